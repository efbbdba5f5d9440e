"""Fused decode attention (Triton, under TRITON_INTERPRET=1 on CPU) against the PyTorch reference.

Tolerance from the reference's own error (style guide): both the kernel and the reference run in the
working dtype and are compared with a float64 oracle (attention over the dequantized cache in
float64); the kernel may be at most a small multiple of the reference's error.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels import decode_attention as da
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention, supports
from kvpolar.packing import unpack_bits
from kvpolar.quantizers.base import Quantizer
from kvpolar.quantizers.polar_rope import PolarRopeTensor
from kernel_checks import (DEVICE, ULP, compare_with_oracle, left_padding_mask, oracle_with, random_inputs,  # noqa: E402
                           random_launch, random_shape)

D = 64
#: head dim of the polar-rope key tests that need the transposed kernel: compiled, it takes polar-rope
#: keys from head dim 128 on (``_use_transposed``); the interpreter at any, here the cheaper 64
TRANSPOSED_POLAR_D = D if DEVICE == "cpu" else 128


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


def make_values(fmt, v, layout="tokens"):
    """``layout``: KIVI value scale / min as the quantizer stores them (tokens adjacent in memory) or
    with the groups adjacent ("groups": plain contiguous ``[..., T, G]``)."""
    if fmt == "none":
        qz = kvpolar.quantizer("none")
        return qz, qz.quantize(v)
    bits, group = (int(x) for x in fmt.split("-")[1:])
    qz = kvpolar.quantizer("kivi", bits=bits, group_size=group, axis="token")
    p = qz.quantize(v)
    if layout == "groups":
        p = dataclasses.replace(p, scale=p.scale.contiguous(), minimum=p.minimum.contiguous())
    return qz, p


def check(key_fmt, value_fmt, *, batch=1, hkv=1, gqa=4, tq=1, tk=37, r=0, dtype=torch.float16,
          lengths=None, config=None, factor=3.0, value_layout="tokens", d=D):
    n = tk + r
    k, v, q = random_inputs((key_fmt, value_fmt, batch, hkv, gqa, tq, tk, r, dtype),
                            batch=batch, hkv=hkv, gqa=gqa, tq=tq, n=n, d=d, dtype=dtype)
    kq, pk = make_keys(key_fmt, k[..., :tk, :]) if tk else (None, None)
    vq, pv = make_values(value_fmt, v[..., :tk, :], value_layout) if tk else (None, None)
    rk, rv = (k[..., tk:, :], v[..., tk:, :]) if r else (None, None)
    assert supports(pk, pv)
    return compare_with_oracle(oracle, q, pk, pv, kq, vq, rk, rv, left_padding_mask(lengths, tq, n),
                               config=small_caches_transposed(config), factor=factor)


def record_three_byte_readings(monkeypatch, module) -> dict:
    """The ``WORDS`` mode ``_three_byte_reading`` returns for each operand in 3-byte units, by the
    address of its codes (the last asked for: on CUDA the launch plan builds the arguments once more
    to ask the compiled kernel's residency)."""
    taken = {}
    real = module._three_byte_reading

    def reading(codes, data, unit_bytes, words, cfg):
        out = real(codes, data, unit_bytes, words, cfg)
        if unit_bytes == 3:
            taken[codes.data_ptr()] = out[1]
        return out

    monkeypatch.setattr(module, "_three_byte_reading", reading)
    return taken


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


@pytest.mark.parametrize("layout, value_metadata", [("tokens", "tiles"), ("tokens", "ahead"), ("tokens", "gather"),
                                                    ("groups", "tiles"), ("groups", "words"), ("groups", "ahead"),
                                                    ("groups", "gather")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value_fmt", ["kivi-2-16", "kivi-4-64", "kivi-3-8"])
def test_value_metadata_reads(layout, value_metadata, dtype, value_fmt):
    """The transposed kernel's reads of KIVI value scale / min (``LaunchConfig.value_metadata``:
    [groups, block] tiles where used, int32 words of two groups, 16-bit tiles a block ahead,
    per-unit gathers) against the oracle, for metadata stored with the tokens adjacent (as the
    quantizer stores it) and with the groups adjacent, with an even and an odd number of groups per
    token (odd falls back from words to a block ahead), and a length that leaves a short last split
    (the blocks read ahead past the cache end are masked)."""
    check("kivi-2-32", value_fmt, batch=2, gqa=4, tk=83, r=3, dtype=dtype, lengths=[86, 40],
          config=LaunchConfig(value_metadata=value_metadata), value_layout=layout)


@pytest.mark.parametrize("key_fmt, config", [
    ("kivi-2-32", LaunchConfig(transposed=False, by_parts=True, block_n=16)),   # KIVI keys by parts
    ("kivi-2-32", LaunchConfig(transposed=False, by_parts=False, block_n=16)),  # one key group per block
    ("kivi-2-16", LaunchConfig(transposed=False, block_n=32)),                 # two groups per block
    ("polar-2-4-32-half", LaunchConfig(transposed=False, block_n=16)),         # polar-rope keys
    ("kivi-2-32", LaunchConfig(block_n=16)),                                   # the transposed kernel
    ("polar-2-4-32-half", LaunchConfig(block_n=16)),
])
def test_surplus_blocks_read_no_key_metadata(key_fmt, config):
    """65 tokens (three 32-token key groups, the last of one token) over two splits: under the interpreter
    (splits of a power of two blocks) 64-token splits, so the last split's blocks at 96 and 112 start
    past the cache's last key group. Their metadata must not be read: on the H100 the classic kernel's unmasked
    reads there (KIVI and polar-rope keys) left the metadata tensors and faulted where one ended a memory
    segment (``compute-sanitizer``: 1-7 bytes past a key group tensor). On the CPU every load and store
    is checked against the kernel's tensors (``interpreter_bounds``)."""
    import contextlib

    from interpreter_bounds import checked_bounds

    bounds = checked_bounds() if DEVICE == "cpu" else contextlib.nullcontext()
    with bounds:
        check(key_fmt, "kivi-2-32", batch=2, hkv=2, gqa=4, tk=65, r=3,
              config=dataclasses.replace(config, num_splits=2))


@pytest.mark.parametrize("layout", ["tokens", "groups"])
def test_classic_kernel_reads_either_value_metadata_layout(layout):
    """The classic kernel (by parts and interleaved) addresses KIVI value scale / min through their
    token and group strides."""
    for by_parts in (True, False):
        check("kivi-2-32", "kivi-4-16", batch=2, gqa=4, tk=45, r=2, lengths=[47, 20], value_layout=layout,
              config=LaunchConfig(transposed=False, by_parts=by_parts, block_n=16))


def test_value_metadata_modes():
    """Which read ``_value_metadata`` picks: tiles for metadata with its tokens adjacent (as stored
    by the quantizer), words where two 16-bit groups fill an int32 word of the query's dtype, a block
    ahead otherwise, and what the config asks for; the policy's choice by layout, and per-unit
    gathers for 3-bit codes."""
    from kvpolar.kernels import decode_attention as da

    v = torch.randn(1, 1, 5, D)
    q16 = torch.randn(1, 4, 1, D, dtype=torch.float16)
    even = da.value_operand(make_values("kivi-2-16", v.half(), "groups")[1])
    odd = da.value_operand(make_values(f"kivi-2-{D}", v.half(), "groups")[1])
    adjacent = da.value_operand(make_values("kivi-2-16", v.half())[1])
    meta, mode = da._value_metadata(even, q16, LaunchConfig())
    assert mode == 2 and meta[0].dtype == torch.int32 and meta[0].shape[-1] == D // 32
    assert da._value_metadata(odd, q16, LaunchConfig())[1] == 1
    assert da._value_metadata(even, q16, LaunchConfig(value_metadata="ahead"))[1] == 1
    assert da._value_metadata(even, q16, LaunchConfig(value_metadata="tiles"))[1] == 3
    meta, mode = da._value_metadata(adjacent, q16, LaunchConfig(value_metadata="words"))
    assert mode == 3 and meta[0].stride(-2) == 1 and meta[0].dtype == torch.float16
    meta, mode = da._value_metadata(even, q16, LaunchConfig(value_metadata="gather"))
    assert mode == 0 and meta[0].dtype == torch.float16
    keys = da.key_operand(make_keys("kivi-2-32", v.half())[1])
    assert da.value_metadata_policy(keys, adjacent, LaunchConfig()) == "tiles"
    assert da.value_metadata_policy(keys, even, LaunchConfig()) == "words"
    assert da.value_metadata_policy(keys, adjacent, LaunchConfig(value_metadata="ahead")) == "ahead"
    three_bit = da.value_operand(make_values("kivi-3-32", v.half())[1])  # 3-byte units: gathered per unit
    assert da.value_metadata_policy(keys, three_bit, LaunchConfig()) == "gather"
    assert da.value_metadata_policy(keys, three_bit, LaunchConfig(value_metadata="tiles")) == "tiles"
    with pytest.raises(ValueError, match="value_metadata='later'"):
        LaunchConfig(value_metadata="later")


def test_value_metadata_of_mixed_layouts_is_read_through_one_layout():
    """Scale and minimum stored in different layouts (the kernels address both through one set of
    strides) are given to the kernel in one: the result still matches the oracle."""
    k, v, q = random_inputs(("mixed",), batch=2, hkv=1, gqa=4, tq=1, n=40, d=D, dtype=torch.float16)
    kq, pk = make_keys("kivi-2-32", k)
    vq, p = make_values("kivi-2-16", v)
    mixed = dataclasses.replace(p, minimum=p.minimum.contiguous())
    op = da.value_operand(mixed)
    assert op.meta[0].stride() == op.meta[1].stride() and mixed.scale.stride() != mixed.minimum.stride()
    assert torch.equal(op.meta[0], p.scale) and torch.equal(op.meta[1], p.minimum)
    compare_with_oracle(oracle, q, pk, mixed, kq, vq, None, None, None, config=small_caches_transposed(None))


@pytest.mark.parametrize("tk", [1, 16, 33, 70])
def test_lengths_off_the_block_and_group(tk):
    check("kivi-2-32", "kivi-2-32", tk=tk, gqa=1)


@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("tq", [1, 3])
def test_gqa_and_query_tokens_with_residual(gqa, tq):
    check("kivi-2-32", "kivi-2-32", hkv=2 if gqa == 1 else 1, gqa=gqa, tq=tq, tk=40, r=7)


@pytest.mark.parametrize("key_fmt", ["kivi-2-32", "polar-2-4-32-half"])
@pytest.mark.parametrize("max_rows", [16, 64])
def test_draft_verification_step(key_fmt, max_rows):
    """Assisted decoding verifies a draft in one step: 9 query tokens x GQA 4 = 36 rows (64-row
    tiles), the residual window holding the draft, a ragged batch; by the policy the classic kernel
    (over ``transposed_max_rows``), and the transposed one where allowed."""
    config = LaunchConfig(transposed_min_rows=0, transposed_max_rows=max_rows)
    check(key_fmt, "kivi-2-32", batch=2, gqa=4, tq=9, tk=40, r=12, lengths=[52, 30], config=config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_batch_left_padding(dtype):
    check("kivi-2-32", "kivi-2-32", batch=3, gqa=4, tk=50, r=5, dtype=dtype, lengths=[55, 20, 3])


def test_fully_masked_row_gives_zeros():
    out = check("kivi-4-32", "kivi-4-32", batch=2, gqa=1, tk=20, r=3, lengths=[23, 0])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("key_fmt, value_fmt", [("kivi-2-32", "kivi-2-32"), ("polar-2-4-16-half", "kivi-4-32"),
                                                ("kivi-4-32", "kivi-3-32")])
def test_lazy_rescale_gives_the_same_attention(key_fmt, value_fmt):
    """``lazy_rescale`` (running sums rescaled only where a row's maximum grew): the oracle's
    attention over one split of several blocks, a ragged batch and a fully masked row."""
    out = check(key_fmt, value_fmt, batch=3, gqa=4, tq=2, tk=150, r=3, lengths=[153, 40, 0],
                config=LaunchConfig(lazy_rescale=True, num_splits=1))
    assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_fmt, value_fmt", [("kivi-2-32", "kivi-2-32"), ("kivi-4-64", "kivi-4-16"),
                                                ("kivi-8-32", "kivi-3-32")])
@pytest.mark.parametrize("bias", ["first", "last"])
def test_kivi_key_bias_before_or_after_the_key_products(key_fmt, value_fmt, dtype, bias):
    """``kivi_key_bias`` "last" (the default: the key group's score bias added after the key products)
    and "first" (their first accumulator): the oracle's attention with 16-bit and byte units, key
    groups of one and two blocks, a ragged batch, two query tokens and several splits."""
    check(key_fmt, value_fmt, batch=2, gqa=4, tq=2, tk=150, r=3, dtype=dtype, lengths=[153, 61],
          config=LaunchConfig(kivi_key_bias=bias, num_splits=2), d=128)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key_fmt, value_fmt, units", [("kivi-2-32", "kivi-2-32", "halfwords"),
                                                       ("kivi-4-64", "kivi-4-16", "halfwords"),
                                                       ("kivi-2-32", "kivi-2-32", "bytes"),
                                                       ("polar-2-4-32-half", "kivi-3-32", "halfwords"),
                                                       ("kivi-2-32", "kivi-8-32", "halfwords")])
