import math

import numpy as np
import pytest
import torch

from kvpolar.quantizers import codebooks as cb


def density_samples(density: cb.Density, n: int, seed: int) -> torch.Tensor:
    """Exact samples by inverse-CDF on a much finer grid than the Lloyd-Max one (independent path)."""
    grid = np.linspace(density.lo, density.hi, 1 << 20)
    cdf = np.cumsum(density.pdf(grid))
    cdf /= cdf[-1]
    u = np.random.default_rng(seed).random(n)
    return torch.from_numpy(np.interp(u, cdf, grid))


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_uniform_lloyd_max_is_the_uniform_grid(bits):
    book = cb.lloyd_max(cb.uniform_density(0, 2 * math.pi), bits)
    k = 2**bits
    expected = (torch.arange(k, dtype=torch.float64) + 0.5) * 2 * math.pi / k
    assert torch.allclose(book.centroids, expected, atol=1e-9)
    assert book.mse == pytest.approx((2 * math.pi / k) ** 2 / 12, rel=1e-6)


@pytest.mark.parametrize("level,bits", [(2, 2), (3, 2), (4, 3)])
def test_lloyd_max_is_a_fixed_point_on_samples(level, bits):
    """Centroids are the conditional means of their cells under the density (sampled independently)."""
    density = cb.polar_angle_density(level)
    book = cb.lloyd_max(density, bits)
    x = density_samples(density, 400_000, seed=level)
    codes = cb.nearest(x, book.boundaries)
    means = torch.stack([x[codes == k].mean() for k in range(2**bits)])
    counts = torch.bincount(codes, minlength=2**bits).double()
    stds = torch.stack([x[codes == k].std() for k in range(2**bits)])
    assert torch.all((means - book.centroids).abs() <= 5 * stds / counts.sqrt())
    mse = float(((x - book.centroids[codes]) ** 2).mean())
    assert mse == pytest.approx(book.mse, rel=0.02)


def test_polar_density_matches_paper_normalisation():
    for level in (2, 3, 5):
        density = cb.polar_angle_density(level)
        grid = np.linspace(0, math.pi / 2, 200_001)
        n = 2 ** (level - 1)
        const = math.gamma(n) / (2 ** (n - 2) * math.gamma(n / 2) ** 2)
        integral = np.trapezoid(const * density.pdf(grid), grid)
        assert integral == pytest.approx(1.0, rel=1e-6)


def test_lloyd_max_symmetric_and_sorted():
    book = cb.lloyd_max(cb.sphere_coordinate_density(64), 3)
    c = book.centroids
    assert torch.all(c[1:] > c[:-1])
    assert torch.allclose(c, -c.flip(0), atol=1e-9)
    assert book.bits == 3


def test_cached():
    a = cb.lloyd_max(cb.polar_angle_density(3), 2)
    assert cb.lloyd_max(cb.polar_angle_density(3), 2) is a


def test_nearest_is_argmin_distance():
    centroids = torch.tensor([-1.0, -0.2, 0.5, 2.0])
    x = torch.randn(1000) * 2
    brute = (x[:, None] - centroids[None]).abs().argmin(-1)
    assert torch.equal(cb.nearest(x, cb.boundaries_of(centroids)), brute)
    rows = torch.randn(3, 50)
    per_row = torch.sort(torch.randn(3, 4), dim=-1).values
    brute = (rows[..., None] - per_row[:, None, :]).abs().argmin(-1)
    assert torch.equal(cb.nearest(rows, cb.boundaries_of(per_row)), brute)


def test_kmeans_converges_to_lloyd_max_on_samples():
    density = cb.polar_angle_density(3)
    x = density_samples(density, 200_000, seed=7).float().reshape(2, -1)
    init = torch.linspace(0.2, 1.3, 4)
    got = cb.kmeans_1d(x, init, iterations=200)
    assert got.shape == (2, 4)
    assert torch.allclose(got.double(), cb.lloyd_max(density, 2).centroids.expand(2, 4), atol=3e-3)


def test_kmeans_reduces_error_and_keeps_empty_cells():
    x = torch.rand(5, 300) ** 3
    init = torch.tensor([0.0, 0.3, 0.6, 10.0])
    got = cb.kmeans_1d(x, init)
    assert torch.all(got[:, 3] == 10.0)  # no data near 10: the cell stays empty
    err = lambda c: ((x - torch.gather(c, -1, cb.nearest(x, cb.boundaries_of(c)))) ** 2).mean()
    assert err(got) < err(init.expand(5, 4).contiguous())


@pytest.mark.parametrize("bad", [0, 9, 2.0])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        cb.lloyd_max(cb.uniform_density(0, 1), bad)


def test_bad_density():
    with pytest.raises(ValueError, match="kind='beta'"):
        cb.Density("beta", 0, 1)
    with pytest.raises(ValueError, match="empty"):
        cb.uniform_density(1, 1)
