"""Decode steps with one of the fused kernel's host-time measures on and off, alternated, on the
8B-shaped model (random weights, ``--layers`` layers, 32k tokens per sequence). ``--switch``:

* ``bound`` (the default): the split kernels' launches bound (``BOUND_LAUNCHES``) against every
  launch through Triton's dispatcher;
* ``fold``: the residual window attended in the combine kernel at any batch (``MAX_FOLDED_ROWS``
  unlimited, ``MAX_FOLDED_WINDOW`` as shipped) against its own split launch (``MAX_FOLDED_WINDOW = 0``);
* ``rotate``: values stored in a rotated domain (turbo and polar-recursive alike) un-rotated in the
  combine kernel, their window folded (``ROTATE_IN_COMBINE``), against two matrix products on the host
  side and the window's own launch;
* ``addresses``: bound launches handing CUDA tensors to the compiled kernels as their addresses
  (``bound_launch.ADDRESSES``) against handing over the tensors (Triton's launcher then calls each
  one's ``data_ptr()`` and checks the address with the driver).

For each preset and batch the cache is filled once; then blocks of ``--block`` decode steps
alternate between the two settings ``--rounds`` times (after ``--warmup`` untimed steps of each), so
both see the same cache and the same moves into the packed part. fp16-flash (``DynamicCache``, SDPA
without cuDNN) is timed the same way as the reference; the setting does not touch it. Wall-clock
median per step, ms.

    PYTHONPATH=src python benchmarks/bound_launch_steps.py [--switch bound|fold|rotate|addresses]
        [--presets fp16-flash,kivi-2,polar-rope-3] [--batches 1,4] [--layers 32] [--smoke]

``--smoke``: the small model on the CPU, a 400-token context (checks that the script runs; on the
CPU nothing is compiled, so both settings launch through the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_end_to_end as e2e  # noqa: E402

from kvpolar.kernels import bound_launch, decode_attention  # noqa: E402

#: ``--switch`` name -> (``kvpolar.kernels.decode_attention`` attributes set on, set off, column labels off / on);
#: a name ``module.attribute`` names an attribute of another module of ``_MODULES``
SWITCHES = {"bound": ({"BOUND_LAUNCHES": True}, {"BOUND_LAUNCHES": False}, ("dispatcher", "bound launches")),
            "fold": ({"MAX_FOLDED_ROWS": 1 << 30}, {"MAX_FOLDED_WINDOW": 0}, ("window launched", "window folded")),
            "rotate": ({"ROTATE_IN_COMBINE": decode_attention.ROTATE_IN_COMBINE},  # (the shipped set)
                       {"ROTATE_IN_COMBINE": frozenset()}, ("host products", "in the combine kernel")),
            "addresses": ({"bound_launch.ADDRESSES": True}, {"bound_launch.ADDRESSES": False},
                          ("tensors", "addresses"))}
_MODULES = {"bound_launch": bound_launch}


def _setting(name: str) -> tuple[object, str]:
    """(module, attribute) a ``SWITCHES`` name sets."""
    module, _, attribute = name.rpartition(".")
    return (_MODULES[module] if module else decode_attention), attribute


@torch.no_grad()
def alternated_steps(model, preset: str, batch: int, context: int, block: int, rounds: int,
                     warmup: int, switch: str = "bound") -> dict[bool, list[float]]:
    """ms per decode step with the ``switch`` on (True) and off, blocks of ``block`` steps alternated."""
    on, off, _ = SWITCHES[switch]
    settings = (True,) if preset in e2e.FP16_BASELINES else (True, False)
    steps = len(settings) * (warmup + block * rounds)
    cache = e2e.make_cache(model, preset, context + steps)
    e2e.fill_cache(model, cache, preset, batch, context)
    kw = e2e.cache_kwargs(model, cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=e2e.DEVICE)
    pos = torch.full((batch, 1), context, device=e2e.DEVICE, dtype=torch.long)
    times: dict[bool, list[float]] = {s: [] for s in settings}
    defaults = {name: getattr(*_setting(name)) for name in (*on, *off)}
    plan = [(s, warmup, False) for s in settings] + [(s, block, True) for _ in range(rounds) for s in settings]
    try:
        for setting, count, timed in plan:
            for name, value in {**defaults, **(on if setting else off)}.items():
                setattr(*_setting(name), value)
            for _ in range(count):
                ms, ids = e2e.timed_forward(model, preset, ids, pos, kw)
                if timed:
                    times[setting].append(ms)
                pos = pos + 1
    finally:
        for name, value in defaults.items():
            setattr(*_setting(name), value)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", choices=sorted(SWITCHES), default="bound")
    ap.add_argument("--presets", default="fp16-flash,kivi-2,polar-rope-3")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="small model on the CPU, 400-token context")
    args = ap.parse_args()
    if args.smoke:
        e2e.DEVICE, args.context, args.layers, args.block, args.rounds, args.warmup = "cpu", 400, 2, 2, 1, 1
    model = e2e.build_model(args.layers)
    rows = []
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            times = alternated_steps(model, preset, batch, args.context, args.block, args.rounds, args.warmup,
                                     args.switch)
            rows.append({"preset": preset, "batch": batch,
                         "on_ms": statistics.median(times[True]),
                         "off_ms": statistics.median(times[False]) if False in times else None,
                         "steps": {str(k): v for k, v in times.items()}})
    title = (f"{e2e._device_name()}, {args.layers} layers, {args.context} tokens per sequence, switch "
             f"{args.switch}: median ms per decode step")
    print(title)
    labels = SWITCHES[args.switch][2]
    print(f"| preset | batch | {labels[0]} | {labels[1]} | tokens/s gain |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        d = row["off_ms"]
        gain = f"{d / row['on_ms']:.3f}x" if d else ""
        print(f"| {row['preset']} | {row['batch']} | {'' if d is None else f'{d:.2f}'} | {row['on_ms']:.2f} | {gain} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"title": title, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
