"""``kvpolar demo``: greedy generation on a real model with the 16-bit cache and every preset.

For each preset: bits/element and bytes of the cache (from ``QuantizedKVCache.memory_report``),
compression against the 16-bit cache, agreement of the generated tokens with the 16-bit run, and
decode speed. Runs on the built-in model (``kvpolar.assets.tiny_model_path()``) by default.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

BASELINE = "16-bit"
DEFAULT_PROMPT_TOKENS = 768
DEFAULT_NEW_TOKENS = 48


@dataclasses.dataclass(frozen=True)
class GenerationRow:
    preset: str
    bits_per_element: float
    cache_bytes: int
    compression: float
    agreement: float  # fraction of generated positions equal to the 16-bit run's tokens
    first_divergence: int | None  # index of the first generated token that differs, None if none
    tokens_per_second: float
    text: str


def demo_prompt(tokenizer: Any, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the built-in held-out text: ``[1, tokens]`` int64."""
    from kvpolar.eval.common import heldout_token_ids

    ids = heldout_token_ids(tokenizer)
    if len(ids) < tokens:
        raise ValueError(f"the held-out text holds {len(ids)} tokens; fewer than the {tokens} asked for")
    return torch.tensor([ids[:tokens]], dtype=torch.long)


@torch.no_grad()
def run_generation_demo(
    presets: Sequence[str],
    model_path: str | None = None,
    device: str = "cpu",
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    progress: bool = False,
    dtype: str | None = "float16",
) -> tuple[list[GenerationRow], dict[str, Any]]:
    """Generate ``new_tokens`` greedily after a held-out prompt with the 16-bit cache, then each preset.

    The first row, ``"16-bit"``, is the stock ``DynamicCache`` with ``sdpa``: the reference for token
    agreement. ``progress`` shows a tqdm bar on stderr. ``dtype`` is the model's (and so the cache's)
    dtype: float16 by default, on the CPU too, so bits/element are those of a 16-bit deployment
    (None: float16 on CUDA, float32 on CPU).
    """
    import transformers
    from tqdm import tqdm

    import kvpolar

    from kvpolar.eval.common import load_model

    model, tokenizer, _ = load_model(model_path, device, dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_tokens} + {new_tokens} new tokens is longer than the model's context ({limit} tokens)"
        )
    ids = demo_prompt(tokenizer, prompt_tokens).to(device)
    setup = {
        "model": model_path or "built-in tiny Llama (kvpolar.assets.tiny_model_path())",
        "device": device,
        "dtype": str(model.dtype).replace("torch.", ""),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
    }
    rows: list[GenerationRow] = []
    baseline: torch.Tensor | None = None
    runs = tqdm([BASELINE, *presets], desc="kvpolar demo", unit="run", disable=not progress)
    for preset in runs:
        runs.set_postfix_str(preset)
        if preset == BASELINE:
            model.set_attn_implementation("sdpa")
            cache: Any = transformers.DynamicCache(config=model.config)
        else:
            cache = kvpolar.enable(model, preset)
        start = time.perf_counter()
        out = model.generate(
            ids, **kvpolar.cache_kwargs(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=tokenizer.eos_token_id,
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        generated = out[0, ids.shape[1]:].cpu()
        if baseline is None:
            baseline = generated
        rows.append(_row(preset, cache, generated, baseline, elapsed, tokenizer))
    return rows, setup


def _row(preset: str, cache: Any, generated: torch.Tensor, baseline: torch.Tensor, elapsed: float, tokenizer: Any) -> GenerationRow:
    if preset == BASELINE:
        nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        bits, ratio = 16.0, 1.0
    else:
        report = cache.memory_report()
        nbytes, bits, ratio = report.total, report.bits_per_element, report.compression_ratio
    n = min(len(generated), len(baseline))
    same = generated[:n] == baseline[:n]
    diverged = (~same).nonzero()
    return GenerationRow(
        preset=preset,
        bits_per_element=bits,
        cache_bytes=int(nbytes),
        compression=ratio,
        agreement=float(same.float().mean()) if n else 1.0,
        first_divergence=int(diverged[0]) if len(diverged) else None,
        tokens_per_second=len(generated) / elapsed,
        text=tokenizer.decode(generated, skip_special_tokens=True),
    )


def format_generation_table(rows: Sequence[GenerationRow]) -> str:
    lines = [
        "| preset | bits/elem | cache bytes | compression | agreement with 16-bit | first divergence | tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        div = "-" if r.first_divergence is None else str(r.first_divergence)
        lines.append(
            f"| {r.preset} | {r.bits_per_element:.2f} | {r.cache_bytes:,} | {r.compression:.2f}x | "
            f"{100 * r.agreement:.0f}% | {div} | {r.tokens_per_second:.1f} |"
        )
    return "\n".join(lines)
