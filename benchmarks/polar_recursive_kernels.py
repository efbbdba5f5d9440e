"""GPU check and timing of the polar-recursive Triton kernels (encode, scores) against references.

    PYTHONPATH=src python benchmarks/polar_recursive_kernels.py [out.json] [--shapes BxT ...]

Checks at the first shape (codes and scores against the PyTorch references), then times, per shape
(default: the polar-rope scores benchmark's grid, batch 1 and 8 x 4k, 32k, 128k tokens), with 8 KV
heads / 32 query heads (GQA 4), head dim 128, float16, one query token: the fp16 GQA-aware
``q @ K^T`` (query heads folded onto their KV head), the scores kernel at a few block sizes, the
PyTorch reference scores, and the encode kernel against the PyTorch quantizer. Times are medians of
triton.testing.do_bench (CUDA events, warm-up).
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

import kvpolar
from kvpolar.kernels.polar_recursive_encode import polar_recursive_encode
from kvpolar.kernels.polar_recursive_scores import polar_recursive_scores
from kvpolar.quantizers import polar_recursive as pr

HKV, HQ, D = 8, 32, 128
SHAPES = ("1x4096", "1x32768", "1x131072", "8x4096", "8x32768", "8x131072")


def check(quant, b: int, t: int) -> dict:
    keys = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.float16)
    folded = q.reshape(b, HKV, HQ // HKV, D)
    ref_p = quant.quantize(keys)
    ker_p = polar_recursive_encode(quant, keys)
    ref_s = pr.rotated_scores(folded, ref_p)
    ker_s = polar_recursive_scores(folded, ref_p)
    return {"shape": f"{b}x{t}", "encode_code_bytes_equal_fraction": float((ref_p.codes == ker_p.codes).float().mean()),
            "encode_radii_max_rel_diff": float(((ref_p.radii.float() - ker_p.radii.float()).abs().max()
                                                / ref_p.radii.float().abs().max())),
            "scores_max_rel_error_vs_reference": float((ker_s - ref_s).abs().max() / ref_s.abs().max())}


def time_shape(quant, b: int, t: int) -> dict[str, float]:
    keys = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.float16)
    q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.float16)
    folded = q.reshape(b, HKV, HQ // HKV, D)
    p = polar_recursive_encode(quant, keys)
    timings = {"fp16 q@K^T (GQA by reshape)": triton.testing.do_bench(lambda: folded @ keys.transpose(-1, -2))}
    for bt in (16, 32):
        timings[f"scores kernel, block_t={bt}"] = triton.testing.do_bench(
            lambda: polar_recursive_scores(folded, p, block_t=bt))
    if b * t <= 8 * 32768:  # the PyTorch reference materialises fp32 keys
        timings["scores reference (PyTorch)"] = triton.testing.do_bench(lambda: pr.rotated_scores(folded, p))
    timings["encode kernel, block_n=16"] = triton.testing.do_bench(lambda: polar_recursive_encode(quant, keys, block_n=16))
    if b * t <= 8 * 32768:
        timings["encode reference (PyTorch)"] = triton.testing.do_bench(lambda: quant.quantize(keys))
    return timings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    quant = kvpolar.quantizer("polar-recursive")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    checks = check(quant, 2, 4099)
    rows = []
    for b, t in shapes:
        for name, ms in time_shape(quant, b, t).items():
            rows.append({"batch": b, "tokens": t, "operation": name, "median_ms": ms})
        torch.cuda.empty_cache()
    result = {
        "command": "PYTHONPATH=src python benchmarks/polar_recursive_kernels.py OUT --shapes " + " ".join(args.shapes),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "heads": {"kv_heads": HKV, "q_heads": HQ, "head_dim": D, "dtype": "float16", "query_tokens": 1},
        "checks": checks, "results": rows,
    }
    print(json.dumps(checks, indent=1))
    print("| B | T | operation | median ms | vs fp16 q@K^T |\n|---:|---:|---|---:|---:|")
    for b, t in shapes:
        sel = [r for r in rows if (r["batch"], r["tokens"]) == (b, t)]
        base = sel[0]["median_ms"]
        for r in sel:
            print(f"| {b} | {t} | {r['operation']} | {r['median_ms']:.3f} | {r['median_ms'] / base:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
