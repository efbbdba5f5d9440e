"""Held-out perplexity with the KV cache quantized as it is while decoding.

Each window of ``max_length`` held-out tokens is run through
a fresh cache of the preset. The first ``prefill`` tokens go in one forward call (a prompt); the rest
are fed ``chunk`` tokens per call (1 = token-by-token decoding). Only predictions made by those later
calls are scored: each of them attends to keys/values that were written through the preset's cache
(quantized, apart from whatever the preset keeps in 16 bits, e.g. a residual window of recent tokens)
and read back from it. Nothing is fake-quantized inside a single forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from kvpolar.eval import report
from kvpolar.eval.common import check_length, heldout_token_ids, load_model
from kvpolar.eval.decoding import cache_memory, forward_chunks, new_cache
from kvpolar.eval.presets import EvalPreset, reset_attention, resolve_presets

PROTOCOL = __doc__.split("\n\n", 1)[1].strip()


@dataclasses.dataclass(frozen=True)
class PerplexityRow:
    preset: str
    method: str
    perplexity: float
    nll: float
    tokens_scored: int
    bits_per_element: float
    cache_bytes: int
    compression: float


def windows_from(ids: Sequence[int], max_length: int, num_windows: int) -> torch.Tensor:
    """The first ``num_windows`` non-overlapping ``max_length``-token windows: ``[W, L]`` int64."""
    available = len(ids) // max_length
    if available < 1:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than max_length={max_length}")
    n = min(num_windows, available)
    return torch.tensor(list(ids[: n * max_length]), dtype=torch.long).view(n, max_length)


def preset_perplexity(model: Any, windows: torch.Tensor, preset: EvalPreset, prefill: int, chunk: int,
                      on_step=None, batch_size: int = 4) -> PerplexityRow:
    """Perplexity of ``windows`` ``[W, L]`` (on the model's device) under ``preset``'s cache.

    Windows go through the cache ``batch_size`` at a time (one cache per batch of sequences).
    """
    total, count, memory = 0.0, 0, None
    for ids in windows.split(batch_size):
        cache = new_cache(model, preset)
        sums = []

        def score(start: int, logits: torch.Tensor) -> None:
            # logits at position p predict token p + 1; the last position of the window predicts nothing
            targets = ids[:, start + 1 : start + 1 + logits.shape[1]]
            lg = logits[:, : targets.shape[1]]
            if targets.numel():
                sums.append(torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="sum"))

        forward_chunks(model, cache, ids, prefill, chunk, score, on_step)
        total += float(torch.stack(sums).sum()) if sums else 0.0
        count += ids.shape[0] * (ids.shape[1] - prefill - 1)
        memory = cache_memory(cache, model)
    reset_attention(model)
    nll = total / max(count, 1)
    return PerplexityRow(preset.name, preset.method or preset.name, math.exp(nll), nll, count,
                         memory["bits_per_element"], memory["cache_bytes"], memory["compression"])


def run_perplexity(
    model_path: str | pathlib.Path | None,
    presets: Sequence[str | EvalPreset],
    device: str | None = None,
    max_length: int = 2048,
    out_dir: str | pathlib.Path | None = None,
    progress: bool = True,
    dtype: str | None = None,
    residual_length: int | None = None,
    num_windows: int = 4,
    prefill: int | None = None,
    chunk: int = 1,
    batch_size: int = 4,
) -> dict:
    """Perplexity of the shipped held-out text for the fp16 baseline and each preset.

    Args:
        model_path: local checkpoint directory (None: the built-in tiny model).
        presets: preset names (``"fp16"`` is always included first) or :class:`EvalPreset` objects.
        device: ``"cpu"``, ``"cuda"``, or None for CUDA when available.
        max_length: tokens per window (at most the model's context).
        out_dir: where ``perplexity.json``, ``perplexity.md`` and ``perplexity_vs_bits.png`` go (None: nowhere).
        num_windows: windows of held-out text (fewer if the text is shorter).
        prefill: tokens of each window given as one prompt (default ``max_length // 4``).
        chunk: tokens per decode-time forward call (1 = token by token).
        batch_size: windows decoded together through one cache.
        dtype: model dtype, ``"float16"``/``"bfloat16"``/``"float32"`` (None: float16 on CUDA,
            float32 on CPU); the cache stores keys, values and metadata in it.
        residual_length: the presets' 16-bit window of newest tokens (None: each preset's own,
            128); a short window makes short evaluations exercise the quantized part.
    Returns: the results dict written to ``perplexity.json``.
    """
    from tqdm.auto import tqdm

    model, tokenizer, dev = load_model(model_path, device, dtype)
    check_length(model, max_length)
    resolved = resolve_presets(presets, residual_length)
    prefill = max(1, max_length // 4) if prefill is None else prefill
    if not 1 <= prefill < max_length - 1:
        raise ValueError(f"prefill={prefill}; it must be in [1, max_length - 2 = {max_length - 2}]")
    windows = windows_from(heldout_token_ids(tokenizer), max_length, num_windows).to(dev)
    steps_per_batch = math.ceil((max_length - prefill) / chunk)
    batches = math.ceil(windows.shape[0] / batch_size)
    bar = tqdm(total=len(resolved) * batches * steps_per_batch, desc="perplexity", disable=not progress)
    rows = []
    for preset in resolved:
        bar.set_postfix_str(preset.name)
        rows.append(preset_perplexity(model, windows, preset, prefill, chunk, lambda: bar.update(1), batch_size))
    bar.close()
    results = {
        "eval": "perplexity", "model": str(model_path or "built-in tiny model"), "device": report.device_name(dev),
        "settings": {"residual_length": residual_length, "max_length": max_length, "windows": int(windows.shape[0]), "prefill": prefill, "chunk": chunk, "batch_size": batch_size,
                     "dtype": str(model.dtype).removeprefix("torch.")},
        "protocol": PROTOCOL, "rows": [dataclasses.asdict(r) for r in rows],
    }
    if out_dir is not None:
        report.write_perplexity(out_dir, results)
    return results
