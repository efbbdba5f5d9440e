"""Plot and tabulate benchmarks/results/attention_h100.json (written by bench_attention.py) or
attention_transposed_h100.json (tune_attention_t.py: method names ``<preset>:<launch variant>``).

Usage: ``python benchmarks/report_attention.py [results.json ...] [plot.png]``: prints the markdown
table that benchmarks/README.md carries and writes the plot (speed-up over fp16 SDPA vs context
length, one panel per batch size) to ``plot.png``; without arguments it reads
``results/attention_h100.json`` and plots to ``attention_speedup_h100.png``, and with results named
but no ``.png`` it plots nothing (so that a table of another run never overwrites that committed
plot). Several JSON files (runs of one GPU, e.g. batch sizes timed in separate device calls) are
shown together; each row's speed-up is against the fp16 SDPA of its own run.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    named = [a for a in sys.argv[1:] if a.endswith(".json")]
    sources = named or ["benchmarks/results/attention_h100.json"]
    default_png = None if named else "benchmarks/attention_speedup_h100.png"
    png = next((a for a in sys.argv[1:] if a.endswith(".png")), default_png)
    runs = [json.load(open(src)) for src in sources]
    gpus = {run["meta"]["gpu"] for run in runs}
    if len(gpus) > 1:
        raise SystemExit(f"results of different GPUs ({', '.join(sorted(gpus))}): plot them separately")
    data = {"meta": runs[0]["meta"], "results": [r for run in runs for r in run["results"]]}
    rows = [r for r in data["results"] if r["median_ms"]]
    if png is not None:
        plot(rows, data["meta"]["gpu"], png)
    print_table(data["results"])


def plot(rows: list[dict], gpu: str, png: str) -> None:
    """Speed-up over fp16 SDPA against context length, one panel per batch size, written to ``png``."""
    batches = sorted({r["batch"] for r in rows})
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "sdpa-fp16"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches) + 2, 4.5), sharey=True, squeeze=False)
    colors = plt.get_cmap("tab20").colors  # one color per method (the default cycle repeats after 10)
    markers = "osD^v<>ph*"
    for ax, b in zip(axes[0], batches):
        for i, m in enumerate(methods):
            pts = sorted((r["tokens"], r["speedup_vs_sdpa_fp16"]) for r in rows if r["batch"] == b and r["method"] == m)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=m,
                        color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                        linestyle="--" if m.startswith("hf-") else "-")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"batch {b}")
        ax.set_xlabel("context tokens")
    axes[0][0].set_ylabel("speed-up over fp16 SDPA (GPU time)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"Decode attention, 32 q heads / 8 KV heads, D=128 - {gpu}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def print_table(results: list[dict]) -> None:
    """The markdown table of ``results`` (rows without a time print their note)."""
    print(f"| B | T | method | GPU time (ms) | eager (ms) | x fp16 SDPA | GB/s read | % of copy BW |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        if not r["median_ms"]:
            print(f"| {r['batch']} | {r['tokens']} | {r['method']} | {r['note']} | | | | |")
            continue
        eager = f"{r['eager_median_ms']:.4f}" if r.get("eager_median_ms") else ""
        gbs = r.get("gb_per_s") or r["bytes"] / r["median_ms"] / 1e6
        print(f"| {r['batch']} | {r['tokens']} | {r['method']} | {r['median_ms']:.4f} | {eager} | "
              f"{r['speedup_vs_sdpa_fp16']:.2f} | {gbs:.0f} | {100 * r['copy_bw_fraction']:.0f}% |")


if __name__ == "__main__":
    main()
