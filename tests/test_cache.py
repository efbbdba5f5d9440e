"""The quantized KV cache on a tiny Llama: config, residual policy, padding, memory report, errors."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import traceback
import warnings

import pytest
import torch
import transformers
from cache_helpers import QuantizedKVCache, config, continuation, left_padded, stock_logits, teacher_forced, tiny_model

import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.cache.config import PRESETS, KVCacheConfig

LENGTHS = [45, 30, 12]  # ragged prompts, left-padded to 45


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def batch():
    ids, mask = left_padded(LENGTHS)
    return ids, mask, continuation(len(LENGTHS), 12)


@pytest.fixture(scope="module")
def stock(llama, batch):
    return stock_logits(llama, *batch)


# ----- config ------------------------------------------------------------------------------------
def test_import_kvpolar_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import kvpolar; c = kvpolar.KVCacheConfig.preset('kivi-2'); print(c.key_quantizer)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "kivi"


def test_presets_and_bad_names():
    for name in ("none", "kivi-2", "kivi-4", "polar-rope-3", "polar-rope-4", "polar-recursive", "squat-2",
                 "turbo-3", "turbo-4", "turbo-k3v4", "fp8"):
        assert KVCacheConfig.preset(name) is PRESETS[name]
    with pytest.raises(ValueError, match="preset='kivi-3'.*allowed:.*kivi-2"):
        KVCacheConfig.preset("kivi-3")
    with pytest.raises(ValueError, match="residual_length"):
        KVCacheConfig(residual_length=-1)
    with pytest.raises(ValueError, match="min_chunk=0.*integer >= 1"):
        KVCacheConfig(min_chunk=0)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match=rf"max_rollback_tokens={bad}.*None \(a whole step\) or an integer >= 0"):
            KVCacheConfig(max_rollback_tokens=bad)
    with pytest.raises(ValueError, match="full_precision_layers='boundary-3'"):
        KVCacheConfig(full_precision_layers="boundary-3")
    with pytest.raises(ValueError, match=r"layer_overrides\[1\]"):
        KVCacheConfig(layer_overrides={1: {"bits": 4}})


def test_layer_plan_policy():
    c = KVCacheConfig(
        key_params={"bits": 2}, full_precision_layers=(0, -1),
        layer_overrides={-2: {"key_params": {"bits": 4}}, 1: {"value_quantizer": "none", "value_params": {}}},
    )
    plans = [c.plan(i, 6) for i in range(6)]
    assert [p.full_precision for p in plans] == [True, False, False, False, False, True]
    assert plans[4].key_params == {"bits": 4} and plans[3].key_params == {"bits": 2}
    assert plans[1].value_quantizer == "none" and plans[2].value_quantizer == "kivi"
    assert KVCacheConfig(full_precision_layers="boundary-2").full_precision_indices(6) == {0, 1, 4, 5}
    with pytest.raises(ValueError, match="full_precision_layers"):
        KVCacheConfig(full_precision_layers=(7,)).full_precision_indices(6)


def test_build_errors(llama):
    with pytest.raises(ValueError, match="key_quantizer='no-such-method' is not registered.*available: .*kivi"):
        QuantizedKVCache(llama.config, KVCacheConfig(key_quantizer="no-such-method"))
    unregistered = [p for p, c in PRESETS.items() if c.key_quantizer not in kvpolar.available_quantizers()]
    for name in unregistered:  # presets of methods not installed here: a clear error, no fallback
        with pytest.raises(ValueError, match="is not registered"):
            QuantizedKVCache(llama.config, name)
    small = tiny_model("llama", layers=1, head_dim=16)  # KIVI values group 32 channels: D=16 cannot
    with pytest.raises(ValueError, match="value_quantizer='kivi' cannot store head_dim=16"):
        QuantizedKVCache(small.config, "kivi-2")
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        QuantizedKVCache(GPT2Config(), "kivi-2")


def test_misuse_errors(llama, batch):
    ids, mask, cont = batch
    other = tiny_model("llama", layers=3)
    cache = QuantizedKVCache(llama.config, "kivi-2")
    with pytest.raises(ValueError, match="built for a model of 2 layers"):
        teacher_forced(other, ids, mask, cont[:, :1], cache)
    cache = QuantizedKVCache(llama.config, "kivi-2")
    teacher_forced(llama, ids, mask, cont[:, :1], cache)
    with pytest.raises(ValueError, match="batch=3"):  # reused for another batch
        teacher_forced(llama, ids[:1], mask[:1], cont[:1, :1], cache)
    cache = QuantizedKVCache(llama.config, "kivi-2")
    llama.set_attn_implementation("sdpa")
    try:
        with pytest.raises(RuntimeError, match="attn_implementation='kvpolar'"):
            teacher_forced(llama, ids, mask, cont[:, :1], cache)
    finally:
        llama.set_attn_implementation("kvpolar")


# ----- exactness -----------------------------------------------------------------------------------
def test_none_equals_dynamic_cache(llama, batch, stock):
    """Identity quantizers through the packed path: the plumbing (order, masks, GQA) is exact."""
    cache = QuantizedKVCache(llama.config, config("none", residual_length=4, min_chunk=1))
    got = teacher_forced(llama, *batch, cache)
    assert cache.layers[0].packed_keys.num_tokens == max(LENGTHS) + 12 - 4  # packed + 4 in the window
    torch.testing.assert_close(got, stock[0], rtol=0, atol=2e-6)


def test_per_token_formats_move_in_chunks_of_min_chunk(llama, batch):
    """A per-token format (token group 1) moves ``min_chunk`` tokens at a time, not one per step."""
    cache = QuantizedKVCache(llama.config, config("none", residual_length=4))  # min_chunk 32
    teacher_forced(llama, *batch, cache)
    layer = cache.layers[0]
    total = max(LENGTHS) + 12
    assert layer.chunk == 32
    assert layer.packed_keys.num_tokens == (total - 4) // 32 * 32
    assert layer.residual_tokens == total - layer.packed_keys.num_tokens
    assert 4 <= layer.residual_tokens < 4 + 32


def test_left_padding_rows_match_single_runs(llama, batch):
    ids, mask, cont = batch
    padded = teacher_forced(llama, ids, mask, cont, QuantizedKVCache(llama.config, config("none", residual_length=4)))
    for i, n in enumerate(LENGTHS):
        alone = teacher_forced(llama, ids[i:i + 1, -n:], mask[i:i + 1, -n:], cont[i:i + 1],
                               QuantizedKVCache(llama.config, config("none", residual_length=4)))
        torch.testing.assert_close(padded[i:i + 1], alone, rtol=0, atol=2e-6)


def test_kivi8_close_to_full_precision(llama, batch, stock):
    errors = {}
    for preset in ("kivi-8", "kivi-2"):
        got = teacher_forced(llama, *batch, QuantizedKVCache(llama.config, config(preset, residual_length=4)))
        errors[preset] = (got - stock[0]).abs().max().item()
    scale = stock[0].abs().max().item()
    assert errors["kivi-8"] < 5e-3 * scale  # 8-bit: ~1e-3 relative on this model
    assert errors["kivi-8"] < errors["kivi-2"] / 20  # and the tolerance is far below what 2 bits gives


def test_padding_stays_out_of_key_statistics(llama, batch):
    """Each packed key group's per-channel min/max equals that of its real tokens only.

    The first 32-token group holds 15 padding + 17 real tokens in row 1 (and only padding in row 2,
    whose statistics are free). Padding keys differ from real keys, so a leak would move the minimum
    or the range (checked: without the padding fill this test fails).
    """
    ids, mask, cont = batch
    _, dyn = stock_logits(llama, ids, mask, cont[:, :0])
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=4))
    teacher_forced(llama, ids, mask, cont[:, :0], cache)
    g = 32
    for layer, ref in zip(cache.layers, dyn.layers):
        packed = layer.packed_keys
        assert packed.num_tokens == g
        for b, n in enumerate(LENGTHS):
            real = ref.keys[b, :, max(LENGTHS) - n:g]  # real tokens of row b in the first group
            if real.shape[-2] == 0:
                continue
            lo, hi = real.amin(-2), real.amax(-2)
            torch.testing.assert_close(packed.minimum[b, :, 0], lo, rtol=0, atol=0)
            torch.testing.assert_close(packed.minimum[b, :, 0] + 3 * packed.scale[b, :, 0], hi, rtol=1e-5, atol=1e-6)


def test_packed_value_metadata_keeps_tokens_adjacent(llama, batch):
    """After the cache's moves into the packed part (quantize, then ``cat``), KIVI value scale /
    minimum are still laid out with consecutive tokens adjacent in memory (the layout the fused
    kernel reads as one vector per channel group)."""
    ids, mask, cont = batch
    kv = config("kivi-2", residual_length=4, value_params={"bits": 2, "group_size": 8, "axis": "token"})
    cache = QuantizedKVCache(llama.config, kv)
    teacher_forced(llama, ids, mask, continuation(len(LENGTHS), 40), cache)
    for layer in cache.layers:
        packed = layer.packed_values
        assert packed.num_tokens >= 64 and packed.scale.shape[-1] == 4  # two moves or more; 4 groups
        for meta in (packed.scale, packed.minimum):
            assert meta.stride(-2) == 1 and meta.stride(-1) == packed.num_tokens


# ----- bookkeeping ---------------------------------------------------------------------------------
def test_seq_length_and_memory_report(llama, batch):
    ids, mask, cont = batch
    r, steps, t0 = 8, 30, max(LENGTHS)
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=r))
    b, h, d, layers = len(LENGTHS), 2, 32, 2
    for fed in (0, steps):
        cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=r))
        teacher_forced(llama, ids, mask, cont[:, :0] if fed == 0 else continuation(b, fed), cache)
        tokens = t0 + fed
        packed = (tokens - r) // 32 * 32
        assert cache.get_seq_length() == tokens
        assert cache.layers[1].packed_keys.num_tokens == packed == cache.layers[1].packed_values.num_tokens
        rep = cache.memory_report()
        elems = layers * b * h * tokens * d  # per keys or values
        assert rep.tokens == tokens and rep.fp16_bytes == 2 * elems * 2
        assert rep.packed_codes == 2 * layers * b * h * packed * d * 2 // 8  # 2-bit keys and values
        groups = math.ceil(packed / 32)
        assert rep.metadata_fields["key.scale"] == layers * b * h * groups * d * 4  # float32 model
        assert rep.metadata_fields["value.minimum"] == layers * b * h * packed * (d // 32) * 4
        assert rep.residual == 2 * layers * b * h * (tokens - packed) * d * 4
        assert rep.total == rep.packed_codes + rep.metadata + rep.residual + rep.shared
        assert rep.compression_ratio == pytest.approx(rep.fp16_bytes / rep.total)
    assert cache.memory_report(total_over_ranks=True) == rep  # no process group: local figures


def test_full_precision_boundary_layers(batch):
    """Boundary layers hold exactly the 16-bit keys/values: all of them after prefill, and the layers
    before the first quantized one after decoding too."""
    model = tiny_model("llama", layers=5, dtype=torch.float16)
    ids, mask, cont = batch
    _, dyn = stock_logits(model, ids, mask, cont)
    cache = QuantizedKVCache(model.config, config("kivi-2", residual_length=4, full_precision_layers="boundary-2"))
    teacher_forced(model, ids, mask, cont, cache)
    for i in (0, 1):
        assert torch.equal(cache.layers[i].keys, dyn.layers[i].keys)
        assert torch.equal(cache.layers[i].values, dyn.layers[i].values)
    for i in (3, 4):
        assert cache.layers[i].packed_keys is None and cache.layers[i].keys.shape == dyn.layers[i].keys.shape
    assert cache.layers[2].packed_keys is not None
    rep = cache.memory_report()
    assert rep.full_precision_layers == 4 * 2 * dyn.layers[0].keys.nbytes
    prefill = QuantizedKVCache(model.config, config("kivi-2", residual_length=4, full_precision_layers=(0, 1, -2, -1)))
    teacher_forced(model, ids, mask, cont[:, :0], prefill)
    _, dyn0 = stock_logits(model, ids, mask, cont[:, :0])
    for i in (0, 1, 3, 4):
        assert torch.equal(prefill.layers[i].keys, dyn0.layers[i].keys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generate(dtype):
    model = tiny_model("llama", layers=2, dtype=dtype)
    ids, mask = left_padded([40, 20])
    cache = kvpolar.enable(model, config("kivi-2", residual_length=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the cache under the name this transformers wants
        out = model.generate(ids, attention_mask=mask, **kvpolar.cache_kwargs(model, cache), max_new_tokens=10,
                             do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 50) and cache.get_seq_length() == 49
    assert cache.layers[0].packed_keys.dtype == dtype
    assert all(torch.isfinite(s).all() for s in out.scores)


def test_decoding_over_a_foreign_cache_warns_once(llama, monkeypatch):
    """generate() without the kvpolar cache keeps 16-bit keys and values: said once, not silently;
    a kvpolar cache's full-precision layers (and forwards with no cache) say nothing."""
    from kvpolar.cache import attention

    ids = torch.randint(1, 90, (1, 20), generator=torch.Generator().manual_seed(8))
    monkeypatch.setattr(attention, "_WARNED_FOREIGN_CACHE", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        llama(input_ids=ids, use_cache=False)
        cache = QuantizedKVCache(llama.config, config("kivi-2", full_precision_layers=(0,), residual_length=4))
        llama.generate(ids, **kvpolar.cache_kwargs(llama, cache), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not [w for w in caught if "kvpolar" in str(w.message)]
    with pytest.warns(RuntimeWarning, match="not a kvpolar QuantizedKVCache") as record:
        llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len([w for w in record if "QuantizedKVCache" in str(w.message)]) == 1


def test_cache_keyword_follows_the_model_signature(llama):
    """``cache`` where forward takes it (transformers >= 5.24), else ``past_key_values``; the
    installed version's model gets the keyword its forward names."""
    assert kvpolar.cache_keyword(llama) in inspect.signature(llama.forward).parameters

    class OldModel:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    class NewModel:
        def forward(self, input_ids=None, cache=None, use_cache=None):
            pass

    cache = kvpolar.QuantizedKVCache(llama.config, "kivi-2")
    assert kvpolar.cache_kwargs(OldModel(), cache) == {"past_key_values": cache}
    assert kvpolar.cache_kwargs(NewModel(), cache) == {"cache": cache}
    with pytest.raises(TypeError, match="model: expected a transformers model"):
        kvpolar.cache_keyword(object())


# ----- methods that need the prompt's queries (SQuat) ----------------------------------------------
@pytest.fixture
def query_recording_quantizer():
    """A full-precision quantizer that requires ``queries=`` and records what it receives."""
    from kvpolar import registry
    from kvpolar.quantizers.identity import Identity

    class NeedsQueries(Identity):
        name = "test-needs-queries"
        context_keys = frozenset({"queries"})
        required_context = frozenset({"queries"})
        seen: list = []

        def _quantize(self, x, queries=None):
            NeedsQueries.seen.append((x.shape, queries))
            return super()._quantize(x)

    registry.register(NeedsQueries)
    yield NeedsQueries
    registry._REGISTRY.pop(NeedsQueries.name)


def test_prompt_queries_reach_the_key_quantizer(llama, query_recording_quantizer):
    ids, mask = left_padded([45, 30])
    cont = continuation(2, 10)
    cfg = KVCacheConfig("test-needs-queries", {}, "none", {}, residual_length=4, min_chunk=1)
    got = teacher_forced(llama, ids, mask, cont, QuantizedKVCache(llama.config, cfg))
    ref, _ = stock_logits(llama, ids, mask, cont)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    calls = [c for c in query_recording_quantizer.seen if c[0][0] == 2]  # leave out the build-time probes
    assert len(calls) == 2 * 11  # 2 layers: the prefill chunk, then one token per decode step
    first = calls[0][1]
    assert first.shape == (2, 4, 45, 32)  # [B, query heads (GQA-stacked), prompt tokens, D]
    assert all(q is first for _, q in calls[::2])  # layer 0 keeps its prompt queries for every chunk
    # row 1 is left-padded by 15: padding queries are replaced by its first real query
    assert torch.equal(first[1, :, :15], first[1, :, 15:16].expand(-1, 15, -1))
    assert not torch.equal(first[0, :, :15], first[0, :, 15:16].expand(-1, 15, -1))


def test_cuda_dispatch_falls_back_with_a_warning(monkeypatch):
    """Without the fused kernel module the CUDA path warns once, naming why, and uses the reference."""
    from kvpolar.cache import attention

    monkeypatch.setattr(attention, "_FUSED", {})
    monkeypatch.setitem(sys.modules, "kvpolar.kernels.decode_attention", None)  # import fails
    cuda_query = type("CudaQuery", (), {"device": torch.device("cuda")})()  # only .device is read
    with pytest.warns(RuntimeWarning, match="fused decode attention unavailable.*reference"):
        assert attention.fused_kernel(cuda_query) is None
    assert attention.fused_kernel(torch.zeros(1)) is None  # CPU: the reference, no warning


def test_decode_size_sdpa_over_cached_tokens_prefers_flash_to_cudnn_on_cuda(monkeypatch):
    """Decode-size SDPA calls over cached tokens on CUDA (fewer queries than keys, at most
    ``MAX_FUSED_QUERY_ROWS`` query rows per KV head) run with flash and memory-efficient attention
    before cuDNN in PyTorch's priority order (``SDPA_PRIORITY``); a prompt's first forward, long steps,
    CPU queries and ``SDPA_PRIORITY = None`` keep PyTorch's order."""
    from torch.nn.attention import SDPBackend

    from kvpolar.cache import attention
    from kvpolar.decode_attention import MAX_FUSED_QUERY_ROWS

    def cuda_query(tokens):  # only .device and .shape are read: [B, Hq=8, Tq, D]
        return type("CudaQuery", (), {"device": torch.device("cuda"), "shape": (1, 8, tokens, 64)})()

    keys = torch.zeros(1, 2, 1000, 64)  # [B, Hkv=2, Tk, D]: a GQA group of 4
    before = torch._C._get_sdp_priority_order()
    with attention.sdpa_backends(cuda_query(1), keys):
        order = list(torch._C._get_sdp_priority_order())
    assert torch._C._get_sdp_priority_order() == before  # restored on exit
    ranks = [order.index(int(getattr(SDPBackend, name)))
             for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")]
    assert ranks == [0, 1, 2]
    with attention.sdpa_backends(cuda_query(MAX_FUSED_QUERY_ROWS // 4), keys):  # a verify step's size
        assert list(torch._C._get_sdp_priority_order()) == order
    long_step, prompt = cuda_query(MAX_FUSED_QUERY_ROWS // 4 + 1), cuda_query(1000)
    for query in (long_step, prompt, torch.zeros(1, 8, 1, 64)):  # (the last on the CPU)
        with attention.sdpa_backends(query, keys):
            assert torch._C._get_sdp_priority_order() == before
    monkeypatch.setattr(attention, "SDPA_PRIORITY", None)
    with attention.sdpa_backends(cuda_query(1), keys):
        assert torch._C._get_sdp_priority_order() == before


@pytest.mark.parametrize("case", ["key format", "pair"])
def test_formats_the_kernel_does_not_read_use_the_reference(monkeypatch, case):
    """A stored format the fused kernel does not cover (polar-recursive keys with quantized radii; KIVI
    keys in 48-token groups with polar-recursive values, which fill no 32-token block: the kernel's
    own ``supports`` says no) decodes with the reference, warned once, naming the setting."""
    import types

    from kvpolar.cache import attention
    from kvpolar.kernels.decode_attention import supports, unsupported_reason

    calls = []
    fake = types.SimpleNamespace(
        supports=supports,
        unsupported_reason=unsupported_reason,
        fused_decode_attention=lambda *a: calls.append("fused"),
    )
    monkeypatch.setattr(attention, "fused_kernel", lambda query: fake)
    monkeypatch.setattr(attention, "_FUSED", {})
    if case == "key format":
        kq = kvpolar.quantizer("polar-recursive", levels=4, bits=(4, 2, 2, 2), radius_bits=6)
        vq = kvpolar.quantizer("kivi", axis="token")
        said = "does not read keys stored as PolarRecursiveTensor .*radius_bits=6"
    else:
        kq = kvpolar.quantizer("kivi", bits=2, group_size=48, axis="channel")
        vq = kvpolar.quantizer("polar-recursive")
        said = "with values stored as PolarRecursiveTensor .*KIVI keys of group_size=48"
    k, v = torch.randn(1, 2, 96, 64), torch.randn(1, 2, 96, 64)
    q = torch.randn(1, 4, 1, 64)
    args = (kq.quantize(k), vq.quantize(v), kq, vq, None, None, 0.125, None)
    assert not supports(args[0], args[1])
    with pytest.warns(RuntimeWarning, match=said):
        out = attention._decode(q, *args)
    assert calls == []
    assert torch.allclose(out, reference_decode_attention(q, *args))


@pytest.mark.parametrize("preset", ["none", "kivi-2"])
def test_multi_token_step_after_prefill(llama, batch, preset):
    """A second multi-token forward (chunked prefill, a new turn) attends over packed + window + new
    tokens with the causal mask: identical to feeding the tokens one by one."""
    ids, mask, cont = batch
    one_by_one = teacher_forced(llama, ids, mask, cont, QuantizedKVCache(llama.config, config(preset, residual_length=4)))
    cache = QuantizedKVCache(llama.config, config(preset, residual_length=4))
    teacher_forced(llama, ids, mask, cont[:, :0], cache)
    full = torch.cat([mask, torch.ones_like(cont)], dim=-1)
    pos = (full.cumsum(-1) - 1)[:, -cont.shape[1]:]
    with torch.no_grad():
        out = llama(input_ids=cont, attention_mask=full, position_ids=pos, **kvpolar.cache_kwargs(llama, cache))
    assert cache.layers[0].packed_keys is not None and cache.get_seq_length() == full.shape[1]
    # 45 + 12 tokens, window 4: both runs hold the same 32 packed tokens (no group completes meanwhile)
    torch.testing.assert_close(out.logits[:, :-1].float(), one_by_one[:, 1:cont.shape[1]], rtol=0, atol=2e-6)


def test_memory_report_total_over_ranks(tmp_path):
    """Two gloo processes: ``total_over_ranks=True`` sums every byte count over the ranks."""
    import socket

    import torch.multiprocessing as mp
    from cache_helpers import memory_report_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import of torch/transformers in the children (spawn costs ~40 s here)
    procs = mp.start_processes(memory_report_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False,
                               start_method="fork")
    for _ in range(60):  # at most ~2 minutes, then fail instead of hanging
        if procs.join(timeout=2):
            break
    else:
        for p in procs.processes:
            p.kill()
        pytest.fail("the two gloo ranks did not finish within 2 minutes")
    (local0, total0), (local1, total1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert total0 == total1 | {"tokens": total0["tokens"]}  # tokens: this rank's sequence length
    for name in ("packed_codes", "metadata", "residual", "total", "fp16_bytes"):
        assert total0[name] == local0[name] + local1[name]
    assert local0["total"] != local1["total"]


def test_window_does_not_pin_the_prompt_buffer(llama):
    """After prefill the 16-bit window owns just its tokens (a view would keep the whole prompt alive)."""
    ids, mask = left_padded([45])
    cache = QuantizedKVCache(llama.config, config("kivi-2", residual_length=4))
    teacher_forced(llama, ids, mask, ids[:, :0], cache)
    keys = cache.layers[0].keys
    assert keys.shape[-2] == 13 and keys.untyped_storage().nbytes() == keys.nbytes


def test_squat_prompt_subspace_is_counted_once_per_layer(llama, batch):
    """SQuat keeps its prepared subspace (Qs and every block matrix) per layer: counted as metadata,
    exactly, and prepared once (the same object serves every later key group)."""
    ids, mask, cont = batch
    squat = {"bits": 2, "group_size": 32, "block_size": 16}  # 2 blocks at the test model's head dim 32
    cache = QuantizedKVCache(llama.config, config("squat-2", residual_length=4, key_params=squat))
    teacher_forced(llama, ids, mask, cont[:, :1], cache)
    first = [layer.key_context["subspace"] for layer in cache.layers]
    packed_before = cache.layers[0].packed_keys.num_tokens
    more = continuation(len(LENGTHS), 40, seed=7)
    for t in range(more.shape[1]):  # past another 32-token group
        m = torch.cat([mask, torch.ones(len(LENGTHS), 1 + t + 1, dtype=mask.dtype)], dim=-1)
        with torch.no_grad():
            llama(input_ids=more[:, t:t + 1], attention_mask=m, position_ids=m.sum(-1, keepdim=True) - 1,
                  **kvpolar.cache_kwargs(llama, cache))
    assert cache.layers[0].packed_keys.num_tokens > packed_before  # later key groups were quantized
    assert all(layer.key_context["subspace"] is s for layer, s in zip(cache.layers, first))
    expected = sum(s.qs.nbytes + sum(m.nbytes for m in s.block_matrices) for s in first)
    assert len(first[0].block_matrices) == 2
    assert cache.memory_report().metadata_fields["key.subspace"] == expected


def test_unpadded_decoding_reads_nothing_on_the_host(llama, monkeypatch):
    """Without padding (no mask from the model) the window keeps no padding flags and a decode step,
    chunk moves included, reads no tensor value on the host (on a GPU each read would synchronize):
    no flag check before quantizing, no range check of codes the quantizer clamped itself. The
    logits still match the stock cache's (identity quantizers)."""
    ids = torch.randint(1, 90, (2, 20), generator=torch.Generator().manual_seed(5))
    steps = continuation(2, 40)
    stock_cache = transformers.DynamicCache(config=llama.config)
    llama.set_attn_implementation("sdpa")
    try:
        stock = teacher_forced_unpadded(llama, ids, steps, stock_cache)
    finally:
        llama.set_attn_implementation("kvpolar")
    reads = []
    for preset in ("none", "kivi-2"):
        cache = QuantizedKVCache(llama.config, config(preset, residual_length=4))
        got = teacher_forced_unpadded(llama, ids, steps[:, :1], cache)  # prompt and a first step
        for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, _name=name, **k):
                if any("kvpolar" in f.filename and "tests" not in f.filename for f in traceback.extract_stack()[:-1]):
                    reads.append((preset, _name))
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        got = torch.cat([got, teacher_forced_unpadded(llama, None, steps[:, 1:], cache)], dim=1)
        monkeypatch.undo()
        layer = cache.layers[0]
        assert layer.residual_valid is None and layer.packed_keys.num_tokens >= 32  # chunks moved meanwhile
        if preset == "none":
            torch.testing.assert_close(got, stock, rtol=0, atol=2e-6)
    assert reads == []


def teacher_forced_unpadded(model, ids, steps, cache) -> torch.Tensor:
    """Logits ``[B, n, V]``: after the prompt ``ids`` (skipped when None) and after each token of
    ``steps`` ``[B, S]`` fed one at a time, with no attention mask."""
    kw = kvpolar.cache_kwargs(model, cache)
    logits = []
    with torch.no_grad():
        if ids is not None:
            logits.append(model(input_ids=ids, use_cache=True, **kw).logits[:, -1].float())
        for t in range(steps.shape[1]):
            out = model(input_ids=steps[:, t:t + 1], use_cache=True, **kw)
            logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)
