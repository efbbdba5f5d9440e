import dataclasses
import math

import pytest
import torch

import kvpolar
import kvpolar.packing
from kvpolar import synthetic
from kvpolar.quantizers import codebooks as cb
from kvpolar.quantizers import polar_recursive as pr
from kvpolar.quantizers.rotations import Rotation, rotation


def make(**params):
    return kvpolar.quantizer("polar-recursive", **params)


def test_registered_with_paper_defaults():
    q = make()
    assert "polar-recursive" in kvpolar.available_quantizers()
    c = q.config
    assert (c.levels, c.bits, c.codebook, c.preconditioner, c.seed, c.radius_bits) == (
        4, (4, 2, 2, 2), "analytic", "hadamard", 0, None
    )


@pytest.mark.parametrize("levels", [1, 3, 7])
def test_polar_transform_is_exactly_invertible(levels):
    y = torch.randn(5, 9, 128, dtype=torch.float64)
    angles, radii = pr.polar_transform(y, levels)
    assert [a.shape[-1] for a in angles] == [128 >> l for l in range(1, levels + 1)]
    assert radii.shape[-1] == 128 >> levels
    assert angles[0].min() >= 0 and angles[0].max() < 2 * math.pi
    for a in angles[1:]:
        assert a.min() >= 0 and a.max() <= math.pi / 2
    assert torch.allclose(pr.inverse_polar_transform(angles, radii), y, atol=1e-12)
    assert torch.allclose(radii.norm(dim=-1), y.norm(dim=-1), atol=1e-12)


def test_default_is_3_875_bits_per_element_at_d128():
    x = torch.randn(2, 4, 100, 128, dtype=torch.float16)
    p = make().quantize(x)
    assert p.bits_per_element == 3.875
    # 46 code bytes (32 + 8 + 4 + 2) + 8 fp16 radii per token
    assert p.codes.shape == (2, 4, 100, 46) and p.radii.shape == (2, 4, 100, 8)
    assert p.radii.dtype == torch.float16 and p.nbytes == 2 * 4 * 100 * 62
    assert p.shared_nbytes == 128 + 4 * (16 + 4 + 4 + 4) == make().shared_nbytes(128)


def test_fp32_input_keeps_fp32_radii_and_counts_them():
    p = make().quantize(torch.randn(1, 10, 128))
    assert p.radii.dtype == torch.float32
    assert p.bits_per_element == 2.875 + 32 / 16


@pytest.mark.parametrize(
    "params,d,expected_bits",
    [
        # 256 + 3 * 63 = 445 code bits -> 56 bytes, + one 16-bit radius
        ({"levels": 7, "bits": (4, 3, 3, 3, 3, 3, 3)}, 128, (56 * 8 + 16) / 128),
        ({"radius_bits": 6}, 128, 2.875 + (8 * 6 + 32) / 128),
        ({"levels": 2, "bits": (3, 3), "preconditioner": "orthogonal"}, 96, (48 * 3 + 24 * 3) / 96 + 16 / 4),
    ],
)
def test_other_allocations_count_every_bit(params, d, expected_bits):
    p = make(**params).quantize(torch.randn(3, 40, d, dtype=torch.bfloat16))
    assert p.bits_per_element == pytest.approx(expected_bits, rel=1e-12)


@pytest.mark.parametrize("bits", [(4, 2, 2, 2), (3, 5, 1, 7, 2), (8,)])
def test_level_bit_stream_round_trip_and_layout(bits):
    d = 64
    codes = [torch.randint(0, 2**b, (3, 2, d >> l)).to(torch.uint8) for l, b in enumerate(bits, start=1)]
    packed = pr.pack_levels(codes, bits)
    assert packed.shape[-1] == math.ceil(pr.code_bits_per_token(d, bits) / 8)
    assert all(torch.equal(a, b) for a, b in zip(pr.unpack_levels(packed, bits, d), codes))
    if len(bits) == 1:
        assert torch.equal(packed, kvpolar.packing.pack_bits(codes[0], bits[0]))