@pytest.mark.parametrize("lazy", [False, True])
def test_kivi_value_min_as_a_product(key_fmt, value_fmt, units, dtype, lazy):
    """``kivi_value_min="product"`` (the values' minimum as its own product, each code by one fused
    multiply-add, each code position's sums rescaled after the loop): the oracle's attention over
    16-bit and byte units, 3-bit values in 3-byte units, 8-bit values (which keep the elementwise
    form), a ragged batch, two query tokens, several splits, with and without lazy rescaling."""
    check(key_fmt, value_fmt, batch=2, gqa=4, tq=2, tk=150, r=3, dtype=dtype, lengths=[153, 61], d=128,
          config=LaunchConfig(kivi_value_min="product", kivi_code_units=units, lazy_rescale=lazy,
                              num_splits=2))


@pytest.mark.parametrize("magnitude", [1e-2, 1e-4])
def test_kivi_value_min_product_small_values(magnitude):
    """float16 values so small that ``F * scale`` (``kivi_parts.value_fma_factor``) is subnormal (1e-4)
    or near it (1e-2): the "product" form stays within the documented bound, each value off by at
    most ``code * 2**-20`` on top of the usual rounding, and so does the output (a convex combination)."""
    k, v, q = random_inputs(("small values", magnitude), batch=2, hkv=1, gqa=4, tq=1, n=160, d=128,
                            dtype=torch.float16)
    v = (v.float() * magnitude).half()
    kq, pk = make_keys("kivi-2-32", k)
    vq, pv = make_values("kivi-2-32", v, "tokens")
    compare_with_oracle(oracle, q, pk, pv, kq, vq, None, None, None, absolute=3 * 2.0 ** -20,
                        config=LaunchConfig(kivi_value_min="product", transposed_min_rows=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_precision_path(dtype):
    check("none", "none", gqa=4, tq=3, tk=29, r=4, dtype=dtype)


@pytest.mark.parametrize("r", [0, 5])
def test_query_with_strided_channels(r):
    """A query whose channels are not adjacent in memory (every other element of a wider tensor) gives
    the same attention as its contiguous copy: the kernels read a query row as D adjacent elements."""
    k, v, q = random_inputs(("strided query", r), batch=2, hkv=1, gqa=4, tq=1, n=40 + r, d=D, dtype=torch.float16)
    strided = torch.stack([q, torch.zeros_like(q)], dim=-1).flatten(-2)[..., ::2]
    assert strided.stride(-1) == 2 and torch.equal(strided, q)
    kq, pk = make_keys("kivi-4-32", k[..., :40, :])
    vq, pv = make_values("kivi-4-32", v[..., :40, :])
    rk, rv = (k[..., 40:, :].to(DEVICE), v[..., 40:, :].to(DEVICE)) if r else (None, None)
    pk, pv = pk.to(DEVICE), pv.to(DEVICE)
    out = fused_decode_attention(strided.to(DEVICE), pk, pv, kq, vq, rk, rv, D**-0.5)
    assert torch.equal(out, fused_decode_attention(q.to(DEVICE), pk, pv, kq, vq, rk, rv, D**-0.5))


def test_residual_only():
    check("none", "none", gqa=8, tk=0, r=9)


def window_launches(monkeypatch) -> list:
    """The first token of each split launch over the 16-bit window (``_launch_split`` with
    full-precision keys from token ``tk`` on), appended as they happen."""
    launched = []
    original = da._launch_split

    def record(*args, **kwargs):
        if args[1].fmt == da.FMT_FULL:
            launched.append(args[4])
        return original(*args, **kwargs)

    monkeypatch.setattr(da, "_launch_split", record)
    return launched


@pytest.mark.parametrize("form", ["by-kv-head", "by-row", "launched"])
@pytest.mark.parametrize("case", ["gqa1", "gqa8-tq3", "ragged", "window-only", "long-window", "two-steps", "bf16",
                                  "fp32", "wide-group"])
def test_window_in_the_combine_kernel_or_its_own_launch(monkeypatch, form, case):
    """The residual window attended in the combine kernel's programs (windows of at most
    ``MAX_FOLDED_WINDOW`` tokens in calls of at most ``MAX_FOLDED_ROWS`` query rows): by one program
    per KV head (``_kv_head_window_combine_kernel``, groups of at most ``MAX_WINDOW_GROUP_ROWS`` rows:
    a wider group takes the other form) or one per query row (``_window_combine_kernel``); or by its
    own split launch (otherwise; here forced by a window limit of 0). The oracle's attention every
    way, over windows of one and of several ``WINDOW_BLOCK_N`` steps, GQA 1 and 8, three and nine
    query tokens, a ragged batch with a fully masked row, no packed tokens, bfloat16 and float32."""
    launched = window_launches(monkeypatch)
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 0 if form == "launched" else 1024)
    monkeypatch.setattr(da, "MAX_FOLDED_ROWS", 4096)
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD", form == "by-kv-head")
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD_SM_SHARE", 1 << 20)  # (whatever the GPU's SM count)
    monkeypatch.setattr(da, "_COMBINE_LAUNCHES", {})
    monkeypatch.setattr(da, "_WINDOW_LAUNCHES", {})  # (a window launch bound by another test would skip ``_launch_split``)
    kw = {"gqa1": dict(gqa=1, hkv=2, tk=40, r=5),
          "gqa8-tq3": dict(gqa=8, tq=3, tk=33, r=31),
          "ragged": dict(batch=3, gqa=4, tk=50, r=70, lengths=[120, 64, 0]),
          "window-only": dict(gqa=4, tk=0, r=45, lengths=None),
          "long-window": dict(batch=2, gqa=2, tk=20, r=97, lengths=[117, 90]),
          "two-steps": dict(batch=2, gqa=2, tk=20, r=150, lengths=[170, 120]),  # (> WINDOW_BLOCK_N = 128)
          "bf16": dict(batch=2, gqa=4, tk=37, r=40, dtype=torch.bfloat16, lengths=[77, 12]),
          "fp32": dict(batch=2, gqa=4, tk=21, r=40, dtype=torch.float32, lengths=[61, 30]),
          "wide-group": dict(gqa=8, tq=9, tk=20, r=33)}[case]
    tk = kw.pop("tk")
    key_fmt = "none" if tk == 0 else "kivi-2-32"
    out = check(key_fmt, key_fmt, tk=tk, **kw)
    assert launched == ([] if form != "launched" else [tk])  # the window's split launch starts at token tk
    kernel = {"by-kv-head": da._kv_head_window_combine_kernel, "by-row": da._window_combine_kernel,
              "launched": da._combine_kernel}[form]
    if case == "wide-group" and form == "by-kv-head":
        kernel = da._window_combine_kernel  # (72 rows per KV head)
    assert [key[1] for key in da._COMBINE_LAUNCHES] == [kernel]
    if case == "ragged":
        assert torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("form", ["by-kv-head", "by-row"])
@pytest.mark.parametrize("case", ["part", "one", "full", "empty", "window-only", "two-steps", "bf16",
                                  "polar-rope-keys", "turbo-values", "polar-recursive-values", "16-bit-packed",
                                  "padded"])
def test_window_length_read_from_memory(monkeypatch, form, case):
    """``residual_length``: the window in buffers of a fixed size (``capacity`` tokens, the rest filled
    with huge values that must not be read), the kernel reading how many are real from memory. The
    output equals the call over the real tokens alone, bit for bit (the blocks beyond add nothing), in
    both folded forms, also with polar-rope keys, values the merge un-rotates and a 16-bit "packed"
    part (a 16-bit layer's cache in replayed decoding); with an empty window it equals the call without
    one. Both are also checked against the PyTorch reference (within 8 ulps of the output's largest
    value; at most 1.3 measured under the interpreter), so a fault the two kernel paths share fails too.
    "padded": a batch with left padding (replayed decoding's padded prompts): a mask over the packed
    part and the whole buffer, its columns past the length True, which must not make them read."""
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD", form == "by-kv-head")
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD_SM_SHARE", 1 << 20)
    monkeypatch.setattr(da, "_COMBINE_LAUNCHES", {})
    tk, capacity, real, dtype = {"part": (40, 70, 37, torch.float16), "one": (40, 33, 1, torch.float16),
                                 "full": (33, 64, 64, torch.float16), "empty": (40, 35, 0, torch.float16),
                                 "window-only": (0, 50, 19, torch.float16),
                                 "two-steps": (40, 200, 150, torch.float16),  # (steps of WINDOW_BLOCK_N = 128)
                                 "bf16": (37, 45, 30, torch.bfloat16), "polar-rope-keys": (64, 40, 21, torch.float16),
                                 "turbo-values": (48, 40, 13, torch.float16),
                                 "polar-recursive-values": (48, 40, 26, torch.float16),
                                 "16-bit-packed": (45, 33, 20, torch.float16),
                                 "padded": (40, 70, 37, torch.float16)}[case]
    d = TRANSPOSED_POLAR_D if case == "polar-rope-keys" else D
    k, v, q = random_inputs(("window-in-memory", case), batch=2, hkv=2, gqa=4, tq=1, n=tk + capacity, d=d,
                            dtype=dtype)
    fmt = "kivi-2-32" if tk and case != "16-bit-packed" else "none"  # (16-bit: a layer kept in 16 bits, replayed)
    key_fmt = "polar-2-4-32-half" if case == "polar-rope-keys" else fmt
    kq, pk = make_keys(key_fmt, k[..., :tk, :]) if tk else (None, None)
    vq, pv = make_values(fmt, v[..., :tk, :]) if tk else (None, None)
    if case.endswith("-values"):
        vq = kvpolar.quantizer("turbo", bits=4) if case == "turbo-values" else kvpolar.quantizer("polar-recursive")
        pv = vq.quantize(v[..., :tk, :].to(DEVICE))
    rk, rv = k[..., tk:, :].clone(), v[..., tk:, :].clone()
    rk[..., real:, :], rv[..., real:, :] = 3e4, -3e4  # not the window's: never read
    dev = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    scale = d**-0.5
    length = torch.tensor([real], dtype=torch.int32, device=DEVICE)
    mask = real_mask = None
    if case == "padded":  # row 0: 11 padding tokens, row 1: none but one in the window's real part
        mask = torch.ones(2, 1, 1, tk + capacity, dtype=torch.bool)
        mask[0, ..., :11] = False
        mask[1, ..., tk + 5] = False
        real_mask = mask[..., :tk + real]
    out = fused_decode_attention(dev(q), dev(pk), dev(pv), kq, vq, dev(rk), dev(rv), scale, dev(mask),
                                 residual_length=length)
    window = (dev(rk[..., :real, :]), dev(rv[..., :real, :])) if real else (None, None)
    want = fused_decode_attention(dev(q), dev(pk), dev(pv), kq, vq, *window, scale, dev(real_mask))
    assert torch.equal(out, want)
    # and both against the PyTorch reference over the real tokens, so a fault the two paths share fails
    host = lambda x: None if x is None else x.to("cpu")  # noqa: E731  (the polar-rope stand-in decodes on the CPU)
    ref = reference_decode_attention(q, host(pk), host(pv), kq, vq, *(host(w) for w in window), scale,
                                     real_mask).double()
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= 8 * ULP[dtype] * ref.abs().max().item(), f"error {err:.3g} against the reference"
    kernel = da._kv_head_window_combine_kernel if form == "by-kv-head" else da._window_combine_kernel
    assert kernel in [key[1] for key in da._COMBINE_LAUNCHES]


def test_window_length_in_memory_refuses_what_it_cannot_do(monkeypatch):
    """``residual_length`` must be an int32 one-element tensor on the query's device, with a window the
    merging kernel attends (not its own launch)."""
    k, v, q = random_inputs("window-in-memory-errors", batch=1, hkv=2, gqa=4, tq=1, n=80, d=D, dtype=torch.float16)
    kq, pk = make_keys("kivi-2-32", k[..., :64, :])
    vq, pv = make_values("kivi-2-32", v[..., :64, :])
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    args = (dev(q), dev(pk), dev(pv), kq, vq, dev(k[..., 64:, :]), dev(v[..., 64:, :]), D**-0.5)
    length = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    for bad, match in ((length.long(), "int32 tensor of one element"), (torch.tensor([5, 6], dtype=torch.int32),
                                                                        "int32 tensor of one element"), (5, "got 5")):
        with pytest.raises(ValueError, match=match):
            fused_decode_attention(*args, residual_length=bad)
    with pytest.raises(ValueError, match="without a residual window"):
        fused_decode_attention(*args[:5], None, None, D**-0.5, residual_length=length)
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 8)
    with pytest.raises(ValueError, match="needs the 16-token window attended in the kernel that merges"):
        fused_decode_attention(*args, residual_length=length)


