"""``kvpolar demo``: greedy generation on a real model with the stock cache and every preset.

For each preset: bits/element and bytes of the cache (from ``QuantizedKVCache.memory_report``),
compression against a 16-bit cache, agreement of the generated tokens with the stock cache's run, and
decode speed. Runs on the built-in model (``kvpolar.assets.tiny_model_path()``) by default. The
stock cache's row is named by its width: ``"16-bit"`` for float16 / bfloat16 models, ``"32-bit"``
for float32 (whose bytes are then twice a 16-bit cache's: compression 0.50x). ``kvpolar bench`` runs
the same loop, optionally with the presets' decode steps replayed from CUDA graphs (``DECODINGS``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_PROMPT_TOKENS = 768
DEFAULT_NEW_TOKENS = 48


@dataclasses.dataclass(frozen=True)
class GenerationRow:
    preset: str
    bits_per_element: float
    cache_bytes: int
    compression: float
    agreement: float  # fraction of generated positions equal to the stock cache run's tokens
    first_divergence: int | None  # index of the first generated token that differs, None if none
    tokens_per_second: float
    text: str
    decoding: str = "generate"  # how the tokens were decoded (``DECODINGS``), or why replaying was refused


#: How ``run_generation_demo`` decodes the presets' tokens: ``"generate"`` (``model.generate``),
#: ``"replayed"`` (``model.generate(..., custom_generate=kvpolar.replayed_decoding)``: decode steps
#: recorded in CUDA graphs and replayed; a CUDA device) or ``"stretches"`` (the same call with
#: ``graphs=False``: its stretches run eagerly, on any device, the tokens ``generate``'s). The stock
#: cache's row always takes ``generate``.
DECODINGS = ("generate", "replayed", "stretches")


def baseline_name(dtype: torch.dtype) -> str:
    """The stock cache's row: ``"16-bit"`` (float16, bfloat16) or ``"32-bit"`` (float32)."""
    return f"{8 * dtype.itemsize}-bit"


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
    label: str = "kvpolar demo",
    decoding: str = "generate",
) -> tuple[list[GenerationRow], dict[str, Any]]:
    """Generate ``new_tokens`` greedily after a held-out prompt with the 16-bit cache, then each preset.

    The first row, ``"16-bit"``, is the stock ``DynamicCache`` with ``sdpa``: the reference for token
    agreement. ``progress`` shows a tqdm bar on stderr, named ``label``. ``dtype`` is the model's (and so the cache's)
    dtype: float16 by default, on the CPU too, so bits/element are those of a 16-bit deployment
    (None: float16 on CUDA, float32 on CPU). ``decoding``: how the presets decode (``DECODINGS``); a
    preset that replayed decoding refuses (e.g. every layer kept in 16 bits) takes ``generate``, its row
    saying why. Every run suppresses the end-of-sequence token, so that each decodes ``new_tokens``.
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding={decoding!r}; allowed: {', '.join(DECODINGS)}")
    if decoding == "replayed" and not str(device).startswith("cuda"):
        raise ValueError(f"decoding='replayed' records CUDA graphs; device={device!r} is not a CUDA device")
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
        "decoding": decoding,
    }
    rows: list[GenerationRow] = []
    baseline: torch.Tensor | None = None
    stock = baseline_name(model.dtype)
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)  # (the same for every run)
    runs = tqdm([stock, *presets], desc=label, unit="run", disable=not progress)
    for preset in runs:
        runs.set_postfix_str(preset)
        if preset == stock:
            model.set_attn_implementation("sdpa")
            cache: Any = transformers.DynamicCache(config=model.config)
        else:
            cache = kvpolar.enable(model, preset)
        how = "generate" if preset == stock else decoding
        start = time.perf_counter()
        out = None
        if how != "generate":  # generate's own call, its loop replayed decoding's
            try:
                out = model.generate(ids, **kvpolar.cache_kwargs(model, cache), **settings,
                                     custom_generate=kvpolar.replayed_decoding, graphs=how == "replayed")
            except ValueError as err:  # (a cache replayed decoding refuses: its row says why)
                how = f"generate (replaying refused: {err})"
                cache = kvpolar.enable(model, preset)
                start = time.perf_counter()
        if out is None:
            out = model.generate(ids, **kvpolar.cache_kwargs(model, cache), **settings)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        generated = out[0, ids.shape[1]:].cpu()
        if baseline is None:
            baseline = generated
        rows.append(_row(preset, cache, model, generated, baseline, elapsed, tokenizer, how))
    return rows, setup


def _row(preset: str, cache: Any, model: Any, generated: torch.Tensor, baseline: torch.Tensor, elapsed: float,
         tokenizer: Any, decoding: str = "generate") -> GenerationRow:
    from kvpolar.eval.decoding import cache_memory  # (the stock cache counted by its tensors' bytes)

    memory = cache_memory(cache, model)
    n = min(len(generated), len(baseline))
    same = generated[:n] == baseline[:n]
    diverged = (~same).nonzero()
    return GenerationRow(
        preset=preset,
        bits_per_element=memory["bits_per_element"],
        cache_bytes=int(memory["cache_bytes"]),
        compression=memory["compression"],
        agreement=float(same.float().mean()) if n else 1.0,
        first_divergence=int(diverged[0]) if len(diverged) else None,
        tokens_per_second=len(generated) / elapsed,
        text=tokenizer.decode(generated, skip_special_tokens=True),
        decoding=decoding,
    )


def format_generation_table(rows: Sequence[GenerationRow]) -> str:
    """Markdown table of ``rows``; the first row is the stock cache the agreement is measured against.
    Where some preset did not decode with ``generate``, a last column says how each did, and the
    reasons replaying was refused follow the table."""
    shown = any(r.decoding != "generate" for r in rows)
    lines = [
        f"| preset | bits/elem | cache bytes | compression | agreement with {rows[0].preset} | first divergence "
        "| tokens/s |" + (" decoding |" if shown else ""),
        "|---|---:|---:|---:|---:|---:|---:|" + ("---|" if shown else ""),
    ]
    notes = []
    for r in rows:
        div = "-" if r.first_divergence is None else str(r.first_divergence)
        how = r.decoding.split(" (", 1)[0] + (" (replaying refused)" if " (" in r.decoding else "")
        lines.append(
            f"| {r.preset} | {r.bits_per_element:.2f} | {r.cache_bytes:,} | {r.compression:.2f}x | "
            f"{100 * r.agreement:.0f}% | {div} | {r.tokens_per_second:.1f} |" + (f" {how} |" if shown else "")
        )
        if " (" in r.decoding:
            notes.append(f"- {r.preset}: {r.decoding}")
    return "\n".join(lines + ([""] + notes if notes else []))
