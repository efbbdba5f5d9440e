"""What the un-rotation costs in the dequantization kernel of the rotated formats (turbo, polar-recursive).

``kvpolar.kernels.dequantize`` rebuilds a rotated format's vectors in their stored basis and un-rotates
them: for a randomized Hadamard rotation (the presets') as three exact bfloat16 terms times the +-1
matrix (``dequantize.HADAMARD_BFLOAT16``), else by one tf32x3 product with the dense float32 ``D x D``
matrix (``decode_formats.rotation_matrix``). This script times the kernel as it runs, with the dense matrix
instead (``HADAMARD_BFLOAT16`` off), and with no un-rotation (the kernel compiled without one: the
result is then in the stored basis), per preset and role, on random normal ``[B, 8, T, 128]`` tensors,
CUDA events, median of ``--repeats``; for scale also PyTorch products of the same ``[B * 8 * T, 128]``
rows with the matrix in float32 and in float16.

    PYTHONPATH=src python benchmarks/unrotation_cost.py [--presets polar-recursive turbo-4] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_dequantize import _median_ms, role_quantizer  # noqa: E402


def measure(preset: str, batch: int, tokens: int, repeats: int) -> list[dict]:
    from kvpolar.kernels import decode_formats as formats
    from kvpolar.kernels import dequantize

    rows = []
    for role in ("keys", "values"):
        _, quantizer = role_quantizer(preset, role)
        p = quantizer.quantize(torch.randn(batch, 8, tokens, 128, device="cuda", dtype=torch.float16))
        matrix = formats.rotation_matrix(p)
        if matrix is None or not dequantize.supports(p):
            continue
        out = torch.empty(tuple(p.shape), device="cuda", dtype=torch.float16)
        with_unrotation = _median_ms(lambda: dequantize.dequantize_into(p, out), repeats, "cuda")
        saved = dequantize.HADAMARD_BFLOAT16
        dequantize.HADAMARD_BFLOAT16 = False
        try:
            dense = _median_ms(lambda: dequantize.dequantize_into(p, out), repeats, "cuda")
        finally:
            dequantize.HADAMARD_BFLOAT16 = saved
        real = dequantize._unrotation
        dequantize._unrotation = lambda p: (None, None, 0)  # the kernel compiled without an un-rotation
        try:
            without = _median_ms(lambda: dequantize.dequantize_into(p, out), repeats, "cuda")
        finally:
            dequantize._unrotation = real
        flat = out.view(-1, 128)
        fp32 = _median_ms(lambda: flat.float() @ matrix, repeats, "cuda")
        fp16 = _median_ms(lambda: flat @ matrix.half(), repeats, "cuda")
        rows.append({"preset": preset, "role": role, "format": type(p).__name__, "batch": batch, "tokens": tokens,
                     "kernel_ms": with_unrotation, "kernel_dense_tf32x3_ms": dense,
                     "kernel_without_unrotation_ms": without,
                     "torch_fp32_product_ms": fp32, "torch_fp16_product_ms": fp16})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["polar-recursive", "turbo-4"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    rows = [row for preset in args.presets for row in measure(preset, args.batch, args.tokens, args.repeats)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"{torch.cuda.get_device_name()}, B={args.batch}, T={args.tokens}, 8 heads, D=128, ms")
    print("| preset | role | kernel | dense R, tf32x3 | without the un-rotation | share | torch fp32 product | "
          "torch fp16 product |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        share = 1 - r["kernel_without_unrotation_ms"] / r["kernel_ms"]
        print(f"| {r['preset']} | {r['role']} | {r['kernel_ms']:.3f} | {r['kernel_dense_tf32x3_ms']:.3f} | "
              f"{r['kernel_without_unrotation_ms']:.3f} | "
              f"{share:.0%} | {r['torch_fp32_product_ms']:.3f} | {r['torch_fp16_product_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