def test_window_by_kv_head_where_its_programs_fill_the_gpu(monkeypatch):
    """The folded window takes one program per KV head where batch x KV heads x
    ``WINDOW_BY_KV_HEAD_SM_SHARE`` reaches the SMs (large batches: the window read once per KV head),
    one per query row below (few programs: each row's merge in its own program); ``describe_launch``
    reports which, and a window too long to fold."""
    monkeypatch.setattr(da, "_device_sms", lambda device: 16)
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD_SM_SHARE", 2)
    chosen = []
    for batch in (3, 4):  # 6 and 8 (sequence, KV head) programs: 12 and 16 against 16 SMs
        monkeypatch.setattr(da, "_COMBINE_LAUNCHES", {})
        check("kivi-2-32", "kivi-2-32", batch=batch, hkv=2, gqa=4, tk=33, r=20, lengths=None)
        chosen += [key[1] for key in da._COMBINE_LAUNCHES]
    assert chosen == [da._window_combine_kernel, da._kv_head_window_combine_kernel]
    # ``describe_launch`` reports the same, and a window too long to fold, or none
    forms = []
    for batch, r in ((3, 20), (4, 20), (4, da.MAX_FOLDED_WINDOW + 1), (4, 0)):
        keys, values, query = random_inputs(("describe-window", batch), batch=batch, hkv=2, gqa=4, tq=1, n=64, d=D,
                                            dtype=torch.float16)
        pk, pv = make_keys("kivi-2-32", keys)[1], make_values("kivi-2-32", values, "tokens")[1]
        forms.append(da.describe_launch(query, pk, pv, residual_tokens=r)["window"])
    assert forms == ["by query row", "by KV head", "own launch", None]
    with pytest.raises(ValueError, match="residual_tokens must be an int >= 0"):
        da.describe_launch(query, pk, pv, residual_tokens=-1)