def test_online_codebook_is_stored_and_counted():
    x = torch.randn(2, 3, 64, 128, dtype=torch.float16)
    p = make(codebook="online").quantize(x)
    assert p.codebooks.shape == (2, 3, 28) and p.codebooks.dtype == torch.float32
    assert p.nbytes == 2 * 3 * 64 * 62 + 2 * 3 * 28 * 4
    assert p.shared_nbytes == 128  # only the signs: the codebooks travel with the tensor


def unit_mse(x, xh):
    x, xh = x.double(), xh.double()
    return float(((xh - x).norm(dim=-1) ** 2 / x.norm(dim=-1) ** 2).mean())


def expected_default_mse():
    """Distortion predicted from the per-level Lloyd-Max errors (small-angle, Gaussian input):
    a level-l angle error e scales the energy of its 2^l coordinates by e^2."""
    books = [cb.lloyd_max(cb.polar_angle_density(l), b) for l, b in enumerate((4, 2, 2, 2), start=1)]
    return sum(book.mse for book in books)


@pytest.mark.parametrize("preconditioner", ["hadamard", "orthogonal"])
def test_distortion_on_gaussian_matches_codebook_errors(preconditioner):
    x = torch.randn(4, 512, 128)
    q = make(preconditioner=preconditioner)
    mse = unit_mse(x, q.dequantize(q.quantize(x)))
    assert mse == pytest.approx(expected_default_mse(), rel=0.1)


@pytest.mark.parametrize("preconditioner,outlier_scale", [("hadamard", 10.0), ("orthogonal", 30.0)])
def test_outlier_channels_do_not_hurt_after_preconditioning(preconditioner, outlier_scale):
    """Error independent of outliers. (At outlier_scale=30, where 8 channels hold ~98 % of the
    energy, the structured Hadamard rotation is ~30 % worse; the dense one is not: see README.)"""
    q = make(preconditioner=preconditioner)
    errors = []
    for pairs in (0, 4):
        keys = synthetic.rope_keys(1, 4, 256, 128, outlier_pairs=pairs, outlier_scale=outlier_scale, dtype=torch.float32)
        errors.append(unit_mse(keys, q.dequantize(q.quantize(keys))))
    assert errors[1] <= 1.05 * errors[0]
    assert errors[0] == pytest.approx(expected_default_mse(), rel=0.1)


def test_online_codebook_not_worse_than_analytic_on_skewed_data():
    keys = synthetic.rope_keys(1, 2, 256, 128, dtype=torch.float32)
    analytic, online = make(), make(codebook="online")
    e_a = unit_mse(keys, analytic.dequantize(analytic.quantize(keys)))
    e_o = unit_mse(keys, online.dequantize(online.quantize(keys)))
    assert e_o <= e_a * 1.02


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_norm_preserved_up_to_radii_precision(dtype):
    x = (torch.randn(3, 50, 128) * torch.rand(3, 50, 1) * 20).to(dtype)
    q = make()
    p = q.quantize(x)
    rel_stored = float(torch.finfo(dtype).eps)  # radii rounding (+ output rounding) in x.dtype
    rotated = pr.decode_rotated(p)
    assert torch.allclose(rotated.norm(dim=-1), p.radii.float().norm(dim=-1), rtol=1e-5)
    exact = x.double().norm(dim=-1)
    assert ((rotated.double().norm(dim=-1) - exact).abs() / exact).max() <= rel_stored
    out = q.dequantize(p)
    assert out.dtype == dtype and out.shape == x.shape
    assert ((out.double().norm(dim=-1) - exact).abs() / exact).max() <= 2 * rel_stored


