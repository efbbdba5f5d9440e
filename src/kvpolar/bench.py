"""``kvpolar bench``: decode speed and cache memory per preset on a model, written as a report.

Runs :func:`kvpolar.generation_demo.run_generation_demo` with a prompt of ``max_length - new_tokens``
held-out tokens and writes ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``.
For kernel-level GPU numbers see ``benchmarks/`` (``bench_attention.py``, ``bench_end_to_end.py``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

import torch

from kvpolar.generation_demo import format_generation_table, run_generation_demo


def run_bench(
    model_path: str | None,
    presets: Sequence[str],
    device: str = "cpu",
    max_length: int = 1024,
    out_dir: str | pathlib.Path = "kvpolar-results",
    new_tokens: int = 64,
    progress: bool = True,
    dtype: str | None = None,
    decoding: str = "generate",
) -> dict[str, Any]:
    """Time greedy decoding of ``new_tokens`` after a ``max_length - new_tokens`` prompt per preset;
    ``decoding``: how the presets decode (``kvpolar.generation_demo.DECODINGS``; ``"replayed"``: decode
    steps replayed from CUDA graphs, ``custom_generate=kvpolar.replayed_decoding``)."""
    if new_tokens >= max_length:
        raise ValueError(f"new_tokens={new_tokens} must be smaller than max_length={max_length}")
    rows, setup = run_generation_demo(
        presets, model_path=model_path, device=device, prompt_tokens=max_length - new_tokens,
        new_tokens=new_tokens, progress=progress, dtype=dtype, label="kvpolar bench", decoding=decoding,
    )
    how = {"generate": "the whole `generate` call",
           "replayed": "the whole `generate(..., custom_generate=kvpolar.replayed_decoding)` call for the "
                       "presets (decode steps recorded in CUDA graphs and replayed; recordings included), "
                       "`generate` for the stock cache",
           "stretches": "the whole `generate(..., custom_generate=kvpolar.replayed_decoding, graphs=False)` call "
                        "for the presets (the replayed path's stretches run eagerly), `generate` for the stock "
                        "cache"}[decoding]
    markdown = (
        f"# kvpolar bench\n\n{setup['model']} on {_device_name(device)} ({setup['dtype']}): greedy decoding of "
        f"{setup['new_tokens']} tokens after a {setup['prompt_tokens']}-token held-out prompt. Cache bytes and "
        "bits/element come from `QuantizedKVCache.memory_report()` at the end of generation (the residual "
        "window, in the model's dtype, included); compression is against a 16-bit cache; tokens/s is "
        f"wall-clock over {how}, prefill included.\n\n" + format_generation_table(rows) + "\n"
    )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "setup": {**setup, "device_name": _device_name(device), "torch": torch.__version__,
                  "python": platform.python_version()},
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    files = [out / "bench.json", out / "bench.md", out / "bench.png"]
    files[0].write_text(json.dumps(results, indent=1))
    files[1].write_text(markdown)
    _plot(rows, files[2])
    return {**results, "markdown": markdown, "files": [str(f) for f in files]}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()})"


def _plot(rows: Sequence[Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.preset for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    axes[0].bar(names, [r.tokens_per_second for r in rows], color="tab:blue")
    axes[0].set_ylabel("tokens/s")
    axes[1].bar(names, [r.bits_per_element for r in rows], color="tab:orange")
    axes[1].set_ylabel("cache bits/element")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
