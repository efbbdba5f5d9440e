"""PolarQuant-Recursive (Han et al. 2025, arXiv 2502.02617): random preconditioning, a recursive polar
transform, and angle codebooks fitted to the angles' known distributions.

For every head vector ``x`` (``D`` a multiple of ``2**levels``):

1. ``y = R x`` with a shared seeded rotation ``R`` (``preconditioner``: randomized Hadamard, or a
   dense random orthogonal matrix for any ``D``); afterwards the coordinates behave like i.i.d.
   Gaussians scaled by ``||x||``.
2. Level 1 pairs ``(y[2i], y[2i+1])`` into an angle ``atan2(y[2i+1], y[2i])`` in ``[0, 2 pi)`` and a
   radius; level ``l >= 2`` pairs neighbouring level-``(l-1)`` radii ``(a, b)`` into
   ``atan2(b, a)`` in ``[0, pi/2]`` and ``sqrt(a^2 + b^2)``. ``D / 2**levels`` radii remain.
3. Level-``l`` angles are coded with ``bits[l-1]`` bits against a codebook: ``"analytic"`` =
   Lloyd-Max on the level's density for Gaussian input (uniform, then ``sin(2 psi)^(2^(l-1)-1)``),
   a layer-wide constant; ``"online"`` = 1-D k-means on the tensor's own angles, one codebook per
   level per leading index (batch, head), stored with the tensor and counted.
4. The remaining radii are kept in the input dtype (16 bits for float16/bfloat16 as in the paper;
   float32 input keeps float32 radii, 32 bits, counted as such), or with ``radius_bits=b`` (beyond
   the paper) as ``b``-bit codes of ``log(radius)``, min-max per token (min and scale stored in the
   input dtype: ``2 x 16`` bits per token).

Reconstruction is the exact inverse transform, so ``||x_hat|| = ||stored radii||``: the norm is
kept up to the radii's precision. Defaults (4 levels, bits ``(4, 2, 2, 2)``, 16-bit radii) give
``4/2 + 2/4 + 2/8 + 2/16 + 16/16 = 3.875`` bits per element at any ``D`` divisible by 16 whose
power of two ``D >= 16``.

Stored layout (``PolarRecursiveTensor``), per token: ``codes`` uint8 is one dense little-endian bit
stream of every angle code, levels in order ``1..levels``, angles in order within a level; angle
``i`` of level ``l`` occupies bits ``[o_l + i * bits[l-1], o_l + (i + 1) * bits[l-1])`` with
``o_l = sum_{l' < l} (D / 2**l') * bits[l'-1]`` (``ceil(total / 8)`` bytes per token; for one level
this is exactly ``pack_bits(codes, bits[0])``). ``scores`` rotates the query once and
multiplies it with keys rebuilt in the rotated domain from codebook values (keys are never
un-rotated); ``weighted_sum`` accumulates in the rotated domain and un-rotates the output once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from kvpolar.kernels import triton_available
from kvpolar.packing import pack_bits, unpack_bits
from kvpolar.quantized import KEPT, QuantizedTensor, quantized_tensor_class, shared, stored, tokens_contiguous
from kvpolar.quantizers import uniform
from kvpolar.quantizers.base import Quantizer
from kvpolar.quantizers.codebooks import boundaries_of, kmeans_1d, lloyd_max, nearest, polar_angle_density
from kvpolar.quantizers.rotations import ROTATION_KINDS, Rotation, is_power_of_two, rotation
from kvpolar.registry import register
from kvpolar.validation import allowed, check_choice, check_positive_int

CODEBOOKS = ("analytic", "online")
PAPER_BITS = (4, 2)  # level 1, then every later level
KMEANS_ITERATIONS = 25


@dataclasses.dataclass(frozen=True)
class PolarRecursiveConfig:
    """``levels`` polar levels; ``bits[l-1]`` angle bits at level ``l`` (default: 4, then 2 each);
    ``radius_bits``: None = radii in the input dtype (the paper), or 1..8 bits per log-radius."""

    levels: int = 4
    bits: tuple[int, ...] | None = None
    codebook: str = "analytic"
    preconditioner: str = "hadamard"
    seed: int = 0
    radius_bits: int | None = None

    def __post_init__(self) -> None:
        check_positive_int("levels", self.levels)
        bits = self.bits
        if bits is None:
            bits = (PAPER_BITS[0],) + (PAPER_BITS[1],) * (self.levels - 1)
        if not isinstance(bits, (tuple, list)):
            raise allowed("bits", bits, f"a tuple of {self.levels} integers 1..8 (one per level)")
        bits = tuple(bits)
        if len(bits) != self.levels:
            raise ValueError(
                f"bits={bits!r} has {len(bits)} entries; levels={self.levels} needs one per level"
            )
        for b in bits:
            if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 8:
                raise allowed("bits", bits, "integers 1..8, one per level")
        object.__setattr__(self, "bits", bits)
        check_choice("codebook", self.codebook, CODEBOOKS)
        check_choice("preconditioner", self.preconditioner, ROTATION_KINDS)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise allowed("seed", self.seed, "an integer")
        rb = self.radius_bits
        if rb is not None and (not isinstance(rb, int) or isinstance(rb, bool) or not 1 <= rb <= 8):
            raise allowed("radius_bits", rb, "None (radii in the input dtype) or integers 1..8")


@quantized_tensor_class
class PolarRecursiveTensor(QuantizedTensor):
    """Polar-recursive keys or values; ``m = D / 2**levels`` radii per token.

    codes: uint8 ``[..., T, ceil(sum_l D/2^l * bits[l-1] / 8)]``, one bit stream over all levels.
    radii: ``[..., T, m]`` input dtype (``[..., T, 0]`` when ``radius_bits`` is set).
    (codes and radii of the setting the fused kernel reads by parts, ``decode_formats.reads_by_parts``,
    are laid out with consecutive tokens adjacent, ``[..., bytes, T]`` / ``[..., m, T]`` in memory.)
    radius_codes: uint8 ``[..., T, ceil(m * radius_bits / 8)]`` (``[..., T, 0]`` otherwise).
    radius_scale, radius_min: ``[..., T, 1]`` input dtype, log-radius grid (``[..., T, 0]`` otherwise).
    codebooks: float32 ``[..., sum_l 2^bits[l-1]]`` online codebooks per leading index (``[0]`` when
        analytic). rotation: the shared preconditioner (int8 signs ``[D]`` or float32 ``[D, D]``).
    analytic_codebooks: float32 ``[sum_l 2^bits[l-1]]`` shared constants (``[0]`` when online).
    """

    codes: torch.Tensor = stored(token_axis=-2, tokens_contiguous=KEPT)
    radii: torch.Tensor = stored(token_axis=-2, tokens_contiguous=KEPT)
    radius_codes: torch.Tensor = stored(token_axis=-2)
    radius_scale: torch.Tensor = stored(token_axis=-2)
    radius_min: torch.Tensor = stored(token_axis=-2)
    codebooks: torch.Tensor = stored(token_axis=None)
    rotation: torch.Tensor = shared()
    analytic_codebooks: torch.Tensor = shared()
    levels: int = 4
    bits: tuple[int, ...] = (4, 2, 2, 2)
    codebook: str = "analytic"
    preconditioner: str = "hadamard"
    seed: int = 0
    radius_bits: int | None = None


# ----- the transform ---------------------------------------------------------------------------
def polar_transform(y: torch.Tensor, levels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Recursive polar transform of ``y`` ``[..., D]`` (float32/64).

    Returns ``angles`` (level ``l``: ``[..., D / 2**l]``; level 1 in ``[0, 2 pi)``, later levels in
    ``[0, pi/2]``) and the remaining radii ``[..., D / 2**levels]``.
    """
    pairs = y.unflatten(-1, (-1, 2))
    angle = torch.atan2(pairs[..., 1], pairs[..., 0])
    angles = [torch.where(angle < 0, angle + 2 * math.pi, angle)]
    radii = torch.linalg.vector_norm(pairs, dim=-1)
    for _ in range(levels - 1):
        pairs = radii.unflatten(-1, (-1, 2))
        angles.append(torch.atan2(pairs[..., 1], pairs[..., 0]))
        radii = torch.linalg.vector_norm(pairs, dim=-1)
    return angles, radii


