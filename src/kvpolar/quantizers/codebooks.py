"""Scalar codebooks: 1-D Lloyd-Max on a known density, k-means on data, nearest-codeword search.

A codebook is a sorted vector of ``K = 2**bits`` centroids; a value's code is the index of the
nearest centroid, found by bucketizing against the midpoints between neighbours (``boundaries``).

* :func:`lloyd_max` fits a codebook to a density on an interval ("offline"/"analytic"): the
  density is discretised as piecewise constant on ``GRID_POINTS`` bins (cell moments exact for
  that discretisation, so a uniform density gives the exact uniform grid), then Lloyd's iteration
  (boundaries = midpoints, centroids = conditional means) runs in float64 until no centroid moves
  by more than ``1e-9`` of the interval (far below float32 resolution). Deterministic; cached per ``(density, bits)``.
* :func:`kmeans_1d` fits codebooks to data ("online"), batched over leading axes, initialised from
  a given codebook (e.g. the analytic one), so it is deterministic too.

Densities (:class:`Density`, hashable cache keys): uniform on an interval; ``sin(2 psi)^p`` on
``[0, pi/2]`` (the polar-recursive angles); ``(1 - x^2)^((D - 3) / 2)`` on ``[-1, 1]`` (one
coordinate of a uniformly random unit vector in ``R^D``, the TurboQuant codebook).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch

from kvpolar.validation import allowed

GRID_POINTS = 1 << 16
MAX_ITERATIONS = 20_000
TOLERANCE = 1e-9
DENSITY_KINDS = ("uniform", "sin2-power", "sphere-coordinate")


@dataclasses.dataclass(frozen=True)
class Density:
    """An unnormalised density on ``[lo, hi]``; ``param`` is the power or the dimension."""

    kind: str
    lo: float
    hi: float
    param: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in DENSITY_KINDS:
            raise allowed("kind", self.kind, DENSITY_KINDS)
        if not self.lo < self.hi:
            raise ValueError(f"density interval [{self.lo}, {self.hi}] is empty; need lo < hi")

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Unnormalised density at ``x`` (float64 array), scaled so its maximum is about 1."""
        if self.kind == "uniform":
            return np.ones_like(x)
        if self.kind == "sin2-power":
            return np.exp(self.param * np.log(np.clip(np.sin(2 * x), 1e-300, None)))
        exponent = (self.param - 3) / 2
        return np.exp(exponent * np.log1p(-np.clip(x * x, None, 1 - 1e-300)))


def uniform_density(lo: float, hi: float) -> Density:
    return Density("uniform", float(lo), float(hi))


def polar_angle_density(level: int) -> Density:
    """Density of a level-``level`` polar-recursive angle for Gaussian input (PolarQuant, Lemma 2).

    Level 1: uniform on ``[0, 2 pi)``; level ``l >= 2``: ``sin(2 psi)^(2^(l-1) - 1)`` on ``[0, pi/2]``.
    """
    if level == 1:
        return uniform_density(0.0, 2 * math.pi)
    return Density("sin2-power", 0.0, math.pi / 2, float(2 ** (level - 1) - 1))


def sphere_coordinate_density(dim: int) -> Density:
    """Density of one coordinate of a uniform random unit vector in ``R^dim``: ``(1-x^2)^((dim-3)/2)``."""
    if dim < 2:
        raise ValueError(f"dim={dim} is not supported; allowed: integers >= 2")
    return Density("sphere-coordinate", -1.0, 1.0, float(dim))


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
    """Sorted centroids ``[K]`` (float64) with the boundaries ``[K-1]`` between them and the MSE."""

    centroids: torch.Tensor
    boundaries: torch.Tensor
    mse: float

    @property
    def bits(self) -> int:
        return int(math.log2(self.centroids.numel()))


