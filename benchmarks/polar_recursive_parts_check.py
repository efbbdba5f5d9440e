"""polar-recursive by parts in the transposed decode kernel on the GPU: correctness of each way of
building the parts, and their times.

For ``KEY_JOIN`` / ``VALUE_JOIN`` (``kernels/polar_recursive_parts.py``: parts joined from
``[tokens, D/16]`` tiles, or built on ``[tokens, D/8]`` tiles with one SFU op per coordinate) and
transposed stages 2 and 3: ``fused_decode_attention`` (transposed kernel forced) against
``reference_decode_attention`` for polar-recursive keys and values, polar-recursive keys with KIVI-2
values and KIVI-2 keys with polar-recursive values, fp16 and bf16, B=2, 32/8 heads, D=128, 2110
packed + 128 residual tokens, ragged mask; then the correct settings timed against fp16 SDPA at
B=8 and 32, 32k tokens (CUDA graphs, ``bench_attention.graph_ms``). Writes ``parts_check.json``.

    PYTHONPATH=src python benchmarks/polar_recursive_parts_check.py OUT_DIR
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels import polar_recursive_parts as pr
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402

dev = "cuda"
B, HQ, HKV, D, TK, R = 2, 32, 8, 128, 2110, 128
PAIRS = [("polar-recursive", "polar-recursive"), ("polar-recursive", "kivi"), ("kivi", "polar-recursive")]
#: (join key parts, join value parts, transposed stages)
SETTINGS = [(True, True, 3), (True, True, 2), (False, False, 3), (False, False, 2), (False, True, 3), (False, True, 2)]


def quantizer(name, role):
    if name == "kivi":
        return kvpolar.quantizer("kivi", bits=2, group_size=32, axis="channel" if role == "k" else "token")
    return kvpolar.quantizer(name)


def check(key_join, value_join, stages):
    pr.KEY_JOIN, pr.VALUE_JOIN = key_join, value_join
    cfg = LaunchConfig(transposed_min_rows=0, transposed_stages=stages)
    rows = []
    for kname, vname in PAIRS:
        for dtype in (torch.float16, torch.bfloat16):
            kq, vq = quantizer(kname, "k"), quantizer(vname, "v")
            args = ba.ragged_case(kq, vq, dtype, dev, B, TK, R)
            want = reference_decode_attention(*args).float()
            got = fused_decode_attention(*args, config=cfg).float()
            rel = ((got - want).norm() / want.norm()).item()
            ok = rel < (5e-3 if dtype == torch.float16 else 3e-2)
            rows.append({"key_join": key_join, "value_join": value_join, "stages": stages, "keys": kname,
                         "values": vname, "dtype": str(dtype), "rel_l2_error": rel, "ok": ok})
            print(f"join keys={key_join!s:5s} values={value_join!s:5s} stages={stages} {kname:15s} {vname:15s} "
                  f"{str(dtype):15s} rel {rel:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def timings(settings):
    rows = []
    for b in (8, 32):
        t = 32768
        scale = D**-0.5

        def sdpa_call(i):
            q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
            k = torch.randn(b, HKV, t, D, device=dev, dtype=torch.float16)
            v = torch.randn_like(k)
            return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        base = ba.graph_ms(sdpa_call, 2 * b * HKV * t * D * 2)
        pk, pv = ba.make_preset("polar-recursive", b, t - ba.RESIDUAL, torch.float16, dev)
        nbytes = pk.nbytes + pv.nbytes
        del pk, pv
        for key_join, value_join, stages in settings:
            pr.KEY_JOIN, pr.VALUE_JOIN = key_join, value_join
            cfg = LaunchConfig(transposed_stages=stages)

            def fused_call(i, cfg=cfg):
                pk, pv = ba.make_preset("polar-recursive", b, t - ba.RESIDUAL, torch.float16, dev)
                q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
                rk = torch.randn(b, HKV, ba.RESIDUAL, D, device=dev, dtype=torch.float16)
                return lambda: fused_decode_attention(q, pk, pv, None, None, rk, torch.randn_like(rk), scale, None, cfg)

            ms = ba.graph_ms(fused_call, nbytes)
            rows.append({"batch": b, "tokens": t, "key_join": key_join, "value_join": value_join, "stages": stages,
                         "median_ms": ms, "sdpa_ms": base, "speedup_vs_sdpa_fp16": base / ms})
            print(f"B={b} T={t} join keys={key_join} values={value_join} stages={stages}: {ms:.4f} ms, "
                  f"sdpa {base:.4f} ms, x{base / ms:.2f}", flush=True)
            torch.cuda.empty_cache()
    return rows


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    checks = [r for s in SETTINGS for r in check(*s)]
    good = [s for s in SETTINGS if all(r["ok"] for r in checks if (r["key_join"], r["value_join"], r["stages"]) == s)]
    print("correct settings:", good)
    times = timings(good)
    with open(os.path.join(out, "parts_check.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "command": " ".join(sys.argv), "checks": checks, "times": times}, f, indent=1)


if __name__ == "__main__":
    main()
