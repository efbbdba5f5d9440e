import math

import pytest
import torch

import kvpolar
from kvpolar import synthetic
from kvpolar.quantizers.kivi import KiviChannelTensor
from kvpolar.quantizers.squat import SquatSubspace, channel_blocks

KEYS_SHAPE = (1, 4, 256, 128)
RANK = 8


def _keys_and_queries(seed=0, dtype=torch.float16, shape=KEYS_SHAPE, query_tokens=64):
    keys = synthetic.rope_keys(*shape, seed=seed, dtype=dtype)
    queries = synthetic.low_rank_queries(shape, tokens=query_tokens, rank=RANK, seed=seed + 7, dtype=dtype)
    return keys, queries


def _errors(quantizer, packed, keys, queries):
    """(key error projected on the queries' subspace, score error, plain key error), Frobenius norms."""
    basis = torch.linalg.svd(queries.double(), full_matrices=False)[2][..., :RANK, :]
    err = quantizer.dequantize(packed).double() - keys.double()
    exact = queries.double() @ keys.double().transpose(-1, -2)
    score_err = quantizer.scores(queries, packed).double() - exact
    return (err @ basis.transpose(-1, -2)).norm().item(), score_err.norm().item(), err.norm().item()


def _kivi(bits=2, group_size=32):
    return kvpolar.quantizer("kivi", bits=bits, group_size=group_size, axis="channel")


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_error_in_query_subspace_much_smaller_than_kivi(bits, seed):
    keys, queries = _keys_and_queries(seed)
    kivi = _kivi(bits)
    squat = kvpolar.quantizer("squat", bits=bits, block_size=16, subspace_dim=RANK, lam=1.0)
    proj_k, score_k, plain_k = _errors(kivi, kivi.quantize(keys), keys, queries)
    proj_s, score_s, plain_s = _errors(squat, squat.quantize(keys, queries=queries), keys, queries)
    # Only the last 16 of 128 channels keep their error inside the subspace: ~sqrt(16/128) of KIVI's.
    assert proj_s < 0.5 * proj_k
    assert score_s < 0.5 * score_k
    # The price: the error moves out of the subspace, the plain key error grows a little.
    assert plain_k < plain_s < 1.3 * plain_k


def test_paper_defaults_reduce_score_error():
    keys, queries = _keys_and_queries(2)
    kivi, squat = _kivi(), kvpolar.quantizer("squat")  # bits=2, group 32, block 64, r=20, lam=1e-3
    _, score_k, _ = _errors(kivi, kivi.quantize(keys), keys, queries)
    _, score_s, _ = _errors(squat, squat.quantize(keys, queries=queries), keys, queries)
    assert score_s < 0.97 * score_k


def test_error_shrinks_with_smaller_blocks():
    keys, queries = _keys_and_queries(3)
    proj = []
    for block in (128, 64, 32, 16):
        q = kvpolar.quantizer("squat", block_size=block, subspace_dim=RANK, lam=1.0)
        proj.append(_errors(q, q.quantize(keys, queries=queries), keys, queries)[0])
    # block 128 = one block = KIVI; then about 1.3-1.5x less per halving on these keys
    assert all(a > 1.15 * b for a, b in zip(proj, proj[1:])), proj


def _assert_same_storage(a, b):
    assert type(a) is type(b) is KiviChannelTensor
    assert a.shape == b.shape and a.dtype == b.dtype
    for name in ("codes", "scale", "minimum"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 45, 64])
@pytest.mark.parametrize("bits", [2, 3])
def test_lam_zero_is_kivi_exactly(dtype, tokens, bits):
    keys, queries = _keys_and_queries(4, dtype, shape=(2, 2, tokens, 64), query_tokens=5)
    squat = kvpolar.quantizer("squat", bits=bits, block_size=16, subspace_dim=4, lam=0.0)
    _assert_same_storage(squat.quantize(keys, queries=queries), _kivi(bits).quantize(keys))


