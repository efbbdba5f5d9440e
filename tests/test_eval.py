"""The evaluation harness on CPU with the built-in model at short lengths (fp16 DynamicCache baseline
plus a test-only cache that quantizes keys/values with a kvpolar quantizer as they are written)."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import kvpolar
from kvpolar.eval import EvalPreset, resolve_presets, run_agreement, run_fidelity, run_needle, run_perplexity
from kvpolar.eval import fidelity, needle, perplexity
from kvpolar.eval.agreement import agreement
from kvpolar.eval.common import check_length, heldout_token_ids, load_model
from kvpolar.eval.presets import baseline_preset


class _WriteQuantizedCache(transformers.DynamicCache):
    """Test stand-in for a quantized cache: new keys/values are stored quantize-dequantized."""

    def __init__(self, config, q):
        super().__init__(config=config)
        self.q = q

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = self.q.dequantize(self.q.quantize(key_states))
        v = self.q.dequantize(self.q.quantize(value_states))
        return super().update(k, v, layer_idx, *args, **kwargs)


def _preset(name: str, **params) -> EvalPreset:
    q = kvpolar.quantizer(name, **params)
    label = f"{name}-{params.get('bits', '')}"
    return EvalPreset(label, lambda model: _WriteQuantizedCache(model.config, q), q, q, method=name)


@pytest.fixture(scope="module")
def loaded():
    return load_model(None, "cpu")


@pytest.fixture(scope="module")
def windows(loaded):
    _, tokenizer, _ = loaded
    return perplexity.windows_from(heldout_token_ids(tokenizer), 96, 2)


def test_decode_protocol_matches_one_forward_pass_for_the_baseline(loaded, windows):
    """Prefill + chunked decoding through DynamicCache (one window or a batch of two per cache)
    scores exactly what one forward pass does."""
    model, _, _ = loaded
    prefill = 40
    row = perplexity.preset_perplexity(model, windows, baseline_preset(), prefill=prefill, chunk=11, batch_size=1)
    batched = perplexity.preset_perplexity(model, windows, baseline_preset(), prefill=prefill, chunk=11, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    # positions prefill .. L-2 predict tokens prefill+1 .. L-1 (the decode-time predictions)
    nll = torch.nn.functional.cross_entropy(logits[:, prefill:-1].reshape(-1, logits.shape[-1]), windows[:, prefill + 1 :].reshape(-1))
    assert row.tokens_scored == batched.tokens_scored == 2 * (windows.shape[1] - prefill - 1)
    assert math.isclose(batched.nll, float(nll), rel_tol=1e-4)
    assert math.isclose(row.nll, float(nll), rel_tol=1e-4)
    assert row.bits_per_element == torch.finfo(model.dtype).bits  # the stock cache holds the model dtype


def test_quantized_cache_costs_perplexity(loaded, windows):
    model, _, _ = loaded
    base = perplexity.preset_perplexity(model, windows[:1], baseline_preset(), prefill=32, chunk=32)
    kivi2 = perplexity.preset_perplexity(model, windows[:1], _preset("kivi", bits=2, group_size=32, axis="token"), 32, 32)
    kivi8 = perplexity.preset_perplexity(model, windows[:1], _preset("kivi", bits=8, group_size=32, axis="token"), 32, 32)
    assert kivi2.perplexity > base.perplexity
    assert abs(kivi8.nll - base.nll) < abs(kivi2.nll - base.nll)


def test_run_perplexity_writes_json_markdown_and_plot(tmp_path):
    preset = _preset("kivi", bits=4, group_size=32, axis="token")
    res = run_perplexity(None, ["fp16", preset], "cpu", max_length=64, out_dir=tmp_path, progress=False,
                         num_windows=1, prefill=32, chunk=16)
    assert [r["preset"] for r in res["rows"]] == ["fp16", "kivi-4"]
    saved = json.loads((tmp_path / "perplexity.json").read_text())
    assert saved["rows"] == res["rows"]
    md = (tmp_path / "perplexity.md").read_text()
    assert "Protocol" in md and "kivi-4" in md
    assert (tmp_path / "perplexity_vs_bits.png").stat().st_size > 0


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_prompt_places_the_needle_at_depth(loaded, depth):
    _, tokenizer, _ = loaded
    filler = list(range(100, 400))
    hay, question = needle.build_prompt(tokenizer, filler, 120, depth, "48213")
    assert len(hay) + len(question) == 120
    needle_ids = tokenizer(needle.needle_text("48213"), add_special_tokens=False).input_ids
    start = next(i for i in range(len(hay)) if hay[i : i + len(needle_ids)] == needle_ids)
    n_filler = len(hay) - 1 - len(needle_ids)
    assert start - 1 == round(depth * n_filler)
    with pytest.raises(ValueError, match="depth"):
        needle.build_prompt(tokenizer, filler, 120, 1.5, "1")


def test_run_needle_grid_and_heatmaps(tmp_path):
    res = run_needle(None, [_preset("kivi", bits=2, group_size=32, axis="token")], "cpu", max_length=64,
                     out_dir=tmp_path, progress=False, lengths=[40, 48], depths=[0.0, 1.0], trials=1)
    assert len(res["cells"]) == 2 * 2 * 2
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in res["cells"])
    assert (tmp_path / "needle_fp16.png").is_file() and (tmp_path / "needle_kivi-2.png").is_file()
    baseline_hits = sum(c["accuracy"] for c in res["cells"] if c["preset"] == "fp16")
    assert ("retrieves no pass key" in (tmp_path / "needle.md").read_text()) == (baseline_hits == 0)


def test_capture_matches_the_cache_keys_and_values(loaded, windows):
    """Captured keys/values are what the model writes into its cache (after RoPE, per KV head)."""
    model, _, _ = loaded
    caps = fidelity.capture_qkv(model, windows)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=windows, **kvpolar.cache_kwargs(model, cache), use_cache=True)
    assert sorted(caps) == list(range(model.config.num_hidden_layers))
    for i, cap in caps.items():
        torch.testing.assert_close(cap.key, cache.layers[i].keys, rtol=0, atol=0)
        torch.testing.assert_close(cap.value, cache.layers[i].values, rtol=0, atol=0)
        assert cap.query.shape[1] == model.config.num_attention_heads
    assert model.config._attn_implementation == "sdpa"


def test_fidelity_errors_order_with_bits(loaded, windows):
    model, _, _ = loaded
    caps = fidelity.capture_qkv(model, windows)
    exact = fidelity.layer_fidelity(caps[1], _preset("none"), 16, 1)
    assert exact.score_rel_error < 1e-6 and exact.output_rel_error < 1e-6
    e2 = fidelity.layer_fidelity(caps[1], _preset("kivi", bits=2, group_size=32, axis="token"), 16, 1)
    e8 = fidelity.layer_fidelity(caps[1], _preset("kivi", bits=8, group_size=32, axis="token"), 16, 1)
    assert 0 < e8.score_rel_error < e2.score_rel_error
    assert 0 < e8.output_rel_error < e2.output_rel_error


def test_run_fidelity_and_agreement_write_reports(tmp_path):
    preset = _preset("kivi", bits=2, group_size=32, axis="token")
    res = run_fidelity(None, [preset], "cpu", max_length=64, out_dir=tmp_path, progress=False, num_queries=8)
    assert {r["layer"] for r in res["rows"]} == set(range(6))
    assert (tmp_path / "fidelity_layers.png").is_file()
    res = run_agreement(None, [preset], "cpu", max_length=48, out_dir=tmp_path, progress=False, prompts=1, new_tokens=6)
    rows = {r["preset"]: r for r in res["rows"]}
    assert rows["fp16"]["token_agreement"] == 1.0 and rows["fp16"]["tokens_before_divergence"] == 6
    assert (tmp_path / "agreement.md").is_file()


def test_agreement_counts_equal_positions_and_common_prefix():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == (0.75, 2.0)
    assert agreement([[1, 2], [3, 4]], [[1, 2], [0, 4]]) == (0.75, 1.0)


def test_bad_inputs_say_what_is_wrong(loaded, tmp_path):
    model, _, _ = loaded
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "missing", "cpu")
    with pytest.raises(ValueError, match="longer than the model's context"):
        check_length(model, 4096)
    with pytest.raises(ValueError, match="unknown preset 'no-such-preset'|preset"):
        resolve_presets(["no-such-preset"])
    with pytest.raises(ValueError, match="more than once"):
        resolve_presets(["fp16", baseline_preset()])


def test_kvpolar_presets_run_through_the_quantized_cache(loaded):
    """With the transformers cache (kvpolar.cache, merged from the cache branch): real presets."""
    pytest.importorskip("kvpolar.cache", reason="kvpolar.cache (the transformers cache) is not on this branch yet")
    from kvpolar.eval.presets import kvpolar_preset

    model, tokenizer, _ = loaded
    w = perplexity.windows_from(heldout_token_ids(tokenizer), 224, 1)  # longer than the 128-token residual window
    rows = {p.name: perplexity.preset_perplexity(model, w, p, prefill=16, chunk=52)
            for p in (baseline_preset(), kvpolar_preset("kivi-2"), kvpolar_preset("kivi-8"))}
    assert model.config._attn_implementation == "sdpa"  # put back after the kvpolar presets
    assert rows["kivi-2"].bits_per_element < rows["kivi-8"].bits_per_element < rows["fp16"].bits_per_element
    assert abs(rows["kivi-8"].nll - rows["fp16"].nll) < abs(rows["kivi-2"].nll - rows["fp16"].nll)
    cap = fidelity.capture_qkv(model, w)[2]
    assert 0 < fidelity.layer_fidelity(cap, kvpolar_preset("kivi-2"), 8, 2).score_rel_error < 1
