"""kvpolar.cache.graphed: greedy decoding in stretches over window buffers (replayed from CUDA graphs on
a GPU). On the CPU the same stretches run eagerly (``graphs=False``): the window in fixed-size buffers,
its write position and length advanced as tensors, the layers' host state handed back after each
stretch and the chunk moved into the packed part then. The tokens must be ``generate``'s, token for
token, across several moves; the recording itself runs on the GPU (``benchmarks/bench_graphed_decode.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest
import torch

import kvpolar
from cache_helpers import VOCAB, config, tiny_model  # noqa: E402
from kvpolar.cache.graphed import decode_with_graphs, generate_with_graphs
from kvpolar.cache.layer import QuantizedLayer


def _prompt(batch: int, tokens: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, preset, new, sampling=None, **changes):
    """``generate``'s greedy tokens (or with ``sampling``, its keywords), ``new`` of them: no
    end-of-sequence token (the tiny models' default, 2, would stop a sequence or, under
    ``min_new_tokens``, be suppressed; neither is plain decoding)."""
    cache = kvpolar.QuantizedKVCache(model.config, config(preset, **changes))
    model.generation_config.eos_token_id = None
    out = model.generate(ids, max_new_tokens=new, **(sampling or {"do_sample": False}),
                         **kvpolar.cache_kwargs(model, cache))
    assert out.shape[1] == ids.shape[1] + new
    return out, cache


@pytest.mark.parametrize("preset, prompt, residual, new", [
    ("kivi-2", 40, 8, 75),          # packed after the prompt, two moves of 32 while decoding
    ("kivi-2", 5, 8, 50),           # nothing packed until the first move
    ("polar-rope-3", 140, 16, 130),  # 128-token chunks, the first move while decoding
    ("squat-2", 50, 8, 40),         # the prompt's query subspace kept for the moves
    ("turbo-4", 40, 8, 40),         # rotated keys, per-token formats (moves of min_chunk = 32)
    ("polar-recursive", 40, 8, 40),  # rotated values
    ("kivi-2-boundary", 40, 8, 75),  # 16-bit first and last layers: their whole cache before their buffers
])
def test_stretches_give_generate_tokens(preset, prompt, residual, new):
    """Token for token ``generate``'s, and the same cache after. Where nothing was packed after the
    prompt, ``generate``'s steps attend the window alone with SDPA and these steps with kvpolar's decode
    attention (float rounding apart, the same): there the stored tensors are compared with a tolerance."""
    changes = dict(residual_length=residual)
    if preset.endswith("-boundary"):  # (generate's 16-bit layers attend with SDPA, these with kvpolar's kernel)
        preset, changes["full_precision_layers"] = preset.removesuffix("-boundary"), (0, -1)
    exact = (prompt - residual) // 32 > 0 and preset != "polar-rope-3" and "full_precision_layers" not in changes
    model = tiny_model(layers=3, head_dim=64 if preset == "squat-2" else 32)  # (SQuat: two 32-channel blocks)
    ids = _prompt(2, prompt)
    want, reference_cache = _generate(model, ids, preset, new, **changes)
    cache = kvpolar.QuantizedKVCache(model.config, config(preset, **changes))
    got = generate_with_graphs(model, ids, cache, new, graphs=False)
    assert torch.equal(got, want)
    assert cache.get_seq_length() == reference_cache.get_seq_length()
    for mine, theirs in zip(cache.layers, reference_cache.layers):
        assert mine.window_buffers is None and mine.residual_tokens == theirs.residual_tokens
        assert (mine.packed_keys is None) == (theirs.packed_keys is None)
        if mine.packed_keys is not None:
            assert mine.packed_keys.num_tokens == theirs.packed_keys.num_tokens
            for name, t in mine.packed_keys.stored_tensors().items():
                other = theirs.packed_keys.stored_tensors()[name]
                if exact:
                    assert torch.equal(t, other), name
                elif t.is_floating_point():
                    torch.testing.assert_close(t, other, rtol=1e-4, atol=1e-5, msg=name)
        if exact:
            assert torch.equal(mine.keys, theirs.keys)
        else:
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)


def _left_padded(batch: int, tokens: int, real: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts ``[batch, tokens]`` with pad id 0 before row ``b``'s ``real[b]`` tokens, their mask)."""
    ids = _prompt(batch, tokens)
    mask = (torch.arange(tokens)[None, :] >= tokens - torch.tensor(real)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("preset, prompt, real, residual, new", [
    ("kivi-2", 40, (40, 31, 12), 8, 75),             # padding packed after the prompt and in the window
    ("kivi-2-boundary", 40, (25, 40, 3), 8, 45),     # 16-bit layers: their cache (with padding) before buffers
    ("polar-rope-3", 140, (140, 100, 20), 16, 40),   # 128-token chunks: the padded chunk packed at prefill
    ("turbo-4", 20, (7, 20), 8, 40),                 # padding only in the window, moved while decoding
])
def test_padded_stretches_give_generate_tokens(preset, prompt, real, residual, new):
    """Left-padded prompts: the tokens are ``generate``'s with the same mask, token for token, and the
    layers' padding flags what ``generate`` leaves (the steps' tokens real)."""
    changes = dict(residual_length=residual)
    if preset.endswith("-boundary"):
        preset, changes["full_precision_layers"] = preset.removesuffix("-boundary"), (0, -1)
    model = tiny_model(layers=3, head_dim=32)
    ids, mask = _left_padded(len(real), prompt, real)
    reference_cache = kvpolar.QuantizedKVCache(model.config, config(preset, **changes))
    model.generation_config.eos_token_id = None
    want = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          **kvpolar.cache_kwargs(model, reference_cache))
    cache = kvpolar.QuantizedKVCache(model.config, config(preset, **changes))
    got = generate_with_graphs(model, ids, cache, new, graphs=False, attention_mask=mask)
    assert torch.equal(got, want)
    for mine, theirs in zip(cache.layers, reference_cache.layers):
        assert mine.residual_tokens == theirs.residual_tokens
        assert (mine.residual_valid is None) == (theirs.residual_valid is None)
        if mine.residual_valid is not None:
            assert torch.equal(mine.residual_valid, theirs.residual_valid)


