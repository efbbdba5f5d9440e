import pytest
import torch

import kvpolar
from kvpolar.quantizers.fp8 import FP8_FORMATS, Fp8Tensor, fp8_max

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
#: Mantissa bits and smallest normal exponent of each format (for the round-trip bound).
MANTISSA = {"e4m3": 3, "e5m2": 2}
MIN_NORMAL_EXP = {"e4m3": -6, "e5m2": -14}


def _torch_reference(x: torch.Tensor, fmt: str, per_head: bool) -> torch.Tensor:
    """Scale by amax / format max, let torch cast to float8, scale back: float32."""
    xf = x.float()
    amax = xf.abs().amax(dim=(-2, -1), keepdim=True) if per_head else xf.abs().amax()
    s = torch.where(amax > 0, amax / torch.finfo(FP8_FORMATS[fmt]).max, torch.ones_like(amax))
    return (xf / s).to(FP8_FORMATS[fmt]).float() * s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale", ["tensor", "head"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (5, 1, 32), (9, 16)])
def test_round_trip_equals_torch_cast_and_is_bounded(dtype, fmt, scale, shape):
    x = (torch.randn(*shape) * torch.logspace(-2, 2, shape[-1])).to(dtype)
    q = kvpolar.quantizer("fp8", format=fmt, scale=scale)
    p = q.quantize(x)
    y = q.dequantize(p)
    assert y.shape == x.shape and y.dtype == dtype and p.codes.dtype == FP8_FORMATS[fmt]
    ref = _torch_reference(x, fmt, scale == "head")
    assert torch.equal(y, ref.to(dtype))
    # Relative rounding error 2^-(m+1) for normals, an absolute half-subnormal step below them,
    # plus the final rounding to the working dtype.
    s = p.token_scales().unsqueeze(-1)
    m = MANTISSA[fmt]
    bound = (
        x.float().abs() * 2.0 ** -(m + 1)
        + s * 2.0 ** (MIN_NORMAL_EXP[fmt] - m - 1)
        + y.float().abs() * torch.finfo(dtype).eps
    )
    assert torch.all((y.float() - x.float()).abs() <= bound * (1 + 1e-6))


def test_per_head_scale_is_per_slice():
    x = torch.randn(2, 3, 10, 8)
    x[1, 2] *= 1e5
    p = kvpolar.quantizer("fp8", scale="head").quantize(x)
    assert p.scale.shape == (2, 3, 1)
    assert torch.allclose(p.scale[..., 0], x.abs().amax(dim=(-2, -1)) / 448)
    pt = kvpolar.quantizer("fp8", scale="tensor").quantize(x)
    assert pt.scale.shape == (1, 1, 1) and torch.isclose(pt.scale.flatten()[0], x.abs().max() / 448)
    # Per-head scales keep the small heads precise next to a huge one.
    err_h = (kvpolar.quantizer("fp8", scale="head").dequantize(p) - x)[0].abs().max()
    err_t = (kvpolar.quantizer("fp8", scale="tensor").dequantize(pt) - x)[0].abs().max()
    assert err_h < 0.5 * err_t  # one scale for all pushes the small heads into subnormals


def test_zero_tensor_round_trips():
    q = kvpolar.quantizer("fp8")
    x = torch.zeros(1, 2, 5, 16, dtype=torch.float16)
    p = q.quantize(x)
    assert torch.equal(q.dequantize(p), x) and torch.all(p.scale == 1)


@pytest.mark.parametrize("scale,n_scales", [("tensor", 1), ("head", 2 * 8)])
def test_bits_per_element(scale, n_scales):
    x = torch.randn(2, 8, 100, 128, dtype=torch.bfloat16)
    p = kvpolar.quantizer("fp8", scale=scale).quantize(x)
    assert p.bits_per_element == 8 + 32 * (n_scales + 1) / x.numel()
    assert p.nbytes == x.numel() + 4 * n_scales + 4
    grown = kvpolar.cat([p, kvpolar.quantizer("fp8", scale=scale).quantize(x[..., :7, :])])
    assert grown.bits_per_element == 8 + 32 * (2 * n_scales + 2) / (2 * 8 * 107 * 128)


