"""polar-recursive's 2-bit angle levels evaluated as cubics (the library since the thirty-third session)
against looked up by two selects on the code's bits (the form they replaced): sm_90 instruction counts
on a machine without a GPU, or checks and times on one.

Levels 2-4 of the paper setting store 2-bit angles; the parts kernel turns each code into cos or sin of
its codebook entry. Four points fix a cubic, so ``polar_recursive_parts.angle_factor`` evaluates
``((c3 t + c2) t + c1) t + c0`` at ``t = code - 3/2`` with the coefficients computed once per program
(``level_values``); ``--form selects`` puts the earlier ``level_values`` / ``angle_factor`` (the four
entries, two selects) back before anything is compiled. Each form runs in its own process (Triton
compiles a kernel's callees once per process); the driver runs both and prints what each printed.

``--time 32x32768 1x131072`` (on a GPU): each form is checked against the reference at three shapes
(ragged float16, bfloat16 with three query tokens, B=8 / 32k) and timed at the given shapes as
``bench_attention`` times its grid (CUDA-graph medians over copies beyond L2).

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

FORMS = ("cubic", "selects")


@triton.jit
def _select_values(cos_ptr, sin_ptr, ENTRY: tl.constexpr):
    """The earlier ``level_values``: cos and sin of the four entries, 8 float32 scalars."""
    return (tl.load(cos_ptr + ENTRY), tl.load(cos_ptr + ENTRY + 1), tl.load(cos_ptr + ENTRY + 2),
            tl.load(cos_ptr + ENTRY + 3), tl.load(sin_ptr + ENTRY), tl.load(sin_ptr + ENTRY + 1),
            tl.load(sin_ptr + ENTRY + 2), tl.load(sin_ptr + ENTRY + 3))


@triton.jit
def _select_factor(word, SHIFT: tl.constexpr, values, SIN: tl.constexpr, NATIVE: tl.constexpr):
    """The earlier ``angle_factor``: two selects on the bits of code ``(word >> SHIFT) & 3``."""
    code = word >> SHIFT
    hi = (code & 2) != 0
    lo = (code & 1) != 0
    if SIN:
        out = tl.where(hi, tl.where(lo, values[7], values[6]), tl.where(lo, values[5], values[4]))
    else:
        out = tl.where(hi, tl.where(lo, values[3], values[2]), tl.where(lo, values[1], values[0]))
    return out


def use_form(form: str) -> None:
    """Put ``form``'s ``level_values`` / ``angle_factor`` in place (before anything is compiled in this
    process): "selects" the earlier ones, "cubic" leaves the library's (also ``profile_attention.py --levels``)."""
    from kvpolar.kernels import polar_recursive_parts as pr

    if form == "selects":
        pr.level_values = _select_values
        pr.angle_factor = _select_factor


def _time(form: str, shapes: list[str]) -> None:
    """Check ``form`` against the reference, then time it (GPU)."""
    use_form(form)
    import torch

    import bench_attention as ba

    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"== {form}", flush=True)
    for b, tq, tk, dtype, ragged in ((2, 1, 3001, torch.float16, True), (1, 3, 1000, torch.bfloat16, False),
                                     (8, 1, 32768, torch.float16, True)):
        row = ba.check_case("polar-recursive", b, tq, tk, dtype, ragged, None, dev)
        if row is None or not row["ok"]:
            raise SystemExit(f"{form}: wrong result (the check above)")
    for shape in shapes:
        b, t = (int(x) for x in shape.split("x"))
        print(f"{form} time B={b} T={t}: {ba.preset_graph_ms('polar-recursive', b, t, dev, None):.4f} ms", flush=True)
        torch.cuda.empty_cache()


def _report(form: str, batch: int, tokens: int) -> None:
    use_form(form)
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
