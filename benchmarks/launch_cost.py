"""Host time of one decode-attention call on CUDA, and how much of it Triton's dispatcher takes.

A batch-1 decode step of a ``transformers`` model is bound by host time (benchmarks/README.md, end to
end): kvpolar's step took about 0.3 ms per layer more than fp16 with SDPA's flash backend. This
script splits that per-layer cost on the GPU machine itself. Each row is the wall-clock time of
``--calls`` back-to-back calls divided by their number (median of ``--repeats`` runs, the device
synchronized before and after each run); each call queues about 20 us of GPU work at batch 1, less
than its host time, so the rows are host time. Rows:

* ``sdpa flash``: ``scaled_dot_product_attention`` of one query token over a 16-bit cache, flash
  backend (what fp16 pays per layer);
* ``fused, ..., window R folded``: ``fused_decode_attention`` over the packed cache plus an R-token
  16-bit window (the steady decode state) attended in the combine kernel (two kernel launches);
  ``launched``: the window's own split launch (``MAX_FOLDED_WINDOW = 0``, three launches); ``no
  window`` (two launches); each with ``BOUND_LAUNCHES`` (the kernels relaunched through their
  compiled kernels, ``kvpolar.kernels.bound_launch``, CUDA tensors handed over as their addresses),
  ``bound launches, tensors`` (``bound_launch.ADDRESSES`` off: as tensors, whose ``data_ptr()``
  Triton's launcher calls and checks with the driver) and without (every launch through Triton's
  dispatcher, which binds, specializes and hashes every argument);
* ``empty kernel via jit``: a one-argument Triton kernel through the dispatcher, Triton's floor;
  ``empty kernel, compiled``: the same kernel launched as ``CompiledKernel[grid](x)``;
* with ``--parts``, each of the fused call's bound launches alone (by kernel: the packed tokens'
  split kernel, the combine kernel attending the window; then, with the window launched, its split
  kernel and the plain combine kernel), three ways: ``BoundLaunch.relaunch`` (the varying values'
  specialization, then the compiled kernel), ``CompiledKernel[grid](*values)`` (Triton's runner:
  current stream, launch metadata, then the launcher) and the launcher alone (``CompiledKernel.run``
  given the stream, no launch hooks; skipped where the runner calls it otherwise). Where a kernel's
  GPU time per call exceeds these (the packed tokens' kernel), back-to-back launches wait for the
  GPU and its rows are GPU time.
Also checked: the two launch paths give the same output, and how many packed launches were bound ones.

    PYTHONPATH=src:benchmarks python benchmarks/launch_cost.py [--presets kivi-2 polar-rope-3]
        [--batch 1] [--tokens 32768] [--residual 70] [--parts] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch
import triton

from bench_attention import HKV, HQ, D, make_preset
from kvpolar.kernels import bound_launch
from kvpolar.kernels import decode_attention as mod
from kvpolar.kernels.bound_launch import BoundLaunch


@triton.jit
def _empty_kernel(x_ptr):
    pass


def host_us(call, calls: int, repeats: int) -> float:
    """Median over ``repeats`` runs of the wall-clock microseconds per call of ``calls`` calls."""
    call()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


#: How Triton 3.6's ``CompiledKernel[grid]`` runner calls the launcher (whitespace removed), which the
#: launcher-alone row repeats with the stream given and no launch hooks.
_RUNNER_CALL = ("self.run(grid[0],grid[1],grid[2],stream,self.function,self.packed_metadata,launch_metadata,"
                "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*args)")


def launch_parts(name: str, call, calls: int, repeats: int) -> list[tuple[str, float]]:
    """Rows of host us per launch for each bound launch ``call`` makes, timed alone (see the module doc)."""
    recorded: list[tuple[BoundLaunch, tuple, tuple]] = []
    relaunch = BoundLaunch.relaunch

    def recording(self, grid, values):
        recorded.append((self, grid, values))
        return relaunch(self, grid, values)

    BoundLaunch.relaunch = recording
    try:
        call()
    finally:
        BoundLaunch.relaunch = relaunch
    rows = []
    stream = torch.cuda.current_stream().cuda_stream
    for bound, grid, values in recorded:
        what = getattr(getattr(bound.kernel, "fn", None), "__name__", "kernel")
        compiled, launch_values = bound.prepared(values)
        grid3 = (*grid, 1, 1)[:3]
        rows.append((f"{name} {what} ({len(launch_values)} arguments): relaunch",
                     host_us(lambda: bound.relaunch(grid, values), calls, repeats)))
        rows.append((f"{name} {what}: compiled[grid](*values)",
                     host_us(lambda: compiled[grid3](*launch_values), calls, repeats)))
        if _RUNNER_CALL not in "".join(inspect.getsource(type(compiled).__getitem__).split()):
            print("launcher alone not timed: this Triton's runner calls its launcher otherwise")
            continue
        launcher = lambda: compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata,  # noqa: E731
                                        None, None, None, *launch_values)
        rows.append((f"{name} {what}: launcher alone (CompiledKernel.run)", host_us(launcher, calls, repeats)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "polar-rope-3"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32768, help="packed tokens per sequence")
    ap.add_argument("--residual", type=int, default=70, help="16-bit window tokens")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--parts", action="store_true", help="also time each bound launch alone")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev, dt, b = "cuda", torch.float16, args.batch
    rows: list[tuple[str, float]] = []
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=dt)
    full_k = torch.randn(b, HKV, args.tokens + args.residual, D, device=dev, dtype=dt)
    full_v = torch.randn_like(full_k)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, enable_gqa=True)

    rows.append(("sdpa flash (+ context manager)", host_us(sdpa, args.calls, args.repeats)))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        rows.append(("sdpa flash", host_us(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, enable_gqa=True),
            args.calls, args.repeats)))
    x = torch.empty(1, device=dev)
    rows.append(("empty kernel via jit", host_us(lambda: _empty_kernel[(1,)](x), args.calls, args.repeats)))
    empty = _empty_kernel[(1,)](x)
    rows.append(("empty kernel, compiled", host_us(lambda: empty[(1, 1, 1)](x), args.calls, args.repeats)))
    rk, rv = full_k[:, :, : args.residual].contiguous(), full_v[:, :, : args.residual].contiguous()
    for name in args.presets:
        keys, values = make_preset(name, b, args.tokens, dt, dev)
        fold = mod.MAX_FOLDED_WINDOW
        for bound, addresses in ((True, True), (True, False), (False, True)):
            mod.BOUND_LAUNCHES, bound_launch.ADDRESSES = bound, addresses
            how = ("bound launches" if addresses else "bound launches, tensors") if bound else "dispatcher"
            for window, limit in (((rk, rv), fold), ((rk, rv), 0), ((None, None), fold)):
                mod.MAX_FOLDED_WINDOW = limit
                label = f"{name} fused, {how}, " + (
                    "no window" if window[0] is None else
                    f"window {args.residual} " + ("folded" if limit else "launched (MAX_FOLDED_WINDOW = 0)"))
                call = lambda: mod.fused_decode_attention(q, keys, values, None, None, *window, D**-0.5)  # noqa: E731
                rows.append((label, host_us(call, args.calls, args.repeats)))
            mod.MAX_FOLDED_WINDOW = fold
        mod.BOUND_LAUNCHES, bound_launch.ADDRESSES = True, True
        check = mod.fused_decode_attention(q, keys, values, None, None, rk, rv, D**-0.5)
        mod.BOUND_LAUNCHES = False
        same = torch.equal(check, mod.fused_decode_attention(q, keys, values, None, None, rk, rv, D**-0.5))
        mod.BOUND_LAUNCHES = True
        rows.append((f"{name}: bound and dispatcher launches give the same output: {same}", float(same)))
        plan = mod._remembered_plan(mod._packed_query(q, mod.formats.rotation_matrix(keys)), keys, values, None,
                                    D**-0.5, mod._DEFAULT_CONFIG)
        rows.append((f"{name}: packed launches that skipped the dispatcher", float(plan.launch.direct_launches)))
        if args.parts:
            for limit in (fold, 0):
                mod.MAX_FOLDED_WINDOW = limit
                rows += launch_parts(name, lambda: mod.fused_decode_attention(q, keys, values, None, None, rk, rv,
                                                                             D**-0.5), args.calls, args.repeats)
            mod.MAX_FOLDED_WINDOW = fold
    title = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: host us per "
             f"call, B={b}, {HQ}/{HKV} heads, D={D}, {args.tokens} packed + {args.residual} window tokens")
    print(title)
    print("| call | host us |\n|---|---:|")
    for label, us in rows:
        print(f"| {label} | {us:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"title": title, "rows": rows, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
