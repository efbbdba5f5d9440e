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

``--time 32x32768 1x131072`` (on a GPU): each form is also checked against the reference at three
shapes (ragged float16, bfloat16 with three query tokens, B=8 / 32k) and timed at the given shapes as
``bench_attention`` times its grid (CUDA-graph medians over copies beyond L2), in the same processes.

    PYTHONPATH=src:benchmarks python benchmarks/inspect_level_polynomials.py [--batch 32] [--tokens 32768]
        [--time 32x32768 1x131072]
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


def _use(form: str) -> None:
    from kvpolar.kernels import polar_recursive_parts as pr

    if form == "polynomial":
        pr.level_values = _level_polynomials
        pr.angle_factor = _polynomial_factor


def _time(form: str, shapes: list[str]) -> None:
    """Check ``form`` against the reference, then time it (GPU)."""
    _use(form)
    import torch

    import bench_attention as ba
    from kvpolar.kernels.decode_attention import fused_decode_attention

    dev = torch.device("cuda")
    torch.manual_seed(0)
    for b, tq, tk, dtype, ragged in ((2, 1, 3001, torch.float16, True), (1, 3, 1000, torch.bfloat16, False),
                                     (8, 1, 32768, torch.float16, True)):
        pk, pv = ba.make_preset("polar-recursive", b, tk, dtype, dev)
        q = torch.randn(b, ba.HQ, tq, ba.D, device=dev, dtype=dtype)
        rk = torch.randn(b, ba.HKV, ba.RESIDUAL, ba.D, device=dev, dtype=dtype)
        rv = torch.randn_like(rk)
        n = tk + ba.RESIDUAL
        mask = None
        if ragged:
            lengths = torch.tensor([n - 7 * i * (n // 20) for i in range(b)], device=dev)
            mask = (torch.arange(n, device=dev)[None, :] >= n - lengths[:, None])[:, None, None, :]
        want = ba.reference("polar-recursive", q, pk, pv, rk, rv, ba.D**-0.5, mask)
        out = fused_decode_attention(q, pk, pv, None, None, rk, rv, ba.D**-0.5, mask).float()
        rel = ((out - want).abs().max() / want.abs().max()).item()
        print(f"{form} check B={b} Tq={tq} N={n} {dtype}: rel err {rel:.2e}", flush=True)
        if not rel < (1e-2 if dtype == torch.float16 else 4e-2):
            raise SystemExit(f"{form}: wrong result (rel err {rel:.2e})")
    for shape in shapes:
        b, t = (int(x) for x in shape.split("x"))
        pk, pv = ba.make_preset("polar-recursive", b, t - ba.RESIDUAL, torch.float16, dev)
        nbytes = pk.nbytes + pv.nbytes
        del pk, pv
        ms = ba.graph_ms(ba.fused_maker("polar-recursive", b, t - ba.RESIDUAL, dev, None), nbytes)
        print(f"{form} time B={b} T={t}: {ms:.4f} ms", flush=True)
        torch.cuda.empty_cache()


def _report(form: str, batch: int, tokens: int) -> None:
    _use(form)
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
    ap.add_argument("--time", nargs="+", default=None, metavar="BxT",
                    help="on a GPU: check each form against the reference and time it at these shapes")
    args = ap.parse_args()
    if args.form is not None:
        if args.time:
            _time(args.form, args.time)
        else:
            _report(args.form, args.batch, args.tokens)
        return
    for form in FORMS:
        extra = ["--time", *args.time] if args.time else []
        subprocess.run([sys.executable, __file__, "--form", form, "--batch", str(args.batch), "--tokens",
                        str(args.tokens), *extra], check=True)


if __name__ == "__main__":
    main()
