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


def test_scores_kernel_refuses_non_power_of_two():
    q_ = kvpolar.quantizer("polar-recursive", preconditioner="orthogonal", levels=2, bits=(3, 2))
    p = q_.quantize(torch.randn(1, 4, 48))
    with pytest.raises(ValueError, match="power of two"):
        prs.polar_recursive_scores(torch.randn(1, 2, 48), p)