def inverse_polar_transform(angles: list[torch.Tensor], radii: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`polar_transform`: ``[..., D]`` from the angles and radii."""
    for angle in reversed(angles):
        radii = torch.stack((radii * torch.cos(angle), radii * torch.sin(angle)), dim=-1).flatten(-2)
    return radii


@functools.lru_cache(maxsize=64)
def analytic_codebooks(bits: tuple[int, ...], device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Lloyd-Max codebook per level (float32 ``[2**bits[l-1]]``) for Gaussian-input angle densities."""
    return tuple(
        lloyd_max(polar_angle_density(level), b).centroids.to(device, torch.float32)
        for level, b in enumerate(bits, start=1)
    )


class PolarRecursive(Quantizer):
    name = "polar-recursive"
    Config = PolarRecursiveConfig
    stored_type = PolarRecursiveTensor
    stored_params = {name: name for name in ("levels", "bits", "codebook", "preconditioner", "seed", "radius_bits")}
    dequantize_kernel = True

    config: PolarRecursiveConfig

    def check_head_dim(self, head_dim: int) -> None:
        c = self.config
        if c.preconditioner == "hadamard" and not is_power_of_two(head_dim):
            raise ValueError(
                f"head dim {head_dim} is not a power of two: preconditioner='hadamard' needs one; "
                "use preconditioner='orthogonal'"
            )
        if 2**c.levels > head_dim:
            raise ValueError(
                f"levels={c.levels} exceeds log2(head dim {head_dim}) = {math.log2(head_dim):.3g}; "
                f"allowed: 1..{int(math.log2(head_dim))}"
            )
        if head_dim % 2**c.levels:
            raise ValueError(
                f"head dim {head_dim} is not divisible by 2**levels = {2**c.levels} (levels={c.levels}); "
                "pick fewer levels"
            )

    def shared_nbytes(self, head_dim: int) -> int:
        """The preconditioner (signs or matrix) plus the analytic codebooks (float32)."""
        self.check_head_dim(head_dim)
        c = self.config
        books = 4 * sum(2**b for b in c.bits) if c.codebook == "analytic" else 0
        return rotation(c.preconditioner, head_dim, c.seed).nbytes + books

    # ----- encode -----------------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor) -> PolarRecursiveTensor:
        c = self.config
        d, lead = x.shape[-1], x.shape[:-2]
        rot = rotation(c.preconditioner, d, c.seed, x.device)
        angles, radii = polar_transform(rot.apply(x), c.levels)
        fixed = analytic_codebooks(c.bits, str(x.device))
        if c.codebook == "online":
            books = [kmeans_1d(a.reshape(*lead, -1), book, KMEANS_ITERATIONS) for a, book in zip(angles, fixed)]
        else:
            books = list(fixed)
        level_codes = [
            nearest(angle.reshape(*lead, -1), boundaries_of(book)).reshape(angle.shape)
            for angle, book in zip(angles, books)
        ]
        empty = x.new_empty(*x.shape[:-1], 0)
        radius_fields = {"radii": radii.to(x.dtype), "radius_codes": empty.to(torch.uint8),
                         "radius_scale": empty, "radius_min": empty}
        if c.radius_bits is not None:
            radius_fields = _encode_log_radii(radii, c.radius_bits, x.dtype)
        online = torch.cat(books, dim=-1) if c.codebook == "online" else torch.empty(0, device=x.device)
        codes = pack_levels(level_codes, c.bits)
        from kvpolar.kernels.decode_formats import reads_by_parts  # (here: it imports the quantizers' rotations)

        if c.radius_bits is None and reads_by_parts(c.levels, c.bits, d, c.codebook):
            # one vector per code byte / radius over consecutive tokens: whole words the decode
            # kernel's pipeliner copies ahead (row-major rows of 46 bytes allow only byte loads)
            codes, radius_fields["radii"] = tokens_contiguous(codes), tokens_contiguous(radius_fields["radii"])
        return PolarRecursiveTensor(
            shape=x.shape, dtype=x.dtype, codes=codes, **radius_fields,
            codebooks=online, rotation=rot.stored,
            analytic_codebooks=torch.cat(fixed) if c.codebook == "analytic" else torch.empty(0, device=x.device),
            levels=c.levels, bits=c.bits, codebook=c.codebook, preconditioner=c.preconditioner,
            seed=c.seed, radius_bits=c.radius_bits,
        )

    # ----- decode -----------------------------------------------------------------------------
    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, PolarRecursiveTensor)
        return _rotation_of(p).inverse(decode_rotated(p)).to(p.dtype)

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, PolarRecursiveTensor)
        if q.is_cuda and triton_available() and is_power_of_two(p.head_dim):
            from kvpolar.kernels.polar_recursive_scores import polar_recursive_scores

            return polar_recursive_scores(q, p)  # reads the packed codes; 28x the reference on an H100
        return rotated_scores(q, p)

    def _weighted_sum(self, weights: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, PolarRecursiveTensor)
        return rotated_weighted_sum(weights, p)


