import math

import pytest
import torch

from kvpolar.quantizers.rotations import rotation, walsh_hadamard


def sylvester(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128])
def test_fast_walsh_hadamard_equals_dense_matrix(d):
    x = torch.randn(3, 5, d, dtype=torch.float64)
    assert torch.allclose(walsh_hadamard(x), x @ sylvester(d), atol=1e-10)


@pytest.mark.parametrize("kind,d", [("hadamard", 64), ("hadamard", 128), ("orthogonal", 96), ("orthogonal", 128)])
def test_orthogonal_and_inverse(kind, d):
    r = rotation(kind, d, seed=3)
    m = r.matrix().double()
    assert torch.allclose(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-5)
    x = torch.randn(4, 7, d)
    y = r.apply(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), x.double() @ m.T, atol=1e-4)
    assert torch.allclose(r.inverse(y), x, atol=1e-5)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_hadamard_is_signs_then_transform():
    r = rotation("hadamard", 32, seed=1)
    signs = r.stored.double()
    assert set(signs.tolist()) <= {-1.0, 1.0}
    expected = sylvester(32) @ torch.diag(signs) / math.sqrt(32)
    assert torch.allclose(r.matrix().double(), expected, atol=1e-6)


def test_deterministic_cached_and_seeded():
    a, b = rotation("orthogonal", 48, seed=5), rotation("orthogonal", 48, seed=5)
    assert a is b
    assert not torch.equal(rotation("orthogonal", 48, seed=6).stored, a.stored)
    assert not torch.equal(rotation("hadamard", 64, seed=0).stored, rotation("hadamard", 64, seed=1).stored)
    # the generator, not global state, decides
    torch.manual_seed(123)
    from kvpolar.quantizers import rotations

    fresh = rotations._cached.__wrapped__("orthogonal", 48, 5, "cpu")
    assert torch.equal(fresh.stored, a.stored)


def test_nbytes_is_what_is_stored():
    assert rotation("hadamard", 128).nbytes == 128  # int8 signs
    assert rotation("orthogonal", 96).nbytes == 96 * 96 * 4  # float32 matrix


def test_half_precision_input_gives_float32():
    r = rotation("hadamard", 64)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert torch.allclose(r.apply(x), r.apply(x.float()))


@pytest.mark.parametrize(
    "kind,d,match",
    [("hadamard", 96, "use kind='orthogonal'"), ("givens", 64, "kind='givens'"), ("orthogonal", 0, "dim=0")],
)
def test_errors(kind, d, match):
    with pytest.raises(ValueError, match=match):
        rotation(kind, d)


def test_wrong_last_dim():
    with pytest.raises(ValueError, match="last dim 32"):
        rotation("hadamard", 64).apply(torch.randn(2, 32))


def test_dense_matrix_and_hadamard_column_scale_are_computed_once_per_rotation():
    """``Rotation.dense`` (``R`` for kernels) and ``hadamard_column_scale`` (``s / sqrt(D)``, ``R = H diag(s)
    / sqrt(D)``): the same tensors on every call for the layer's shared rotation, and only for Hadamard."""
    r = rotation("hadamard", 32, seed=5)
    assert r.dense is rotation("hadamard", 32, seed=5).dense
    assert torch.equal(r.dense, r.matrix())
    scale = r.hadamard_column_scale
    assert scale is r.hadamard_column_scale
    assert torch.allclose(walsh_hadamard(torch.eye(32)) * scale, r.matrix(), atol=1e-6)
    with pytest.raises(ValueError, match="hadamard_column_scale of a 'orthogonal' rotation"):
        rotation("orthogonal", 8, seed=1).hadamard_column_scale
