"""Host (Python) time of one ``fused_decode_attention`` call, without launching any kernel.

A decode step of a ``transformers`` model calls the fused attention once per layer, and the eager
step is bound by host time (benchmarks/README.md, end to end), so the library's own Python per
call counts. This runs on the CPU machine: the packed cache is built on the CPU
(``bench_attention.make_preset``), the launch planning sees the GPU's view of the world (132 SMs,
compiled kernels), and the Triton kernels are replaced by stand-ins that accept the launch and do
nothing (returning a stand-in compiled kernel, so the split kernels' bound launches bind and
relaunch as on a GPU). So it measures kvpolar's planning and argument building, not Triton's
launcher or the GPU.
Best of ``--repeats`` runs of ``--calls`` calls, microseconds per call.

    PYTHONPATH=src:benchmarks python benchmarks/host_cost.py [--presets kivi-2 polar-rope-3 turbo-4]
        [--batch 4] [--tokens 4096] [--residual 70]
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from bench_attention import HKV, HQ, D, make_preset
from kvpolar.kernels import bound_launch
from kvpolar.kernels import decode_attention as mod


class _NoCompiled:
    """Stands in for a compiled kernel: ``compiled[grid](*values)`` returns at once (so the library's
    bound launches, ``kvpolar.kernels.bound_launch``, bind and relaunch as on a GPU)."""

    run = function = packed_metadata = None

    def __getitem__(self, grid):
        return lambda *values: None


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args)`` returns a ``_NoCompiled`` at once; no
    compiled kernel to ask for its residency (``_transposed_residency`` then keeps the measured policy)."""

    def __init__(self, kernel):
        self.fn = kernel.fn  # (its parameters: what a bound launch binds the arguments to)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _NoCompiled()

    def warmup(self, *args, **kwargs):
        raise AttributeError("no compiled kernel here")


def best_us(call, calls: int, repeats: int) -> float:
    """Fewest microseconds per call over ``repeats`` runs of ``calls`` calls (after one warm-up)."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "polar-rope-3", "turbo-4"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096, help="packed tokens per sequence")
    ap.add_argument("--residual", type=int, default=70, help="16-bit residual-window tokens (0: none)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    patches = [mock.patch.object(mod, "_interpreting", lambda: False),
               mock.patch.object(mod, "_device_sms", lambda device: 132),
               mock.patch.object(bound_launch, "_current_device", lambda: 0),
               mock.patch.object(mod, "_WINDOW_LAUNCHES", {}),
               mock.patch.object(mod, "_COMBINE_LAUNCHES", {}),
               *(mock.patch.object(mod, name, _NoLaunch(getattr(mod, name)))
                 for name in ("_split_kernel_t", "_split_kernel", "_combine_kernel", "_window_combine_kernel",
                              "_kv_head_window_combine_kernel"))]
    for patch in patches:
        patch.start()
    try:
        print(f"fused_decode_attention, Python per call without launches (B={args.batch}, {HQ}/{HKV} heads, "
              f"D={D}, {args.tokens} packed + {args.residual} residual tokens):")
        for name in args.presets:
            keys, values = make_preset(name, args.batch, args.tokens, torch.float16, "cpu")
            query = torch.randn(args.batch, HQ, 1, D, dtype=torch.float16)
            rk = torch.randn(args.batch, HKV, args.residual, D, dtype=torch.float16) if args.residual else None
            rv = torch.randn_like(rk) if args.residual else None
            us = best_us(lambda: mod.fused_decode_attention(query, keys, values, None, None, rk, rv, D**-0.5),
                         args.calls, args.repeats)
            print(f"  {name:14s} {us:7.1f} us")
    finally:
        for patch in patches:
            patch.stop()


if __name__ == "__main__":
    main()