def test_one_block_is_kivi_exactly():
    keys, queries = _keys_and_queries(5, shape=(1, 2, 70, 64))
    squat = kvpolar.quantizer("squat", block_size=64, subspace_dim=RANK, lam=5.0)
    with pytest.warns(UserWarning, match="block_size=64 covers the whole head dim 64.*exactly KIVI"):
        p = squat.quantize(keys, queries=queries)
    _assert_same_storage(p, _kivi().quantize(keys))


@pytest.mark.parametrize("tokens", [1, 45, 96])
def test_stored_form_is_kivi_keys(tokens):
    keys, queries = _keys_and_queries(6, shape=(2, 2, tokens, 128))
    squat = kvpolar.quantizer("squat", bits=2, group_size=32, subspace_dim=RANK, lam=1.0)
    p, ref = squat.quantize(keys, queries=queries), _kivi().quantize(keys)
    assert isinstance(p, KiviChannelTensor)
    assert (p.codes.shape, p.scale.shape, p.minimum.shape) == (ref.codes.shape, ref.scale.shape, ref.minimum.shape)
    assert p.bits_per_element == ref.bits_per_element and p.nbytes == ref.nbytes
    if tokens % 32 == 0:
        assert p.bits_per_element == 2 + 32 / 32
    kivi = _kivi()
    assert torch.equal(kivi.dequantize(p), squat.dequantize(p))
    q = torch.randn(2, 8, 3, 128, dtype=torch.float16)  # GQA 4
    assert torch.equal(kivi.scores(q, p), squat.scores(q, p))
    dense = squat.dequantize(p).double().repeat_interleave(4, dim=1)
    ref_scores = q.double() @ dense.transpose(-1, -2)
    assert (squat.scores(q, p).double() - ref_scores).abs().max() <= 1e-2 * ref_scores.abs().max()


def _reference_squat(keys, qs, lam, block, bits, group):
    """Plain float64 transcription of the paper: per token group, per channel block."""
    d = keys.shape[-1]
    a = lam * qs.double().transpose(-1, -2) @ qs.double() + torch.eye(d, dtype=torch.float64)
    levels = 2**bits - 1
    out = torch.empty(keys.shape, dtype=torch.float64)
    for g0 in range(0, keys.shape[-2], group):
        k = keys[..., g0 : g0 + group, :].double().clone()
        for s in range(0, d, block):
            e = min(s + block, d)
            lo = k[..., s:e].amin(-2, keepdim=True).to(keys.dtype).double()
            scale = ((k[..., s:e].amax(-2, keepdim=True) - lo) / levels).to(keys.dtype).double()
            inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
            k_hat = torch.round((k[..., s:e] - lo) * inv).clamp(0, levels) * scale + lo
            if e < d:
                m = -torch.linalg.solve(a[..., e:, e:], a[..., e:, s:e])
                k[..., e:] += (k_hat - k[..., s:e]) @ m.transpose(-1, -2)
            out[..., g0 : g0 + group, s:e] = k_hat
    return out


@pytest.mark.parametrize("block", [16, 48])
def test_matches_plain_reference(block):
    keys, queries = _keys_and_queries(8, torch.float32, shape=(1, 2, 80, 96))
    squat = kvpolar.quantizer("squat", bits=2, block_size=block, subspace_dim=RANK, lam=0.5)
    sub = squat.prepare(queries)
    got = squat.dequantize(squat.quantize(keys, subspace=sub)).double()
    ref = _reference_squat(keys, sub.qs, 0.5, block, 2, 32)
    # float32 vs float64 shifts may flip a code at a rounding tie now and then, nothing more.
    close = (got - ref).abs() <= 1e-4 * ref.abs().max()
    assert close.float().mean() > 0.995
    assert (got - ref).norm() <= 0.05 * (ref - keys.double()).norm()