def test_padded_cache_decoded_from_its_mask():
    """``decode_with_graphs`` over a cache whose prompt had padding: with the prompts' mask each row
    continues at its own position (``generate``'s tokens); without it the call is refused."""
    model = tiny_model(layers=2, head_dim=32)
    ids, mask = _left_padded(2, 40, (40, 17))
    model.generation_config.eos_token_id = None
    want = model.generate(ids, attention_mask=mask, max_new_tokens=41, do_sample=False,
                          **kvpolar.cache_kwargs(model, kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))))
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    kw = kvpolar.cache_kwargs(model, cache)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kw).logits[:, -1:].argmax(-1)
    with pytest.raises(ValueError, match="the cache holds padding: pass the prompts' attention_mask"):
        decode_with_graphs(model, cache, first, 40, 40, graphs=False)
    run = decode_with_graphs(model, cache, first, 40, 40, graphs=False, attention_mask=mask.bool())
    assert torch.equal(torch.cat([ids, first, run.tokens], dim=1), want)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_families(family):
    model = tiny_model(family, layers=2, head_dim=32)
    ids = _prompt(1, 45)
    want, _ = _generate(model, ids, "kivi-2", 40, residual_length=8)
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    assert torch.equal(generate_with_graphs(model, ids, cache, 40, graphs=False), want)


def test_stretches_end_at_each_move(monkeypatch):
    """One eager step per stretch without graphs counts every step; the stretches end where the window
    reaches ``residual_length + chunk`` (then a chunk moves), and the cache can go on decoding eagerly."""
    model = tiny_model(layers=2, head_dim=32)
    ids = _prompt(1, 40)
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    kw = kvpolar.cache_kwargs(model, cache)
    logits = model(input_ids=ids, use_cache=True, **kw).logits
    first = logits[:, -1:].argmax(-1)
    windows = []
    real = QuantizedLayer.take_window_buffers

    def record(layer, steps):
        windows.append((layer.residual_tokens, steps))
        real(layer, steps)

    monkeypatch.setattr(QuantizedLayer, "take_window_buffers", record)
    run = decode_with_graphs(model, cache, first, 40, 70, graphs=False)
    monkeypatch.undo()
    assert run.tokens.shape == (1, 70) and run.eager_steps == 70 and run.replayed_steps == run.recordings == 0
    assert windows[::2] == [(8, 32), (8, 32), (8, 6)]  # (layer 0: window before, steps) per stretch
    assert cache.get_seq_length() == 110 and cache.layers[0].residual_tokens == 14
    nxt = model(input_ids=run.tokens[:, -1:], use_cache=True, **kw).logits  # eager again, as ever
    assert nxt.shape[-1] == VOCAB


@pytest.mark.parametrize("sampling", [dict(temperature=0.7, top_k=20, top_p=0.9), dict(top_k=0),
                                      dict(temperature=1.3, top_k=5)])
def test_sampling_draws_as_generate(sampling):
    """Sampled with the same seed, the tokens ``generate(do_sample=True, ...)`` draws: the same warpers in
    the same order, one ``torch.multinomial`` per token (eager stretches here; recorded ones on a GPU:
    ``benchmarks/bench_graphed_decode.py --sampling``)."""
    model = tiny_model(layers=2, head_dim=32)
    ids = _prompt(2, 40)
    torch.manual_seed(11)
    want, _ = _generate(model, ids, "kivi-2", 45, sampling={"do_sample": True, "top_p": 1.0, **sampling},
                        residual_length=8)
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    torch.manual_seed(11)
    got = generate_with_graphs(model, ids, cache, 45, do_sample=True, graphs=False, **sampling)
    assert torch.equal(got, want)
    greedy = generate_with_graphs(model, ids, kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8)),
                                  45, graphs=False)
    assert not torch.equal(got, greedy)  # (it did sample)


@pytest.mark.parametrize("sampling", [None, dict(do_sample=True, top_k=3)])
def test_suppressed_tokens_as_generate(sampling):
    """``suppress_token_ids``: the tokens of ``generate(suppress_tokens=...)`` (greedy and sampled under
    one seed), none of them the suppressed ones, which greedy decoding would have chosen."""
    model = tiny_model(layers=2, head_dim=32)
    ids = _prompt(2, 30)
    free, _ = _generate(model, ids, "kivi-2", 40, residual_length=8)
    banned = sorted({int(free[0, 32]), int(free[1, 35])})  # (tokens greedy decoding chooses)
    torch.manual_seed(5)
    want, _ = _generate(model, ids, "kivi-2", 40, sampling={**(sampling or {"do_sample": False}),
                                                            "suppress_tokens": banned}, residual_length=8)
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    torch.manual_seed(5)
    got = generate_with_graphs(model, ids, cache, 40, suppress_token_ids=banned, graphs=False, **(sampling or {}))
    assert torch.equal(got, want)
    assert not torch.isin(got[:, 30:], torch.tensor(banned)).any()
    with pytest.raises(ValueError, match="suppress_token_ids=\\[-1\\]; allowed"):
        generate_with_graphs(model, ids, kvpolar.QuantizedKVCache(model.config, "kivi-2"), 4,
                             suppress_token_ids=[-1], graphs=False)


def test_eos_stops_every_sequence_and_pads():
    model = tiny_model(layers=2, head_dim=32)
    ids = _prompt(2, 20)
    want, _ = _generate(model, ids, "kivi-2", 40, residual_length=8)
    eos = int(want[0, 25])  # a token the first sequence produces
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    got = generate_with_graphs(model, ids, cache, 40, eos_token_id=eos, graphs=False)
    new = got[:, 20:]
    for row in range(2):
        hits = (new[row] == eos).nonzero()
        if len(hits):
            assert (new[row, int(hits[0]):] == eos).all()
            assert torch.equal(new[row, :int(hits[0])], want[row, 20:20 + int(hits[0])])


