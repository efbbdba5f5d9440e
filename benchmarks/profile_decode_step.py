"""Where a decode step of the 8B-shaped model goes, per preset: each step's wall time (a slow step
among fast ones is a recompilation) and a torch.profiler table of one step (CPU and CUDA time);
with ``--python N``, also the Python functions of N more steps by their own time (cProfile), the
host side that sets a small batch's step; with ``--sync-steps N``, the host-device synchronizations
of N more steps (``torch.cuda.set_sync_debug_mode``: a value read on the host, a copy from pageable
host memory), by the source line that made them: each one stalls the host until the GPU catches up,
so an eager step then costs its host time plus its GPU time instead of the larger of the two; with
``--host-split N``, the host's wall time of N more steps split by function (``host_split``: the decoder
layers, their attention modules, the attention function, the cache's update and compression, the
fused kernel's call), measured by clock reads around each call, without a profiler's overhead.

Uses ``bench_end_to_end``'s model (random weights, fewer layers to keep it short) and cache fill.

    PYTHONPATH=src python benchmarks/profile_decode_step.py OUT_DIR [--layers 4] [--batch 12]
        [--presets turbo-3,turbo-4,squat-2,polar-recursive] [--python 20] [--sync-steps 20] [--host-split 60]
"""
import argparse
import collections
import contextlib
import cProfile
import functools
import io
import os
import pstats
import sys
import time
import types
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import bench_end_to_end as e2e  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--presets", default="fp16,turbo-3,turbo-4,squat-2,polar-recursive")
    ap.add_argument("--python", type=int, default=0, help="steps profiled by cProfile (0: none)")
    ap.add_argument("--sync-steps", type=int, default=0,
                    help="steps whose host-device synchronizations are counted (0: none)")
    ap.add_argument("--host-split", type=int, default=0,
                    help="steps whose host time is split by function with clock reads (0: none)")
    args = ap.parse_args()
    model = e2e.build_model(args.layers)
    report = []
    for preset in args.presets.split(","):
        e2e._reset_memory()
        cache = e2e.make_cache(model, preset)
        e2e.fill_cache(model, cache, preset, args.batch, args.context)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, 1), device="cuda")
        pos = torch.full((args.batch, 1), args.context, device="cuda", dtype=torch.long)
        kw = e2e.cache_kwargs(model, cache)

        def step():
            nonlocal ids, pos
            with e2e.attention_backends(preset):
                out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
            ids = out.logits[:, -1:].argmax(-1)
            pos = pos + 1

        times = []
        for _ in range(8):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60)
        cuda = prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60)
        line = f"{preset} B={args.batch} layers={args.layers}: step ms " + " ".join(f"{t:.1f}" for t in times)
        print(line, flush=True)
        report += [line, table, cuda]
        if args.python:
            report.append(python_profile(step, args.python, f"{preset} B={args.batch} layers={args.layers}"))
            print(report[-1], flush=True)
        if args.sync_steps:
            report.append(synchronizations(step, args.sync_steps, f"{preset} B={args.batch} layers={args.layers}"))
            print(report[-1], flush=True)
        if args.host_split:
            report.append(host_split(model, step, args.host_split, f"{preset} B={args.batch} layers={args.layers}"))
            print(report[-1], flush=True)
        del cache
    with open(os.path.join(args.out, "profile_decode_step.txt"), "w") as f:
        f.write("\n".join(report))


def python_profile(step, steps: int, title: str) -> str:
    """cProfile of ``steps`` calls of ``step`` (synchronized at the end) after 64 unprofiled ones (the
    16-bit window's kernel compiles a variant when its strides change class within the first 32-token
    move): the 30 functions of most own time and the 30 of most cumulative time."""
    for _ in range(64):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    text.write(f"cProfile of {steps} steps, {title}\n")
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    return text.getvalue()