def test_block_size_not_dividing_head_dim():
    assert channel_blocks(128, 48) == [(0, 48), (48, 96), (96, 128)]
    keys, queries = _keys_and_queries(9)
    squat = kvpolar.quantizer("squat", block_size=48, subspace_dim=RANK, lam=1.0)
    sub = squat.prepare(queries)
    assert [m.shape[-2:] for m in sub.block_matrices] == [(80, 48), (32, 48), (0, 32)]
    kivi = _kivi()
    assert _errors(squat, squat.quantize(keys, subspace=sub), keys, queries)[0] < 0.8 * _errors(
        kivi, kivi.quantize(keys), keys, queries
    )[0]


@pytest.mark.parametrize("tokens", [40, 64])
def test_svd_and_power_give_comparable_error(tokens):
    keys, queries = _keys_and_queries(10, query_tokens=tokens)
    results = {}
    for method in ("svd", "power"):
        q = kvpolar.quantizer("squat", block_size=16, subspace_dim=12, lam=1.0, subspace=method)
        results[method] = _errors(q, q.quantize(keys, queries=queries), keys, queries)
    for s, p in zip(results["svd"], results["power"]):
        assert abs(p - s) <= 0.05 * s


def test_power_subspace_matches_svd_on_a_clear_spectrum():
    _, queries = _keys_and_queries(11, torch.float32, query_tokens=200)
    svd = kvpolar.quantizer("squat", subspace_dim=RANK, subspace="svd").prepare(queries).qs
    power = kvpolar.quantizer("squat", subspace_dim=RANK, subspace="power").prepare(queries).qs
    gram_s, gram_p = svd.transpose(-1, -2) @ svd, power.transpose(-1, -2) @ power
    assert (gram_p - gram_s).norm() <= 1e-3 * gram_s.norm()
    again = kvpolar.quantizer("squat", subspace_dim=RANK, subspace="power").prepare(queries).qs
    assert torch.equal(power, again)  # seeded


@pytest.mark.parametrize("group", [1, 4, 8])
def test_gqa_stacked_queries(group):
    b, hkv, tq, d = 2, 2, 6, 64
    keys = synthetic.rope_keys(b, hkv, 50, d, seed=12)
    queries = torch.randn(b, hkv * group, tq, d, dtype=torch.float16)
    squat = kvpolar.quantizer("squat", block_size=16, subspace_dim=4, lam=1.0)
    stacked = queries.reshape(b, hkv, group * tq, d)  # query head h -> KV head h // group
    _assert_same_storage(squat.quantize(keys, queries=queries), squat.quantize(keys, queries=stacked))
    sub = squat.prepare(queries, kv_heads=hkv)
    _assert_same_storage(squat.quantize(keys, subspace=sub), squat.quantize(keys, queries=stacked))
    # KV head 1's subspace comes from query heads group..2*group-1 only
    one_head = squat.prepare(queries[:, group : 2 * group].reshape(b, 1, group * tq, d))
    assert torch.allclose(one_head.qs[:, 0].abs(), sub.qs[:, 1].abs(), atol=1e-4)


def test_prepare_then_reuse_equals_one_shot_and_cat():
    keys, queries = _keys_and_queries(13, shape=(2, 2, 100, 64))
    squat = kvpolar.quantizer("squat", block_size=16, subspace_dim=RANK, lam=1.0, subspace="power")
    one_shot = squat.quantize(keys, queries=queries)
    sub = squat.prepare(queries)
    assert isinstance(sub, SquatSubspace) and sub.qs.shape == (2, 2, RANK, 64) and sub.qs.dtype == torch.float32
    _assert_same_storage(squat.quantize(keys, subspace=sub), one_shot)
    # Decoding: later key groups reuse the prompt's subspace; per-group work makes cat exact.
    parts = [squat.quantize(keys[..., s : s + n, :], subspace=sub) for s, n in ((0, 64), (64, 32), (96, 4))]
    _assert_same_storage(kvpolar.cat(parts), one_shot)
    assert sub.to("cpu").qs.device == torch.device("cpu")


def test_registered_and_repr():
    assert "squat" in kvpolar.available_quantizers()
    q = kvpolar.quantizer("squat", bits=2, group_size=32, block_size=64, subspace_dim=20, lam=1e-3, subspace="svd")
    assert "subspace_dim=20" in repr(q)
    assert q.context_keys == {"queries", "subspace"}


