"""Where a decode step of the 8B-shaped model goes, per preset: each step's wall time (a slow step
among fast ones is a recompilation) and a torch.profiler table of one step (CPU and CUDA time);
with ``--python N``, also the Python functions of N more steps by their own time (cProfile), the
host side that sets a small batch's step; with ``--sync-steps N``, the host-device synchronizations
of N more steps (``torch.cuda.set_sync_debug_mode``: a value read on the host, a copy from pageable
host memory), by the source line that made them: each one stalls the host until the GPU catches up,
so an eager step then costs its host time plus its GPU time instead of the larger of the two.

Uses ``bench_end_to_end``'s model (random weights, fewer layers to keep it short) and cache fill.

    PYTHONPATH=src python benchmarks/profile_decode_step.py OUT_DIR [--layers 4] [--batch 12]
        [--presets turbo-3,turbo-4,squat-2,polar-recursive] [--python 20] [--sync-steps 20]
"""
import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import time
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


if __name__ == "__main__":
    main()
