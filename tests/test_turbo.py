import math

import pytest
import torch

import kvpolar
from kvpolar.quantizers import codebooks as cb
from kvpolar.quantizers import turbo
from kvpolar.packing import unpack_bits
from kvpolar.quantizers.rotations import Rotation

# TurboQuant (arXiv 2504.19874), Theorem 1: unit-vector MSE of the per-coordinate Lloyd-Max codebook
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def make(**params):
    return kvpolar.quantizer("turbo", **params)


def unit_mse(x, xh):
    x, xh = x.double(), xh.double()
    return float(((xh - x).norm(dim=-1) ** 2 / x.norm(dim=-1) ** 2).mean())


@pytest.mark.parametrize("d,bits", [(64, 2), (128, 1), (128, 3)])
def test_codebook_matches_kmeans_on_random_unit_vectors(d, bits):
    """Independent numerical Lloyd-Max: k-means on coordinates of Monte-Carlo random unit vectors."""
    g = torch.Generator().manual_seed(d + bits)
    v = torch.randn(600_000 // d, d, generator=g, dtype=torch.float64)
    coords = (v / v.norm(dim=-1, keepdim=True)).flatten().float()
    init = torch.quantile(coords[:100_000], (torch.arange(2**bits) + 0.5) / 2**bits)
    mc = cb.kmeans_1d(coords[None], init, iterations=60)[0].double()
    book = turbo.sphere_codebook(d, bits).double()
    # Monte-Carlo error of a cell mean is about sigma_cell / sqrt(n_cell); allow a few of those
    assert torch.allclose(book, mc, rtol=0, atol=6 / math.sqrt(d) / math.sqrt(coords.numel() / 2**bits))
    assert torch.allclose(book, -book.flip(0), atol=1e-9)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_round_trip_error_near_turboquant_anchors(bits):
    x = torch.randn(8, 256, 128)
    plain = make(bits=bits, norm_correction=False)
    mse = unit_mse(x, plain.dequantize(plain.quantize(x)))
    # the paper's anchors are rounded to 1-2 digits; the exact Lloyd-Max value is cb's mse * D
    assert mse == pytest.approx(PAPER_MSE[bits], rel=0.15)
    assert mse == pytest.approx(cb.lloyd_max(cb.sphere_coordinate_density(128), bits).mse * 128, rel=0.05)
    corrected = make(bits=bits)
    mse_nc = unit_mse(x, corrected.dequantize(corrected.quantize(x)))
    # norm correction trades a little MSE (most at 1 bit: 2 - 2 sqrt(1 - mse)) for the exact norm
    assert mse_nc == pytest.approx(2 - 2 * math.sqrt(1 - mse), rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rotation", ["hadamard", "orthogonal"])
def test_norm_correction_gives_the_input_norm(dtype, rotation):
    x = (torch.randn(3, 40, 64) * torch.rand(3, 40, 1) * 10).to(dtype)
    q = make(bits=2, rotation=rotation)
    p = q.quantize(x)
    assert p.norms.dtype == torch.float16
    exact = x.double().norm(dim=-1, keepdim=True)
    codewords = p.codebook.double()[unpack_bits(p.codes, p.bits, p.head_dim).long()]
    # the stored factor is ||x|| / ||c||, rounded once to float16
    factor = exact / codewords.norm(dim=-1, keepdim=True)
    assert torch.all((p.norms.double() - factor).abs() <= factor * (2**-11 + 1e-6))
    rotated = turbo.decode_rotated(p)
    assert torch.all((rotated.double().norm(dim=-1, keepdim=True) - exact).abs() <= exact * (2**-11 + 1e-6))
    out = q.dequantize(p)
    assert out.dtype == dtype
    eps = float(torch.finfo(dtype).eps)
    assert torch.all((out.double().norm(dim=-1, keepdim=True) - exact).abs() <= exact * (2**-11 + eps + 1e-5))
    plain = make(bits=2, rotation=rotation, norm_correction=False).quantize(x)
    assert torch.all((plain.norms.double() - exact).abs() <= exact * 2**-11)  # without: ||x|| itself


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [64, 128, 96])
def test_bits_per_element_is_bits_plus_16_over_d(bits, d):
    rotation = "hadamard" if d != 96 else "orthogonal"
    for dtype in (torch.float16, torch.float32):
        p = make(bits=bits, rotation=rotation).quantize(torch.randn(2, 3, 33, d).to(dtype))
        assert p.bits_per_element == bits + 16 / d
        assert p.codes.shape[-1] == d * bits // 8
    assert p.shared_nbytes == make(bits=bits, rotation=rotation).shared_nbytes(d)


def test_shared_nbytes():
    assert make(bits=3).shared_nbytes(128) == 128 + 8 * 4
    assert make(bits=2, rotation="orthogonal").shared_nbytes(96) == 96 * 96 * 4 + 4 * 4


@pytest.mark.parametrize("norm_correction", [True, False])
@pytest.mark.parametrize("gqa", [1, 8])
@pytest.mark.parametrize("tokens", [1, 29])
def test_scores_and_weighted_sum_match_dequantized(norm_correction, gqa, tokens):
    q = make(bits=3, norm_correction=norm_correction)
    x = torch.randn(2, 1, tokens, 64, dtype=torch.bfloat16)
    p = q.quantize(x)
    queries = torch.randn(2, gqa, 2, 64, dtype=torch.bfloat16)
    dq = q.dequantize(p).double().expand(2, gqa, tokens, 64)
    eps = float(torch.finfo(torch.bfloat16).eps)
    s = q.scores(queries, p)
    ref = queries.double() @ dq.transpose(-1, -2)
    assert s.shape == (2, gqa, 2, tokens) and s.dtype == torch.float32
    assert torch.all((s.double() - ref).abs() <= 2 * eps * (queries.double().abs() @ dq.abs().transpose(-1, -2)) + 1e-5)
    w = torch.softmax(torch.randn(2, gqa, 2, tokens), -1)
    out = q.weighted_sum(w, p)
    assert torch.all((out.double() - w.double() @ dq).abs() <= 2 * eps * (w.double() @ dq.abs()) + 1e-5)


def test_rotation_once(monkeypatch):
    q = make()
    p = q.quantize(torch.randn(1, 2, 20, 64))
    calls = []
    original = Rotation.inverse

    def counting(self, y):
        calls.append(tuple(y.shape))
        return original(self, y)

    monkeypatch.setattr(Rotation, "inverse", counting)
    q.scores(torch.randn(1, 2, 3, 64), p)
    assert calls == []
    q.weighted_sum(torch.softmax(torch.randn(1, 2, 3, 20), -1), p)
    assert calls == [(1, 2, 3, 64)]


def test_cat_and_zero_vectors():
    q = make(bits=2)
    x = torch.randn(1, 2, 30, 64, dtype=torch.float16)
    x[0, 0, 3] = 0
    whole = q.quantize(x)
    assert torch.all(q.dequantize(whole)[0, 0, 3] == 0)
    parts = kvpolar.cat([q.quantize(x[..., :7, :]), q.quantize(x[..., 7:, :])])
    assert torch.equal(q.dequantize(parts), q.dequantize(whole))


@pytest.mark.parametrize(
    "params,match",
    [({"bits": 5}, "bits=5"), ({"bits": 0}, "bits=0"), ({"rotation": "none"}, "rotation='none'"),
     ({"norm_correction": 1}, "norm_correction=1"), ({"seed": "a"}, "seed='a'")],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        make(**params)


def test_errors_on_inputs():
    with pytest.raises(ValueError, match="use rotation='orthogonal'"):
        make().quantize(torch.randn(1, 4, 96))
    with pytest.raises(ValueError, match="float16 range"):
        make().quantize(torch.full((1, 2, 64), 1e5))
    p = make(bits=2).quantize(torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="quantized with"):
        make(bits=3).dequantize(p)