def test_window_folds_up_to_the_limits(monkeypatch):
    """Windows of at most ``MAX_FOLDED_WINDOW`` tokens in calls of at most ``MAX_FOLDED_ROWS`` query
    rows go to the combine kernel; a longer window or more query rows get the window's split launch,
    unless the per-KV-head form takes the call (then any number of rows)."""
    launched = window_launches(monkeypatch)
    monkeypatch.setattr(da, "BOUND_LAUNCHES", False)  # (every window launch through ``_launch_split``, also on a GPU)
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 8)
    monkeypatch.setattr(da, "MAX_FOLDED_ROWS", 8)
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD", False)
    check("kivi-2-32", "kivi-2-32", batch=2, gqa=4, tk=16, r=8)  # 8 rows
    assert launched == []
    check("kivi-2-32", "kivi-2-32", batch=2, gqa=4, tk=16, r=9)
    assert launched == [16]
    check("kivi-2-32", "kivi-2-32", batch=3, gqa=4, tk=17, r=8)  # 12 rows
    assert launched == [16, 17]
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD", True)
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD_SM_SHARE", 1 << 20)
    check("kivi-2-32", "kivi-2-32", batch=3, gqa=4, tk=18, r=8)  # 12 rows, by KV head
    assert launched == [16, 17]
    check("kivi-2-32", "kivi-2-32", batch=3, gqa=4, tk=19, r=9)  # a window too long
    assert launched == [16, 17, 19]