def code_bits_per_token(head_dim: int, bits: tuple[int, ...]) -> int:
    """Angle-code bits per token: ``sum_l (D / 2**l) * bits[l-1]``."""
    return sum((head_dim >> level) * b for level, b in enumerate(bits, start=1))


def pack_levels(level_codes: list[torch.Tensor], bits: tuple[int, ...]) -> torch.Tensor:
    """Concatenate every level's codes (level ``l``: ``[..., D / 2**l]``, ``bits[l-1]`` bits each)
    into one little-endian bit stream per token, packed into ``ceil(total / 8)`` uint8 bytes."""
    streams = []
    for codes, b in zip(level_codes, bits):
        shifts = torch.arange(b, device=codes.device)
        streams.append(((codes.unsqueeze(-1) >> shifts) & 1).flatten(-2))
    return pack_bits(torch.cat(streams, dim=-1), 1, check_range=False)  # (single bits)


def unpack_levels(packed: torch.Tensor, bits: tuple[int, ...], head_dim: int) -> list[torch.Tensor]:
    """Inverse of :func:`pack_levels`: uint8 codes per level, ``[..., T, D / 2**l]``."""
    stream = unpack_bits(packed, 1, code_bits_per_token(head_dim, bits))
    out, offset = [], 0
    for level, b in enumerate(bits, start=1):
        n = head_dim >> level
        chunk = stream[..., offset : offset + n * b].unflatten(-1, (n, b)).to(torch.int32)
        shifts = torch.arange(b, device=packed.device, dtype=torch.int32)
        out.append((chunk << shifts).sum(-1).to(torch.uint8))
        offset += n * b
    return out