def synchronizations(step, steps: int, title: str) -> str:
    """Host-device synchronizations of ``steps`` calls of ``step`` (after 64 unrecorded ones), counted by
    the Python line that made them (PyTorch's sync debug mode warns at each)."""
    for _ in range(64):
        step()
    torch.cuda.synchronize()
    where: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{w.filename}:{w.lineno}"] += 1
    lines = [f"synchronizations in {steps} steps, {title}: {sum(where.values())}"]
    lines += [f"  {n:5d}  {place}" for place, n in where.most_common(20)]
    return "\n".join(lines)


@contextlib.contextmanager
def _clocked(owner, name: str, label: str, totals: dict):
    """``owner.name`` replaced by a wrapper that adds each call's wall time (seconds) and count to
    ``totals[label]``; restored on exit."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def clocked(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            entry = totals[label]
            entry[0] += time.perf_counter() - start
            entry[1] += 1

    setattr(owner, name, clocked)
    try:
        yield
    finally:
        setattr(owner, name, original)


def host_split(model, step, steps: int, title: str) -> str:
    """Host wall time of ``steps`` calls of ``step`` (after 64 untimed ones; one synchronization at the
    end) split by function: microseconds per step and per call of the model's decoder layers and their
    attention modules, the attention function the model dispatches to (kvpolar's or SDPA's), the
    cache layers' update (kvpolar's ``QuantizedLayer`` or ``transformers``' ``DynamicLayer``), kvpolar's
    post-attention bookkeeping and window compression, and ``fused_decode_attention``. Each entry
    includes the entries it calls; a clock read costs well under a microsecond."""
    import transformers
    from transformers.cache_utils import DynamicLayer

    from kvpolar.cache import attention as kv_attention
    from kvpolar.cache.layer import QuantizedLayer
    from kvpolar.kernels import decode_attention as kv_kernels

    decoder = model.model.layers[0]
    mapping = transformers.AttentionInterface._global_mapping
    totals: dict = collections.defaultdict(lambda: [0.0, 0])
    targets = [(type(decoder), "forward", "decoder layer"), (type(decoder.self_attn), "forward", "attention module"),
               (QuantizedLayer, "update", "kvpolar cache update"), (DynamicLayer, "update", "DynamicLayer.update"),
               (QuantizedLayer, "after_attention", "kvpolar after_attention"),
               (QuantizedLayer, "_compress", "kvpolar window compression"),
               (kv_kernels, "fused_decode_attention", "fused_decode_attention")]
    targets += [(mapping, name, f"attention function {name!r}") for name in ("sdpa", kv_attention.ATTENTION_NAME)
                if name in mapping]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(64):
        step()
    sync()
    with contextlib.ExitStack() as stack:
        for owner, name, label in targets:
            if isinstance(owner, dict):
                stack.enter_context(_clocked_entry(owner, name, label, totals))
            else:
                stack.enter_context(_clocked(owner, name, label, totals))
        start = time.perf_counter()
        for _ in range(steps):
            step()
        host = time.perf_counter() - start
        sync()
        wall = time.perf_counter() - start
    lines = [f"host time by function over {steps} steps, {title}: {1000 * wall / steps:.3f} ms per step "
             f"({1000 * host / steps:.3f} ms before the final synchronization)",
             f"  {'function':34s} {'us/step':>9s} {'us/call':>9s} {'calls/step':>10s}"]
    for label, (seconds, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {label:34s} {1e6 * seconds / steps:9.1f} {1e6 * seconds / max(calls, 1):9.1f} "
                     f"{calls / steps:10.2f}")
    return "\n".join(lines)


@contextlib.contextmanager
def _clocked_entry(mapping: dict, key: str, label: str, totals: dict):
    """``_clocked`` for an entry of a dict (``transformers``' attention functions by name)."""
    original = mapping[key]
    holder = types.SimpleNamespace(fn=original)
    with _clocked(holder, "fn", label, totals):
        mapping[key] = holder.fn
        try:
            yield
        finally:
            mapping[key] = original


if __name__ == "__main__":
    main()