class _RecordedKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the keywords, runs nothing."""

    def __init__(self, name):
        self.name, self.launches = name, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, kwargs))


def test_dependent_launch_lets_the_merge_start_after_split_kernels_only(monkeypatch):
    """Where dependent launches are available (``dependent_launch.available``: compute capability 9.0
    or later, not the interpreter; then patched on here), every split kernel is launched with
    ``LAUNCH_DEPENDENTS`` and the kernel that merges the splits as a dependent launch (``launch_pdl``) that waits for them
    (``WAIT_PRIMARY``), with the window folded into it or launched on its own; not where no split
    kernel runs right before it (a window alone; rotated values whose window partials the host
    rotates in between), nor with ``LaunchConfig(dependent_launch=False)``. With the default
    (``dependent_launch=None``) only calls of few (sequence, KV head) pairs for the SMs
    (``dependent_launch_policy``; the interpreter's 8 SMs: fewer than 4 pairs). ``describe_launch``
    reports the same. (The GPU runs of this file time nothing but run every kernel this way.)"""
    from kvpolar.kernels import dependent_launch

    assert not dependent_launch.available(torch.device("cpu"))
    monkeypatch.setattr(dependent_launch, "interpreting", lambda: False)
    for capability, expected in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(dependent_launch, "cuda_capability", lambda device, c=capability: c)
        assert dependent_launch.available(torch.device("cuda", 0)) is (expected and dependent_launch.HAS_GRID_DEPENDENCY_CONTROL)
    monkeypatch.setattr(dependent_launch, "interpreting", lambda: True)
    assert not dependent_launch.available(torch.device("cuda", 0))
    monkeypatch.setattr(da._dependent_launch, "available", lambda device: True)
    monkeypatch.setattr(da, "BOUND_LAUNCHES", False)
    recorded = []
    for name in ("_split_kernel", "_split_kernel_t", "_combine_kernel", "_window_combine_kernel",
                 "_kv_head_window_combine_kernel"):
        kernel = _RecordedKernel(name)
        kernel.launches = recorded
        monkeypatch.setattr(da, name, kernel)

    def launches(batch, tk, r, values="kivi-2-32", config=None, gqa=4):
        recorded.clear()
        k, v, q = random_inputs(("dependent", batch, tk, r), batch=batch, hkv=2, gqa=gqa, tq=1, n=tk + r, d=D,
                                dtype=torch.float16)
        pk = pv = None
        if tk:
            pk = make_keys("kivi-2-32", k[..., :tk, :])[1]
            pv = (kvpolar.quantizer("turbo", bits=4).quantize(v[..., :tk, :]) if values == "turbo-4"
                  else make_values(values, v[..., :tk, :])[1])
        rk, rv = (k[..., tk:, :], v[..., tk:, :]) if r else (None, None)
        fused_decode_attention(q, pk, pv, None, None, rk, rv, D**-0.5, None, config)
        return [("split" if name.startswith("_split") else name, kwargs.get("LAUNCH_DEPENDENTS", False),
                 kwargs.get("WAIT_PRIMARY", False), kwargs.get("launch_pdl", False)) for name, kwargs in recorded]

    split = ("split", True, False, False)
    plain_split = ("split", False, False, False)
    always = LaunchConfig(dependent_launch=True)
    assert launches(1, 64, 20) == [split, ("_window_combine_kernel", False, True, True)]  # (the policy: 2 pairs)
    assert launches(2, 64, 20) == [plain_split, ("_kv_head_window_combine_kernel", False, False, False)]  # (4 pairs)
    assert launches(2, 64, 20, config=always) == [split, ("_kv_head_window_combine_kernel", False, True, True)]
    assert launches(2, 64, 0, config=always) == [split, ("_combine_kernel", False, True, True)]
    late = LaunchConfig(dependent_launch=True, dependent_launch_signal="after-loop")  # (LAUNCH_DEPENDENTS 2)
    assert launches(2, 64, 20, config=late) == [("split", 2, False, False),
                                                ("_kv_head_window_combine_kernel", False, True, True)]
    assert launches(1, 64, 20) == [("split", 1, False, False), ("_window_combine_kernel", False, True, True)]
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 8)  # the window's own split launch, then the merge
    assert launches(2, 64, 20, config=always) == [split, split, ("_combine_kernel", False, True, True)]
    assert launches(1, 64, 20) == [split, split, ("_combine_kernel", False, True, True)]
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 512)
    assert launches(1, 0, 20) == [("_window_combine_kernel", False, False, False)]  # no split kernel before it
    assert launches(1, 64, 20, config=LaunchConfig(dependent_launch=False)) == [
        plain_split, ("_window_combine_kernel", False, False, False)]
    monkeypatch.setattr(da, "MAX_FOLDED_ROWS", 4)  # rotated values beyond the row limit: host products in between
    monkeypatch.setattr(da, "WINDOW_BY_KV_HEAD", False)
    assert launches(2, 64, 20, values="turbo-4", config=always) == [split, split, ("_combine_kernel", False, False, False)]
    pk = make_keys("kivi-2-32", torch.randn(2, 2, 64, D))[1]
    pv = make_values("kivi-2-32", torch.randn(2, 2, 64, D))[1]
    q = torch.randn(2, 8, 1, D, dtype=torch.float16)
    assert da.describe_launch(q, pk, pv, always, 20)["dependent_launch"] is True
    assert da.describe_launch(q, pk, pv, residual_tokens=20)["dependent_launch"] is False  # (the policy: 4 pairs)
    pk1 = make_keys("kivi-2-32", torch.randn(1, 2, 64, D))[1]
    pv1 = make_values("kivi-2-32", torch.randn(1, 2, 64, D))[1]
    assert da.describe_launch(q[:1], pk1, pv1, residual_tokens=20)["dependent_launch"] is True
    assert da.describe_launch(q, pk, pv, LaunchConfig(dependent_launch=False), 20)["dependent_launch"] is False
    turbo = kvpolar.quantizer("turbo", bits=4).quantize(torch.randn(2, 2, 64, D))
    assert da.describe_launch(q, pk, turbo, always, 20)["dependent_launch"] is False
    assert da.describe_launch(q, pk, turbo, always)["dependent_launch"] is True


def test_dependent_launch_policy():
    """``LaunchConfig(dependent_launch=None)`` (the default) merges the splits by a dependent launch where
    the (sequence, KV head) pairs are fewer than half the SMs: on an H100 (132 SMs) with 8 KV heads, batches
    up to 8 (measured faster there) and not from 9 (slower at 16 and 32); True and False override it."""
    assert da.dependent_launch_policy(1, 8, 132) and da.dependent_launch_policy(8, 8, 132)
    assert not da.dependent_launch_policy(9, 8, 132) and not da.dependent_launch_policy(32, 8, 132)
    for batch, expected in ((1, True), (8, True), (16, False)):
        assert da._with_dependent_launch(LaunchConfig(), batch, 8, 132).dependent_launch is expected
        assert da._with_dependent_launch(LaunchConfig(dependent_launch=True), batch, 8, 132).dependent_launch is True
        assert da._with_dependent_launch(LaunchConfig(dependent_launch=False), batch, 8, 132).dependent_launch is False
    with pytest.raises(ValueError, match=r"dependent_launch=1 \(allowed: None, True, False\)"):
        LaunchConfig(dependent_launch=1)
    with pytest.raises(ValueError, match=r"dependent_launch_signal='end' \(allowed: 'start', 'after-loop'\)"):
        LaunchConfig(dependent_launch_signal="end")


@pytest.mark.parametrize("value_kind", ["turbo-4", "polar-recursive"])
@pytest.mark.parametrize("limits", ["folded", "window-launched", "many-rows", "switched-off", "as-shipped"])
def test_rotated_values_unrotated_in_the_combine_kernel(monkeypatch, value_kind, limits):
    """Values stored in a rotated domain (turbo, polar-recursive): in calls of at most
    ``MAX_FOLDED_ROWS`` rows the combine kernel un-rotates the packed splits' merged sum itself
    (``ROTATED``), with the window folded into it or launched on its own (its splits then merged as
    stored); beyond the row limit, or for value formats not in ``ROTATE_IN_COMBINE``, the host rotates
    the window's partials into the values' domain and un-rotates the output (and the window gets its
    own launch); as shipped, both formats take the first way. The oracle's attention in every case,
    over a ragged batch with several packed splits."""
    launched = window_launches(monkeypatch)
    monkeypatch.setattr(da, "BOUND_LAUNCHES", False)  # (every window launch through ``_launch_split``, also on a GPU)
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 0 if limits == "window-launched" else 512)
    monkeypatch.setattr(da, "MAX_FOLDED_ROWS", 4 if limits == "many-rows" else 1024)
    if limits != "as-shipped":
        monkeypatch.setattr(da, "ROTATE_IN_COMBINE", frozenset() if limits == "switched-off"
                            else frozenset({"PolarRecursiveTensor", "TurboTensor"}))
    batch, hkv, gqa, tk, r = 2, 1, 4, 48, 21
    k, v, q = (x.to(DEVICE) for x in random_inputs(("rotated", value_kind, limits), batch=batch, hkv=hkv, gqa=gqa,
                                                   tq=1, n=tk + r, d=D, dtype=torch.float16))
    kq = kvpolar.quantizer("kivi", bits=2, group_size=16, axis="channel")
    vq = kvpolar.quantizer("turbo", bits=4) if value_kind == "turbo-4" else kvpolar.quantizer("polar-recursive")
    pk, pv = kq.quantize(k[..., :tk, :]), vq.quantize(v[..., :tk, :])  # (on the device: the layer's shared rotation)
    rk, rv = k[..., tk:, :], v[..., tk:, :]
    mask = torch.ones(batch, 1, 1, tk + r, dtype=torch.bool, device=DEVICE)
    mask[1, ..., 30:tk] = False  # a ragged packed part
    da.formats.rotation_matrix(pv)  # (its dense matrix computed once per layer, as a cache's first call would)
    products = []
    original_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(1) or original_matmul(a, b))
    out = fused_decode_attention(q, pk, pv, kq, vq, rk, rv, D**-0.5, mask, config=LaunchConfig(block_n=16, num_splits=3))
    host_products = len(products)
    monkeypatch.setattr(torch.Tensor, "__matmul__", original_matmul)
    want = reference_decode_attention(q.float(), pk, pv, kq, vq, rk.float(), rv.float(), D**-0.5, mask)
    torch.testing.assert_close(out.float().cpu(), want.cpu(), atol=3e-3, rtol=3e-3)
    assert out.dtype == q.dtype
    in_kernel = limits in ("folded", "window-launched", "as-shipped")
    folded = limits in ("folded", "as-shipped")
    assert launched == ([] if folded else [tk])
    assert host_products == (0 if in_kernel else 2)  # (the window's partials into the domain, the output out)


@pytest.mark.parametrize("key_group, config, kernel", [(16, None, "classic"), (64, None, "transposed"),
                                                      (64, LaunchConfig(block_n=16), "transposed"),
                                                      (32, LaunchConfig(block_n=16, transposed=False), "classic")])
def test_polar_recursive_pairs_take_32_token_blocks(monkeypatch, key_group, config, kernel):
    """A pair with polar-recursive values takes 32-token blocks, also where KIVI keys in 16-token groups
    (the transposed kernel's blocks hold one group: the classic kernel then) or a ``block_n`` of 16
    would give 16-token blocks, which compiled for the H100 gave wrong results (benchmarks/README.md,
    twenty-sixth session); the oracle's attention either way."""
    monkeypatch.setattr(da, "_device_sms", lambda device: 132)
    k, v, q = random_inputs(("pr-blocks", key_group), batch=2, hkv=1, gqa=4, tq=1, n=300, d=128, dtype=torch.float16)
    kq = kvpolar.quantizer("kivi", bits=2, group_size=key_group, axis="channel")
    vq = kvpolar.quantizer("polar-recursive")
    pk, pv = kq.quantize(k[..., :288, :]), vq.quantize(v[..., :288, :])
    launch = da.describe_launch(q, pk, pv, config)
    assert (launch["kernel"], launch["block_n"]) == (kernel, 32)
    got = fused_decode_attention(*(x.to(DEVICE) for x in (q, pk, pv)), kq, vq, k[..., 288:, :].to(DEVICE),
                                 v[..., 288:, :].to(DEVICE), 128**-0.5, config=config)
    want = reference_decode_attention(q.float(), pk, pv, kq, vq, k[..., 288:, :].float(), v[..., 288:, :].float(),
                                      128**-0.5)
    torch.testing.assert_close(got.cpu().float(), want, atol=3e-3, rtol=3e-3)


@pytest.mark.parametrize("keys_kind, group", [("kivi", 48), ("polar-rope", 16)])
def test_polar_recursive_values_refused_with_key_groups_that_cannot_fill_a_block(keys_kind, group):
    """Key groups that neither split into nor fill 32-token blocks: ``supports`` says no (the cache then
    decodes with the reference, warning once), and the kernel refuses them naming the setting."""
    k, v, q = random_inputs(("pr-refused", keys_kind), batch=1, hkv=1, gqa=4, tq=1, n=96, d=128, dtype=torch.float16)
    kq = (kvpolar.quantizer("kivi", bits=2, group_size=group, axis="channel") if keys_kind == "kivi"
          else kvpolar.quantizer("polar-rope", radius_bits=2, angle_bits=4, group_size=group))
    vq = kvpolar.quantizer("polar-recursive")
    pk, pv = kq.quantize(k), vq.quantize(v)
    assert not supports(pk, pv)
    assert supports(pk, kvpolar.quantizer("kivi", bits=2, group_size=32, axis="token").quantize(v))
    with pytest.raises(ValueError, match=f"polar-recursive values with .* keys of group_size={group}"):
        fused_decode_attention(q, pk, pv, kq, vq, None, None, 128**-0.5)


def test_many_splits_and_blocks():
    check("kivi-2-32", "kivi-2-32", gqa=4, tk=70, r=3, config=LaunchConfig(block_n=16, num_splits=3))


@pytest.mark.parametrize("key_fmt", ["kivi-2-64", "kivi-4-64", "kivi-8-64"])
def test_key_group_terms_carried_across_blocks(key_fmt):
    """16-token blocks in 64-token key groups: the group's scaled query and score bias are computed
    where a group starts and carried to its other blocks, also into splits that start mid-group
    (5 splits of 32 tokens: those at 32 and 96 start inside a group) and a short last group."""
    check(key_fmt, "kivi-2-32", batch=2, gqa=4, tk=150, r=3, lengths=[153, 70],
          config=LaunchConfig(block_n=16, num_splits=5))


@pytest.mark.parametrize("tk", [40, 64])
def test_several_key_groups_per_block(tk):
    check("kivi-2-16", "kivi-3-32", gqa=4, tq=3, tk=tk, r=2, config=LaunchConfig(block_n=64, num_splits=1))


@pytest.mark.parametrize("rb_ab", [(2, 4), (4, 4), (3, 3)])
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_polar_rope_keys(rb_ab, pairing):
    rb, ab = rb_ab
    check(f"polar-{rb}-{ab}-32-{pairing}", "kivi-2-32", gqa=4, tq=3 if rb == 2 else 1, tk=45, r=5)


@pytest.mark.parametrize("rb_ab", [(2, 4), (3, 3)])
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reading,mode", [(None, 2), ("words", 2), ("halfwords", 1)])
def test_polar_rope_3byte_units_both_readings(monkeypatch, rb_ab, pairing, dtype, reading, mode):
    """6-bit pair codes (four per 3-byte unit) read as the rows' int32 words (``WORDS`` mode 2, three
    words per four units, the units assembled in registers; the default) or by two 16-bit gathers per
    unit (``three_byte_units="halfwords"``, mode 1): the same attention as the oracle (ragged batch,
    query tokens 2, a short last split), and the reading asked for is the one taken."""
    from kvpolar.kernels import decode_attention as da

    taken = record_three_byte_readings(monkeypatch, da)
    rb, ab = rb_ab
    config = LaunchConfig() if reading is None else LaunchConfig(three_byte_units=reading)
    check(f"polar-{rb}-{ab}-32-{pairing}", "kivi-2-32", batch=2, gqa=4, tq=2, tk=83, r=3, dtype=dtype,
          lengths=[86, 40], config=config, d=TRANSPOSED_POLAR_D)
    assert list(taken.values()) == [mode]  # the keys (the values are KIVI-2, in bytes)


def test_polar_rope_words_fall_back_where_rows_are_not_whole_words():
    """Codes whose storage does not start on a 4-byte boundary keep the halfword reading."""
    from kvpolar.kernels import decode_attention as da

    words = LaunchConfig(three_byte_units="words")
    aligned = torch.zeros(5, 48, dtype=torch.uint8)
    data, mode = da._three_byte_reading(aligned, "halfwords", 3, 1, words)
    assert mode == 2 and data.dtype == torch.int32 and data.shape == (5, 12)
    shifted = torch.zeros(2 + 5 * 48, dtype=torch.uint8)[2:].view(5, 48)
    assert da._three_byte_reading(shifted, "halfwords", 3, 1, words) == ("halfwords", 1)
    with pytest.raises(ValueError, match="three_byte_units='bytes'"):
        LaunchConfig(three_byte_units="bytes")


def record_kivi_code_units(monkeypatch, module) -> dict:
    """(bits, bytes per unit) of each KIVI operand ``_kivi_code_units`` reads, by the address of its
    codes (the last asked for, as in ``record_three_byte_readings``)."""
    taken = {}
    real = module._kivi_code_units

    def reading(op, cfg):
        out = real(op, cfg)
        taken[op.data.data_ptr()] = (op.bits, out[1])
        return out

    monkeypatch.setattr(module, "_kivi_code_units", reading)
    return taken


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reading", ["bytes", "halfwords"])
@pytest.mark.parametrize("key_fmt, value_fmt", [("kivi-2-32", "kivi-2-32"), ("kivi-4-32", "kivi-4-16"),
                                                ("kivi-2-32", "kivi-4-16"), ("kivi-4-32", "kivi-2-32")])
def test_kivi_code_units_both_readings(monkeypatch, key_fmt, value_fmt, reading, dtype):
    """2- and 4-bit KIVI keys and values in the transposed kernel read from bytes or from 16-bit
    units (``kivi_code_units``; a step per code position in the halfword reading): the same attention as
    the oracle (ragged batch, two query tokens, a short last split), and the reading asked for is
    the one taken for both operands."""
    taken = record_kivi_code_units(monkeypatch, da)
    check(key_fmt, value_fmt, batch=2, gqa=4, tq=2, tk=83, r=3, dtype=dtype, lengths=[86, 40],
          config=LaunchConfig(kivi_code_units=reading), d=128)  # (2-bit codes: 16 halfwords from head dim 128)
    unit_bytes = 2 if reading == "halfwords" else 1
    assert sorted(taken.values()) == sorted([(int(key_fmt.split("-")[1]), unit_bytes),
                                             (int(value_fmt.split("-")[1]), unit_bytes)])


def run_ptx(asm: str, word: np.ndarray, smem_size: int = 49152) -> np.ndarray:
    """The result ``$0`` of the straight-line PTX ``asm`` (``mov`` / ``shr`` / ``shl`` / ``or`` / ``and``
    on 32-bit registers) with ``$1`` = ``word`` (uint32 array)."""
    regs = {"$1": word.astype(np.uint32), "%dynamic_smem_size": np.uint32(smem_size)}

    def value(x):
        return regs[x] if x in regs else np.uint32(int(x, 0))

    for ins in asm.strip("{} ").split(";"):
        parts = ins.replace(",", " ").split()
        if not parts or parts[0] == ".reg":
            continue
        op, dst, *src = parts
        a = value(src[0])
        if op == "mov.u32":
            regs[dst] = a
        elif op == "shr.u32":
            regs[dst] = a >> np.uint32(int(src[1]))
        elif op == "shl.b32":
            regs[dst] = a << np.uint32(int(src[1]))
        elif op == "or.b32":
            regs[dst] = a | value(src[1])
        elif op == "and.b32":
            regs[dst] = a & value(src[1])
        else:
            raise AssertionError(f"unexpected instruction {ins!r}")
    return regs["$0"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
def test_half_code_instructions_give_offset_plus_code_times_step(dtype, bits):
    """The compiled reading of 16-bit units (``kivi_parts.half_code_asm``: two units per 32-bit register),
    run on the host for every unit value: each half is, in ``dtype``, the offset of the byte reading
    (1024 float16, 128 bfloat16) plus code ``k`` times ``unit_code_step``, which the kernel divides out."""
    from kvpolar.kernels import kivi_parts

    tl_dtype = da.tl.float16 if dtype == torch.float16 else da.tl.bfloat16
    units = np.arange(1 << 16, dtype=np.uint32)
    words = units | (units[::-1] << 16)  # low half u, high half 65535 - u
    offset = 1024.0 if dtype == torch.float16 else 128.0
    for k in range(16 // bits):
        out = run_ptx(kivi_parts.half_code_asm(k, bits, tl_dtype), words)
        halves = torch.from_numpy(out.view(np.int16).copy()).view(dtype).float().view(-1, 2)
        step = kivi_parts.unit_code_step(k, bits, 2, tl_dtype)
        for half, u in ((halves[:, 0], units), (halves[:, 1], units[::-1].copy())):
            code = torch.from_numpy(((u >> (k * bits)) & ((1 << bits) - 1)).astype(np.float32))
            assert torch.equal(half, offset + code * step), (k, bits, dtype)


def test_kivi_halfwords_fall_back_where_rows_are_not_whole_halfwords():
    """Codes whose storage does not start on a 2-byte boundary, or whose rows hold fewer than 16 halfwords
    (too few units per code position for the tensor cores), keep the byte reading; the option is checked."""
    halfwords = LaunchConfig(kivi_code_units="halfwords")
    op = da.key_operand(kvpolar.quantizer("kivi", bits=2, group_size=32, axis="channel")
                         .quantize(torch.randn(1, 1, 32, 128)))
    data, unit_bytes, per_unit = da._kivi_code_units(op, halfwords)
    assert data.dtype == torch.int16 and (unit_bytes, per_unit) == (2, 8)
    shifted = dataclasses.replace(op, data=torch.zeros(1 + op.data.numel(), dtype=torch.uint8)[1:].view(op.data.shape))
    data, unit_bytes, per_unit = da._kivi_code_units(shifted, halfwords)
    assert data.dtype == torch.uint8 and (unit_bytes, per_unit) == (1, 4)
    for bits, head_dim, wanted in ((2, 64, 1), (4, 64, 2), (4, 32, 1)):  # 16 units per code position at least
        small = da.key_operand(kvpolar.quantizer("kivi", bits=bits, group_size=32, axis="channel")
                                .quantize(torch.randn(1, 1, 32, head_dim)))
        assert da._kivi_code_units(small, halfwords)[1] == wanted, (bits, head_dim)
    with pytest.raises(ValueError, match="kivi_code_units='words'"):
        LaunchConfig(kivi_code_units="words")


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


def test_supports_verdict_is_kept_per_packed_pair(monkeypatch):
    """A decode step asks ``supports`` once per layer about the same packed pair: the formats are
    inspected once per pair, and another pair gets its own verdict."""
    from kvpolar.kernels import decode_operands

    kq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="channel")
    vq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="token")
    x = torch.randn(1, 1, 48, D)
    keys, values = kq.quantize(x), vq.quantize(x)
    inspected = []
    real = decode_operands.key_reason
    monkeypatch.setattr(decode_operands, "key_reason", lambda p: inspected.append(p) or real(p))
    assert supports(keys, values) and supports(keys, values) and supports(keys, values)
    assert inspected == [keys]
    refused = kvpolar.quantizer("kivi", bits=2, group_size=24, axis="channel").quantize(x)
    assert not supports(refused, values) and not supports(refused, values)
    assert inspected == [keys, refused]
    assert supports(keys, values) and inspected == [keys, refused]  # still kept
    other_values = vq.quantize(x)  # the same keys with other values: asked anew
    assert supports(keys, other_values) and inspected == [keys, refused, keys]


def test_too_many_query_rows_per_kv_head_is_an_error():
    """GQA 4 x 65 query tokens = 260 rows per KV head exceed the one tile; 64 tokens (256 rows) are
    allowed (the kernel then runs, checked against the reference for KIVI and polar-rope keys)."""
    kq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="channel")
    vq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="token")
    x = torch.randn(1, 1, 32, D)
    with pytest.raises(ValueError, match=r"query rows per KV head \(GQA group 4 x 65 query tokens\) = 260; allowed: at most 256"):
        fused_decode_attention(torch.randn(1, 4, 65, D), kq.quantize(x), vq.quantize(x), kq, vq, None, None, 1.0)
    check("kivi-2-32", "kivi-2-32", gqa=4, tq=64, tk=32, r=1)
    check("polar-2-4-32-half", "kivi-2-32", gqa=4, tq=64, tk=70, r=2, dtype=torch.bfloat16)


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
    return da.Operand(fmt, torch.zeros(1, 1, rows, 128 * bits // 8 // (2 if fmt == da.FMT_POLAR else 1),
                                        dtype=torch.uint8), (), bits=bits)


