"""Generation modes that change the cache's batch or length: beam search (reorder_cache), modes that
repeat or select sequences, assisted / speculative decoding (crop after a multi-token step), and long
steps after the first (a prefill in chunks, the next turn of a conversation)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from cache_helpers import VOCAB, QuantizedKVCache, config, left_padded, tiny_model

import kvpolar

# (method, params, context): every stored form, including the ones whose fields lack the batch axis
# (fp8's per-chunk token counts, one scale for the whole tensor) or add one (online codebooks)
FORMATS = [
    ("none", {}, False),
    ("kivi", {"bits": 2, "axis": "channel"}, False),
    ("kivi", {"bits": 4, "axis": "token"}, False),  # tokens-contiguous scale / minimum
    ("polar-rope", {"radius_bits": 2, "angle_bits": 4}, False),
    ("polar-recursive", {}, False),
    ("polar-recursive", {"codebook": "online"}, False),
    ("squat", {"bits": 2, "block_size": 16}, True),
    ("turbo", {"bits": 3}, False),
    ("fp8", {"scale": "head"}, False),
    ("fp8", {"scale": "tensor"}, False),
]


@pytest.mark.parametrize("name,params,needs_queries", FORMATS, ids=lambda v: str(v))
def test_select_batch_picks_the_rows_of_every_stored_form(name, params, needs_queries):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 64, 32, generator=gen)
    q = kvpolar.quantizer(name, **params)
    context = {"queries": torch.randn(3, 2, 8, 32, generator=gen)} if needs_queries else {}
    packed = q.quantize(x, **context)
    index = torch.tensor([2, 0, 0, 1])
    picked = packed.select_batch(index)
    assert picked.shape == (4, 2, 64, 32) and type(picked) is type(packed)
    if name == "fp8" and params["scale"] == "tensor":  # one scale for all rows: kept, not indexed
        assert picked.scale.shape[0] == 1
    torch.testing.assert_close(q.dequantize(picked), q.dequantize(packed)[index], rtol=0, atol=0)
    for field, tensor in picked.stored_tensors().items():  # tokens-contiguous fields keep their layout
        old = getattr(packed, field)
        if tensor.dim() >= 2 and min(tensor.shape[-2:]) > 1:
            assert (tensor.stride(-2) < tensor.stride(-1)) == (old.stride(-2) < old.stride(-1)), field
    with pytest.raises(ValueError, match="index: expected a 1-D integer tensor"):
        packed.select_batch(torch.tensor([[0]]))


def _feed(model, cache, ids, mask):
    """Logits ``[B, T, V]`` of ``ids`` after what ``cache`` holds; ``mask`` covers both."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    kw = kvpolar.cache_kwargs(model, cache)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
    return out.logits.float()


def _steps(model, cache, tokens, mask):
    """Feed ``tokens`` ``[B, S]`` one at a time; returns (logits ``[B, S, V]``, the grown mask)."""
    logits = []
    for t in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits.append(_feed(model, cache, tokens[:, t:t + 1], mask)[:, -1])
    return torch.stack(logits, dim=1), mask


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2)


