"""Decode steps that kvpolar sends to SDPA over cached tokens, with and without ``SDPA_PRIORITY``
(flash and memory-efficient before cuDNN, ``kvpolar.cache.attention``), on the 8B-shaped model
(random weights, ``--layers`` layers, batch 1):

- ``window``: kivi-2, one-token decode steps after a ``--prompt``-token prompt, while nothing is
  packed yet (the cache attends over its 16-bit window with SDPA);
- ``16-bit layers``: turbo-k3v4 over a ``--context``-token cache, whose first and last two layers
  stay 16-bit and attend with SDPA (with 6 layers: 4 of them).

Every key length is new at every step, which is what makes cuDNN build a graph per step. Wall-clock
median per step, the two settings alternated ``--rounds`` times in one process.

    PYTHONPATH=src python benchmarks/sdpa_priority_steps.py [--layers 6] [--rounds 2] [--smoke]

``--smoke``: the small model on the CPU, a 300-token context (checks that the script runs; on the
CPU both settings are PyTorch's order).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_end_to_end as e2e  # noqa: E402

from kvpolar.cache import attention  # noqa: E402


@torch.no_grad()
def step_times(model, preset: str, context: int, step_tokens: int, steps: int) -> list[float]:
    """ms of each of ``steps`` forwards of ``step_tokens`` new tokens after a ``context``-token fill."""
    cache = e2e.make_cache(model, preset)
    e2e.fill_cache(model, cache, preset, 1, context)
    kw = e2e.cache_kwargs(model, cache)
    times, seen = [], context
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (1, step_tokens), device=e2e.DEVICE)
        pos = torch.arange(seen, seen + step_tokens, device=e2e.DEVICE)[None]
        times.append(e2e.timed_forward(model, preset, ids, pos, kw)[0])
        seen += step_tokens
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="small model on the CPU, 300-token context")
    args = ap.parse_args()
    if args.smoke:
        e2e.DEVICE, args.context, args.rounds = "cpu", 300, 1
    model = e2e.build_model(args.layers)
    default = attention.SDPA_PRIORITY
    cases = {"window": ("kivi-2", args.prompt, 1, 40), "16-bit layers": ("turbo-k3v4", args.context, 1, 12)}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for setting, priority in (("pytorch order", None), ("SDPA_PRIORITY", default)):
            attention.SDPA_PRIORITY = priority
            for case, (preset, context, tokens, steps) in cases.items():
                times = step_times(model, preset, context, tokens, steps)[2:]  # (first steps: compiles)
                results.setdefault((case, setting), []).extend(times)
    attention.SDPA_PRIORITY = default
    print(f"{e2e._device_name()}, {args.layers} layers, batch 1: median ms per step")
    print("| steps | PyTorch's order | SDPA_PRIORITY |")
    print("|---|---:|---:|")
    for case in cases:
        a, b = (statistics.median(results[(case, s)]) for s in ("pytorch order", "SDPA_PRIORITY"))
        print(f"| {case} | {a:.2f} | {b:.2f} |")


if __name__ == "__main__":
    main()
