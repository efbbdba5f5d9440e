"""Seeded random rotations shared by a layer: randomized Hadamard and dense random orthogonal.

A rotation ``R`` (orthogonal, ``D x D``) acts on the last axis of ``[..., D]`` tensors:
``apply(x) = x @ R^T`` (each row vector ``x`` becomes ``R x``) and ``inverse(y) = y @ R``. Because
``R`` is orthogonal, ``q . k = (R q) . (R k)``: methods rotate the query once instead of un-rotating
keys.

* ``"hadamard"``: ``R = H diag(s) / sqrt(D)`` with ``H`` the Sylvester Hadamard matrix and ``s``
  seeded random signs; applied by a fast Walsh-Hadamard transform in ``O(D log D)``, power-of-two
  ``D`` only. Stored: the signs, int8 ``[D]`` (``D`` bytes).
* ``"orthogonal"``: a Haar-distributed random orthogonal matrix (QR of a seeded Gaussian matrix with
  the sign fix), any ``D``. Stored: the matrix, float32 ``[D, D]``.

Rotations are deterministic in ``(kind, dim, seed)`` (built on the CPU in float64, whatever the
device) and cached per device by :func:`rotation`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from kvpolar.validation import allowed, check_choice, check_positive_int

ROTATION_KINDS = ("hadamard", "orthogonal")


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
    """A seeded orthogonal map of ``[..., D]`` tensors; see the module docstring.

    Attributes:
        kind: ``"hadamard"`` or ``"orthogonal"``.
        dim: ``D``.
        seed: the seed it was drawn from.
        stored: what a layer keeps: int8 signs ``[D]`` (hadamard) or float32 matrix ``[D, D]``.
    """

    kind: str
    dim: int
    seed: int
    stored: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Bytes of what is stored (the signs or the matrix)."""
        return self.stored.numel() * self.stored.element_size()

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for every row: ``x`` ``[..., D]`` any float dtype -> float32 ``[..., D]``."""
        self._check(x)
        x = x.float()
        if self.kind == "hadamard":
            return walsh_hadamard(x * self.stored.to(x.device, torch.float32)) / math.sqrt(self.dim)
        return x @ self.stored.to(x.device).T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``R^T y`` for every row: ``y`` ``[..., D]`` -> float32 ``[..., D]``."""
        self._check(y)
        y = y.float()
        if self.kind == "hadamard":
            return walsh_hadamard(y) / math.sqrt(self.dim) * self.stored.to(y.device, torch.float32)
        return y @ self.stored.to(y.device)

    def matrix(self) -> torch.Tensor:
        """The dense ``D x D`` float32 matrix ``R`` (for tests and references)."""
        eye = torch.eye(self.dim, device=self.stored.device)
        return self.apply(eye).T

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        """:meth:`matrix`, contiguous, computed once per object (the layers' shared rotations are the
        cached objects of :func:`rotation`): for kernels that take ``R`` as a product."""
        return self.matrix().contiguous()

    @functools.cached_property
    def hadamard_column_scale(self) -> torch.Tensor:
        """float32 ``s / sqrt(D)`` ``[D]`` of a randomized Hadamard rotation, ``R = H diag(s) / sqrt(D)``
        with ``H`` the Sylvester matrix and ``s`` the stored signs; computed once per object."""
        if self.kind != "hadamard":
            raise ValueError(f"hadamard_column_scale of a {self.kind!r} rotation (allowed: 'hadamard')")
        return (self.stored.float() / math.sqrt(self.dim)).contiguous()

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"tensor has last dim {x.shape[-1]}; this rotation acts on dim {self.dim}")


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last axis (Sylvester order).

    ``x``: ``[..., D]`` float, ``D`` a power of two. Returns ``x @ H`` (``H`` symmetric, ``H H = D I``),
    same shape and dtype, in ``log2(D)`` butterfly passes.
    """
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ValueError(f"Walsh-Hadamard transform needs a power-of-two last dim; got {d}")
    lead = x.shape[:-1]
    h = 1
    while h < d:
        pairs = x.reshape(*lead, d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, d)
        h *= 2
    return x


def rotation(kind: str, dim: int, seed: int = 0, device: torch.device | str = "cpu") -> Rotation:
    """The rotation of ``kind`` for ``dim`` drawn from ``seed``, cached per ``(kind, dim, seed, device)``.

    Raises:
        ValueError: unknown ``kind``, ``dim`` not positive, or ``kind="hadamard"`` with a
            non-power-of-two ``dim``.
    """
    check_choice("kind", kind, ROTATION_KINDS)
    check_positive_int("dim", dim)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise allowed("seed", seed, "an integer")
    if kind == "hadamard" and not is_power_of_two(dim):
        raise ValueError(
            f"dim={dim} is not a power of two: the Hadamard rotation needs one; "
            "use kind='orthogonal' (preconditioner/rotation='orthogonal') for other head dims"
        )
    return _cached(kind, dim, seed, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _cached(kind: str, dim: int, seed: int, device: str) -> Rotation:
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        signs = torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8) * 2 - 1
        stored = signs.to(torch.int8)
    else:
        gaussian = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        stored = (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(torch.float32)
    return Rotation(kind=kind, dim=dim, seed=seed, stored=stored.to(device))