def _encode_log_radii(radii: torch.Tensor, bits: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Min-max ``bits``-bit codes of ``log(radius)`` per token (radii below 1e-6 of the token's
    largest are clamped there, so one zero radius does not spread the grid)."""
    floor = radii.amax(-1, keepdim=True) * 1e-6 + torch.finfo(torch.float32).tiny
    log_r = torch.log(torch.maximum(radii, floor))
    scale, minimum = uniform.minmax_scale(log_r.amin(-1, keepdim=True), log_r.amax(-1, keepdim=True), bits, dtype)
    codes = uniform.encode(log_r, scale, minimum, bits)
    return {"radii": radii.new_empty(*radii.shape[:-1], 0).to(dtype),
            "radius_codes": pack_bits(codes, bits, check_range=False),  # (clamped by encode)
            "radius_scale": scale, "radius_min": minimum}


def _rotation_of(p: PolarRecursiveTensor) -> Rotation:
    return Rotation(kind=p.preconditioner, dim=p.head_dim, seed=p.seed, stored=p.rotation)


def decoded_angles(p: PolarRecursiveTensor) -> list[torch.Tensor]:
    """Codebook value of every stored angle: level ``l`` ``[..., T, D / 2**l]`` float32."""
    lead, d, tokens = p.shape[:-2], p.head_dim, p.num_tokens
    books = p.codebooks if p.codebook == "online" else p.analytic_codebooks
    angles, entry = [], 0
    for codes, b in zip(unpack_levels(p.codes, p.bits, d), p.bits):
        codes = codes.long()
        n = codes.shape[-1]
        book = books[..., entry : entry + 2**b]
        if p.codebook == "online":
            flat = codes.reshape(*lead, tokens * n)
            angles.append(torch.gather(book, -1, flat).reshape(codes.shape))
        else:
            angles.append(book[codes])
        entry += 2**b
    return angles


def decoded_radii(p: PolarRecursiveTensor) -> torch.Tensor:
    """The remaining radii ``[..., T, D / 2**levels]`` float32."""
    if p.radius_bits is None:
        return p.radii.float()
    m = p.head_dim >> p.levels
    codes = unpack_bits(p.radius_codes, p.radius_bits, m)
    return torch.exp(uniform.decode(codes, p.radius_scale, p.radius_min))


def decode_rotated(p: PolarRecursiveTensor) -> torch.Tensor:
    """Reconstruction in the rotated domain, ``R x_hat``: ``[..., T, D]`` float32."""
    return inverse_polar_transform(decoded_angles(p), decoded_radii(p))


def rotated_scores(q: torch.Tensor, p: PolarRecursiveTensor) -> torch.Tensor:
    """``q @ x_hat^T`` as ``(R q) @ (R x_hat)^T``: the query is rotated once, keys stay rotated.

    q: ``[..., Tq, D]`` (leading shape of ``p``); returns ``[..., Tq, T]`` float32.
    """
    q_rot = _rotation_of(p).apply(q)
    return q_rot @ decode_rotated(p).transpose(-1, -2)


def rotated_weighted_sum(weights: torch.Tensor, p: PolarRecursiveTensor) -> torch.Tensor:
    """``weights @ x_hat`` as ``R^T (weights @ R x_hat)``: one inverse rotation of the output.

    weights: ``[..., Tq, T]``; returns ``[..., Tq, D]`` float32.
    """
    return _rotation_of(p).inverse(weights.float() @ decode_rotated(p))


register(PolarRecursive)
