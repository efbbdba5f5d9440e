"""Needle in a haystack: retrieve a pass key hidden at a given depth of held-out filler text.

A prompt of ``length`` tokens is filler from the held-out documents with the sentence
"The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at ``depth`` (0 = start,
1 = just before the question), then "What is the pass key? The pass key is". The haystack goes in as
one prefill; the question is fed token by token and the answer greedily decoded, so every answer
token reads the cache as the preset stored it. Exact match: the decoded text starts with the digits.
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
from collections.abc import Sequence
from typing import Any

import torch

from kvpolar.eval import report
from kvpolar.eval.common import check_length, heldout_token_ids, load_model
from kvpolar.eval.decoding import greedy_continue, new_cache
from kvpolar.eval.presets import EvalPreset, reset_attention, resolve_presets

PROTOCOL = __doc__.split("\n\n", 1)[1].strip()
QUESTION = " What is the pass key? The pass key is"


def needle_text(passkey: str) -> str:
    return f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "


def build_prompt(tokenizer: Any, filler: Sequence[int], length: int, depth: float, passkey: str) -> tuple[list[int], list[int]]:
    """``(haystack ids, question ids)`` with ``len(haystack) + len(question) == length``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth}; it must be in [0, 1]")
    needle = tokenizer(needle_text(passkey), add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    n_filler = length - len(bos) - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"length={length} cannot hold the needle and the question ({length - n_filler} tokens)")
    if len(filler) < n_filler:
        raise ValueError(f"the filler text has {len(filler)} tokens; length={length} needs {n_filler}")
    cut = round(depth * n_filler)
    hay = bos + list(filler[:cut]) + needle + list(filler[cut:n_filler])
    return hay, question


@dataclasses.dataclass(frozen=True)
class NeedleCell:
    preset: str
    length: int
    depth: float
    accuracy: float
    trials: int


def needle_grid(model: Any, tokenizer: Any, preset: EvalPreset, filler: Sequence[int], lengths: Sequence[int],
                depths: Sequence[float], trials: int, seed: int = 0, on_step=None) -> list[NeedleCell]:
    """Retrieval accuracy per (length, depth) for one preset; pass keys drawn from ``seed``."""
    device = next(model.parameters()).device
    cells = []
    for length in lengths:
        for depth in depths:
            rng = random.Random(f"{seed}-{length}-{depth}")  # the same keys for every preset
            hits = 0
            for t in range(trials):
                passkey = str(rng.randint(10000, 99999))
                offset = (t * 997) % max(1, len(filler) - length)
                hay, question = build_prompt(tokenizer, filler[offset:], length, depth, passkey)
                answer = greedy_continue(model, new_cache(model, preset), torch.tensor([hay], device=device),
                                         torch.tensor([question], device=device), new_tokens=4)
                hits += tokenizer.decode(answer).strip().startswith(passkey)
                if on_step is not None:
                    on_step()
            cells.append(NeedleCell(preset.name, length, depth, hits / trials, trials))
    reset_attention(model)
    return cells


def run_needle(
    model_path: str | pathlib.Path | None,
    presets: Sequence[str | EvalPreset],
    device: str | None = None,
    max_length: int = 2048,
    out_dir: str | pathlib.Path | None = None,
    progress: bool = True,
    dtype: str | None = None,
    residual_length: int | None = None,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 4,
    seed: int = 0,
) -> dict:
    """Needle accuracy on a depth x length grid for the fp16 baseline and each preset.

    ``lengths`` defaults to powers of two from 256 up to ``max_length`` (and ``max_length``).
    Writes ``needle.json``, ``needle.md`` and ``needle_<preset>.png`` heatmaps to ``out_dir``.
    """
    from tqdm.auto import tqdm

    model, tokenizer, _ = load_model(model_path, device, dtype)
    check_length(model, max_length)
    if lengths is None:
        lengths = sorted({n for n in (256, 512, 1024, 2048, 4096, 8192) if n < max_length} | {max_length})
    for n in lengths:
        check_length(model, n, "needle length")
    resolved = resolve_presets(presets, residual_length)
    filler = [i for i in heldout_token_ids(tokenizer) if i != tokenizer.bos_token_id]
    bar = tqdm(total=len(resolved) * len(lengths) * len(depths) * trials, desc="needle", disable=not progress)
    cells = []
    for preset in resolved:
        bar.set_postfix_str(preset.name)
        cells += needle_grid(model, tokenizer, preset, filler, lengths, depths, trials, seed, lambda: bar.update(1))
    bar.close()
    results = {
        "eval": "needle", "model": str(model_path or "built-in tiny model"), "device": report.device_name(model.device),
        "settings": {"residual_length": residual_length, "lengths": list(lengths), "depths": list(depths), "trials": trials, "seed": seed,
                     "dtype": str(model.dtype).removeprefix("torch.")},
        "protocol": PROTOCOL, "cells": [dataclasses.asdict(c) for c in cells],
    }
    if out_dir is not None:
        report.write_needle(out_dir, results)
    return results
