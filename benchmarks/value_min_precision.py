"""Error of the fused decode attention over a KIVI cache against the float64 oracle, KIVI values'
minimum applied elementwise (the default) or as a product (``LaunchConfig.kivi_value_min``), for
float16 values scaled down until their group scales fall below ``2**-9`` (where ``F * scale`` is
subnormal: ``kivi_parts.value_fma_factor``).

Usage (repository root, CPU): ``TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/value_min_precision.py``.
Keys and values ``[2, 1, 160, 128]`` (kivi-2, 32-token key groups, 32-channel value groups), 4 query heads.
The oracle and the stored formats are the kernel tests' (``tests/test_kernels_decode_attention.py``).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import test_kernels_decode_attention as checks  # noqa: E402
from kvpolar.decode_attention import reference_decode_attention  # noqa: E402
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention  # noqa: E402


def main() -> None:
    scale = 128 ** -0.5
    print("| value magnitude | largest output | float16 reference's error | elementwise | product |")
    print("|---:|---:|---:|---:|---:|")
    for magnitude in (1.0, 1e-2, 1e-3, 1e-4):
        k, v, q = checks.random_inputs(("value-min precision", magnitude), batch=2, hkv=1, gqa=4, tq=1, n=160,
                                       d=128, dtype=torch.float16)
        v = (v.float() * magnitude).half()
        kq, pk = checks.make_keys("kivi-2-32", k)
        vq, pv = checks.make_values("kivi-2-32", v)
        want = checks.oracle(q, pk, pv, None, None, scale, None)
        ref = reference_decode_attention(q, pk, pv, kq, vq, None, None, scale, None)
        errors = []
        for form in ("elementwise", "product"):
            cfg = LaunchConfig(kivi_value_min=form, transposed_min_rows=0)
            out = fused_decode_attention(q, pk, pv, kq, vq, None, None, scale, None, cfg).double()
            errors.append((out - want).abs().max().item())
        print(f"| {magnitude:g} | {want.abs().max().item():.2e} | {(ref.double() - want).abs().max().item():.2e} | "
              f"{errors[0]:.2e} | {errors[1]:.2e} |")


if __name__ == "__main__":
    main()
