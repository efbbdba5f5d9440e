"""The quantized cache across model families (Llama, Mistral, Qwen2, Qwen3) and every registered preset."""

from __future__ import annotations

import pytest
import torch
from cache_helpers import FAMILIES, QuantizedKVCache, config, continuation, left_padded, stock_logits, teacher_forced, tiny_model

import kvpolar
from kvpolar.cache.config import PRESETS

REGISTERED = [
    name for name, c in PRESETS.items()
    if {c.key_quantizer, c.value_quantizer} <= set(kvpolar.available_quantizers())
    and all({o.get("key_quantizer", c.key_quantizer), o.get("value_quantizer", c.value_quantizer)}
            <= set(kvpolar.available_quantizers()) for o in c.layer_overrides.values())
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return tiny_model(request.param, layers=2, kv_heads=1)  # GQA 4


# every registered preset on Llama; on the other families, one preset per kind of key path
PER_FAMILY = [p for p in ("kivi-2", "polar-rope-3", "squat-2", "turbo-4") if p in REGISTERED]


@pytest.mark.parametrize("preset", REGISTERED)
def test_generate_every_preset(preset):
    _generate(tiny_model("llama", layers=2, kv_heads=1), preset)


@pytest.fixture(scope="module", params=[f for f in sorted(FAMILIES) if f != "llama"])
def other_family(request):
    return tiny_model(request.param, layers=2, kv_heads=1)


@pytest.mark.parametrize("preset", PER_FAMILY)
def test_generate_other_families(other_family, preset):
    _generate(other_family, preset)


def _generate(model, preset):
    """Prompts long enough (136 + padding) that groups of up to 128 tokens reach the packed path."""
    ids, mask = left_padded([136, 120])
    changes = {"residual_length": 4}
    if PRESETS[preset].full_precision_layers:  # boundary-2 would cover both layers of the tiny model
        changes["full_precision_layers"] = (0,)
    cache = QuantizedKVCache(model.config, config(preset, **changes))
    out = model.generate(ids, attention_mask=mask, **kvpolar.cache_kwargs(model, cache), max_new_tokens=6,
                         do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 142) and cache.get_seq_length() == 141
    assert all(torch.isfinite(s).all() for s in out.scores)
    quantized = [layer for layer in cache.layers if not layer.plan.full_precision]
    assert quantized and all(layer.packed_keys is not None for layer in quantized)
    rep = cache.memory_report()
    assert rep.total > 0 and rep.tokens == 141
    if "queries" in quantized[0].key_quantizer.context_keys:  # SQuat: prompt subspace kept and counted
        kept = quantized[0].context_nbytes()
        assert kept and all(rep.metadata_fields[f"key.{k}"] == len(quantized) * v for k, v in kept.items())


def test_none_equals_dynamic_cache(model):
    ids, mask = left_padded([30, 17])
    cont = continuation(2, 6)
    ref, _ = stock_logits(model, ids, mask, cont)
    got = teacher_forced(model, ids, mask, cont, QuantizedKVCache(model.config, config("none", residual_length=3)))
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("family,extra", [
    ("mistral", {"sliding_window": 12}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
])
def test_sliding_window_shorter_than_context(family, extra):
    """The sliding-window mask carries the window: results equal the stock cache's (the quantized cache
    keeps every token; memory is not reclaimed beyond the window)."""
    m = tiny_model(family, layers=2, **extra)
    ids, mask = left_padded([30, 17])
    cont = continuation(2, 6)
    ref, _ = stock_logits(m, ids, mask, cont)
    got = teacher_forced(m, ids, mask, cont, QuantizedKVCache(m.config, config("none", residual_length=3)))
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
