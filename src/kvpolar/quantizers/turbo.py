"""``"turbo"``: rotation + per-coordinate Lloyd-Max, the TurboQuant-MSE scheme serving engines ship
(Zandieh et al., arXiv 2504.19874; vLLM's ``turboquant_*`` key presets). Baseline of issue 10.

For every head vector ``x``: ``y = R x`` with a shared seeded rotation (``"hadamard"``: random signs
+ fast Walsh-Hadamard, power-of-two ``D``; ``"orthogonal"``: dense random orthogonal, any ``D``);
the norm ``||x||`` is stored in float16 (16 bits per vector, whatever the input dtype); each
coordinate of the unit vector ``y / ||x||`` gets the code of its nearest centroid in the Lloyd-Max
codebook of one coordinate of a uniformly random unit vector in ``R^D`` (density proportional to
``(1 - t^2)^((D - 3) / 2)`` on ``[-1, 1]``; computed once per ``(D, bits)``, no data). Codes are
packed densely along ``D``: ``bits + 16 / D`` bits per element exactly (for ``D * bits`` a multiple
of 8).

Reconstruction in the rotated domain is ``scale * c`` with ``c`` the codeword vector and ``scale``
the stored float16 factor: ``||x||``, or with ``norm_correction=True`` ``||x|| / ||c||`` (divided once
when quantizing, nothing extra stored), so the reconstructed vector has the norm of ``x``. ``scores`` rotates the query once; ``weighted_sum``
accumulates in the rotated domain and un-rotates the output once.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from kvpolar.packing import pack_bits, unpack_bits
from kvpolar.quantized import QuantizedTensor, quantized_tensor_class, shared, stored
from kvpolar.quantizers.base import Quantizer
from kvpolar.quantizers.codebooks import lloyd_max, nearest, sphere_coordinate_density
from kvpolar.quantizers.rotations import ROTATION_KINDS, Rotation, is_power_of_two, rotation
from kvpolar.registry import register
from kvpolar.validation import allowed, check_choice

TURBO_BITS = (1, 2, 3, 4)
FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclasses.dataclass(frozen=True)
class TurboConfig:
    bits: int = 3
    rotation: str = "hadamard"
    seed: int = 0
    norm_correction: bool = True

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, TURBO_BITS)
        check_choice("rotation", self.rotation, ROTATION_KINDS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise allowed("seed", self.seed, "an integer")
        check_choice("norm_correction", self.norm_correction, (True, False))


@quantized_tensor_class
class TurboTensor(QuantizedTensor):
    """codes: uint8 ``[..., T, ceil(D * bits / 8)]``; norms: float16 ``[..., T, 1]``, the factor on the
    codeword vector (``||x||``, or ``||x|| / ||c||`` under ``norm_correction``);
    rotation (shared): int8 signs ``[D]`` or float32 ``[D, D]``; codebook (shared): float32 ``[2**bits]``."""

    codes: torch.Tensor = stored(token_axis=-2)
    norms: torch.Tensor = stored(token_axis=-2)
    rotation: torch.Tensor = shared()
    codebook: torch.Tensor = shared()
    bits: int = 3
    rotation_kind: str = "hadamard"
    seed: int = 0
    norm_correction: bool = True


@functools.lru_cache(maxsize=64)
@functools.lru_cache(maxsize=64)
def sphere_codebook(head_dim: int, bits: int, device: str = "cpu") -> torch.Tensor:
    """Lloyd-Max centroids ``[2**bits]`` float32 for one coordinate of a random unit vector in R^D
    (one tensor per arguments, shared by every ``TurboTensor`` made with them: read-only)."""
    return lloyd_max(sphere_coordinate_density(head_dim), bits).centroids.to(device, torch.float32)


@functools.lru_cache(maxsize=64)
def _sphere_boundaries(head_dim: int, bits: int, device: str) -> torch.Tensor:
    return lloyd_max(sphere_coordinate_density(head_dim), bits).boundaries.to(device, torch.float32)


class Turbo(Quantizer):
    name = "turbo"
    Config = TurboConfig
    stored_type = TurboTensor
    stored_params = {"bits": "bits", "rotation": "rotation_kind", "seed": "seed", "norm_correction": "norm_correction"}
    dequantize_kernel = True

    config: TurboConfig

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim < 2:
            raise ValueError(f"head dim {head_dim} is not supported; allowed: >= 2")
        if self.config.rotation == "hadamard" and not is_power_of_two(head_dim):
            raise ValueError(
                f"head dim {head_dim} is not a power of two: rotation='hadamard' needs one; "
                "use rotation='orthogonal'"
            )

    def shared_nbytes(self, head_dim: int) -> int:
        """The rotation (signs or matrix) plus the float32 codebook."""
        self.check_head_dim(head_dim)
        return rotation(self.config.rotation, head_dim, self.config.seed).nbytes + 4 * 2**self.config.bits

    def _quantize(self, x: torch.Tensor) -> TurboTensor:
        c = self.config
        d = x.shape[-1]
        rot = rotation(c.rotation, d, c.seed, x.device)
        y = rot.apply(x)
        norm = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
        unit = y / norm.clamp_min(torch.finfo(torch.float32).tiny)
        codes = nearest(unit, _sphere_boundaries(d, c.bits, str(x.device)))
        codebook = sphere_codebook(d, c.bits, str(x.device))
        scale = norm
        if c.norm_correction:  # the codeword vector's own norm, divided out once here
            scale = norm / torch.linalg.vector_norm(codebook[codes.long()], dim=-1, keepdim=True)
        if scale.numel() and float(scale.max()) > FP16_MAX:
            raise ValueError(
                f"a vector norm of {float(norm.max()):.4g} (stored factor {float(scale.max()):.4g}) exceeds "
                f"the float16 range ({FP16_MAX:.0f}) turbo stores its factors in; rescale the input"
            )
        return TurboTensor(
            shape=x.shape, dtype=x.dtype, codes=pack_bits(codes, c.bits, check_range=False),  # (codebook indices)
            norms=scale.to(torch.float16),
            rotation=rot.stored, codebook=codebook,
            bits=c.bits, rotation_kind=c.rotation, seed=c.seed, norm_correction=c.norm_correction,
        )

    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, TurboTensor)
        return _rotation_of(p).inverse(decode_rotated(p)).to(p.dtype)

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, TurboTensor)
        return rotated_scores(q, p)

    def _weighted_sum(self, weights: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, TurboTensor)
        return _rotation_of(p).inverse(weights.float() @ decode_rotated(p))


def _rotation_of(p: TurboTensor) -> Rotation:
    return Rotation(kind=p.rotation_kind, dim=p.head_dim, seed=p.seed, stored=p.rotation)


def token_scale(p: TurboTensor) -> torch.Tensor:
    """Per-token factor ``[..., T, 1]`` float32 on the codeword vector (the stored ``norms``)."""
    return p.norms.float()


def decode_rotated(p: TurboTensor) -> torch.Tensor:
    """Reconstruction in the rotated domain, ``R x_hat``: ``[..., T, D]`` float32."""
    codewords = p.codebook[unpack_bits(p.codes, p.bits, p.head_dim).long()]
    return codewords * token_scale(p)


def rotated_scores(q: torch.Tensor, p: TurboTensor) -> torch.Tensor:
    """``(R q) @ (R x_hat)^T`` from codebook values: ``[..., Tq, D]`` -> ``[..., Tq, T]`` float32.

    Per token this is ``scale_t * sum_d (R q)_d c[code_td]``: the query is rotated once and keys
    are never un-rotated (a kernel would look the products up per code).
    """
    codewords = p.codebook[unpack_bits(p.codes, p.bits, p.head_dim).long()]
    raw = _rotation_of(p).apply(q) @ codewords.transpose(-1, -2)
    return raw * token_scale(p).transpose(-1, -2)


register(Turbo)