def test_quantized_log_radii_error_is_bounded_by_the_grid():
    x = torch.randn(2, 64, 128)
    p = make(radius_bits=5).quantize(x)
    radii = pr.decoded_radii(p)
    _, exact = pr.polar_transform(rotation("hadamard", 128).apply(x), 4)
    half_step = p.radius_scale.float() / 2 + 1e-6
    assert torch.all((radii.log() - exact.log()).abs() <= half_step)


@pytest.mark.parametrize("codebook", ["analytic", "online"])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("tokens", [1, 37])
def test_scores_and_weighted_sum_match_dequantized(codebook, gqa, tokens):
    q = make(codebook=codebook)
    keys = torch.randn(2, 2, tokens, 64, dtype=torch.float16)
    p = q.quantize(keys)
    queries = torch.randn(2, 2 * gqa, 3, 64, dtype=torch.float16)
    dq = q.dequantize(p).double().repeat_interleave(gqa, dim=1)
    ref = queries.double() @ dq.transpose(-1, -2)
    s = q.scores(queries, p)
    assert s.shape == (2, 2 * gqa, 3, tokens) and s.dtype == torch.float32
    # dequantize rounds the keys to fp16; the fast path stays in float32
    tol = 4 * float(torch.finfo(torch.float16).eps) * (queries.double().abs() @ dq.abs().transpose(-1, -2))
    assert torch.all((s.double() - ref).abs() <= tol + 1e-5)
    w = torch.softmax(torch.randn(2, 2 * gqa, 3, tokens), dim=-1)
    out = q.weighted_sum(w, p)
    ref = w.double() @ dq
    assert out.shape == (2, 2 * gqa, 3, 64)
    assert torch.all((out.double() - ref).abs() <= 4 * float(torch.finfo(torch.float16).eps) * (w.double() @ dq.abs()) + 1e-5)


def test_scores_never_unrotate_keys_and_weighted_sum_unrotates_once(monkeypatch):
    q = make()
    p = q.quantize(torch.randn(1, 2, 30, 128))
    queries = torch.randn(1, 2, 4, 128)
    expected_scores = q.scores(queries, p)
    expected_out = q.weighted_sum(torch.softmax(torch.randn(1, 2, 4, 30), -1), p)
    calls = []
    original = Rotation.inverse

    def counting_inverse(self, y):
        calls.append(tuple(y.shape))
        return original(self, y)

    monkeypatch.setattr(Rotation, "inverse", counting_inverse)
    assert torch.equal(q.scores(queries, p), expected_scores)
    assert calls == []
    w = torch.softmax(torch.randn(1, 2, 4, 30, generator=torch.Generator().manual_seed(0)), -1)
    q.weighted_sum(w, p)
    assert calls == [(1, 2, 4, 128)]  # once, on the output, never on the 30 tokens
    assert expected_out.shape == (1, 2, 4, 128)


def test_cat_and_online_codebook_refusal():
    x = torch.randn(1, 2, 50, 64, dtype=torch.float16)
    q = make()
    whole = q.quantize(x)
    parts = kvpolar.cat([q.quantize(x[..., :20, :]), q.quantize(x[..., 20:, :])])
    assert torch.equal(q.dequantize(parts), q.dequantize(whole)) and parts.nbytes == whole.nbytes
    online = make(codebook="online")
    with pytest.raises(ValueError, match="per-tensor 'codebooks'"):
        kvpolar.cat([online.quantize(x[..., :20, :]), online.quantize(x[..., 20:, :])])


def test_deterministic_and_seeded():
    x = torch.randn(1, 20, 64)
    a, b = make(seed=1).quantize(x), make(seed=1).quantize(x)
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, make(seed=2).quantize(x).codes)


