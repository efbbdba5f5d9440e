import pytest
import torch

import kvpolar
from kvpolar.decode_attention import reference_decode_attention


def _dense_attention(q, k, v, scale, mask):
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, 1)
    v = v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("tq", [1, 3])
def test_none_quantizer_equals_dense_attention(gqa, tq):
    b, hkv, tk, r, d = 2, 2, 37, 5, 64
    k, v = torch.randn(b, hkv, tk + r, d), torch.randn(b, hkv, tk + r, d)
    q = torch.randn(b, hkv * gqa, tq, d)
    none = kvpolar.quantizer("none")
    mask = torch.ones(b, 1, tq, tk + r, dtype=torch.bool)
    mask[1, ..., :7] = False  # left padding of sequence 1
    out = reference_decode_attention(
        q, none.quantize(k[..., :tk, :]), none.quantize(v[..., :tk, :]), none, none,
        k[..., tk:, :], v[..., tk:, :], d**-0.5, mask,
    )
    ref = _dense_attention(q, k, v, d**-0.5, mask)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_kivi_equals_attention_over_dequantized_cache():
    b, hkv, tk, d = 1, 2, 64, 64
    k, v = torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    kq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="channel")
    vq = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="token")
    pk, pv = kq.quantize(k), vq.quantize(v)
    q = torch.randn(b, 8, 1, d)
    out = reference_decode_attention(q, pk, pv, kq, vq, None, None, d**-0.5)
    ref = _dense_attention(q, kq.dequantize(pk), vq.dequantize(pv), d**-0.5, None)
    assert torch.allclose(out.double(), ref, atol=1e-4)


def test_fully_masked_row_gives_zeros_and_no_nan():
    none = kvpolar.quantizer("none")
    k = torch.randn(1, 1, 4, 8)
    mask = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    out = reference_decode_attention(torch.randn(1, 1, 1, 8), none.quantize(k), none.quantize(k), none, none, None, None, 1.0, mask)
    assert torch.equal(out, torch.zeros_like(out))
