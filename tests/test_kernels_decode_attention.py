"""Fused decode attention (Triton, under TRITON_INTERPRET=1 on CPU) against the PyTorch reference.

Tolerance from the reference's own error (style guide): both the kernel and the reference run in the
working dtype and are compared with a float64 oracle (attention over the dequantized cache in
float64); the kernel may be at most a small multiple of the reference's error.
"""

import dataclasses

import pytest
import torch

import kvpolar
from kvpolar.kernels import decode_attention as da
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention, supports
from kvpolar.packing import unpack_bits
from kvpolar.quantizers.base import Quantizer
from kvpolar.quantizers.polar_rope import PolarRopeTensor
from kernel_checks import compare_with_oracle, left_padding_mask, oracle_with, random_inputs  # noqa: E402

D = 64


def _pairs(d, pairing):
    j = torch.arange(d // 2)
    return (j, j + d // 2) if pairing == "half" else (2 * j, 2 * j + 1)


def polar_quantize(x, radius_bits, angle_bits, group_size, pairing):
    """Keys through the real polar-rope quantizer (shortest-arc angle ranges: angle_min may be < 0)."""
    q = kvpolar.quantizer("polar-rope", radius_bits=radius_bits, angle_bits=angle_bits,
                          group_size=group_size, pairing=pairing)
    return q.quantize(x)


def polar_dequantize64(p):
    d, t, ab = p.head_dim, p.num_tokens, p.angle_bits
    codes = unpack_bits(p.codes, p.radius_bits + ab, d // 2).long()

    def tok(m):
        return m.double().repeat_interleave(p.group_size, -2)[..., :t, :]

    r = tok(p.radius_min) + (codes >> ab).double() * tok(p.radius_scale)
    th = tok(p.angle_min) + (codes & ((1 << ab) - 1)).double() * tok(p.angle_scale)
    out = torch.empty(*p.shape, dtype=torch.float64)
    ix, iy = _pairs(d, p.pairing)
    out[..., ix], out[..., iy] = r * th.cos(), r * th.sin()
    return out


@dataclasses.dataclass(frozen=True)
class _PolarConfig:
    pass


class PolarStandIn(Quantizer):
    """polar-rope scores for reference_decode_attention computed in float64 from the stored format."""

    name = "polar-rope-test"
    Config = _PolarConfig
    stored_type = PolarRopeTensor

    def _quantize(self, x):
        raise NotImplementedError

    def _dequantize(self, p):
        return polar_dequantize64(p).to(p.dtype)

    def _scores(self, q, p):
        return (q.double() @ polar_dequantize64(p).transpose(-1, -2)).float()


# ----- float64 oracle -------------------------------------------------------------------------------------
def dequantize64(p):
    name = type(p).__name__
    if name == "FullPrecisionTensor":
        return p.values.double()
    if name == "PolarRopeTensor":
        return polar_dequantize64(p)
    codes = unpack_bits(p.codes, p.bits, p.head_dim).double()
    if name == "KiviChannelTensor":
        sc = p.scale.double().repeat_interleave(p.group_size, -2)[..., : p.num_tokens, :]
        mn = p.minimum.double().repeat_interleave(p.group_size, -2)[..., : p.num_tokens, :]
        return codes * sc + mn
    sc = p.scale.double().repeat_interleave(p.group_size, -1)
    mn = p.minimum.double().repeat_interleave(p.group_size, -1)
    return codes * sc + mn


oracle = oracle_with(dequantize64)


# ----- inputs -------------------------------------------------------------------------------------------------
def make_keys(fmt, k):
    if fmt == "none":
        qz = kvpolar.quantizer("none")
        return qz, qz.quantize(k)
    if fmt.startswith("kivi"):
        bits, group = (int(x) for x in fmt.split("-")[1:])
        qz = kvpolar.quantizer("kivi", bits=bits, group_size=group, axis="channel")
        return qz, qz.quantize(k)
    rb, ab, group, pairing = fmt.split("-")[1:]
    return PolarStandIn(), polar_quantize(k, int(rb), int(ab), int(group), pairing)


def make_values(fmt, v):
    if fmt == "none":
        qz = kvpolar.quantizer("none")
        return qz, qz.quantize(v)
    bits, group = (int(x) for x in fmt.split("-")[1:])
    qz = kvpolar.quantizer("kivi", bits=bits, group_size=group, axis="token")
    return qz, qz.quantize(v)


def check(key_fmt, value_fmt, *, batch=1, hkv=1, gqa=4, tq=1, tk=37, r=0, dtype=torch.float16,
          lengths=None, config=None, factor=3.0):
    n = tk + r
    k, v, q = random_inputs((key_fmt, value_fmt, batch, hkv, gqa, tq, tk, r, dtype),
                            batch=batch, hkv=hkv, gqa=gqa, tq=tq, n=n, d=D, dtype=dtype)
    kq, pk = make_keys(key_fmt, k[..., :tk, :]) if tk else (None, None)
    vq, pv = make_values(value_fmt, v[..., :tk, :]) if tk else (None, None)
    rk, rv = (k[..., tk:, :], v[..., tk:, :]) if r else (None, None)
    assert supports(pk, pv)
    return compare_with_oracle(oracle, q, pk, pv, kq, vq, rk, rv, left_padding_mask(lengths, tq, n),
                               config=small_caches_transposed(config), factor=factor)


def small_caches_transposed(config: LaunchConfig | None) -> LaunchConfig:
    """``config`` with the small test caches let into the transposed kernel (``transposed_min_rows``;
    ``test_launch_policy`` checks the threshold itself)."""
    return dataclasses.replace(config or LaunchConfig(), transposed_min_rows=0)


# ----- tests ------------------------------------------------------------------------------------------------------
KIVI_KEYS = ["kivi-2-32", "kivi-4-32", "kivi-8-16", "kivi-3-32"]


@pytest.mark.parametrize("key_fmt", KIVI_KEYS)
@pytest.mark.parametrize("value_fmt", ["kivi-2-32", "kivi-4-16", "kivi-8-32"])
def test_kivi_formats(key_fmt, value_fmt):
    check(key_fmt, value_fmt, tk=45, gqa=4)


@pytest.mark.parametrize("tk", [1, 16, 33, 70])
def test_lengths_off_the_block_and_group(tk):
    check("kivi-2-32", "kivi-2-32", tk=tk, gqa=1)


@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("tq", [1, 3])
def test_gqa_and_query_tokens_with_residual(gqa, tq):
    check("kivi-2-32", "kivi-2-32", hkv=2 if gqa == 1 else 1, gqa=gqa, tq=tq, tk=40, r=7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_batch_left_padding(dtype):
    check("kivi-2-32", "kivi-2-32", batch=3, gqa=4, tk=50, r=5, dtype=dtype, lengths=[55, 20, 3])


def test_fully_masked_row_gives_zeros():
    out = check("kivi-4-32", "kivi-4-32", batch=2, gqa=1, tk=20, r=3, lengths=[23, 0])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_precision_path(dtype):
    check("none", "none", gqa=4, tq=3, tk=29, r=4, dtype=dtype)


def test_residual_only():
    check("none", "none", gqa=8, tk=0, r=9)


def test_many_splits_and_blocks():
    check("kivi-2-32", "kivi-2-32", gqa=4, tk=70, r=3, config=LaunchConfig(block_n=16, num_splits=3))


@pytest.mark.parametrize("tk", [40, 64])
def test_several_key_groups_per_block(tk):
    check("kivi-2-16", "kivi-3-32", gqa=4, tq=3, tk=tk, r=2, config=LaunchConfig(block_n=64, num_splits=1))


@pytest.mark.parametrize("rb_ab", [(2, 4), (4, 4), (3, 3)])
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_polar_rope_keys(rb_ab, pairing):
    rb, ab = rb_ab
    check(f"polar-{rb}-{ab}-32-{pairing}", "kivi-2-32", gqa=4, tq=3 if rb == 2 else 1, tk=45, r=5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_polar_rope_ragged_bf16(dtype):
    check("polar-2-4-16-half", "kivi-2-32", batch=2, gqa=8, tk=33, r=2, dtype=dtype, lengths=[35, 11])


def test_supports_refuses_what_it_cannot_read():
    kq = kvpolar.quantizer("kivi", bits=2, group_size=24, axis="channel")
    vq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="token")
    x = torch.randn(1, 1, 48, D)
    assert not supports(kq.quantize(x), vq.quantize(x))
    with pytest.raises(ValueError, match="group_size=24"):
        fused_decode_attention(torch.randn(1, 1, 1, D), kq.quantize(x), vq.quantize(x), kq, vq, None, None, 1.0)


@pytest.mark.parametrize("key_fmt", ["kivi-2-32", "polar-2-4-32-half"])
def test_float32_query(key_fmt):
    check(key_fmt, "kivi-3-32", gqa=4, tk=45, r=3, dtype=torch.float32)


def test_natural_order_path():
    check("kivi-4-32", "kivi-2-32", gqa=8, tq=3, tk=45, r=3, config=LaunchConfig(by_parts=False, block_n=32))


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("formats", [("kivi-2-32", "kivi-2-32"), ("kivi-4-32", "kivi-8-32")])
def test_transposed_and_classic_kernels(transposed, formats):
    """Both split kernels (transposed: s^T = K q^T; classic: s = q K^T) on the same inputs."""
    check(*formats, batch=2, gqa=4, tq=2, tk=75, r=3, lengths=[78, 30],
          config=LaunchConfig(transposed=transposed, transposed_warps=2, num_splits=2))


def test_transposed_small_blocks_and_register_cap():
    """16-token blocks inside a 32-token key group; the register cap is ignored by the interpreter."""
    check("kivi-2-32", "kivi-4-16", gqa=8, tk=50, r=2,
          config=LaunchConfig(block_n=16, max_registers=168, transposed_programs_per_sm=16))


def _operand(fmt, rows, bits):
    """A stand-in operand of ``rows`` packed rows (head dim 128) for the launch-policy checks."""
    return da._Operand(fmt, torch.zeros(1, 1, rows, 128 * bits // 8 // (2 if fmt == da._FMT_POLAR else 1),
                                        dtype=torch.uint8), (), bits=bits)


def test_launch_policy():
    """Small caches take the classic kernel; batched launches get the measured programs-per-SM and
    register-cap policy (``transposed_tuning``); explicit config values win."""
    kivi = da._FMT_KIVI
    values2, values4 = _operand(kivi, 1, 2), _operand(kivi, 1, 4)
    cfg = LaunchConfig()
    small = cfg.transposed_min_rows
    assert not da._use_transposed(_operand(kivi, small - 1, 2), values2, cfg)
    assert da._use_transposed(_operand(kivi, small, 2), values2, cfg)
    assert not da._use_transposed(_operand(kivi, small, 2), values2, LaunchConfig(transposed=False))
    big = da._REGISTER_CAP_MIN_ROWS
    assert da.transposed_tuning(_operand(kivi, big, 2), values2, 64, cfg) == (16, 128)
    assert da.transposed_tuning(_operand(kivi, big - 1, 2), values2, 64, cfg) == (12, None)
    assert da.transposed_tuning(_operand(kivi, big, 2), values2, 63, cfg) == (12, None)
    assert da.transposed_tuning(_operand(kivi, big, 4), values4, 64, cfg) == (12, None)
    assert da.transposed_tuning(_operand(kivi, big, 2), values4, 64, cfg) == (12, None)
    polar = _operand(da._FMT_POLAR, small, 6)
    assert da.transposed_tuning(polar, values2, 64, cfg) == (16, None)
    assert da.transposed_tuning(polar, values2, 8, cfg) == (12, None)
    assert da.transposed_tuning(polar, values4, 64, cfg) == (12, None)
    mine = LaunchConfig(transposed_programs_per_sm=5, max_registers=200)
    assert da.transposed_tuning(_operand(kivi, big, 2), values2, 64, mine) == (5, 200)


def test_launch_config_refuses_bad_values():
    with pytest.raises(ValueError, match="block_n=48"):
        LaunchConfig(block_n=48)
    with pytest.raises(ValueError, match="num_warps=3"):
        LaunchConfig(num_warps=3)
    with pytest.raises(ValueError, match="transposed_stages=0"):
        LaunchConfig(transposed_stages=0)
    with pytest.raises(ValueError, match="max_registers=300"):
        LaunchConfig(max_registers=300)
    with pytest.raises(ValueError, match="transposed_programs_per_sm=0"):
        LaunchConfig(transposed_programs_per_sm=0)
    with pytest.raises(ValueError, match="transposed_min_rows=-1"):
        LaunchConfig(transposed_min_rows=-1)