@pytest.mark.parametrize("preset", ["kivi-2", "squat-2", "polar-rope-3", "polar-recursive"])
def test_reorder_mid_decoding_equals_decoding_the_reordered_batch(llama, preset):
    """Reordering after some steps (with a packed part, padding flags and SQuat's prompt subspace)
    continues exactly as a cache that held the reordered sequences from the start."""
    ids, mask = left_padded([150, 132, 141])  # polar-rope-3 packs in groups of 128
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randint(1, VOCAB, (3, 5), generator=gen), torch.randint(1, VOCAB, (4, 6), generator=gen)
    index = torch.tensor([2, 0, 0, 1])
    changes = {"residual_length": 8, "min_chunk": 1}
    if preset == "squat-2":
        changes["key_params"] = {"bits": 2, "group_size": 32, "block_size": 16}

    cache = QuantizedKVCache(llama.config, config(preset, **changes))
    with torch.no_grad():
        _feed(llama, cache, ids, mask)
        _, grown = _steps(llama, cache, first, mask)
        assert cache.layers[0].packed_keys is not None and cache.layers[0].residual_valid is not None
        cache.reorder_cache(index)
        got, _ = _steps(llama, cache, second, grown[index])

        fresh = QuantizedKVCache(llama.config, config(preset, **changes))
        _feed(llama, fresh, ids[index], mask[index])
        _steps(llama, fresh, first[index], mask[index])
        want, _ = _steps(llama, fresh, second, grown[index])
    assert cache.layers[0].batch_size == 4 and cache.get_seq_length() == fresh.get_seq_length()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_repeat_and_select_rows(llama):
    ids, mask = left_padded([40, 33])
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=4, min_chunk=1))
    with torch.no_grad():
        _feed(llama, cache, ids, mask)
        layer = cache.layers[1]
        keys = layer.packed_keys
        cache.batch_repeat_interleave(2)
        assert layer.batch_size == 4 and layer.keys.shape[0] == 4
        torch.testing.assert_close(layer.packed_keys.codes, keys.codes[[0, 0, 1, 1]], rtol=0, atol=0)
        cache.batch_select_indices(torch.tensor([3]))
        torch.testing.assert_close(layer.packed_keys.codes, keys.codes[[1]], rtol=0, atol=0)
        _steps(llama, cache, torch.tensor([[5, 6]]), mask[1:])  # decodes on as a batch of one
    with pytest.raises(ValueError, match="repeats=0"):
        cache.batch_repeat_interleave(0)


def test_beam_search_with_identity_quantizers_equals_the_stock_cache(llama):
    """Beam search through the packed path (identity quantizers): the same beams as DynamicCache."""
    ids, mask = left_padded([30, 22])
    args = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
    cache = QuantizedKVCache(llama.config, config("none", residual_length=4, min_chunk=1))
    got = llama.generate(ids, **kvpolar.cache_kwargs(llama, cache), **args)
    assert cache.layers[0].packed_keys.shape[0] == 6  # batch x beams
    llama.set_attn_implementation("sdpa")
    try:
        stock = transformers.DynamicCache(config=llama.config)
        want = llama.generate(ids, **kvpolar.cache_kwargs(llama, stock), **args)
    finally:
        llama.set_attn_implementation("kvpolar")
    assert torch.equal(got, want)


def test_beam_search_with_a_quantized_cache(llama):
    ids, mask = left_padded([40, 31])
    cache = kvpolar.enable(llama, "kivi-2", residual_length=4)
    out = llama.generate(ids, attention_mask=mask, **kvpolar.cache_kwargs(llama, cache), max_new_tokens=6,
                         num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 46) and cache.get_seq_length() == 45
    assert cache.layers[0].packed_keys.num_tokens == 32


@torch.no_grad()
def _prompt_then_draft(llama, draft_tokens: int, seed: int):
    """A kivi-2 cache (window 8, 32-token chunks) after a 40-token prompt (32 tokens packed) and one
    verify step of ``draft_tokens`` random tokens: (cache, prompt ids, its mask, draft, next token)."""
    ids, mask = left_padded([40])
    draft = torch.randint(1, VOCAB, (1, draft_tokens), generator=torch.Generator().manual_seed(seed))
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=8))
    _feed(llama, cache, ids, mask)
    assert cache.layers[0].packed_keys.num_tokens == 32
    _feed(llama, cache, draft, torch.ones(1, 40 + draft_tokens, dtype=torch.long))
    return cache, ids, mask, draft, torch.tensor([[7]])


