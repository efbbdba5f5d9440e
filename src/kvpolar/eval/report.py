"""Writing evaluation results: ``<eval>.json``, ``<eval>.md`` and PNG plots in one directory."""

from __future__ import annotations

import json
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec such as ``'.3f'`` or ``''``)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" if not f else "---:" for _, _, f in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def _header(results: dict, title: str) -> str:
    s = results["settings"]
    settings = ", ".join(f"{k} {v}" for k, v in s.items())
    return (f"# {title}\n\nModel: `{results['model']}`. Device: {results['device']}. Settings: {settings}.\n\n"
            f"## Protocol\n\n{results['protocol']}\n\n## Results\n\n")


def _write(out_dir: str | pathlib.Path, name: str, results: dict, markdown: str, figures: dict[str, Any]) -> list[pathlib.Path]:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    for fname, fig in figures.items():
        fig.savefig(out / fname, dpi=120, bbox_inches="tight")
        markdown += f"\n![{fname}]({fname})\n"
        paths.append(out / fname)
        import matplotlib.pyplot as plt

        plt.close(fig)
    paths[1].write_text(markdown)
    return paths


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_perplexity(out_dir, results: dict) -> list[pathlib.Path]:
    rows = results["rows"]
    md = _header(results, "Perplexity with a quantized KV cache") + markdown_table(rows, [
        ("preset", "preset", ""), ("bits_per_element", "bits/element", ".2f"), ("compression", "compression", ".2f"),
        ("perplexity", "perplexity", ".3f"), ("tokens_scored", "tokens scored", "d")]) + "\n"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["bits_per_element"])
        ax.plot([r["bits_per_element"] for r in rs], [r["perplexity"] for r in rs], "o-", label=method)
        for r in rs:
            ax.annotate(r["preset"], (r["bits_per_element"], r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KV cache bits / element")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"perplexity vs bits ({results['settings']['max_length']}-token windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _write(out_dir, "perplexity", results, md, {"perplexity_vs_bits.png": fig})


def write_needle(out_dir, results: dict) -> list[pathlib.Path]:
    cells = results["cells"]
    lengths, depths = results["settings"]["lengths"], results["settings"]["depths"]
    presets = list(dict.fromkeys(c["preset"] for c in cells))
    table = [{"preset": p, "accuracy": sum(c["accuracy"] for c in cells if c["preset"] == p)
              / max(1, sum(1 for c in cells if c["preset"] == p))} for p in presets]
    md = _header(results, "Needle in a haystack") + markdown_table(table, [("preset", "preset", ""), ("accuracy", "mean accuracy", ".3f")]) + "\n"
    if table and table[0]["accuracy"] == 0.0:
        md += (f"\n**The {table[0]['preset']} baseline retrieves no pass key: this model cannot do the task, so "
               "this grid says nothing about the cache.**\n")
    plt = _plt()
    figures = {}
    for p in presets:
        grid = [[next(c["accuracy"] for c in cells if c["preset"] == p and c["length"] == n and c["depth"] == d)
                 for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.0 + 0.5 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"needle accuracy: {p}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax)
        figures[f"needle_{_safe(p)}.png"] = fig
    return _write(out_dir, "needle", results, md, figures)


def write_fidelity(out_dir, results: dict) -> list[pathlib.Path]:
    rows = results["rows"]
    md = _header(results, "Attention fidelity per layer") + markdown_table(rows, [
        ("preset", "preset", ""), ("layer", "layer", "d"), ("key_bits_per_element", "key bits", ".2f"),
        ("value_bits_per_element", "value bits", ".2f"), ("key_rel_error", "key error", ".4f"),
        ("value_rel_error", "value error", ".4f"), ("score_rel_error", "score error", ".4f"),
        ("output_rel_error", "output error", ".4f")]) + "\n"
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for p in dict.fromkeys(r["preset"] for r in rows):
        rs = [r for r in rows if r["preset"] == p]
        for ax, key in zip(axes, ("score_rel_error", "output_rel_error")):
            ax.plot([r["layer"] for r in rs], [r[key] for r in rs], "o-", label=p)
    for ax, title in zip(axes, ("attention score rel. error", "attention output rel. error")):
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if rows:
        axes[1].legend(fontsize=8)
    return _write(out_dir, "fidelity", results, md, {"fidelity_layers.png": fig})


def write_agreement(out_dir, results: dict) -> list[pathlib.Path]:
    md = _header(results, "Greedy-generation agreement with fp16") + markdown_table(results["rows"], [
        ("preset", "preset", ""), ("token_agreement", "token agreement", ".3f"),
        ("tokens_before_divergence", "tokens before divergence", ".1f")]) + "\n"
    return _write(out_dir, "agreement", results, md, {})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