def test_launch_policy():
    """Small caches take the classic kernel; batched launches get the measured programs-per-SM and
    register-cap policy (``transposed_tuning``); explicit config values win."""
    kivi = da.FMT_KIVI
    values2, values4 = _operand(kivi, 1, 2), _operand(kivi, 1, 4)
    cfg = LaunchConfig()
    small = cfg.transposed_min_rows
    assert not da._use_transposed(_operand(kivi, small - 1, 2), values2, cfg)
    assert da._use_transposed(_operand(kivi, small, 2), values2, cfg)
    assert not da._use_transposed(_operand(kivi, small, 2), values2, LaunchConfig(transposed=False))
    # a draft verification step of more query rows than one warp holds well takes the classic kernel
    assert da._use_transposed(_operand(kivi, small, 2), values2, cfg, query_rows=cfg.transposed_max_rows)
    assert not da._use_transposed(_operand(kivi, small, 2), values2, cfg, query_rows=cfg.transposed_max_rows + 1)
    with pytest.raises(ValueError, match="transposed_max_rows=0"):
        LaunchConfig(transposed_max_rows=0)
    wave = 256 * math.ceil(12 * 132 / 64)  # tokens that give 64 pairs a wave of 12 programs per SM
    cap = da._REGISTER_CAP
    assert da.transposed_tuning(_operand(kivi, wave, 4), values4, 64, cfg) == (12, None)  # 16-bit units: no cap
    in_bytes = LaunchConfig(kivi_code_units="bytes")
    assert da.transposed_tuning(_operand(kivi, wave, 4), values4, 64, in_bytes) == (12, cap)
    assert da.transposed_tuning(_operand(kivi, wave - 1, 4), values4, 64, in_bytes) == (12, None)
    assert da.transposed_tuning(_operand(kivi, 256 * 13, 4), values2, 64, in_bytes, sms=66) == (12, cap)
    assert da.transposed_tuning(_operand(kivi, wave, 2), values2, 64, cfg) == (12, cap)  # kivi-2
    assert da.transposed_tuning(_operand(kivi, wave, 2), values2, 64, cfg, query_rows=8) == (12, cap)
    assert da.transposed_tuning(_operand(kivi, wave, 2), values2, 64, cfg, query_rows=16) == (12, None)  # 4 tokens
    assert da.transposed_tuning(_operand(kivi, wave - 1, 2), values2, 64, cfg) == (12, None)
    assert da.transposed_tuning(_operand(kivi, wave, 2), values4, 64, cfg) == (12, None)  # not measured: no cap
    assert da.transposed_tuning(_operand(kivi, wave, 8), _operand(kivi, 1, 8), 64, cfg) == (12, None)
    assert da.transposed_tuning(_operand(kivi, wave, 4), _operand(kivi, 1, 8), 64, cfg) == (12, None)
    turbo = _operand(da.formats.FMT_TURBO, wave, 4)
    assert da.transposed_tuning(turbo, turbo, 64, cfg) == (12, cap)
    assert da.transposed_tuning(_operand(kivi, 256 * 198, 4), values2, 8, in_bytes) == (12, cap)  # B=1, 8 KV heads
    assert da.transposed_tuning(_operand(kivi, 256 * 197, 4), values2, 8, in_bytes) == (12, None)
    assert da.transposed_tuning(_operand(kivi, 256 * 198, 2), values2, 8, cfg) == (12, cap)
    recursive = _operand(da.formats.FMT_POLAR_RECURSIVE, wave, 8)
    assert da.transposed_tuning(recursive, recursive, 64, cfg) == (12, None)
    polar = _operand(da.FMT_POLAR, small, 6)
    assert da.transposed_tuning(polar, values2, 64, cfg) == (16, None)
    assert da.transposed_tuning(polar, values2, 8, cfg) == (12, None)
    assert da.transposed_tuning(polar, values4, 64, cfg) == (12, None)
    assert da.value_metadata_policy(turbo, values2, cfg) == "ahead"  # (stand-ins: no metadata to lay out)
    assert da.value_metadata_policy(_operand(kivi, wave, 2), values2, cfg) == "words"
    assert da.value_metadata_policy(polar, values2, cfg) == "words"
    assert da.value_metadata_policy(turbo, values2, LaunchConfig(value_metadata="gather")) == "gather"
    mine = LaunchConfig(transposed_programs_per_sm=5, max_registers=200)
    assert da.transposed_tuning(_operand(kivi, wave, 2), values2, 64, mine) == (5, 200)


