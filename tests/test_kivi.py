import dataclasses
import math

import pytest
import torch

import kvpolar

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def reference_channel(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Plain loop reference of KIVI per-channel quantization (statistics rounded to x.dtype)."""
    out = torch.empty_like(x, dtype=torch.float32)
    levels = 2**bits - 1
    for start in range(0, x.shape[-2], group):
        block = x[..., start : start + group, :].float()
        lo = block.amin(-2, keepdim=True).to(x.dtype).float()
        scale = ((block.amax(-2, keepdim=True) - lo) / levels).to(x.dtype).float()
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        codes = torch.round((block - lo) * inv).clamp(0, levels)
        out[..., start : start + group, :] = codes * scale + lo
    return out.to(x.dtype)


def reference_token(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    t = x.transpose(-1, -2)
    return reference_channel(t, bits, group).transpose(-1, -2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens", [1, 31, 64, 77])
def test_channel_matches_reference(dtype, bits, tokens):
    x = torch.randn(2, 3, tokens, 64).to(dtype)
    q = kvpolar.quantizer("kivi", bits=bits, group_size=32, axis="channel")
    p = q.quantize(x)
    y = q.dequantize(p)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    ref = reference_channel(x, bits, 32)
    assert torch.allclose(y.float(), ref.float(), atol=0, rtol=0) or (y.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_token_matches_reference(dtype, bits, group):
    x = torch.randn(2, 37, 64).to(dtype)
    q = kvpolar.quantizer("kivi", bits=bits, group_size=group, axis="token")
    y = q.dequantize(q.quantize(x))
    ref = reference_token(x, bits, group)
    assert (y.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2**-8


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_error_shrinks_with_bits_and_is_bounded_by_half_step(bits):
    x = torch.randn(4, 128, 64)
    q = kvpolar.quantizer("kivi", bits=bits, group_size=32)
    p = q.quantize(x)
    err = (q.dequantize(p) - x).abs()
    step = p.scale.repeat_interleave(32, dim=-2)
    assert torch.all(err <= step / 2 + 1e-5)


@pytest.mark.parametrize("bits,group", [(2, 32), (2, 128), (3, 32), (4, 64), (8, 128)])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_exact_bits_per_element(bits, group, axis):
    x = torch.randn(2, 4, 256, 128, dtype=torch.float16)
    p = kvpolar.quantizer("kivi", bits=bits, group_size=group, axis=axis).quantize(x)
    assert p.bits_per_element == bits + 32 / group
    assert p.nbytes == x.numel() * (bits + 32 / group) / 8


def test_partial_group_bits_are_counted():
    x = torch.randn(1, 40, 64, dtype=torch.float16)  # one full group of 32 + a partial group of 8
    p = kvpolar.quantizer("kivi", bits=2, group_size=32).quantize(x)
    expected_bytes = 40 * 64 * 2 / 8 + 2 * 64 * 2 * 2
    assert p.nbytes == expected_bytes
    assert p.bits_per_element == expected_bytes * 8 / x.numel()


def test_a_scale_on_a_float16_tie_rounds_to_even():
    """The scale is the float32 quotient ``(hi - min) / levels`` rounded once (``uniform.minmax_scale``),
    whatever the device: here it is exactly 1976.5 float16 units and rounds to even; a product with the
    reciprocal ``1/15`` (what PyTorch on CUDA computes for a division by a Python number) lands just
    above the tie and rounds up, one unit off."""
    from kvpolar.quantizers import uniform

    lo = torch.tensor([-0.91796875], dtype=torch.float16)
    hi = torch.tensor([-0.0131988525390625], dtype=torch.float16)
    scale, minimum = uniform.minmax_scale(lo.float(), hi.float(), 4, torch.float16)
    assert minimum.item() == -0.91796875 and scale.item() == 0.060302734375  # 1976 units: the even neighbour
    assert ((hi.float() - lo.float()) * (1 / 15)).half().item() == 0.060333251953125  # the reciprocal's 1977
    x = torch.cat([lo, hi, torch.zeros(30, dtype=torch.float16) - 0.5]).reshape(1, 1, 32, 1)
    p = kvpolar.quantizer("kivi", bits=4, group_size=32, axis="channel").quantize(x)
    assert p.scale.item() == 0.060302734375


def test_fp32_metadata_is_fp32():
    p = kvpolar.quantizer("kivi", bits=2, group_size=32).quantize(torch.randn(1, 64, 64))
    assert p.scale.dtype == torch.float32 and p.bits_per_element == 2 + 64 / 32


@pytest.mark.parametrize("tokens", [1, 45, 96])
@pytest.mark.parametrize("gqa", [1, 4])
def test_scores_fast_path_equals_dequantized_product(tokens, gqa):
    keys = torch.randn(2, 2, tokens, 64, dtype=torch.float16)
    q = kvpolar.quantizer("kivi", bits=2, group_size=32)
    p = q.quantize(keys)
    queries = torch.randn(2, 2 * gqa, 3, 64, dtype=torch.float16)
    s = q.scores(queries, p)
    dq = q.dequantize(p).double().repeat_interleave(gqa, dim=1)
    ref = queries.double() @ dq.transpose(-1, -2)
    assert s.shape == (2, 2 * gqa, 3, tokens) and s.dtype == torch.float32
    assert (s.double() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("gqa", [1, 8])
def test_weighted_sum_fast_path_equals_dequantized_product(gqa):
    values = torch.randn(2, 2, 50, 64, dtype=torch.bfloat16)
    q = kvpolar.quantizer("kivi", bits=4, group_size=32, axis="token")
    p = q.quantize(values)
    w = torch.softmax(torch.randn(2, 2 * gqa, 2, 50), dim=-1)
    out = q.weighted_sum(w, p)
    ref = w.double() @ q.dequantize(p).double().repeat_interleave(gqa, dim=1)
    assert out.shape == (2, 2 * gqa, 2, 64)
    assert (out.double() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_cat_along_tokens_equals_quantizing_groups_separately():
    x = torch.randn(2, 3, 100, 64, dtype=torch.float16)
    q = kvpolar.quantizer("kivi", bits=2, group_size=32)
    whole = q.quantize(x)
    parts = kvpolar.cat([q.quantize(x[..., :64, :]), q.quantize(x[..., 64:96, :]), q.quantize(x[..., 96:, :])])
    assert parts.shape == x.shape
    assert torch.equal(q.dequantize(parts), q.dequantize(whole))
    assert parts.nbytes == whole.nbytes


def test_cat_after_partial_group_is_refused():
    q = kvpolar.quantizer("kivi", bits=2, group_size=32)
    a, b = q.quantize(torch.randn(1, 40, 64)), q.quantize(torch.randn(1, 32, 64))
    with pytest.raises(ValueError, match="partial group"):
        a.cat(b)


def test_cat_refuses_mismatched_parameters():
    x = torch.randn(1, 32, 64)
    with pytest.raises(ValueError, match="different parameters"):
        kvpolar.cat([kvpolar.quantizer("kivi", bits=2).quantize(x), kvpolar.quantizer("kivi", bits=4).quantize(x)])


def test_to_moves_every_tensor():
    p = kvpolar.quantizer("kivi").quantize(torch.randn(1, 32, 64))
    moved = p.to("cpu")
    assert moved.device == torch.device("cpu") and moved.shape == p.shape
    assert math.isclose(moved.bits_per_element, p.bits_per_element)


def test_value_metadata_keeps_tokens_adjacent_through_cat():
    """Per-token value scale / minimum keep their ``[..., T, G]`` shape but are laid out with
    consecutive tokens adjacent (stride 1 along T) by the quantizer and by ``cat`` (also of parts
    built with the groups adjacent); the values read back are the same."""
    x = torch.randn(2, 3, 70, 64, dtype=torch.float16)
    q = kvpolar.quantizer("kivi", bits=2, group_size=16, axis="token")
    first, second = q.quantize(x[..., :40, :]), q.quantize(x[..., 40:, :])
    assert first.scale.shape == (2, 3, 40, 4) and first.scale.stride(-2) == 1 and first.minimum.stride(-2) == 1
    rows = dataclasses.replace(second, scale=second.scale.contiguous(), minimum=second.minimum.contiguous())
    assert rows.scale.stride(-2) != 1
    grown = kvpolar.cat([first, rows])
    assert grown.scale.stride(-2) == 1 and grown.minimum.stride(-2) == 1 and grown.scale.is_contiguous() is False
    assert torch.equal(q.dequantize(grown), q.dequantize(q.quantize(x)))
    assert torch.equal(q.dequantize(grown), torch.cat([q.dequantize(first), q.dequantize(second)], dim=-2))
    assert grown.nbytes == q.quantize(x).nbytes == 2 * 3 * 70 * (64 * 2 // 8 + 2 * 4 * 2)


def test_tokens_contiguous_field_declaration():
    """``stored(tokens_contiguous=True)`` is for ``[..., T, G]`` fields only; the layout helper keeps
    shape and values."""
    from kvpolar.quantized import stored, tokens_contiguous

    with pytest.raises(ValueError, match="tokens_contiguous needs token_axis=-2"):
        stored(token_axis=None, tokens_contiguous=True)
    t = torch.randn(2, 5, 3)
    laid = tokens_contiguous(t)
    assert laid.shape == t.shape and torch.equal(laid, t) and laid.stride() == (15, 1, 5)
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        tokens_contiguous(torch.randn(4))