@pytest.mark.parametrize(
    "params,match",
    [
        ({"bits": 5}, "bits=5"),
        ({"bits": 1}, "bits=1"),
        ({"subspace_dim": 0}, "subspace_dim=0"),
        ({"block_size": 0}, "block_size=0"),
        ({"group_size": -1}, "group_size=-1"),
        ({"lam": -1e-3}, "lam=-0.001"),
        ({"lam": math.nan}, "lam=nan"),
        ({"lam": "1e-3"}, "lam='1e-3'"),
        ({"subspace": "eig"}, "subspace='eig'"),
        ({"power_iterations": 0}, "power_iterations=0"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match) as info:
        kvpolar.quantizer("squat", **params)
    assert "allowed" in str(info.value)


def test_bad_inputs():
    keys, queries = _keys_and_queries(14, shape=(2, 4, 40, 64))
    q = kvpolar.quantizer("squat", subspace_dim=RANK)
    with pytest.raises(ValueError, match="queries=.*subspace=.*neither"):
        q.quantize(keys)
    with pytest.raises(ValueError, match="both"):
        q.quantize(keys, queries=queries, subspace=q.prepare(queries))
    with pytest.raises(ValueError, match="head dim 32; the keys have 64"):
        q.quantize(keys, queries=queries[..., :32])
    with pytest.raises(ValueError, match="subspace_dim=65 exceeds the head dim 64"):
        kvpolar.quantizer("squat", subspace_dim=65).quantize(keys, queries=queries)
    with pytest.raises(ValueError, match="leading shape.*GQA"):
        q.quantize(keys, queries=queries[:, :3])  # 3 query heads on 4 KV heads
    with pytest.raises(ValueError, match="leading shape.*GQA"):
        q.quantize(keys, queries=queries[:1])  # batch mismatch
    with pytest.raises(TypeError, match="queries has dtype torch.int64"):
        q.quantize(keys, queries=torch.zeros(2, 4, 5, 64, dtype=torch.long))
    with pytest.raises(TypeError, match="unexpected context"):
        q.quantize(keys, query=queries)
    with pytest.raises(ValueError, match="kv_heads=3"):
        q.prepare(queries, kv_heads=3)


def test_bad_prepared_subspace():
    keys, queries = _keys_and_queries(15, shape=(2, 4, 40, 64))
    q = kvpolar.quantizer("squat", subspace_dim=RANK)
    with pytest.raises(ValueError, match="block_size=16.*block_size=64"):
        q.quantize(keys, subspace=kvpolar.quantizer("squat", block_size=16, subspace_dim=RANK).prepare(queries))
    with pytest.raises(ValueError, match="lam=0.5.*lam=0.001"):
        q.quantize(keys, subspace=kvpolar.quantizer("squat", lam=0.5, subspace_dim=RANK).prepare(queries))
    with pytest.raises(ValueError, match="leading shape and head dim must match"):
        q.quantize(keys, subspace=q.prepare(queries[:, :2]))
    with pytest.raises(TypeError, match="SquatSubspace"):
        q.quantize(keys, subspace=queries)
    with pytest.raises(ValueError, match="bits=4"):
        kvpolar.quantizer("squat", bits=4).dequantize(q.quantize(keys, queries=queries))


@pytest.mark.parametrize("method", ["svd", "power"])
def test_fewer_query_tokens_than_subspace_dim(method):
    queries = torch.randn(2, 3, 3, 64)  # rank 3 < subspace_dim 8
    qs = kvpolar.quantizer("squat", subspace_dim=8, subspace=method).prepare(queries).qs
    assert qs.shape == (2, 3, 8, 64) and torch.isfinite(qs).all()
    gram = queries.double().transpose(-1, -2) @ queries.double()
    assert (qs.double().transpose(-1, -2) @ qs.double() - gram).norm() <= 1e-4 * gram.norm()
