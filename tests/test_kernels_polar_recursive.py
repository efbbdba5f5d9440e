"""Triton polar-recursive kernels against their PyTorch references (TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import kvpolar  # noqa: E402
from kvpolar.kernels import polar_recursive_scores as prs  # noqa: E402
from kvpolar.quantizers import polar_recursive as pr  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_error(q, p):
    """Rounding error of the float32 reference itself, measured against a float64 evaluation."""
    rot = pr._rotation_of(p)
    exact = (rot.apply(q.double()).double() @ pr.inverse_polar_transform(
        [a.double() for a in pr.decoded_angles(p)], pr.decoded_radii(p).double()).transpose(-1, -2))
    return exact, (pr.rotated_scores(q, p).double() - exact).abs().max()


@pytest.mark.parametrize(
    "params,dtype,tokens,tq",
    [
        ({}, torch.float16, 1, 1),
        ({}, torch.bfloat16, 45, 3),
        ({"codebook": "online"}, torch.float16, 37, 1),
        ({"levels": 6, "bits": (4, 3, 3, 3, 2, 3)}, torch.float16, 20, 2),
        ({"levels": 3, "bits": (5, 3, 3), "radius_bits": 6}, torch.float32, 33, 17),
        ({"preconditioner": "orthogonal"}, torch.bfloat16, 16, 4),
    ],
)
def test_scores_kernel_matches_reference(params, dtype, tokens, tq):
    q_ = kvpolar.quantizer("polar-recursive", **params)
    keys = torch.randn(2, 2, tokens, 64, device=DEVICE).to(dtype)
    p = q_.quantize(keys)
    queries = torch.randn(2, 2, tq, 64, device=DEVICE).to(dtype)
    exact, ref_err = reference_error(queries, p)
    got = prs.polar_recursive_scores(queries, p, block_t=16)
    assert got.shape == (2, 2, tq, tokens) and got.dtype == torch.float32
    assert (got.double() - exact).abs().max() <= 4 * ref_err + 1e-6 * exact.abs().max()


def test_scores_kernel_gqa_rows_through_quantizer_layout():
    q_ = kvpolar.quantizer("polar-recursive")
    p = q_.quantize(torch.randn(1, 2, 24, 64, device=DEVICE, dtype=torch.float16))
    queries = torch.randn(1, 8, 1, 64, device=DEVICE, dtype=torch.float16)  # GQA 4
    folded = queries.reshape(1, 2, 4, 64)
    got = prs.polar_recursive_scores(folded, p).reshape(1, 8, 1, 24)
    ref = q_.scores(queries, p)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("tokens", [1, 29])
def test_scores_kernel_reads_tokens_adjacent_codes_in_place(tokens):
    """At head dim 128 the quantizer stores codes and radii with consecutive tokens adjacent (the
    decode kernel's layout); the scores kernel reads them through their strides."""
    p = kvpolar.quantizer("polar-recursive").quantize(torch.randn(2, 2, tokens, 128, device=DEVICE, dtype=torch.float16))
    if tokens > 1:
        assert p.codes.stride(-2) == 1 and p.radii.stride(-2) == 1
    assert prs._rows(p.codes, 4, tokens).data_ptr() == p.codes.data_ptr()  # a view, not a copy
    queries = torch.randn(2, 2, 3, 128, device=DEVICE, dtype=torch.float16)
    exact, ref_err = reference_error(queries, p)
    got = prs.polar_recursive_scores(queries, p, block_t=16)
    assert (got.double() - exact).abs().max() <= 4 * ref_err + 1e-6 * exact.abs().max()


def test_scores_kernel_refuses_non_power_of_two():
    q_ = kvpolar.quantizer("polar-recursive", preconditioner="orthogonal", levels=2, bits=(3, 2))
    p = q_.quantize(torch.randn(1, 4, 48))
    with pytest.raises(ValueError, match="power of two"):
        prs.polar_recursive_scores(torch.randn(1, 2, 48), p)


# ----- encode ---------------------------------------------------------------------------------
from kvpolar.kernels import polar_recursive_encode as pre  # noqa: E402
from kvpolar.quantizers import codebooks as cb  # noqa: E402


def reference_angles(quantizer, x):
    c = quantizer.config
    rot = pr.rotation(c.preconditioner, x.shape[-1], c.seed, x.device)
    return pr.polar_transform(rot.apply(x), c.levels)


@pytest.mark.parametrize(
    "params,dtype,tokens",
    [
        ({}, torch.float16, 1),
        ({}, torch.bfloat16, 37),
        ({"levels": 6, "bits": (5, 3, 3, 2, 3, 1)}, torch.float32, 20),
        ({"levels": 2, "bits": (3, 5), "preconditioner": "orthogonal"}, torch.float16, 17),
    ],
)
def test_encode_kernel_matches_reference(params, dtype, tokens):
    quantizer = kvpolar.quantizer("polar-recursive", **params)
    x = torch.randn(2, 3, tokens, 64, device=DEVICE).to(dtype)
    ref = quantizer.quantize(x)
    got = pre.polar_recursive_encode(quantizer, x)
    assert got.codes.shape == ref.codes.shape and got.radii.shape == ref.radii.shape
    assert got.radii.dtype == dtype and got.bits_per_element == ref.bits_per_element
    c = quantizer.config
    angles, radii = reference_angles(quantizer, x)
    books = pr.analytic_codebooks(c.bits, str(x.device))
    ref_codes = pr.unpack_levels(ref.codes, c.bits, 64)
    got_codes = pr.unpack_levels(got.codes, c.bits, 64)
    for angle, book, rc, gc in zip(angles, books, ref_codes, got_codes):
        differ = rc != gc
        # only angles within float32 rounding of a codebook boundary may fall on the other side
        gap = (angle[..., None] - cb.boundaries_of(book)).abs().amin(-1)
        assert torch.all(gap[differ] < 1e-4), gap[differ]
        assert differ.float().mean() < 1e-2
    # radii: the reference's own float32 -> dtype rounding, plus a few float32 ulps
    tol = radii.abs() * (float(torch.finfo(dtype).eps) + 1e-5)
    assert torch.all((got.radii.float() - ref.radii.float()).abs() <= tol)
    if all(torch.equal(a, b) for a, b in zip(ref_codes, got_codes)) and torch.equal(got.radii, ref.radii):
        assert torch.equal(quantizer.dequantize(got), quantizer.dequantize(ref))


def test_encode_kernel_then_scores_kernel():
    quantizer = kvpolar.quantizer("polar-recursive")
    keys = torch.randn(1, 2, 40, 64, device=DEVICE, dtype=torch.float16)
    p = pre.polar_recursive_encode(quantizer, keys)
    queries = torch.randn(1, 2, 3, 64, device=DEVICE, dtype=torch.float16)
    exact, ref_err = reference_error(queries, p)
    assert (prs.polar_recursive_scores(queries, p).double() - exact).abs().max() <= 4 * ref_err + 1e-6 * exact.abs().max()


def test_encode_kernel_refuses_unsupported_settings():
    with pytest.raises(ValueError, match="codebook='analytic' with radius_bits=None"):
        pre.polar_recursive_encode(kvpolar.quantizer("polar-recursive", codebook="online"), torch.randn(1, 4, 64))
    with pytest.raises(ValueError, match="radius_bits=6"):
        pre.polar_recursive_encode(kvpolar.quantizer("polar-recursive", radius_bits=6), torch.randn(1, 4, 64))
