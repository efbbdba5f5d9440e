"""polar-recursive's 2-bit angle levels looked up by selects (the library) against evaluated as cubic
polynomials through the codebook's four (cos, sin) entries, in an sm_90 compile on a machine without a
GPU (no device time).

Levels 2-4 of the paper setting store 2-bit angles; the parts kernel turns each code into cos or sin of
its codebook entry with two selects on the code's bits (``polar_recursive_parts.angle_factor``). Four
points fix a cubic, so the same values are ``((c3 t + c2) t + c1) t + c0`` at ``t = code - 3/2``, with
the coefficients computed once per program from the four entries (``_cubic``; exact up to float32
rounding) and ``t`` read into a float's mantissa without a conversion. ``--form polynomial`` replaces
``level_values`` / ``angle_factor`` before anything is compiled; each form compiles in its own process
(Triton compiles a kernel's callees once per process), and the driver prints both.

    PYTHONPATH=src:benchmarks python benchmarks/inspect_level_polynomials.py [--batch 32] [--tokens 32768]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

FORMS = ("selects", "polynomial")


@triton.jit
def _cubic(v0, v1, v2, v3):
    """Coefficients ``(c0, c1, c2, c3)`` of the cubic through ``(t, v)`` at ``t = -3/2, -1/2, 1/2, 3/2``."""
    c0 = (9.0 / 16.0) * (v1 + v2) - (1.0 / 16.0) * (v0 + v3)
    c1 = (9.0 / 8.0) * (v2 - v1) + (1.0 / 24.0) * (v0 - v3)
    c2 = 0.25 * ((v0 + v3) - (v1 + v2))
    c3 = 0.5 * (v1 - v2) + (1.0 / 6.0) * (v3 - v0)
    return c0, c1, c2, c3


@triton.jit
def _level_polynomials(cos_ptr, sin_ptr, ENTRY: tl.constexpr):
    """``level_values``' replacement: the cubics of cos and of sin over a 2-bit level's four entries."""
    a0, a1, a2, a3 = _cubic(tl.load(cos_ptr + ENTRY), tl.load(cos_ptr + ENTRY + 1), tl.load(cos_ptr + ENTRY + 2),
                            tl.load(cos_ptr + ENTRY + 3))
    b0, b1, b2, b3 = _cubic(tl.load(sin_ptr + ENTRY), tl.load(sin_ptr + ENTRY + 1), tl.load(sin_ptr + ENTRY + 2),
                            tl.load(sin_ptr + ENTRY + 3))
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def _polynomial_factor(code, values, SIN: tl.constexpr):
    """``angle_factor``'s replacement: the code (int32 0..3) at mantissa bit 20 of 1.0, so ``8 f - 9.5`` is
    ``code - 3/2`` exactly, then three FMAs."""
    t = ((code << 20) | 0x3F800000).to(tl.float32, bitcast=True) * 8.0 - 9.5
    if SIN:
        out = ((values[7] * t + values[6]) * t + values[5]) * t + values[4]
    else:
        out = ((values[3] * t + values[2]) * t + values[1]) * t + values[0]
    return out


def _report(form: str, batch: int, tokens: int) -> None:
    from kvpolar.kernels import polar_recursive_parts as pr

    if form == "polynomial":
        pr.level_values = _level_polynomials
        pr.angle_factor = _polynomial_factor
    from inspect_attention_sass import loop_lines, report
    from inspect_preset_kernel import compile_preset

    out = tempfile.mkdtemp(prefix=f"kvpolar-levels-{form}-")
    compiled, _ = compile_preset("polar-recursive", batch, tokens)
    print(f"== {form}")
    print(report(compiled, "polar-recursive", out))
    print(loop_lines(os.path.join(out, "polar-recursive.cubin")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--form", choices=FORMS, default=None, help="compile one form (the driver runs both)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32768)
    args = ap.parse_args()
    if args.form is not None:
        _report(args.form, args.batch, args.tokens)
        return
    for form in FORMS:
        subprocess.run([sys.executable, __file__, "--form", form, "--batch", str(args.batch), "--tokens",
                        str(args.tokens)], check=True)


if __name__ == "__main__":
    main()