@torch.no_grad()
def _after_accepted(llama, ids, mask, accepted, nxt):
    """The logits of ``nxt`` from a kivi-2 cache (window 8) that saw the prompt ``ids`` and then only
    the ``accepted`` draft tokens: what a cropped cache must reproduce."""
    fresh = QuantizedKVCache(llama.config, config("kivi-2", residual_length=8))
    _feed(llama, fresh, ids, mask)
    n = ids.shape[1] + accepted.shape[1]
    _feed(llama, fresh, accepted, torch.ones(1, n, dtype=torch.long))
    return _feed(llama, fresh, nxt, torch.ones(1, n + 1, dtype=torch.long))


def test_crop_rolls_back_draft_tokens(llama):
    """Five draft tokens verified in one step, three rejected: the cache continues exactly as one
    that only ever saw the two accepted ones."""
    cache, ids, mask, draft, nxt = _prompt_then_draft(llama, 5, seed=5)
    assert cache.is_croppable
    with torch.no_grad():
        cache.crop(-3)
        assert cache.get_seq_length() == 42 and cache.layers[0].residual_tokens == 10
        got = _feed(llama, cache, nxt, torch.ones(1, 43, dtype=torch.long))
    torch.testing.assert_close(got, _after_accepted(llama, ids, mask, draft[:, :2], nxt), rtol=0, atol=1e-5)
    cache.crop(40)  # the older form: the length to keep
    assert cache.get_seq_length() == 40
    with pytest.raises(ValueError, match="cannot remove the newest 9 tokens: only 8 are still in the 16-bit window"):
        cache.crop(-9)


def test_a_draft_longer_than_the_window_rolls_back(llama):
    """A 40-token verify step with residual_length 8 and 32-token chunks would have packed 32 of its
    tokens; they stay 16-bit until the next step instead, so 30 rejected ones crop, and the cache
    continues exactly as one that saw only the 10 accepted ones (which then packs as usual)."""
    cache, ids, mask, draft, nxt = _prompt_then_draft(llama, 40, seed=8)
    assert cache.layers[0].packed_keys.num_tokens == 32 and cache.layers[0].residual_tokens == 48
    with torch.no_grad():
        cache.crop(-30)
        got = _feed(llama, cache, nxt, torch.ones(1, 51, dtype=torch.long))
        assert cache.layers[0].packed_keys.num_tokens == 32 and cache.layers[0].residual_tokens == 19
    torch.testing.assert_close(got, _after_accepted(llama, ids, mask, draft[:, :10], nxt), rtol=0, atol=1e-5)
    with torch.no_grad():  # a later 30-token step keeps its own tokens 16-bit too; the next one packs a chunk
        _feed(llama, cache, torch.randint(1, VOCAB, (1, 30), generator=torch.Generator().manual_seed(9)),
              torch.ones(1, 81, dtype=torch.long))
    assert cache.layers[0].packed_keys.num_tokens == 32 and cache.layers[0].residual_tokens == 49
    with torch.no_grad():
        _feed(llama, cache, nxt, torch.ones(1, 82, dtype=torch.long))
    assert cache.layers[0].packed_keys.num_tokens == 64 and cache.layers[0].residual_tokens == 18


def test_max_rollback_tokens_caps_what_a_long_step_keeps_in_16_bits(llama):
    """With max_rollback_tokens=16 a 40-token verify step keeps 16 of its tokens 16-bit (not all 40):
    16 crop, 17 do not, and the error names the cap."""
    gen = torch.Generator().manual_seed(8)
    ids, mask = torch.randint(1, VOCAB, (1, 40), generator=gen), torch.ones(1, 40, dtype=torch.long)
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=8, max_rollback_tokens=16))
    with torch.no_grad():
        _feed(llama, cache, ids, mask)
        _feed(llama, cache, torch.randint(1, VOCAB, (1, 40), generator=gen), torch.ones(1, 80, dtype=torch.long))
    assert cache.layers[0].packed_keys.num_tokens == 64 and cache.layers[0].residual_tokens == 16
    with pytest.raises(ValueError, match="only 16 are still in the 16-bit window.*at most max_rollback_tokens=16"):
        cache.crop(-17)
    cache.crop(-16)
    assert cache.get_seq_length() == 64 and cache.layers[0].residual_tokens == 0


