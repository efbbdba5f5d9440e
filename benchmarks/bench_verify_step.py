"""Speculative / assisted decoding's verify step: fused decode attention with several query tokens.

A draft of ``k`` tokens is verified in one forward of ``k + 1`` query tokens per sequence, causal
among themselves, over the packed cache and the 16-bit window (which holds them). With GQA 4 that is
``4 (k + 1)`` query rows per KV head. ``LaunchConfig.transposed_max_rows`` (16) sends more rows than
that to the classic kernel, a choice made from the sm_90 compile (the transposed kernel's one warp
spills kilobytes per thread at 84 rows) that this script times. For each preset, batch and number of
query tokens: fp16 SDPA over a 16-bit cache with the same queries and causal mask (what a user has
without kvpolar), and the fused kernel by the policy, forced transposed and forced classic. Every
variant is first checked against ``reference_decode_attention`` (ragged left padding plus the causal
block of the new tokens, fp16 and bf16).

    PYTHONPATH=src python benchmarks/bench_verify_step.py --out $OUT          # on the GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/bench_verify_step.py --smoke   # CPU: checks only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402
from kvpolar.kernels.decode_attention import LaunchConfig, describe_launch, fused_decode_attention  # noqa: E402

HQ, HKV, D, RESIDUAL = ba.HQ, ba.HKV, ba.D, ba.RESIDUAL
VARIANTS = {
    "policy": LaunchConfig(),
    "transposed": LaunchConfig(transposed_max_rows=128),
    "classic": LaunchConfig(transposed=False),
}


def verify_mask(b: int, tq: int, n: int, dev, ragged: bool) -> torch.Tensor:
    """bool ``[b, 1, tq, n]``: query ``i`` (the cache's token ``n - tq + i``) sees tokens up to itself;
    with ``ragged``, sequence ``s`` is left-padded by ``s * n // 7`` tokens."""
    cols = torch.arange(n, device=dev)
    causal = cols[None, :] <= (n - tq + torch.arange(tq, device=dev))[:, None]
    start = torch.tensor([s * n // 7 if ragged else 0 for s in range(b)], device=dev)
    return (causal[None] & (cols[None, None, :] >= start[:, None, None]))[:, None]


def check(name: str, dev, dtype, b: int, tk: int, tq: int, cfg: LaunchConfig) -> dict:
    pk, pv = ba.make_preset(name, b, tk, dtype, dev)
    q = torch.randn(b, HQ, tq, D, device=dev, dtype=dtype)
    r = max(tq, min(RESIDUAL, tk // 4))
    rk = torch.randn(b, HKV, r, D, device=dev, dtype=dtype)
    rv = torch.randn_like(rk)
    mask = verify_mask(b, tq, tk + r, dev, ragged=True)
    want = ba.reference(name, q, pk, pv, rk, rv, D**-0.5, mask)
    out = fused_decode_attention(q, pk, pv, None, None, rk, rv, D**-0.5, mask, cfg).float()
    rel = ((out - want).abs().max() / want.abs().max()).item()
    ok = bool(torch.isfinite(out).all()) and rel < (1e-2 if dtype == torch.float16 else 4e-2)
    return {"preset": name, "batch": b, "tq": tq, "tokens": tk + r, "dtype": str(dtype), "max_rel_error": rel,
            "ok": ok, "kernel": describe_launch(q, pk, pv, cfg)["kernel"]}


def sdpa_maker(b: int, t: int, tq: int, dev):
    def make_call(i):
        q = torch.randn(b, HQ, tq, D, device=dev, dtype=torch.float16)
        k = torch.randn(b, HKV, t, D, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        mask = verify_mask(1, tq, t, dev, ragged=False)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)

    return make_call


def fused_maker(name: str, b: int, tk: int, tq: int, dev, cfg: LaunchConfig):
    def make_call(i):
        pk, pv = ba.make_preset(name, b, tk, torch.float16, dev)
        q = torch.randn(b, HQ, tq, D, device=dev, dtype=torch.float16)
        rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=torch.float16)
        rv = torch.randn_like(rk)
        mask = verify_mask(b, tq, tk + RESIDUAL, dev, ragged=False)
        return lambda: fused_decode_attention(q, pk, pv, None, None, rk, rv, D**-0.5, mask, cfg)

    return make_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="JSON file name (default: verify_step_<gpu>.json)")
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "kivi-4", "squat-2", "polar-rope-3", "turbo-k3v4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--query-tokens", type=int, nargs="+", default=[1, 4, 8, 21])
    ap.add_argument("--check-query-tokens", type=int, nargs="+", default=None,
                    help="query tokens of the checks, each in float16 and bfloat16 (default: 21 in float16, 8 in bfloat16)")
    ap.add_argument("--smoke", action="store_true", help="checks only, at small sizes (CPU with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    checks = []
    for name in args.presets:
        for vname, cfg in VARIANTS.items():
            cases = [(torch.float16, 21), (torch.bfloat16, 8)] if not args.smoke else [(torch.float16, 9)]
            if args.check_query_tokens:
                cases = [(dtype, tq) for tq in args.check_query_tokens for dtype in (torch.float16, torch.bfloat16)]
            for dtype, tq in cases:
                row = check(name, dev, dtype, 2, 40 if args.smoke else 2000, tq,
                            dataclasses.replace(cfg, transposed_min_rows=0))
                checks.append({**row, "variant": vname})
                print(f"check {name:12s} {vname:10s} Tq={tq:2d} {row['dtype']:14s} {row['kernel']:10s} "
                      f"rel err {row['max_rel_error']:.2e} {'ok' if row['ok'] else 'FAIL'}", flush=True)
    rows = []
    if not args.smoke:
        device_name = torch.cuda.get_device_name()
        t, tk = args.tokens, args.tokens - RESIDUAL
        print(f"\n{device_name}: median us per call (CUDA graph, L2 defeated), T={t}")
        print(f"{'preset':12s} {'B':>3s} {'Tq':>3s} {'sdpa-fp16':>10s} " + " ".join(f"{v:>16s}" for v in VARIANTS))
        for b in args.batches:
            for tq in args.query_tokens:
                sdpa = 1000 * ba.graph_ms(sdpa_maker(b, t, tq, dev), 2 * b * HKV * t * D * 2)
                for name in args.presets:
                    times = {v: 1000 * ba.graph_ms(fused_maker(name, b, tk, tq, dev, cfg), b * HKV * t * D)
                             for v, cfg in VARIANTS.items()}
                    rows.append({"preset": name, "batch": b, "tokens": t, "tq": tq, "sdpa_fp16_us": sdpa,
                                 **{f"{v}_us": us for v, us in times.items()}})
                    print(f"{name:12s} {b:3d} {tq:3d} {sdpa:10.1f} "
                          + " ".join(f"{us:8.1f} ({sdpa / us:4.2f}x)" for us in times.values()), flush=True)
        name = args.name or f"verify_step_{ba.gpu_tag(device_name)}.json"
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
                       "command": "python benchmarks/bench_verify_step.py " + " ".join(sys.argv[1:]),
                       "checks": checks, "rows": rows}, f, indent=1)
    failed = [c for c in checks if not c["ok"]]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