def test_refusals(monkeypatch):
    model = tiny_model(layers=2, head_dim=32)
    ids = _prompt(1, 12)
    fresh = lambda preset="kivi-2", **kw: kvpolar.QuantizedKVCache(model.config, config(preset, **kw))  # noqa: E731
    with pytest.raises(ValueError, match="graphs=True records CUDA graphs"):
        generate_with_graphs(model, ids, fresh(), 4)
    with pytest.raises(ValueError, match="int64 \\[batch, tokens\\]"):
        generate_with_graphs(model, ids.int(), fresh(), 4, graphs=False)
    with pytest.raises(ValueError, match="must be an int >= 1"):
        generate_with_graphs(model, ids, fresh(), 0, graphs=False)
    with pytest.raises(TypeError, match="QuantizedKVCache"):
        generate_with_graphs(model, ids, object(), 4, graphs=False)
    with pytest.raises(ValueError, match="every layer keeps a 16-bit cache"):
        generate_with_graphs(model, ids, fresh(full_precision_layers=(0, 1)), 4, graphs=False)
    used = fresh()
    generate_with_graphs(model, ids, used, 3, graphs=False)
    with pytest.raises(ValueError, match="holds 14 tokens"):
        generate_with_graphs(model, ids, used, 3, graphs=False)
    with pytest.raises(ValueError, match="position=5, but the cache's layers hold \\[14\\] tokens"):
        decode_with_graphs(model, used, ids[:, :1], 5, 3, graphs=False)
    with pytest.raises(ValueError, match="next_ids must be int64 \\[batch, 1\\]"):
        decode_with_graphs(model, used, ids, 14, 3, graphs=False)
    with monkeypatch.context() as patch:  # (as on a GPU, whose kernel folds windows of at most 100 tokens)
        patch.setattr(kvpolar.cache.attention, "fused_kernel", lambda query: SimpleNamespace(MAX_FOLDED_WINDOW=100))
        with pytest.raises(ValueError, match="residual_length \\+ chunk = 128 \\+ 32 window tokens"):
            generate_with_graphs(model, ids, fresh(), 4, graphs=False)
    for bad, match in ((torch.ones(1, 11, dtype=torch.long), "\\[batch, tokens\\] = \\[1, 12\\]"),
                       (torch.ones(1, 12), "int or bool"), (torch.full((1, 12), 2), "ones \\(real tokens\\) and zeros"),
                       (torch.zeros(1, 12, dtype=torch.long), "rows \\[0\\] hold padding only")):
        with pytest.raises(ValueError, match=match):
            generate_with_graphs(model, ids, fresh(), 4, graphs=False, attention_mask=bad)
    sliding = tiny_model("mistral", layers=2, head_dim=32, sliding_window=64)
    with pytest.raises(ValueError, match="sliding-window attention \\(sliding_window=64"):
        generate_with_graphs(sliding, ids, kvpolar.QuantizedKVCache(sliding.config, "kivi-2"), 4, graphs=False)
    for bad, match in ((dict(temperature=0.5), "pass do_sample=True"), (dict(do_sample=True, temperature=0),
                                                                          "temperature=0; allowed: a number > 0"),
                       (dict(do_sample=True, top_k=-1), "top_k=-1"), (dict(do_sample=True, top_p=1.5), "top_p=1.5")):
        with pytest.raises(ValueError, match=match):
            generate_with_graphs(model, ids, fresh(), 4, graphs=False, **bad)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="needs 'kvpolar'"):
        generate_with_graphs(model, ids, fresh(), 4, graphs=False)


@pytest.mark.parametrize("padded", [False, True])
def test_buffered_steps_through_the_fused_kernel(monkeypatch, padded):
    """The buffered attention's kernel path (on a GPU: the replayed steps' only one), compiled on a GPU
    and under Triton's interpreter on the CPU: the fused kernel reads each layer's window length from
    its device-side tensor (and, for a left-padded batch, the stretch's mask). The tokens are
    ``generate``'s with the PyTorch reference attention (the kernel switched off for it, as the CPU has
    it anyway)."""
    from kvpolar.cache import attention
    from kvpolar.kernels import decode_attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(layers=2, head_dim=32).to(device)
    ids, mask = _left_padded(2, 40, (40, 26)) if padded else (_prompt(1, 40), None)
    ids, mask = ids.to(device), None if mask is None else mask.to(device)
    masked = {} if mask is None else dict(attention_mask=mask)
    model.generation_config.eos_token_id = None
    monkeypatch.setattr(attention, "fused_kernel", lambda query: None)
    want = model.generate(ids, max_new_tokens=36, do_sample=False, **masked, **kvpolar.cache_kwargs(
        model, kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))))
    calls = []
    real = decode_attention.fused_decode_attention

    def fused(*args, **kwargs):
        calls.append(kwargs.get("residual_length"))
        if padded:  # (the mask: the stretch's, over the packed part and the buffers)
            assert args[8] is not None and args[8].shape[-1] == args[1].num_tokens + args[5].shape[-2]
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "fused_kernel", lambda query: SimpleNamespace(
        supports=decode_attention.supports, fused_decode_attention=fused,
        MAX_FOLDED_WINDOW=decode_attention.MAX_FOLDED_WINDOW))
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    if padded:
        masked["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    prompt = model(input_ids=ids, use_cache=True, **masked, **kvpolar.cache_kwargs(model, cache)).logits  # (SDPA)
    first = prompt[:, -1:].argmax(-1)
    run = decode_with_graphs(model, cache, first, 40, 35, graphs=False, attention_mask=mask)  # (a move after 32 steps)
    assert torch.equal(torch.cat([ids, first, run.tokens], dim=1), want)
    assert len(calls) == 2 * 35 and all(isinstance(n, torch.Tensor) and n.dtype == torch.int32 for n in calls)
