"""Attention fidelity per layer on the model's real queries, keys and values.

One forward pass of ``max_length`` held-out tokens with the 16-bit cache records, per layer, the
queries, keys and values the attention function receives (after RoPE, before GQA expansion), through a
registered ``transformers`` attention function that then runs ``sdpa`` unchanged. For each preset, the
preset's key and value quantizers are applied directly to all of that layer's keys and values (no
residual window), and the last ``num_queries`` queries attend causally over them: scores through
``key_quantizer.scores``, outputs through ``value_quantizer.weighted_sum`` of the quantized softmax.
Reported per layer: relative Frobenius error of the attention scores (over attended entries) and of
the attention outputs against the unquantized computation in float32, and of the reconstructed keys
and values.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import torch

from kvpolar.eval import report
from kvpolar.eval.common import check_length, heldout_token_ids, load_model
from kvpolar.eval.presets import EvalPreset, resolve_presets

PROTOCOL = __doc__.split("\n\n", 1)[1].strip()
_CAPTURE = "kvpolar_capture"


@dataclasses.dataclass(frozen=True)
class LayerCapture:
    """``query``: [B, Hq, T, D]; ``key``/``value``: [B, Hkv, T, D] (the model's dtype); softmax ``scale``."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float


@dataclasses.dataclass(frozen=True)
class FidelityRow:
    preset: str
    layer: int
    score_rel_error: float
    output_rel_error: float
    key_rel_error: float
    value_rel_error: float
    key_bits_per_element: float
    value_bits_per_element: float


_captured: dict[int, LayerCapture] | None = None


def _capture_attention(module: Any, query, key, value, attention_mask, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _captured is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        _captured[int(module.layer_idx)] = LayerCapture(query.detach(), key.detach(), value.detach(), float(scale))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


@torch.no_grad()
def capture_qkv(model: Any, input_ids: torch.Tensor) -> dict[int, LayerCapture]:
    """Per-layer queries/keys/values of one forward pass of ``input_ids`` ``[B, T]``."""
    global _captured
    from transformers import AttentionInterface

    AttentionInterface.register(_CAPTURE, _capture_attention)
    previous = model.config._attn_implementation
    _captured = {}
    try:
        model.set_attn_implementation(_CAPTURE)
        model(input_ids=input_ids, use_cache=False)
        return dict(_captured)
    finally:
        _captured = None
        model.set_attn_implementation(previous)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64."""
    return float((approx.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30))


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, (Hq/Hkv) * T, D]: each KV head's queries stacked (quantizer context)."""
    b, hq, t, d = q.shape
    return q.reshape(b, kv_heads, (hq // kv_heads) * t, d)


def layer_fidelity(cap: LayerCapture, preset: EvalPreset, num_queries: int, layer: int) -> FidelityRow:
    """Errors of ``preset``'s quantizers on one layer's captured tensors (see the module docstring)."""
    kq, vq = preset.key_quantizer, preset.value_quantizer
    t = cap.key.shape[-2]
    nq = min(num_queries, t)
    q = cap.query[..., t - nq :, :]
    # causal: query at position t - nq + i attends to keys 0 .. t - nq + i
    mask = torch.arange(t, device=q.device)[None, :] <= torch.arange(t - nq, t, device=q.device)[:, None]
    group = cap.query.shape[1] // cap.key.shape[1]

    def expand(x: torch.Tensor) -> torch.Tensor:
        return x.float().repeat_interleave(group, dim=1)

    exact_scores = q.float() @ expand(cap.key).transpose(-1, -2)
    exact_w = torch.softmax((exact_scores * cap.scale).masked_fill(~mask, float("-inf")), dim=-1)
    exact_out = exact_w @ expand(cap.value)
    if kq is None:
        k_scores, k_err, k_bits = exact_scores, 0.0, 16.0
    else:
        ctx = {"queries": _grouped(cap.query, cap.key.shape[1])} if "queries" in kq.context_keys else {}
        pk = kq.quantize(cap.key, **ctx)
        k_scores = kq.scores(q, pk)
        k_err, k_bits = relative_error(kq.dequantize(pk), cap.key), pk.bits_per_element
    w = torch.softmax((k_scores * cap.scale).masked_fill(~mask, float("-inf")), dim=-1)
    if vq is None:
        out, v_err, v_bits = w @ expand(cap.value), 0.0, 16.0
    else:
        ctx = {"queries": _grouped(cap.query, cap.key.shape[1])} if "queries" in vq.context_keys else {}
        pv = vq.quantize(cap.value, **ctx)
        out = vq.weighted_sum(w, pv)
        v_err, v_bits = relative_error(vq.dequantize(pv), cap.value), pv.bits_per_element
    m = mask.expand_as(exact_scores)
    return FidelityRow(preset.name, layer, relative_error(k_scores[m], exact_scores[m]), relative_error(out, exact_out),
                       k_err, v_err, float(k_bits), float(v_bits))


def run_fidelity(
    model_path: str | pathlib.Path | None,
    presets: Sequence[str | EvalPreset],
    device: str | None = None,
    max_length: int = 2048,
    out_dir: str | pathlib.Path | None = None,
    progress: bool = True,
    dtype: str | None = None,
    num_queries: int = 64,
) -> dict:
    """Per-layer score/output/key/value relative errors of each preset on one held-out window.

    Writes ``fidelity.json``, ``fidelity.md`` and ``fidelity_layers.png`` to ``out_dir``.
    """
    from tqdm.auto import tqdm

    model, tokenizer, dev = load_model(model_path, device, dtype)
    check_length(model, max_length)
    resolved = [p for p in resolve_presets(presets) if not p.is_baseline]
    ids = heldout_token_ids(tokenizer)
    if len(ids) < max_length:
        raise ValueError(f"the evaluation text has {len(ids)} tokens, fewer than max_length={max_length}")
    captures = capture_qkv(model, torch.tensor([ids[:max_length]], device=dev))
    rows = []
    bar = tqdm(total=len(resolved) * len(captures), desc="fidelity", disable=not progress)
    for preset in resolved:
        bar.set_postfix_str(preset.name)
        for layer in sorted(captures):
            rows.append(layer_fidelity(captures[layer], preset, num_queries, layer))
            bar.update(1)
    bar.close()
    results = {
        "eval": "fidelity", "model": str(model_path or "built-in tiny model"), "device": report.device_name(dev),
        "settings": {"max_length": max_length, "num_queries": num_queries, "dtype": str(model.dtype).removeprefix("torch.")},
        "protocol": PROTOCOL, "rows": [dataclasses.asdict(r) for r in rows],
    }
    if out_dir is not None:
        report.write_fidelity(out_dir, results)
    return results