def lloyd_max(density: Density, bits: int) -> Codebook:
    """The MSE-optimal ``2**bits``-level scalar quantizer of ``density`` (cached, deterministic).

    Returns float64 centroids/boundaries on the CPU and the expected squared error under the
    normalised density. Raises ValueError for ``bits`` outside 1..8.
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise allowed("bits", bits, "integers 1..8")
    return _lloyd_max_cached(density, bits)


@functools.lru_cache(maxsize=256)
def _lloyd_max_cached(density: Density, bits: int) -> Codebook:
    k = 1 << bits
    moments = _BinnedMoments(density)
    # start from the high-resolution optimum: centroid density proportional to pdf^(1/3)
    # (Panter-Dite), i.e. the quantiles of pdf^(1/3) at the cell middles
    cube_root = np.cumsum(np.cbrt(moments.height))
    centroids = np.interp((np.arange(k) + 0.5) / k, cube_root / cube_root[-1], moments.edges[1:])
    for _ in range(MAX_ITERATIONS):
        mass, first, _ = moments.cells(centroids)
        updated = np.where(mass > 0, first / np.where(mass > 0, mass, 1.0), centroids)
        moved = np.abs(updated - centroids).max()
        centroids = updated
        if moved <= TOLERANCE * (density.hi - density.lo):
            break
    mass, first, second = moments.cells(centroids)
    mse = float((second - 2 * centroids * first + centroids**2 * mass).sum())
    return Codebook(torch.from_numpy(centroids.copy()), torch.from_numpy(boundaries_of_np(centroids)), mse)


def boundaries_of_np(centroids: np.ndarray) -> np.ndarray:
    return (centroids[1:] + centroids[:-1]) / 2


class _BinnedMoments:
    """The density as piecewise constant on ``GRID_POINTS`` bins, with exact partial-bin moments."""

    def __init__(self, density: Density) -> None:
        self.lo, self.h = density.lo, (density.hi - density.lo) / GRID_POINTS
        self.edges = density.lo + np.arange(GRID_POINTS + 1) * self.h
        centres = self.edges[:-1] + self.h / 2
        mass = density.pdf(centres)
        mass = mass / mass.sum()
        self.height = mass / self.h
        lo_e, hi_e = self.edges[:-1], self.edges[1:]
        per_bin = (mass, self.height * (hi_e**2 - lo_e**2) / 2, self.height * (hi_e**3 - lo_e**3) / 3)
        self.cum = [np.concatenate(([0.0], np.cumsum(m))) for m in per_bin]

    def _below(self, b: np.ndarray) -> list[np.ndarray]:
        """Mass, first and second moment of the density below each point of ``b``."""
        i = np.clip(np.floor((b - self.lo) / self.h).astype(np.int64), 0, GRID_POINTS - 1)
        e, p = self.edges[i], self.height[i]
        b = np.clip(b, self.edges[0], self.edges[-1])
        parts = (b - e, (b**2 - e**2) / 2, (b**3 - e**3) / 3)
        return [c[i] + p * part for c, part in zip(self.cum, parts)]

    def cells(self, centroids: np.ndarray) -> list[np.ndarray]:
        """Per-cell mass, first and second moments for the nearest-centroid cells."""
        b = np.concatenate(([self.edges[0]], boundaries_of_np(centroids), [self.edges[-1]]))
        return [np.diff(m) for m in self._below(b)]


def boundaries_of(centroids: torch.Tensor) -> torch.Tensor:
    """Midpoints between sorted neighbours: ``[..., K]`` -> ``[..., K-1]``."""
    return (centroids[..., 1:] + centroids[..., :-1]) / 2


def nearest(x: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every value of ``x``, as int64.

    ``boundaries``: ``[K-1]`` (one codebook for all of ``x``) or ``[..., K-1]`` with the leading
    shape of ``x`` ``[..., N]`` (one codebook per row). Sorted ascending.
    """
    boundaries = boundaries.to(x.device, x.dtype)
    if boundaries.dim() == 1:
        return torch.bucketize(x, boundaries)
    return torch.searchsorted(boundaries.contiguous(), x.contiguous())


def kmeans_1d(x: torch.Tensor, init: torch.Tensor, iterations: int = 25) -> torch.Tensor:
    """Per-row 1-D k-means (Lloyd's iteration on data).

    Args:
        x: ``[..., N]`` float data, one problem per row.
        init: ``[K]`` or ``[..., K]`` sorted initial centroids.
        iterations: Lloyd steps (stops early once nothing moves).

    Returns:
        ``[..., K]`` float32 sorted centroids; a centroid whose cell stays empty keeps its value.
    """
    x = x.float()
    lead = x.shape[:-1]
    centroids = init.to(x.device, torch.float32).expand(*lead, init.shape[-1]).contiguous()
    k = centroids.shape[-1]
    for _ in range(iterations):
        codes = nearest(x, boundaries_of(centroids))
        sums = torch.zeros(*lead, k, device=x.device).scatter_add_(-1, codes, x)
        counts = torch.zeros(*lead, k, device=x.device).scatter_add_(-1, codes, torch.ones_like(x))
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids
