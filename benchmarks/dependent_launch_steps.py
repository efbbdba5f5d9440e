"""Replayed decode steps with the merge of the splits as a dependent launch and as a plain one (GPU).

The 8B-shaped model (random weights, ``--layers`` layers), each preset's cache filled to ``--context``
tokens per sequence, then ``--steps`` decode steps recorded and replayed from CUDA graphs
(``bench_graphed_decode.graphed_ms``: total wall time / steps) with the library's default launch
configuration with ``dependent_launch=True`` and with ``dependent_launch=False``,
the two alternated ``--rounds`` times. Replayed steps, because an eager step at small batches is bound by
its host, which the launch does not change. Writes JSON to ``--out`` and prints a table last.

Usage: ``PYTHONPATH=src:benchmarks python benchmarks/dependent_launch_steps.py --out OUT.json
[--presets kivi-2 polar-rope-3] [--batches 1] [--layers 32] [--context 32768] [--steps 128] [--rounds 2]
[--smoke]`` (``--smoke``: the small model on the CPU, the steps run eagerly: checks that the script runs;
there neither setting launches anything dependently).
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
import bench_graphed_decode as bgd  # noqa: E402

from kvpolar.kernels import decode_attention  # noqa: E402
from kvpolar.kernels.launch_config import LaunchConfig  # noqa: E402

#: the two settings: label -> the fused attention's default launch configuration
SETTINGS = {"dependent launch": LaunchConfig(dependent_launch=True), "plain launch": LaunchConfig(dependent_launch=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "polar-rope-3"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="small model on the CPU, eager steps")
    args = ap.parse_args()
    graphs = not args.smoke
    if args.smoke:
        e2e.DEVICE, args.context, args.layers, args.steps = "cpu", 300, 2, 20
    elif not torch.cuda.is_available():
        raise SystemExit("dependent_launch_steps.py times CUDA graphs: it needs a GPU (--smoke: the CPU check)")
    model = e2e.build_model(args.layers)
    shipped = decode_attention._DEFAULT_CONFIG
    rows = []
    try:
        for rnd in range(args.rounds):
            for label, cfg in SETTINGS.items():
                decode_attention._DEFAULT_CONFIG = cfg
                for batch in args.batches:
                    for preset in args.presets:
                        e2e._reset_memory()
                        ms, how = bgd.graphed_ms(model, preset, batch, args.context, args.steps, graphs)
                        rows.append({"round": rnd, "setting": label, "preset": preset, "batch": batch,
                                     "ms_per_step": ms, **how})
                        print(rnd, label, preset, batch, f"{ms:.3f} ms/step", flush=True)
    finally:
        decode_attention._DEFAULT_CONFIG = shipped
    title = (f"{e2e._device_name()}, {args.layers} layers, {args.context} tokens per sequence, {args.steps} replayed "
             f"steps: ms per step (median of {args.rounds} rounds)")
    with open(args.out, "w") as f:
        json.dump({"title": title, "command": " ".join(sys.argv), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(title)
    print("| preset | batch | dependent launch | plain launch | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for batch in args.batches:
        for preset in args.presets:
            med = {label: statistics.median(r["ms_per_step"] for r in rows if r["setting"] == label
                                            and r["preset"] == preset and r["batch"] == batch) for label in SETTINGS}
            on, off = med["dependent launch"], med["plain launch"]
            print(f"| {preset} | {batch} | {on:.2f} | {off:.2f} | {off / on:.3f}x |")


if __name__ == "__main__":
    main()