@pytest.mark.parametrize("cap", [None, 0])
def test_prefill_in_chunks(llama, cap):
    """transformers' chunked prefill (``prefill_chunk_size``): with identity quantizers it gives the
    one-shot prefill's tokens; with kivi-2 the last chunk stays 16-bit until the first decode step
    unless ``max_rollback_tokens`` caps it (0: only the residual window and an unfilled chunk)."""
    ids = torch.randint(1, VOCAB, (2, 300), generator=torch.Generator().manual_seed(11))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    whole = kvpolar.enable(llama, "none", max_rollback_tokens=cap)
    chunked = kvpolar.enable(llama, "none", max_rollback_tokens=cap)
    one_shot = llama.generate(ids, **kvpolar.cache_kwargs(llama, whole), **kw)
    in_chunks = llama.generate(ids, **kvpolar.cache_kwargs(llama, chunked), prefill_chunk_size=64, **kw)
    assert torch.equal(in_chunks, one_shot) and chunked.get_seq_length() == 305
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=8, max_rollback_tokens=cap))
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():  # 256 prompt tokens in four 64-token chunks
        for n in range(64, 257, 64):
            _feed(llama, cache, torch.randint(1, VOCAB, (1, 64), generator=gen), torch.ones(1, n, dtype=torch.long))
    layer = cache.layers[0]
    assert layer.residual_tokens == (64 if cap is None else 8 + 24)  # 8 kept, 24 waiting for their chunk
    assert layer.packed_keys.num_tokens == 256 - layer.residual_tokens


@pytest.mark.parametrize("preset", ["kivi-2", "polar-rope-3", "polar-recursive"])
def test_a_long_step_attends_over_the_dequantized_layer(llama, preset, monkeypatch):
    """A 130-token step after a left-padded prompt (260 query rows per KV head, GQA 2: over
    MAX_FUSED_QUERY_ROWS) runs SDPA over the dequantized layer, not the per-row reference (nor, on CUDA,
    the fused kernel's one tile), and gives the reference's logits, also one sequence at a time."""
    from kvpolar.cache import attention

    ids, mask = left_padded([150, 131], seed=13)
    step = torch.randint(1, VOCAB, (2, 130), generator=torch.Generator().manual_seed(14))
    step_mask = torch.cat([mask, torch.ones(2, 130, dtype=torch.long)], dim=-1)
    calls = []
    reference = attention.reference_decode_attention
    monkeypatch.setattr(attention, "reference_decode_attention", lambda *a: calls.append(1) or reference(*a))

    def logits_of_the_step():
        cache = QuantizedKVCache(llama.config, config(preset, residual_length=8))
        with torch.no_grad():
            _feed(llama, cache, ids, mask)
            assert cache.layers[0].packed_keys is not None
            return _feed(llama, cache, step, step_mask)

    long_step = logits_of_the_step()
    assert not calls
    monkeypatch.setattr(attention, "LONG_STEP_BYTES", 1)  # one sequence at a time
    torch.testing.assert_close(logits_of_the_step(), long_step, rtol=0, atol=1e-5)
    assert not calls
    monkeypatch.setattr(attention, "MAX_FUSED_QUERY_ROWS", 260)
    per_row = logits_of_the_step()
    assert len(calls) == llama.config.num_hidden_layers
    torch.testing.assert_close(long_step, per_row, rtol=0, atol=1e-4)


@pytest.mark.filterwarnings("ignore:squat. block_size=32 covers the whole head dim")
@pytest.mark.parametrize("preset,kernels", [("kivi-2", 2), ("polar-rope-3", 2), ("squat-2", 2), ("turbo-4", 2),
                                            ("polar-recursive", 2), ("fp8", 2), ("none", 0)])