@pytest.mark.parametrize("pps", [4, 8, 12, 16])
@pytest.mark.parametrize("programs", [8, 64, 256, 1024, 4096])
@pytest.mark.parametrize("tokens", [1, 70, 4096, 32768 - 96, 131072])
def test_splits_fill_one_wave_and_cover_every_token(monkeypatch, pps, programs, tokens):
    """Compiled launches: as many splits as one wave of ``pps`` programs per SM holds (never a second,
    partly filled wave, unless that wave was under ``wave_fill`` full and the waves taken instead are
    that full, with long splits), every token in exactly one split, none shorter than ``min_split_tokens``."""
    monkeypatch.setattr(da, "_interpreting", lambda: False)
    cfg, sms, block_n = LaunchConfig(programs_per_sm=pps), 132, 32
    splits, per_split = da.choose_splits(tokens, programs, sms, block_n, cfg)
    assert per_split % block_n == 0
    assert (splits - 1) * per_split < tokens <= splits * per_split
    if programs * splits > max(programs, pps * sms):  # (more than one wave: only fuller ones, of long splits)
        assert da.wave_fill_of(splits, programs, pps * sms) >= cfg.wave_fill
        assert per_split >= cfg.min_wave_split_tokens
        assert da.wave_fill_of(max(1, pps * sms // programs), programs, pps * sms) < cfg.wave_fill
    least = da.DEFAULT_MIN_SPLIT_TOKENS  # (the config leaves it to the policy: None)
    assert cfg.min_split_tokens is None and splits <= math.ceil(tokens / least)
    if programs * 2 <= pps * sms and tokens >= 2 * least * (pps * sms // programs):
        assert programs * splits > pps * sms // 2  # and the wave is more than half full


@pytest.mark.parametrize("batch, one_wave, fuller", [(72, 2, 5), (128, 1, 3), (56, 3, 7), (32, 6, 6), (8, 24, 24)])
def test_splits_take_fuller_waves_where_one_wave_is_mostly_empty(monkeypatch, batch, one_wave, fuller):
    """8 KV heads, 12 programs per SM on 132 SMs (1584 slots), 32k tokens: 72 sequences fill one wave
    of 2 splits to 73%, so 5 splits (91%, two waves); batches that fill one wave keep it; ``wave_fill=0``
    always one wave; ``min_wave_split_tokens`` keeps short caches in one."""
    monkeypatch.setattr(da, "_interpreting", lambda: False)
    programs, tokens = batch * 8, 32768 - 128
    cfg = LaunchConfig(programs_per_sm=12)
    assert da.choose_splits(tokens, programs, 132, 32, cfg)[0] == fuller
    assert da.choose_splits(tokens, programs, 132, 32, LaunchConfig(programs_per_sm=12, wave_fill=0))[0] == one_wave
    short = LaunchConfig(programs_per_sm=12, min_wave_split_tokens=tokens)  # (no split of two waves that long)
    assert da.choose_splits(tokens, programs, 132, 32, short)[0] == one_wave
    assert da.wave_fill_of(2, 576, 1584) == pytest.approx(1152 / 1584)
    assert da.wave_fill_of(5, 576, 1584) == pytest.approx(2880 / 3168)
    with pytest.raises(ValueError, match="wave_fill=1.5 \\(allowed: 0 to 1\\)"):
        LaunchConfig(wave_fill=1.5)


def test_polar_recursive_caches_split_down_to_one_block(monkeypatch):
    """The split policy's least split (``min_split_tokens_of``): one block where a polar-recursive tensor
    is read (keys or values), 256 tokens otherwise, the config's value where it gives one; a small
    polar-recursive cache at batch 1 is then cut into one-block splits as far as one wave holds."""
    recursive_fmt, kivi_fmt = da.formats.FMT_POLAR_RECURSIVE, da.FMT_KIVI
    policy = LaunchConfig()
    assert da.min_split_tokens_of(policy, recursive_fmt, kivi_fmt) == 1
    assert da.min_split_tokens_of(policy, kivi_fmt, recursive_fmt) == 1
    assert da.min_split_tokens_of(policy, kivi_fmt, kivi_fmt) == da.DEFAULT_MIN_SPLIT_TOKENS == 256
    assert da.min_split_tokens_of(LaunchConfig(min_split_tokens=96), recursive_fmt, kivi_fmt) == 96
    with pytest.raises(ValueError, match="min_split_tokens=0 \\(allowed: None or >= 1\\)"):
        LaunchConfig(min_split_tokens=0)
    monkeypatch.setattr(da, "_interpreting", lambda: False)
    monkeypatch.setattr(da, "_device_sms", lambda device: 132)
    x = torch.randn(1, 8, 4000, 128)
    q = torch.randn(1, 32, 1, 128, dtype=torch.float16)
    recursive = kvpolar.quantizer("polar-recursive")
    pk, pv = recursive.quantize(x), recursive.quantize(x)
    launch = da.describe_launch(q, pk, pv)  # 125 blocks of 32 tokens per KV head; 12 x 132 slots for 8 programs
    assert (launch["splits"], launch["tokens_per_split"]) == (125, 32)
    fixed = da.describe_launch(q, pk, pv, LaunchConfig(min_split_tokens=256))
    assert (fixed["splits"], fixed["tokens_per_split"]) == (16, 256)
    kivi = kvpolar.quantizer("kivi", bits=2, axis="token", group_size=32).quantize(x)
    with_kivi_values = da.describe_launch(q, pk, kivi)
    assert with_kivi_values["splits"] == 125


def test_small_launches_take_shorter_splits(monkeypatch):
    """``least_split_tokens``: 128-token splits where 256-token ones would launch fewer than two programs
    per SM (batch 1 to 8k tokens, batch 2 at 4k on 132 SMs), the formats' least elsewhere, the config's
    value always; the launch plan takes it (31 splits of a 4k KIVI cache at batch 1, not 16)."""
    kivi_fmt, recursive_fmt = da.FMT_KIVI, da.formats.FMT_POLAR_RECURSIVE
    policy = LaunchConfig()
    for tokens, programs, least in ((3968, 8, 128), (8192, 8, 128), (3968, 16, 128), (8193, 8, 256),
                                    (16256, 8, 256), (8064, 16, 256), (3968, 32, 256), (100, 264, 256)):
        assert da.least_split_tokens(policy, kivi_fmt, kivi_fmt, tokens, programs, 132) == least, (tokens, programs)
    assert da.least_split_tokens(policy, recursive_fmt, kivi_fmt, 3968, 8, 132) == 1
    assert da.least_split_tokens(LaunchConfig(min_split_tokens=256), kivi_fmt, kivi_fmt, 3968, 8, 132) == 256
    monkeypatch.setattr(da, "_interpreting", lambda: False)
    monkeypatch.setattr(da, "_device_sms", lambda device: 132)
    x = torch.randn(1, 8, 3968, 128)
    q = torch.randn(1, 32, 1, 128, dtype=torch.float16)
    pk = kvpolar.quantizer("kivi", bits=2, axis="channel", group_size=32).quantize(x)
    pv = kvpolar.quantizer("kivi", bits=2, axis="token", group_size=32).quantize(x)
    launch = da.describe_launch(q, pk, pv)
    assert launch["splits"] == 31 and launch["tokens_per_split"] == 128
    assert da.describe_launch(q, pk, pv, LaunchConfig(min_split_tokens=256))["splits"] == 16


def test_splits_under_the_interpreter_are_powers_of_two_blocks(monkeypatch):
    monkeypatch.setattr(da, "_interpreting", lambda: True)  # (also where the suite runs on a GPU)
    for tokens in (70, 1000, 5000):
        splits, per_split = da.choose_splits(tokens, 4, 8, 16, LaunchConfig(min_split_tokens=16))
        assert per_split // 16 & (per_split // 16 - 1) == 0 and (splits - 1) * per_split < tokens <= splits * per_split


def test_programs_per_sm_from_registers_and_shared_memory():
    """H100 figures: 128 registers -> 16 one-warp programs (kivi-2 with its cap), 168 -> 12 (turbo-3 in
    Nsight Compute), 192 to 255 -> 8 (a warp's registers come 256 at a time from one of the SM's four
    partitions; the split sweep's waves); shared memory and threads bound it too."""
    assert da.programs_per_sm_of(128, 6656, 1) == 16
    assert da.programs_per_sm_of(168, 3072, 1) == 12
    assert da.programs_per_sm_of(226, 12800, 1) == 8
    assert da.programs_per_sm_of(215, 6656, 1) == 8  # 2 warps per partition (65536 // 6912 would say 9)
    assert da.programs_per_sm_of(192, 6656, 1) == 8
    assert da.programs_per_sm_of(255, 3072, 1) == 8
    assert da.programs_per_sm_of(128, 100 * 1024, 1) == 2
    assert da.programs_per_sm_of(32, 0, 1) == 32
    assert da.programs_per_sm_of(64, 0, 4) == 8
    assert da.programs_per_sm_of(40, 0, 16) == 3  # 1280 registers per warp: 65536 // 20480


def test_describe_launch_caps_programs_per_sm_at_what_fits(monkeypatch):
    """``describe_launch`` reports the launch ``fused_decode_attention`` makes; the one-wave target is
    the measured policy (12 here) capped by the programs the compiled kernel fits on an SM."""
    x = torch.randn(2, 2, 300, 128)
    keys = kvpolar.quantizer("kivi", bits=2, axis="channel", group_size=32).quantize(x)
    values = kvpolar.quantizer("kivi", bits=2, axis="token", group_size=32).quantize(x)
    q = torch.randn(2, 8, 1, 128, dtype=torch.float16)
    classic = da.describe_launch(q, keys, values)
    assert classic["kernel"] == "classic" and classic["block_n"] == 64  # (two key groups per block)
    cfg = LaunchConfig(transposed_min_rows=0, min_split_tokens=32)
    plain = da.describe_launch(q, keys, values, cfg)
    assert plain["kernel"] == "transposed" and plain["programs_per_sm"] == 12
    assert plain["kivi_code_units"] == "halfwords" and classic["kivi_code_units"] is None
    in_bytes = dataclasses.replace(cfg, kivi_code_units="bytes")
    assert da.describe_launch(q, keys, values, in_bytes)["kivi_code_units"] == "bytes"
    monkeypatch.setattr(da, "_transposed_residency", lambda *a, **k: 5)
    capped = da.describe_launch(q, keys, values, cfg)
    assert capped["programs_per_sm"] == 5
    for launch in (classic, plain, capped):
        assert launch["programs"] == 4 * launch["splits"]
        assert (launch["splits"] - 1) * launch["tokens_per_split"] < 300 <= launch["splits"] * launch["tokens_per_split"]
    monkeypatch.setattr(da, "_interpreting", lambda: False)  # compiled: no power-of-two rounding
    assert da.describe_launch(q, keys, values, cfg)["splits"] == min(5 * 8 // 4, 300 // 32 + 1)
    with pytest.raises(ValueError, match="Hq a multiple"):
        da.describe_launch(torch.randn(2, 3, 1, 128), keys, values)
    with pytest.raises(ValueError, match="packed keys and values"):
        da.describe_launch(q, None, values)


def test_residency_key_follows_triton_specialization():
    """The residency of a compiled transposed kernel is looked up by what Triton compiles on: equal
    for two caches of one shape, different when a stride or token count changes its divisibility
    by 16 (those compile to other register counts)."""
    kivi_k = kvpolar.quantizer("kivi", bits=2, axis="channel", group_size=32)
    kivi_v = kvpolar.quantizer("kivi", bits=2, axis="token", group_size=32)
    q = torch.randn(2, 8, 1, 128, dtype=torch.float16)
    scratch = torch.empty(1)

    def key(tokens):
        x = torch.randn(2, 2, tokens, 128, dtype=torch.float16)
        k_op, v_op = da.key_operand(kivi_k.quantize(x)), da.value_operand(kivi_v.quantize(x))
        cfg = da._with_dependent_launch(LaunchConfig(), 2, 2, da._device_sms(q.device))  # (decided, as launched)
        args, kwargs = da._split_t_arguments(q, k_op, v_op, None, 0, 2, 0, 2, scratch, scratch, scratch, 0.1, 4,
                                             32, cfg)
        return da._resident_key(args, kwargs, q.device)

    assert key(2048) == key(2048)
    assert key(2048) != key(2001)


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
    with pytest.raises(ValueError, match="kivi_key_bias='middle'.*'first', 'last'"):
        LaunchConfig(kivi_key_bias="middle")
    with pytest.raises(ValueError, match="kivi_value_min='fused'.*'elementwise', 'product'"):
        LaunchConfig(kivi_value_min="fused")


def test_launch_plan_is_remembered_per_packed_inputs(monkeypatch):
    """A decode step reuses its layer's launch plan while the packed keys / values objects, the
    query's shape and specialization and the config stay; new packed values, a mask or another
    config make a new plan; every result matches the reference."""

    made = []
    original = da._packed_plan
    monkeypatch.setattr(da, "_packed_plan", lambda *a: made.append(1) or original(*a))
    k, v, q = (x.to(DEVICE) for x in random_inputs(("plan",), batch=2, hkv=1, gqa=4, tq=1, n=40, d=D,
                                                   dtype=torch.float16))
    kq, pk = make_keys("kivi-2-32", k)
    vq, pv = make_values("kivi-2-32", v)
    _, pv2 = make_values("kivi-2-32", v * 2)
    mask = left_padding_mask([40, 25], 1, 40).to(DEVICE)
    cfg = small_caches_transposed(None)
    calls = [(q, pv, None, cfg, 1), (q.clone(), pv, None, cfg, 1), (q, pv2, None, cfg, 2), (q, pv2, mask, cfg, 3),
             (q, pv2, mask, dataclasses.replace(cfg, block_n=16), 4), (q, pv2, mask, cfg, 5)]
    for query, values, m, config, plans in calls:
        out = fused_decode_attention(query, pk, values, kq, vq, None, None, D**-0.5, m, config)
        want = reference_decode_attention(query, pk, values, kq, vq, None, None, D**-0.5, m)
        assert len(made) == plans
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=0)


def test_partial_buffers_start_aligned(monkeypatch):
    """The per-split partial output, max and sum share one allocation; each view starts 256 bytes
    after the last (as separate allocations would), also for a row count that is not a multiple of
    4 (query heads 3), so Triton specializes the kernels alike for every shape."""
    seen = {}
    original = da._launch_split

    def record(query, k_op, v_op, mask, offset, splits, per_split, base, total_splits, part_max, part_sum,
               part_acc, *rest):
        seen.update(max=part_max, sum=part_sum, acc=part_acc, total_splits=total_splits)
        return original(query, k_op, v_op, mask, offset, splits, per_split, base, total_splits, part_max,
                        part_sum, part_acc, *rest)

    monkeypatch.setattr(da, "_launch_split", record)
    monkeypatch.setattr(da, "MAX_FOLDED_WINDOW", 0)  # the window through the split kernel
    k, v, q = (x.to(DEVICE) for x in random_inputs(("aligned",), batch=1, hkv=1, gqa=3, tq=1, n=9, d=D,
                                                   dtype=torch.float16))
    fused_decode_attention(q, None, None, None, None, k, v, D**-0.5)
    rows = q.shape[0] * q.shape[1] * q.shape[2] * seen["total_splits"]  # partial rows: 3 x splits
    base = seen["acc"].data_ptr()
    assert rows % 4 and all((seen[n].data_ptr() - base) % 256 == 0 for n in ("max", "sum"))
    assert seen["acc"].numel() >= rows * D and seen["max"].numel() >= rows and seen["sum"].numel() >= rows
    assert seen["max"].data_ptr() >= base + rows * D * 4
    assert seen["sum"].data_ptr() >= seen["max"].data_ptr() + rows * 4


@pytest.mark.parametrize("seed", range(32))
def test_random_shapes_and_launches(seed):
    """Shapes and launches drawn at random (key and value formats, batch, KV heads, GQA ratio, query
    tokens, cache and window lengths, ragged lengths, kernel form, block, splits), against the oracle; on
    the CPU every load and store is also checked against the kernel's tensors (``interpreter_bounds``, as
    for every interpreted test). Fixed seeds: a failure reproduces."""
    rng = np.random.default_rng(seed)
    key_fmt = str(rng.choice(KIVI_KEYS + ["polar-2-4-32-half", "polar-2-4-16-half", "none"]))
    value_fmt = str(rng.choice(["kivi-2-32", "kivi-4-16", "kivi-3-32", "kivi-8-32", "none"]))
    shape = random_shape(rng, max_tokens=150)
    check(key_fmt, value_fmt, **shape, **random_launch(rng, num_splits=[None, 1, 2, 3, 5]), d=64)
