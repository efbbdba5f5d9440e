"""Plot and tabulate end-to-end decoding results (``bench_end_to_end.py``'s JSON).

Usage: ``python benchmarks/report_end_to_end.py [results.json ...] [plot.png]``: several JSON files of
one GPU (batch sizes timed in separate runs) are merged by (preset, batch), a later file's point
replacing an earlier one's. Writes the plot (decode tokens/s and ms per step against the batch size,
one line per preset; batches that ran out of memory are left out) and prints the markdown table
that benchmarks/README.md carries: ms per step by batch, each preset's best tokens/s, and that
best against the best of each 16-bit baseline present (``fp16``, ``fp16-flash``, ``fp16-static``)
and, where the runs recorded it (``read_bound_ms``), against the read bound of the 16-bit baselines'
largest batch: the tokens/s of a 16-bit decoder that only read the weights and the cache once per
step at the copy bandwidth. Points decoded with replayed steps (``--decoding replayed``) are rows of
their own, "<preset> replayed".
"""

from __future__ import annotations

import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_end_to_end import best_tokens_per_second, read_bound_tokens_per_second  # noqa: E402

DEFAULT_SOURCES = ["benchmarks/results/end_to_end_flash_h100.json",
                   "benchmarks/results/end_to_end_flash_small_h100.json"]
BASELINES = ("fp16", "fp16-flash", "fp16-static")


def label(point: dict) -> str:
    """A point's row: its preset, with " replayed" where its steps were replayed from CUDA graphs."""
    return point["preset"] + (" replayed" if point.get("decoding") == "replayed" else "")


def merged_points(sources: list[str]) -> tuple[str, dict[tuple[str, int], dict]]:
    """(GPU name, {(row label, batch): point}) of every file in ``sources``; all of one GPU. A point's
    ``preset`` becomes its row label (:func:`label`)."""
    runs = [json.load(open(src)) for src in sources]
    gpus = {run["gpu"] for run in runs}
    if len(gpus) > 1:
        raise SystemExit(f"results of different GPUs ({', '.join(sorted(gpus))}): report them separately")
    points = {(label(p), p["batch"]): {**p, "preset": label(p)} for run in runs for p in run["points"]}
    return gpus.pop(), points


def table(points: dict[tuple[str, int], dict]) -> str:
    """Markdown: ms per step at each batch ("OOM" where it ran out of memory), best tokens/s (batch),
    and that best over each 16-bit baseline's best."""
    presets = list(dict.fromkeys(preset for preset, _ in points))
    batches = sorted({batch for _, batch in points})
    best = best_tokens_per_second(points.values())
    bases = [b for b in BASELINES if b in best]
    bound = read_bound_tokens_per_second(points.values())
    bound_head = [] if bound is None else [f"x 16-bit read bound ({bound[0]:.0f} tok/s, B={bound[1]})"]
    head = ["preset", *(f"B={b} ms" for b in batches), "best tokens/s", *(f"x {b}" for b in bases), *bound_head]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for preset in presets:
        cells = []
        for b in batches:
            p = points.get((preset, b))
            cells.append("" if p is None else "OOM" if p["status"] != "ok" else f"{p['decode_ms_per_step']:.2f}")
        tps, at = best.get(preset, (math.nan, 0))
        ratios = [f"{tps / best[b][0]:.2f}" for b in bases] + ([] if bound is None else [f"{tps / bound[0]:.2f}"])
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {tps:.1f} (B={at}) | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def plot(gpu: str, points: dict[tuple[str, int], dict], png: str) -> None:
    """Tokens/s and ms per step against the batch size, one line per preset (points that fit)."""
    presets = list(dict.fromkeys(preset for preset, _ in points))
    context = next(iter(points.values()))["context"]
    fig, (tps_ax, ms_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for preset in presets:
        ok = sorted((b, p) for (name, b), p in points.items() if name == preset and p["status"] == "ok")
        if not ok:
            continue
        style = "--" if preset in BASELINES else "-"
        tps_ax.plot([b for b, _ in ok], [p["tokens_per_second"] for _, p in ok], marker="o", linestyle=style, label=preset)
        ms_ax.plot([b for b, _ in ok], [p["decode_ms_per_step"] for _, p in ok], marker="o", linestyle=style, label=preset)
    bounds = {}  # batch -> the least read-bound ms of a 16-bit baseline that fit there
    for (name, b), p in points.items():
        if name in BASELINES and p["status"] == "ok" and p.get("read_bound_ms", math.nan) > 0:
            bounds[b] = min(bounds.get(b, math.inf), p["read_bound_ms"])
    if bounds:
        at = sorted(bounds)
        tps_ax.plot(at, [b * 1000.0 / bounds[b] for b in at], linestyle=":", marker="x", color="black", label="16-bit read bound")
        ms_ax.plot(at, [bounds[b] for b in at], linestyle=":", marker="x", color="black", label="16-bit read bound")
    batches = sorted({b for _, b in points})
    for ax, label in ((tps_ax, "decode tokens/s"), (ms_ax, "ms per decode step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("batch (sequences)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", linewidth=0.3)
    ms_ax.legend(fontsize=8)
    fig.suptitle(f"End to end, Llama-3.1-8B-shaped model, {context} tokens per sequence - {gpu}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    sources = [a for a in sys.argv[1:] if a.endswith(".json")] or DEFAULT_SOURCES
    png = next((a for a in sys.argv[1:] if a.endswith(".png")), "benchmarks/end_to_end_h100.png")
    gpu, points = merged_points(sources)
    plot(gpu, points, png)
    print(f"{gpu}: {', '.join(sources)} -> {png}")
    print(table(points))


if __name__ == "__main__":
    main()