def test_the_dequantized_layer_through_the_kernels(llama, preset, kernels, monkeypatch):
    """``QuantizedLayer.dequantized`` through the Triton kernels (what CUDA runs; on the CPU under the
    interpreter): the packed part written into the buffer's first tokens, the 16-bit window after it,
    as the PyTorch path gives them, with keys and values taken by a kernel in every layer where the
    method has one (``dequantize_kernel``), and never where it has none."""
    pytest.importorskip("triton")
    from kvpolar.kernels import dequantize
    from kvpolar.quantizers import base

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = copy.deepcopy(llama).to(device)
    ids, mask = (x.to(device) for x in left_padded([150, 131], seed=15))
    cache = QuantizedKVCache(model.config, config(preset, residual_length=8))
    with torch.no_grad():
        _feed(model, cache, ids, mask)
    monkeypatch.setattr(base, "cuda_dequantize_into", lambda p, out: False)  # the PyTorch path (CUDA too)
    plain = [layer.dequantized(slice(1, 2)) for layer in cache.layers]
    calls = []

    def kernel(p, out):
        calls.append(type(p).__name__)
        return dequantize.dequantize_into(p, out)

    monkeypatch.setattr(base, "cuda_dequantize_into", kernel)
    for layer, (keys, values) in zip(cache.layers, plain):
        assert layer.packed_keys.num_tokens == 128 and keys.shape == (1, 2, 150, 32)
        got_keys, got_values = layer.dequantized(slice(1, 2))
        for got, want in ((got_keys, keys), (got_values, values)):  # float32: the un-rotations sum in another order
            torch.testing.assert_close(got, want, rtol=2**-20, atol=1e-6)
    assert len(calls) == kernels * len(cache.layers)


def test_assisted_generation_matches_plain_greedy_decoding(llama):
    """Assisted decoding (a draft model proposes, the cache rolls back what the model rejects)
    gives plain greedy decoding's tokens; 64 of the prompt's tokens are packed (kivi-2)."""
    ids = torch.randint(1, VOCAB, (1, 200), generator=torch.Generator().manual_seed(6))
    draft = tiny_model("llama", layers=1, seed=1)
    draft.set_attn_implementation("sdpa")
    plain_cache = kvpolar.enable(llama, "kivi-2")
    plain = llama.generate(ids, **kvpolar.cache_kwargs(llama, plain_cache), max_new_tokens=12, do_sample=False,
                           pad_token_id=0)
    cache = kvpolar.enable(llama, "kivi-2")
    assisted = llama.generate(ids, **kvpolar.cache_kwargs(llama, cache), assistant_model=draft, max_new_tokens=12,
                              do_sample=False, pad_token_id=0)
    assert cache.layers[0].packed_keys.num_tokens == 64
    assert torch.equal(assisted, plain) and cache.get_seq_length() == 211


def test_assisted_generation_with_drafts_longer_than_the_window(llama):
    """Drafts of 24 tokens against a window of 4 (residual_length) still give plain greedy decoding's
    tokens: each verify step's tokens stay croppable until the next step."""
    ids = torch.randint(1, VOCAB, (1, 70), generator=torch.Generator().manual_seed(10))
    draft = tiny_model("llama", layers=1, seed=1)
    draft.set_attn_implementation("sdpa")
    draft.generation_config.num_assistant_tokens = 24
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    plain_cache = kvpolar.enable(llama, "kivi-2", residual_length=4)
    plain = llama.generate(ids, **kvpolar.cache_kwargs(llama, plain_cache), max_new_tokens=40, do_sample=False,
                           pad_token_id=0)
    cache = kvpolar.enable(llama, "kivi-2", residual_length=4)
    assisted = llama.generate(ids, **kvpolar.cache_kwargs(llama, cache), assistant_model=draft, max_new_tokens=40,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(assisted, plain) and cache.get_seq_length() == 109
