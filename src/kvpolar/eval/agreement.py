"""Greedy-generation agreement with the fp16 baseline.

For each prompt (a window of held-out text), the prompt minus its last token is one prefill, the last
token is fed through the cache, and ``new_tokens`` tokens are greedily decoded, with the baseline cache
and with each preset. Reported: the fraction of positions where the preset's token equals the
baseline's, and the mean number of tokens before the first difference.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import torch

from kvpolar.eval import report
from kvpolar.eval.common import check_length, heldout_token_ids, load_model
from kvpolar.eval.decoding import greedy_continue, new_cache
from kvpolar.eval.presets import reset_attention, resolve_presets

PROTOCOL = __doc__.split("\n\n", 1)[1].strip()


@dataclasses.dataclass(frozen=True)
class AgreementRow:
    preset: str
    token_agreement: float
    tokens_before_divergence: float
    prompts: int
    new_tokens: int


def agreement(reference: Sequence[Sequence[int]], generated: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(fraction of equal positions, mean length of the common prefix) over paired generations."""
    same = total = prefix = 0
    for ref, gen in zip(reference, generated, strict=True):
        eq = [a == b for a, b in zip(ref, gen, strict=True)]
        same += sum(eq)
        total += len(eq)
        prefix += next((i for i, e in enumerate(eq) if not e), len(eq))
    return same / max(total, 1), prefix / max(len(reference), 1)


def run_agreement(
    model_path: str | pathlib.Path | None,
    presets,
    device: str | None = None,
    max_length: int = 2048,
    out_dir: str | pathlib.Path | None = None,
    progress: bool = True,
    dtype: str | None = None,
    residual_length: int | None = None,
    prompts: int = 4,
    new_tokens: int = 64,
) -> dict:
    """Token agreement of greedy generation with fp16; prompts of ``max_length - new_tokens`` tokens."""
    from tqdm.auto import tqdm

    model, tokenizer, dev = load_model(model_path, device, dtype)
    check_length(model, max_length)
    prompt_len = max_length - new_tokens
    if prompt_len < 2:
        raise ValueError(f"max_length={max_length} leaves no prompt for new_tokens={new_tokens}")
    resolved = resolve_presets(presets, residual_length)
    ids = heldout_token_ids(tokenizer)
    stride = max(1, (len(ids) - prompt_len) // max(prompts, 1))
    starts = [k * stride for k in range(prompts) if k * stride + prompt_len <= len(ids)]
    bar = tqdm(total=len(resolved) * len(starts), desc="agreement", disable=not progress)
    outputs: dict[str, list[list[int]]] = {}
    for preset in resolved:
        bar.set_postfix_str(preset.name)
        outputs[preset.name] = []
        for s in starts:
            p = torch.tensor([ids[s : s + prompt_len]], device=dev)
            outputs[preset.name].append(greedy_continue(model, new_cache(model, preset), p[:, :-1], p[:, -1:], new_tokens))
            bar.update(1)
        reset_attention(model)
    bar.close()
    base = outputs[resolved[0].name]
    rows = []
    for preset in resolved:
        agree, prefix = agreement(base, outputs[preset.name])
        rows.append(AgreementRow(preset.name, agree, prefix, len(starts), new_tokens))
    results = {
        "eval": "agreement", "model": str(model_path or "built-in tiny model"), "device": report.device_name(dev),
        "settings": {"residual_length": residual_length, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "prompts": len(starts),
                     "dtype": str(model.dtype).removeprefix("torch.")},
        "protocol": PROTOCOL, "rows": [dataclasses.asdict(r) for r in rows],
        "samples": {name: tokenizer.decode(out[0]) for name, out in outputs.items()} if starts else {},
    }
    if out_dir is not None:
        report.write_agreement(out_dir, results)
    return results
