"""Transposed vs classic split kernel of fused decode attention: checks, then GPU times side by side.

(``classic`` = ``LaunchConfig(transposed=False)``; the other variants run the transposed kernel for
KIVI keys and for polar-rope keys of 2/4/6/8 bits per pair.)

One device call: correctness of both kernels against ``reference_decode_attention`` (the
bench_attention checks plus every variant at a ragged bf16 shape), then CUDA-graph medians (inputs
rotated beyond L2, see ``bench_attention.graph_ms``) of fp16 SDPA, the classic kernel and a few
launch configurations of the transposed kernel, for kivi-2 and kivi-4. Writes JSON to ``--out``
and prints a table last.

Usage: ``PYTHONPATH=src python benchmarks/tune_attention_t.py --out $OUT [--presets kivi-2 polar-rope-3]
[--variants classic t-n32] [--check-variants policy] [--shapes 32x32768] [--name FILE.json] [--window-by-kv-head off]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402
from kvpolar.kernels import decode_attention  # noqa: E402
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention  # noqa: E402

CLASSIC = LaunchConfig(block_n=64, num_warps=4, num_stages=2, transposed=False)
VARIANTS = {  # (as measured in results/attention_transposed*_h100.json; pps = programs per SM)
    # Variants leaving max_registers / transposed_programs_per_sm unset now get the launch policy
    # (decode_attention.transposed_tuning) for them; the JSON of each run records the configs it used.
    "policy": LaunchConfig(),  # the defaults
    "t-min0": LaunchConfig(transposed_min_rows=0),  # the defaults, with small caches let into the transposed kernel
    "classic": CLASSIC,
    "t-w2-s2": LaunchConfig(transposed_warps=2, transposed_stages=2, transposed_programs_per_sm=4),
    "t-w2-s3-pps8": LaunchConfig(transposed_warps=2, transposed_stages=3, transposed_programs_per_sm=8),
    "t-w2-s2-pps8": LaunchConfig(transposed_warps=2, transposed_stages=2, transposed_programs_per_sm=8),
    "t-w4-s2": LaunchConfig(transposed_warps=4, transposed_stages=2, transposed_programs_per_sm=4),
    "t-w1-s2-pps8": LaunchConfig(transposed_stages=2, transposed_programs_per_sm=8),  # the first sweep's best
    # register caps: fewer registers per thread, more resident one-warp programs per SM
    "t-w1-pps12-r168": LaunchConfig(transposed_stages=2, transposed_programs_per_sm=12, max_registers=168),
    "t-w1-pps16-r128": LaunchConfig(transposed_stages=2, transposed_programs_per_sm=16, max_registers=128),
    "t-w1-s3-pps12": LaunchConfig(transposed_stages=3, transposed_programs_per_sm=12),  # the default now
    # third sweep: the register cap with 3 stages, and 16 programs per SM without a cap
    "t-s3-pps16": LaunchConfig(transposed_stages=3, transposed_programs_per_sm=16),
    "t-s3-pps16-r128": LaunchConfig(transposed_stages=3, transposed_programs_per_sm=16, max_registers=128),
    "t-s3-pps32-r96": LaunchConfig(transposed_stages=3, transposed_programs_per_sm=32, max_registers=96),
    "t-w1-bn16-pps8": LaunchConfig(block_n=16, transposed_stages=2, transposed_programs_per_sm=8),
    # polar-rope keys (group 128): the block is min(block_n, 128) tokens (measured with 2 stages, 8 pps)
    "t-n32": LaunchConfig(block_n=32, transposed_stages=2, transposed_programs_per_sm=8),
    "t-n32-pps16": LaunchConfig(block_n=32, transposed_stages=2, transposed_programs_per_sm=16),
    "t-n64-w2": LaunchConfig(block_n=64, transposed_warps=2, transposed_stages=2, transposed_programs_per_sm=8),
    # polar-recursive by parts (fourth session): 2 stages (205 registers in sm_90 compiles, 3 stages: 255)
    "t-s2": LaunchConfig(transposed_stages=2),
    "t-s2-pps16": LaunchConfig(transposed_stages=2, transposed_programs_per_sm=16),
    # sixth session: register caps under the one-wave split policy (programs per SM from the compiled kernel)
    "t-s3-r168": LaunchConfig(max_registers=168),
    "t-s3-r144": LaunchConfig(max_registers=144),
    # seventh session: every load of the loop asynchronous or read a block ahead; which register budget now
    "t-s3-r255": LaunchConfig(max_registers=255),  # no cap: programs per SM from the compiled kernel
    "t-s3-r128": LaunchConfig(max_registers=128),  # 16 programs per SM
    "vm-gather": LaunchConfig(value_metadata="gather"),  # KIVI value metadata gathered per unit where used
    "vm-gather-r128": LaunchConfig(value_metadata="gather", max_registers=128),
    "vm-ahead": LaunchConfig(value_metadata="ahead"),
    # eighth session (prepared, not yet run): codes in 3-byte units read as int32 words, three per four
    # units (sm_90 compile: polar-rope-3 1941 instead of 2005 instructions per block, turbo-3 2251
    # instead of 2361, no load of either loop waited for)
    "u3-words": LaunchConfig(three_byte_units="words"),
    # ninth session (prepared, not yet run): KIVI value scale / min stored with the tokens adjacent (the
    # quantizer's layout since then, read as "tiles"; sm_90 compile: kivi-2 1056 instead of 1211
    # instructions per block, kivi-4 1246 instead of 1441) against the earlier layout, groups adjacent
    "vm-groups": LaunchConfig(),  # the policy, values re-laid out by LAYOUTS below
    "vm-groups-u3": LaunchConfig(three_byte_units="words"),  # (u3-words above: with the stored layout)
    # eleventh session: "words" became the default reading of 3-byte units; this is the earlier one
    "u3-halfwords": LaunchConfig(three_byte_units="halfwords"),
    # the kernels wait more than they issue (8 one-warp programs per SM at 231-255 registers): a fourth
    # stage of loads in flight (kivi-2: 238 registers, shared 11 KB), with and without the cap (timed with
    # t-s3-r168 / t-s3-r128 in results/caps_h200.json: only kivi-2 gained, from the cap)
    "t-s4": LaunchConfig(transposed_stages=4),
    "t-s4-r168": LaunchConfig(transposed_stages=4, max_registers=168),
    # twelfth session: 2- and 4-bit KIVI codes read as 16-bit units, one AND per two codes (sm_90 compile,
    # B=32/32k: kivi-2 1085 -> 765 instructions per block at the 168-register cap)
    # (results/halfwords_h200.json; "halfwords" then became the default, "kivi-bytes" is the earlier reading)
    "kivi-halfwords": LaunchConfig(kivi_code_units="halfwords"),
    "kivi-halfwords-r255": LaunchConfig(kivi_code_units="halfwords", max_registers=255),
    "kivi-halfwords-r128": LaunchConfig(kivi_code_units="halfwords", max_registers=128),
    "kivi-bytes": LaunchConfig(kivi_code_units="bytes"),
    # the running output sums rescaled only in blocks where a row's maximum grew (sm_90 compile, kivi-2:
    # the 40 multiplies of every block's rescaling move into a branch)
    "lazy-rescale": LaunchConfig(lazy_rescale=True),
    # sixteenth session: KIVI keys' score bias added after the key products instead of being their first
    # accumulator (sm_90 compile, kivi-2: 709 -> 721 instructions per block, a shorter dependency chain);
    # 2-4% faster on the H200 (results/kivi_step_h200_r*.json, when "policy" was "first"), the default
    # since; "kivi-bias-first" is the form it replaced
    "kivi-bias-last": LaunchConfig(kivi_key_bias="last"),
    "kivi-bias-first": LaunchConfig(kivi_key_bias="first"),
    # seventeenth session: KIVI values' minimum as its own product, each code pair one fma; 0-3% faster on the
    # H100 in the eighteenth (results/kivi_value_min_h100_r*.json), not the default (float16's range)
    "kivi-value-min-product": LaunchConfig(kivi_value_min="product"),
    # fourteenth session: polar-recursive codes and radii stored with the tokens adjacent (every loop load
    # an asynchronous copy; sm_90 compile: 5748 -> 4448 instructions per block); "pr-rows" re-lays them
    # out a row per token, as stored before, with the key tiles of then ("columns")
    "pr-rows": LaunchConfig(polar_recursive_keys="columns"),
    # the levels above the leaves once per subtree in key parts (sm_90 compile: 4448 -> 3695 instructions
    # per block); checked and timed on the H100 in the fifteenth session (results/pr_layout_h100.json,
    # pr_rows_subtrees_h100.json), the default since; "pr-columns" is the form it replaced
    "pr-subtrees": LaunchConfig(polar_recursive_keys="subtrees"),
    "pr-columns": LaunchConfig(polar_recursive_keys="columns"),
    "pr-rows-subtrees": LaunchConfig(polar_recursive_keys="subtrees"),  # the subtrees form on the row layout
    # thirty-seventh session: the merge of the splits as a dependent launch (on Hopper by default at small
    # batches since the thirty-eighth: decode_attention.dependent_launch_policy); this is the plain launch
    # after the split kernel, as before
    "no-dependent-launch": LaunchConfig(dependent_launch=False),
    "dependent-launch": LaunchConfig(dependent_launch=True),  # at every batch (the policy: small batches only)
    # thirty-eighth session: the split programs signal after their block loop rather than at their start
    "dependent-launch-after-loop": LaunchConfig(dependent_launch=True, dependent_launch_signal="after-loop"),
}
#: Variants that time the stored tensors in another layout (a function applied to the packed keys and
#: values before the variant runs); the others read them as stored.
LAYOUTS = {"vm-groups": ba.groups_adjacent, "vm-groups-u3": ba.groups_adjacent, "pr-rows": ba.rows_per_token,
           "pr-rows-subtrees": ba.rows_per_token}


def check_variants(dev, presets, variants):
    rows = []
    for name in presets:
        for dtype, ragged, tq in ((torch.float16, False, 1), (torch.bfloat16, True, 1), (torch.float16, True, 3)):
            b, tk = 3, 2001
            stored_pk, stored_pv = ba.make_preset(name, b, tk, dtype, dev)
            n = tk + ba.RESIDUAL
            q, rk, rv, mask = ba.check_inputs(b, tq, tk, dtype, dev, [n, n - 700, 5] if ragged else None)
            want = ba.reference(name, q, stored_pk, stored_pv, rk, rv, ba.D**-0.5, mask)
            for vname in variants:
                layout = LAYOUTS.get(vname, lambda p: p)
                pk, pv = layout(stored_pk), layout(stored_pv)
                cfg = VARIANTS[vname]
                if cfg.transposed:  # these small caches would take the classic kernel (transposed_min_rows)
                    cfg = dataclasses.replace(cfg, transposed_min_rows=0)
                try:
                    out = fused_decode_attention(q, pk, pv, None, None, rk, rv, ba.D**-0.5, mask, cfg).float()
                    torch.cuda.synchronize()
                    rel = ((out - want).norm() / want.norm()).item()
                    ok = bool(torch.isfinite(out).all()) and rel < (5e-3 if dtype == torch.float16 else 3e-2)
                except Exception as e:  # noqa: BLE001
                    print(f"check {name} {vname}: {type(e).__name__}: {str(e)[-400:]}")
                    rel, ok = float("nan"), False
                rows.append({"preset": name, "variant": vname, "dtype": str(dtype), "tq": tq, "ragged": ragged,
                             "rel_l2_error": rel, "ok": ok})
                print(f"check {name} {vname:14s} {str(dtype):15s} tq={tq} ragged={ragged!s:5s} rel {rel:.2e} {'ok' if ok else 'FAIL'}")
    return rows


def time_all(dev, shapes, copy_gbs, variants, presets):
    rows = []
    for b, t in shapes:
        tk = t - ba.RESIDUAL
        q_bytes = 2 * b * ba.HQ * ba.D * 2
        res_bytes = 2 * b * ba.HKV * ba.RESIDUAL * ba.D * 2

        nbytes = 2 * b * ba.HKV * t * ba.D * 2 + q_bytes
        base = ba.graph_ms(ba.sdpa_maker(b, t, dev), nbytes)
        rows.append({"batch": b, "tokens": t, "method": "sdpa-fp16", "median_ms": base, "bytes": nbytes})
        torch.cuda.empty_cache()
        for name in presets:
            pk, pv = ba.make_preset(name, b, tk, torch.float16, dev)
            nbytes = pk.nbytes + pv.nbytes + res_bytes + q_bytes
            del pk, pv
            for vname in variants:
                try:
                    ms = ba.graph_ms(ba.fused_maker(name, b, tk, dev, VARIANTS[vname], LAYOUTS.get(vname)), nbytes)
                except Exception as e:  # noqa: BLE001
                    print(f"time {name} {vname}: {type(e).__name__}: {str(e)[-300:]}")
                    ms = None
                rows.append({"batch": b, "tokens": t, "method": f"{name}:{vname}", "median_ms": ms, "bytes": nbytes})
                torch.cuda.empty_cache()
        for r in rows:
            if r["batch"] == b and r["tokens"] == t and r["median_ms"]:
                r["speedup_vs_sdpa_fp16"] = base / r["median_ms"]
                r["copy_bw_fraction"] = r["bytes"] / r["median_ms"] / 1e6 / copy_gbs
        print(" ".join(f"{r['method']}={r['median_ms'] or float('nan'):.4f}" for r in rows if r["batch"] == b and r["tokens"] == t), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "kivi-4"], help="presets of bench_attention.PRESETS")
    ap.add_argument("--name", default="attention_transposed_h100.json", help="JSON file name under --out")
    ap.add_argument("--check-variants", nargs="+", default=None,
                    help="variants to check against the reference (default: all timed; register caps do not change results)")
    ap.add_argument("--shapes", nargs="+", default=["1x4096", "1x32768", "1x131072", "8x4096", "8x32768", "32x4096", "32x32768"])
    ap.add_argument("--no-preset-checks", action="store_true",
                    help="skip bench_attention's checks of every preset (a run that times one preset's variants)")
    ap.add_argument("--window-by-kv-head", choices=("on", "off"), default=None,
                    help="decode_attention.WINDOW_BY_KV_HEAD, as bench_attention.py takes it (off: a folded window "
                         "is attended by one program per query row at every batch)")
    args = ap.parse_args()
    if args.window_by_kv_head is not None:
        decode_attention.WINDOW_BY_KV_HEAD = args.window_by_kv_head == "on"
    dev = torch.device("cuda")
    torch.manual_seed(0)
    t0 = time.time()
    props = torch.cuda.get_device_properties(dev)
    checks = ([] if args.no_preset_checks else ba.check_correctness(dev)) + check_variants(dev, args.presets, args.check_variants or args.variants)
    copy_gbs = ba.copy_bandwidth(dev)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape in shapes:  # (written after every shape: a cut-off run keeps what it measured)
        rows += time_all(dev, [shape], copy_gbs, args.variants, args.presets)
        meta = {"gpu": props.name, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "window_by_kv_head": decode_attention.WINDOW_BY_KV_HEAD,
                "variants": {k: dataclasses.asdict(v) for k, v in VARIANTS.items()}, "copy_gb_per_s": copy_gbs,
                "layouts": {k: f.__name__ for k, f in LAYOUTS.items()},  # (else: as stored)
                "elapsed_s": time.time() - t0}
        with open(os.path.join(args.out, args.name), "w") as f:
            json.dump({"meta": meta, "checks": checks, "results": rows}, f, indent=1)
    print(f"\n{props.name} copy {copy_gbs:.0f} GB/s, {time.time() - t0:.0f} s; checks ok: {all(c['ok'] for c in checks)}")
    for c in checks:
        if not c["ok"]:
            print("FAILED", c)
    print(f"{'B':>3} {'T':>7} {'method':22s} {'ms':>8} {'x sdpa':>7} {'%copy':>6}")
    for r in rows:
        if r["median_ms"]:
            print(f"{r['batch']:>3} {r['tokens']:>7} {r['method']:22s} {r['median_ms']:8.4f} {r.get('speedup_vs_sdpa_fp16', 0):7.2f} {100 * r.get('copy_bw_fraction', 0):6.1f}")


if __name__ == "__main__":
    main()
