"""GPU check and timing of the polar-recursive Triton kernels (encode, scores) against references.

    PYTHONPATH=src python benchmarks/polar_recursive_kernels.py [out.json]

Decode shape of issue 10: batch 8, 8 KV heads / 32 query heads (GQA 4), 32k tokens, head dim 128,
float16, one query token. Times are medians of triton.testing.do_bench (CUDA events, warm-up).
"""

from __future__ import annotations

import json
import sys

import torch
import triton

import kvpolar
from kvpolar.kernels.polar_recursive_encode import polar_recursive_encode
from kvpolar.kernels.polar_recursive_scores import polar_recursive_scores
from kvpolar.quantizers import polar_recursive as pr

B, HKV, HQ, T, D = 8, 8, 32, 32768, 128


def main(out_path: str | None) -> None:
    torch.manual_seed(0)
    dev = "cuda"
    quant = kvpolar.quantizer("polar-recursive")
    keys = torch.randn(B, HKV, T, D, device=dev, dtype=torch.float16)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.float16)
    folded = q.reshape(B, HKV, HQ // HKV, D)
    ref_p = quant.quantize(keys)
    ker_p = polar_recursive_encode(quant, keys)
    code_match = float((ref_p.codes == ker_p.codes).float().mean())
    radii_equal = bool(torch.equal(ref_p.radii, ker_p.radii))
    ref_s = pr.rotated_scores(folded, ref_p)
    ker_s = polar_recursive_scores(folded, ref_p)
    score_rel = float((ker_s - ref_s).abs().max() / ref_s.abs().max())

    def fp16_scores():
        return folded @ keys.transpose(-1, -2)

    timings = {"fp16 q@K^T (GQA by reshape)": triton.testing.do_bench(fp16_scores)}
    for bt in (32, 64, 128):
        timings[f"polar-recursive scores kernel, block_t={bt}"] = triton.testing.do_bench(
            lambda: polar_recursive_scores(folded, ref_p, block_t=bt))
    timings["polar-recursive scores reference (PyTorch)"] = triton.testing.do_bench(lambda: pr.rotated_scores(folded, ref_p))
    for bn in (16, 32):
        timings[f"polar-recursive encode kernel, block_n={bn}"] = triton.testing.do_bench(
            lambda: polar_recursive_encode(quant, keys, block_n=bn))
    timings["polar-recursive encode reference (PyTorch)"] = triton.testing.do_bench(lambda: quant.quantize(keys))
    result = {
        "command": "PYTHONPATH=src python benchmarks/polar_recursive_kernels.py",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "shape": {"batch": B, "kv_heads": HKV, "q_heads": HQ, "tokens": T, "head_dim": D, "dtype": "float16"},
        "encode_code_bytes_equal_fraction": code_match, "encode_radii_equal": radii_equal,
        "scores_max_rel_error_vs_reference": score_rel,
        "median_ms": timings,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "median_ms"}, indent=1))
    print("| operation | median ms | vs fp16 q@K^T |\n|---|---:|---:|")
    base = timings["fp16 q@K^T (GQA by reshape)"]
    for name, ms in timings.items():
        print(f"| {name} | {ms:.3f} | {ms / base:.2f}x |")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
