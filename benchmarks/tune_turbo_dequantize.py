"""turbo's dequantization kernel: its un-rotation's precision, tokens per product and programs per SM.

Quantizes random normal ``[B, 8, 32768, 128]`` float16 keys with ``turbo`` (4 bits, Hadamard), then
per launch setting of ``kvpolar.kernels.dequantize`` (``TENSOR_CORE_DOT``, ``FORMAT_BLOCK_TOKENS``,
``FORMAT_PROGRAMS_PER_SM``) times ``dequantize_into`` (CUDA events, median of 10) and checks it
against the quantizer's PyTorch ``dequantize`` (one float16 rounding of each entry plus float32's
error on the largest); the PyTorch time last. On a GPU only:

    PYTHONPATH=src python benchmarks/tune_turbo_dequantize.py
"""

import sys

import torch

sys.path.insert(0, "benchmarks")
import bench_dequantize as bd  # noqa: E402

import kvpolar  # noqa: E402
from kvpolar.kernels import dequantize as K  # noqa: E402

SETTINGS = [("tf32x3", 64, 4), ("tf32x3", 32, 4), ("tf32x3", 128, 4), ("tf32x3", 64, 2), ("tf32x3", 64, 8),
            ("tf32", 64, 4), ("ieee", 32, 1000)]


def main() -> None:
    q = kvpolar.quantizer("turbo", bits=4)
    print(torch.cuda.get_device_name())
    for batch in (1, 8):
        x = torch.randn(batch, 8, 32768, 128, device="cuda", dtype=torch.float16)
        p = q.quantize(x)
        ref = q.dequantize(p).float()
        out = torch.empty_like(x)
        for dot, block, per_sm in SETTINGS:
            K.TENSOR_CORE_DOT, K.FORMAT_BLOCK_TOKENS, K.FORMAT_PROGRAMS_PER_SM = dot, block, per_sm
            try:
                K.dequantize_into(p, out)
            except Exception as err:  # e.g. shared memory
                print(f"B={batch} {dot:7s} block {block:3d} per SM {per_sm}: {type(err).__name__} {str(err)[:100]}")
                continue
            err = (out.float() - ref).abs()
            tol = torch.finfo(torch.float16).eps * ref.abs() + 2.0**-20 * ref.abs().max()
            ms = bd._median_ms(lambda: K.dequantize_into(p, out), 10, "cuda")
            print(f"B={batch} {dot:7s} block {block:3d} per SM {per_sm:4d}: {ms:7.3f} ms, max err "
                  f"{err.max().item():.2e}, within tolerance: {bool((err <= tol).all())}", flush=True)
        print(f"B={batch} PyTorch dequantize: {bd._median_ms(lambda: q.dequantize(p), 10, 'cuda'):.3f} ms", flush=True)


if __name__ == "__main__":
    main()