@pytest.mark.parametrize("scale", ["tensor", "head"])
def test_cat_keeps_each_chunk_scale(scale):
    q = kvpolar.quantizer("fp8", format="e4m3", scale=scale)
    parts_x = [torch.randn(2, 2, n, 32) * mag for n, mag in ((5, 1.0), (1, 300.0), (12, 1e-4))]
    parts = [q.quantize(x) for x in parts_x]
    whole = kvpolar.cat(parts)
    assert whole.shape == (2, 2, 18, 32) and whole.scale.shape[-1] == 3
    assert whole.chunk_tokens.tolist() == [5, 1, 12]
    expected = torch.cat([q.dequantize(p) for p in parts], dim=-2)
    assert torch.equal(q.dequantize(whole), expected)
    # Each chunk kept its own precision: the tiny third chunk is not flattened by the huge second.
    x = torch.cat(parts_x, dim=-2)
    tail_err = (q.dequantize(whole) - x)[..., 6:, :].abs().max()
    assert tail_err <= 2**-4 * x[..., 6:, :].abs().max()  # one scale for all would flush it to 0
    queries = torch.randn(2, 4, 3, 32)  # GQA 2
    dense = expected.double().repeat_interleave(2, dim=1)
    ref = queries.double() @ dense.transpose(-1, -2)
    assert (q.scores(queries, whole).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scores_and_weighted_sum_equal_dequantized_product(fmt, gqa, dtype):
    q = kvpolar.quantizer("fp8", format=fmt, scale="head")
    kv = torch.randn(2, 2, 37, 64).to(dtype)
    p = q.quantize(kv)
    dense = q.dequantize(p).double().repeat_interleave(gqa, dim=1)
    queries = torch.randn(2, 2 * gqa, 3, 64).to(dtype)
    s = q.scores(queries, p)
    ref = queries.double() @ dense.transpose(-1, -2)
    assert s.shape == (2, 2 * gqa, 3, 37) and s.dtype == torch.float32
    # The fast path skips the dequantized tensor's rounding to `dtype`: allow that rounding.
    tol = 4 * torch.finfo(dtype).eps * (queries.double().abs() @ dense.abs().transpose(-1, -2)).max()
    assert (s.double() - ref).abs().max() <= tol
    w = torch.softmax(torch.randn(2, 2 * gqa, 3, 37), dim=-1)
    out = q.weighted_sum(w, p)
    ref_w = w.double() @ dense
    assert out.shape == (2, 2 * gqa, 3, 64)
    assert (out.double() - ref_w).abs().max() <= 4 * torch.finfo(dtype).eps * dense.abs().max()


def test_fp8_in_reference_decode_attention():
    from kvpolar.decode_attention import reference_decode_attention

    q8 = kvpolar.quantizer("fp8")
    k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    query = torch.randn(1, 8, 1, 64)
    out = reference_decode_attention(query, q8.quantize(k), q8.quantize(v), q8, q8, None, None, 64**-0.5)
    kd, vd = (q8.dequantize(q8.quantize(t)).repeat_interleave(4, 1) for t in (k, v))
    ref = torch.softmax(query @ kd.transpose(-1, -2) * 64**-0.5, -1) @ vd
    assert torch.allclose(out, ref, atol=1e-5)


def test_format_max():
    assert fp8_max("e4m3") == 448.0 and fp8_max("e5m2") == 57344.0


@pytest.mark.parametrize(
    "params,match",
    [({"format": "e4m3fn"}, "format='e4m3fn'"), ({"format": "E4M3"}, "format='E4M3'"),
     ({"scale": "channel"}, "scale='channel'"), ({"scale": None}, "scale=None")],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match) as info:
        kvpolar.quantizer("fp8", **params)
    assert "allowed" in str(info.value)


def test_mismatched_stored_tensor_and_cat():
    x = torch.randn(1, 2, 8, 16)
    a = kvpolar.quantizer("fp8", format="e4m3").quantize(x)
    b = kvpolar.quantizer("fp8", format="e5m2").quantize(x)
    with pytest.raises(ValueError, match="format='e4m3'"):
        kvpolar.quantizer("fp8", format="e5m2").dequantize(a)
    with pytest.raises(ValueError, match="different parameters"):
        kvpolar.cat([a, b])
    with pytest.raises(TypeError, match="Fp8Tensor"):
        kvpolar.quantizer("fp8").dequantize(kvpolar.quantizer("kivi").quantize(x))
    assert isinstance(a, Fp8Tensor) and "fp8" in kvpolar.available_quantizers()
