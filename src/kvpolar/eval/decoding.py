"""Feeding tokens through a cache the way decoding does: prefill once, then small chunks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvpolar.cache.cache import cache_kwargs
from kvpolar.eval.presets import EvalPreset


def new_cache(model: Any, preset: EvalPreset) -> Any:
    """A fresh cache for one sequence (``DynamicCache`` when the factory returns None)."""
    cache = preset.make_cache(model)
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    return cache


@torch.no_grad()
def forward_chunks(
    model: Any,
    cache: Any,
    input_ids: torch.Tensor,
    prefill: int,
    chunk: int,
    on_logits: Callable[[int, torch.Tensor], None],
    on_step: Callable[[], None] | None = None,
) -> None:
    """Prefill ``input_ids[:, :prefill]``, then feed the rest ``chunk`` tokens per forward call.

    ``on_logits(start, logits)`` receives the float32 logits ``[B, n, vocab]`` of every forward call
    after the prefill (positions ``start .. start + n - 1``): each of them read the cache, i.e. the
    keys/values of all earlier tokens as the cache stored them.
    """
    if not 1 <= prefill <= input_ids.shape[1]:
        raise ValueError(f"prefill={prefill}; it must be in [1, {input_ids.shape[1]}] (the sequence length)")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}; it must be >= 1")
    kw = cache_kwargs(model, cache)
    model(input_ids=input_ids[:, :prefill], use_cache=True, **kw)
    pos = prefill
    while pos < input_ids.shape[1]:
        end = min(pos + chunk, input_ids.shape[1])
        logits = model(input_ids=input_ids[:, pos:end], use_cache=True, **kw).logits
        on_logits(pos, logits.float())
        if on_step is not None:
            on_step()
        pos = end


@torch.no_grad()
def greedy_continue(model: Any, cache: Any, context: torch.Tensor, feed: torch.Tensor, new_tokens: int) -> list[int]:
    """Prefill ``context`` ``[1, Tc]``, feed ``feed`` ``[1, Tf]`` one token at a time, then greedy-decode.

    Every generated token comes from a forward call that read the cache (none from the prefill's
    full-precision attention). Returns the ``new_tokens`` generated ids.
    """
    kw = cache_kwargs(model, cache)
    model(input_ids=context, use_cache=True, **kw)
    logits = None
    for i in range(feed.shape[1]):
        logits = model(input_ids=feed[:, i : i + 1], use_cache=True, **kw).logits
    if logits is None:
        raise ValueError("feed must hold at least one token (the answer must be decoded from the cache)")
    out: list[int] = []
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(input_ids=torch.tensor([[nxt]], device=context.device), use_cache=True, **kw).logits
    return out


def cache_memory(cache: Any, model: Any) -> dict[str, float]:
    """Bits/element, bytes and compression against a 16-bit cache, from ``memory_report()`` when the cache has one."""
    report = getattr(cache, "memory_report", None)
    if callable(report):
        r = report()
        return {"bits_per_element": float(r.bits_per_element), "cache_bytes": int(r.total),
                "fp16_bytes": int(r.fp16_bytes), "compression": float(r.compression_ratio)}
    # a stock cache: bytes of the tensors it holds (float32 on CPU counts 32 bits, as memory_report does)
    held = [t for layer in getattr(cache, "layers", []) for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in held)
    fp16 = sum(t.numel() * 2 for t in held)
    return {"bits_per_element": 16.0 * nbytes / fp16 if fp16 else 16.0, "cache_bytes": nbytes, "fp16_bytes": fp16,
            "compression": fp16 / nbytes if nbytes else 1.0}
