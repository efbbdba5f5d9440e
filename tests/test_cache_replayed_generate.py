"""``model.generate(..., custom_generate=kvpolar.replayed_decoding)``: ``generate()``'s own call, decoded
by replayed stretches (eagerly on the CPU: ``graphs`` defaults to where the model is). The tokens
must be ``generate``'s, greedy and sampled under one seed, with its end-of-sequence handling; what a
recorded step cannot do must be refused by name."""

from __future__ import annotations

import pytest
import torch

import kvpolar
from cache_helpers import VOCAB, config, tiny_model  # noqa: E402


def _prompt(batch: int, tokens: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _both(model, ids, preset="kivi-2", seed=None, **settings):
    """(``generate``'s output, the replayed one) for the same settings, each with a fresh cache."""
    outs = []
    for hook in (None, kvpolar.replayed_decoding):
        cache = kvpolar.QuantizedKVCache(model.config, config(preset, residual_length=8))
        if seed is not None:
            torch.manual_seed(seed)
        extra = {} if hook is None else {"custom_generate": hook}
        outs.append(model.generate(ids, **kvpolar.cache_kwargs(model, cache), **settings, **extra))
    return outs


@pytest.fixture
def model():
    model = tiny_model(layers=2, head_dim=32)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("preset, new", [("kivi-2", 45), ("polar-rope-3", 20)])
def test_greedy_tokens_are_generates(model, preset, new):
    want, got = _both(model, _prompt(2, 20), preset, max_new_tokens=new, do_sample=False)
    assert want.shape == (2, 20 + new)
    assert torch.equal(got, want)


def test_sampled_tokens_are_generates_under_one_seed(model):
    want, got = _both(model, _prompt(2, 20), seed=11, max_new_tokens=40, do_sample=True, temperature=0.7,
                      top_k=20, top_p=0.9)
    assert torch.equal(got, want)
    greedy, _ = _both(model, _prompt(2, 20), max_new_tokens=40, do_sample=False)
    assert not torch.equal(got, greedy)  # (sampling did something)


def test_several_sequences_per_prompt(model):
    """``num_return_sequences``: ``generate`` repeats the prompts before its loop; the draws match."""
    want, got = _both(model, _prompt(2, 20), seed=4, max_new_tokens=30, do_sample=True, num_return_sequences=2)
    assert want.shape == (4, 50)
    assert torch.equal(got, want)


def test_end_of_sequence_ids_pad_and_cut_as_generate(model):
    """Two end-of-sequence ids met at different steps: the first row padded after its own, the
    output cut where the second finished, exactly as ``generate``."""
    ids = _prompt(2, 20)
    free, _ = _both(model, ids, max_new_tokens=40, do_sample=False)
    eos = [int(free[0, 26]), int(free[1, 33])]
    want, got = _both(model, ids, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert want.shape[1] < 60  # (both rows finished: generate stopped early)
    assert torch.equal(got, want)


def test_minimum_length_over_every_new_token_and_suppressed_tokens(model):
    ids = _prompt(2, 20)
    free, _ = _both(model, ids, max_new_tokens=30, do_sample=False)
    eos, banned = int(free[0, 24]), [int(free[1, 22])]
    want, got = _both(model, ids, max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0,
                      min_new_tokens=30, suppress_tokens=banned)
    assert want.shape == (2, 50)
    assert torch.equal(got, want)
    assert not torch.isin(got[:, 20:], torch.tensor([eos, *banned])).any()


@pytest.mark.parametrize("settings, error, match", [
    (dict(repetition_penalty=1.3), ValueError, "logits processor RepetitionPenaltyLogitsProcessor is not supported"),
    (dict(num_beams=2), ValueError, "num_beams=2"),
    (dict(min_new_tokens=5, eos_token_id=2), ValueError, "min_new_tokens=5\\) stops 5 of 8 new tokens"),
    (dict(max_time=30.0), ValueError, "stopping criterion MaxTimeCriteria is not supported"),
    (dict(return_dict_in_generate=True), ValueError, "return_dict_in_generate=True"),
    (dict(prefill_chunk_size=4), ValueError, "prefill_chunk_size=4 is not supported"),
    (dict(graphs=True), ValueError, "graphs=True records CUDA graphs"),
    (dict(token_streamer=object()), TypeError, "streamer object has no put\\(\\) method"),
])
def test_refusals_name_the_setting(model, settings, error, match):
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    with pytest.raises(error, match=match):
        model.generate(_prompt(1, 12), max_new_tokens=8, do_sample=False, **kvpolar.cache_kwargs(model, cache),
                       custom_generate=kvpolar.replayed_decoding, **settings)


@pytest.mark.parametrize("preset", ["kivi-2", "polar-rope-3"])
def test_padded_batches_decode_as_generate(model, preset):
    """Left-padded prompts of 3 lengths (one row with none), across moves into the packed part (some
    of them carrying padding): the tokens are ``generate``'s, greedy and sampled under one seed."""
    ids = _prompt(3, 30)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    mask[2, :20] = 0  # (10 real tokens: its window starts with padding)
    ids = ids.masked_fill(mask == 0, 0)
    want, got = _both(model, ids, preset, attention_mask=mask, max_new_tokens=50, do_sample=False)
    assert torch.equal(got, want)
    want, got = _both(model, ids, preset, seed=11, attention_mask=mask, max_new_tokens=40, do_sample=True, top_k=30)
    assert torch.equal(got, want)


def test_refuses_other_positions_and_caches(model):
    ids = _prompt(2, 12)
    fresh = lambda: kvpolar.cache_kwargs(model, kvpolar.QuantizedKVCache(model.config, "kivi-2"))  # noqa: E731
    shifted = torch.arange(12)[None].expand(2, 12) + 5
    with pytest.raises(ValueError, match="position_ids other than those the attention mask gives"):
        model.generate(ids, position_ids=shifted, max_new_tokens=4, **fresh(),
                       custom_generate=kvpolar.replayed_decoding)
    short_mask = torch.ones(2, 11, dtype=torch.long)
    short_mask[1, 0] = 0
    with pytest.raises(ValueError, match=r"attention_mask \(2, 11\) and position_ids \(2, 12\) differ in shape"):
        model.generate(ids, attention_mask=short_mask, position_ids=shifted - 5, max_new_tokens=4, **fresh(),
                       custom_generate=kvpolar.replayed_decoding)
    with pytest.raises(TypeError, match="decodes over a kvpolar QuantizedKVCache; got DynamicCache"):
        model.generate(ids, max_new_tokens=4, custom_generate=kvpolar.replayed_decoding)


class Recorder:
    """A streamer that keeps what it is handed: ``puts`` (copies), and how often ``end()`` was called."""

    def __init__(self):
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


def _streamed_both(model, ids, **settings):
    """(puts of ``generate``'s own streamer, puts of ``token_streamer`` with replayed decoding, the two
    outputs), each run with a fresh cache and a fresh recorder (each ended once)."""
    puts, outs = [], []
    for hook in (None, kvpolar.replayed_decoding):
        recorder = Recorder()
        cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
        stream = {"streamer": recorder} if hook is None else {"custom_generate": hook, "token_streamer": recorder}
        outs.append(model.generate(ids, **kvpolar.cache_kwargs(model, cache), **settings, **stream))
        assert recorder.ends == 1
        puts.append(recorder.puts)
    return puts, outs


def test_token_streamer_gets_what_generate_streams(model):
    """The prompts, then each step's tokens (``[B]``), over several moves into the packed part: the
    same puts as ``generate``'s own streamer, and together the output."""
    ids = _prompt(2, 20)
    (want, got), (out, replayed) = _streamed_both(model, ids, max_new_tokens=45, do_sample=False)
    assert torch.equal(out, replayed)
    assert len(got) == len(want) == 1 + 45
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.equal(got[0], ids) and torch.equal(torch.stack(got[1:], dim=1), replayed[:, 20:])


def test_token_streamer_pads_finished_sequences_and_stops_where_generate_does(model):
    """Rows finishing at different steps: a finished row streams the pad id, and the stream stops at the
    step where the last row finished, as ``generate``'s streamer (the stretch runs on past it)."""
    ids = _prompt(2, 20)
    free, _ = _both(model, ids, max_new_tokens=40, do_sample=False)
    eos = [int(free[0, 23]), int(free[1, 30])]
    (want, got), (out, replayed) = _streamed_both(model, ids, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                                                  pad_token_id=0)
    assert torch.equal(out, replayed) and out.shape[1] < 60
    assert len(got) == len(want) == 1 + out.shape[1] - 20
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_streamer_given_to_generate_is_refused_by_name(model):
    """transformers keeps ``streamer=`` from a ``custom_generate`` callable: refused, naming the keyword
    that works, rather than left with the prompts alone."""
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    with pytest.raises(ValueError, match="pass the streamer as token_streamer="):
        model.generate(_prompt(1, 12), max_new_tokens=8, do_sample=False, **kvpolar.cache_kwargs(model, cache),
                       custom_generate=kvpolar.replayed_decoding, streamer=Recorder())


def test_generate_with_graphs_streams_the_prompt_and_tokens(model):
    """``generate_with_graphs(streamer=)`` directly, one sequence, as ``TextStreamer`` takes them."""
    ids = _prompt(1, 20)
    recorder = Recorder()
    cache = kvpolar.QuantizedKVCache(model.config, config("kivi-2", residual_length=8))
    out = kvpolar.generate_with_graphs(model, ids, cache, 30, graphs=False, streamer=recorder)
    assert recorder.ends == 1 and torch.equal(recorder.puts[0], ids)
    assert [tuple(p.shape) for p in recorder.puts[1:]] == [(1,)] * 30
    assert torch.equal(torch.stack(recorder.puts[1:], dim=1), out[:, 20:])


def test_token_stream_keeps_the_host_a_few_steps_ahead(monkeypatch):
    """On CUDA each step's copy lands later: the stream waits for the step ``ahead`` back after each push
    (so tokens reach the streamer step by step, not a stretch at once), hands over whatever else has
    landed without waiting, and everything at ``flush``. Events faked: a copy lands when waited for."""
    from kvpolar.cache.token_stream import TokenStream

    class FakeEvent:
        def __init__(self):
            self.done = False

        def record(self):
            pass

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    recorder = Recorder()
    stream = TokenStream(recorder, 2, 8, torch.device("cpu"), eos_ids=[], pad_token_id=0, ahead=2)
    stream.asynchronous = True  # (as on CUDA, with the fake events)
    tokens = torch.arange(16).reshape(2, 8)
    for column in range(5):
        stream.push(tokens, column)
    assert [p.tolist() for p in recorder.puts] == [[0, 8], [1, 9], [2, 10]]  # steps 0-2: 3 and 4 still queued
    stream.events[3].done = True  # (step 3 lands on its own: handed at the next poll, no wait)
    stream.poll()
    assert len(recorder.puts) == 4
    stream.end()
    assert [p.tolist() for p in recorder.puts] == [[c, c + 8] for c in range(5)] and recorder.ends == 1
    with pytest.raises(ValueError, match="ahead=0; allowed: an int >= 1"):
        TokenStream(recorder, 2, 8, torch.device("cpu"), [], 0, ahead=0)
    with pytest.raises(RuntimeError, match="holds 8 steps; step 9 pushed"):
        full = TokenStream(Recorder(), 2, 8, torch.device("cpu"), [], 0)
        for column in range(9):
            full.push(tokens, column % 8)