def test_wrong_quantizer_settings_are_refused():
    p = make().quantize(torch.randn(1, 8, 64))
    with pytest.raises(ValueError, match="quantized with"):
        make(seed=1).dequantize(p)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"levels": 0}, "levels=0"),
        ({"levels": 3, "bits": (4, 2, 2, 2)}, "bits=.*has 4 entries; levels=3"),
        ({"bits": (4, 2, 2)}, "has 3 entries; levels=4"),
        ({"bits": (4, 2, 2, 9)}, "integers 1..8"),
        ({"bits": (4, 0, 2, 2)}, "integers 1..8"),
        ({"codebook": "kmeans"}, "codebook='kmeans'.*'analytic', 'online'"),
        ({"preconditioner": "none"}, "preconditioner='none'.*'hadamard', 'orthogonal'"),
        ({"radius_bits": 0}, "radius_bits=0"),
        ({"radius_bits": 16}, "radius_bits=16"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        make(**params)


def test_levels_default_bits_follow_the_paper_pattern():
    assert make(levels=6).config.bits == (4, 2, 2, 2, 2, 2)


@pytest.mark.parametrize(
    "params,d,match",
    [
        ({}, 96, "head dim 96 is not a power of two.*use preconditioner='orthogonal'"),
        ({"levels": 8, "bits": (2,) * 8}, 128, "levels=8 exceeds log2"),
        ({"levels": 6, "preconditioner": "orthogonal"}, 96, "not divisible by 2\\*\\*levels = 64"),
        ({"levels": 7, "preconditioner": "orthogonal"}, 96, "levels=7 exceeds"),
    ],
)
def test_head_dim_errors(params, d, match):
    with pytest.raises(ValueError, match=match):
        make(**params).quantize(torch.randn(1, 4, d))


def test_kernel_setting_lays_codes_and_radii_out_with_tokens_adjacent():
    """The setting the fused kernel reads by parts (paper bits, analytic, head dim >= 128) stores codes
    and radii tokens-contiguous; ``cat`` and ``select_batch`` keep the first part's layout (also after
    a part one row per token), every other setting stays a row per token; values read back alike."""
    q = kvpolar.quantizer("polar-recursive")
    x = torch.randn(2, 3, 70, 128, dtype=torch.float16)
    first, second = q.quantize(x[..., :64, :]), q.quantize(x[..., 64:, :])
    for p in (first, second):
        assert p.codes.shape[-2:] == (p.num_tokens, 46) and p.codes.stride(-2) == 1 and p.radii.stride(-2) == 1
    rows = dataclasses.replace(second, codes=second.codes.contiguous(), radii=second.radii.contiguous())
    grown = kvpolar.cat([first, rows])
    assert grown.codes.stride(-2) == 1 and grown.radii.stride(-2) == 1
    assert torch.equal(q.dequantize(grown), q.dequantize(q.quantize(x)))
    picked = grown.select_batch(torch.tensor([1, 1, 0]))
    assert picked.codes.stride(-2) == 1 and picked.radii.stride(-2) == 1
    assert torch.equal(q.dequantize(picked), q.dequantize(grown)[[1, 1, 0]])
    as_rows = kvpolar.cat([rows, first])  # a row-per-token first part: the result keeps its layout
    assert as_rows.codes.is_contiguous() and as_rows.radii.is_contiguous()
    assert grown.nbytes == as_rows.nbytes == q.quantize(x).nbytes
    for other in (kvpolar.quantizer("polar-recursive", codebook="online"), kvpolar.quantizer("polar-recursive", levels=3)):
        p = other.quantize(x[..., :64, :])
        assert p.codes.is_contiguous() and p.radii.is_contiguous()
    small = q.quantize(torch.randn(1, 2, 40, 64))  # head dim 64: the classic kernel's rows
    assert small.codes.is_contiguous()


def test_kept_layout_declaration_is_checked():
    from kvpolar.quantized import KEPT, stored

    with pytest.raises(ValueError, match="tokens_contiguous='sometimes'"):
        stored(token_axis=-2, tokens_contiguous="sometimes")
    with pytest.raises(ValueError, match="tokens_contiguous needs token_axis=-2"):
        stored(token_axis=None, tokens_contiguous=KEPT)
