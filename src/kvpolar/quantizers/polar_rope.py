"""``"polar-rope"``: PolarQuant-RoPE (Wu et al. 2025): keys quantized as radius and angle per RoPE pair.

For pair ``j`` of a key (``pairing="half"``: channels ``j`` and ``j + D/2``, the Hugging Face
``rotate_half`` layout; ``"interleaved"``: ``2j`` and ``2j + 1``, GPT-J), ``r = sqrt(x^2 + y^2)`` and
``theta = atan2(y, x)`` in ``[0, 2*pi)``. Each (group of ``group_size`` tokens, pair) keeps a min-max
range of ``r`` (``radius_bits``) and of ``theta`` (``angle_bits``); codes are round-to-nearest levels.

Angle range per (group, pair), ``angle_range``:

* ``"minmax"`` (the paper's reference code): ``[min theta, max theta]`` over ``[0, 2*pi)``. A group
  whose angles straddle 0 / 2*pi gets a range of nearly ``2*pi`` even if its angles span a small arc.
* ``"shortest-arc"``: the smallest arc covering every angle of the group (start = the angle after the
  largest gap between sorted angles). ``angle_min`` may then be negative (it is shifted into
  ``[-pi, pi)``) and ``angle_min + levels * angle_scale`` may pass ``2*pi``: reconstruction
  ``cos/sin(angle_min + code * angle_scale)`` needs no modulo either way. The default: on synthetic
  RoPE keys it lowers key error at the same bits (figures in ``benchmarks/README.md``).

Stored (:class:`PolarRopeTensor`): per pair the combined ``radius_bits + angle_bits``-bit code
``(radius_code << angle_bits) | angle_code``, packed densely along the pair axis; four metadata numbers
per (group, pair) in the input dtype. Bits per element for 16-bit input:
``(radius_bits + angle_bits) / 2 + 64 / (2 * group_size)`` (3.25 for r2a4, G=128).

Scores ``q . k = sum_j r_j (qx_j cos theta_j + qy_j sin theta_j)`` are computed by table lookup
(:func:`table_scores`, the reference) or, on CUDA, by the Triton kernel
:mod:`kvpolar.kernels.polar_rope_scores`; CUDA quantization uses :mod:`kvpolar.kernels.polar_rope_encode`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kvpolar.kernels import triton_available
from kvpolar.packing import MAX_BITS, pack_bits, unpack_bits
from kvpolar.quantized import QuantizedTensor, quantized_tensor_class, stored
from kvpolar.quantizers import uniform
from kvpolar.quantizers.base import Quantizer
from kvpolar.registry import register
from kvpolar.validation import allowed, check_choice, check_positive_int

PAIRINGS = ("half", "interleaved")
ANGLE_RANGES = ("minmax", "shortest-arc")
TWO_PI = 2 * math.pi


@dataclasses.dataclass(frozen=True)
class PolarRopeConfig:
    """radius_bits, angle_bits: >= 1 each, sum <= 8 (both codes of a pair share one byte)."""

    radius_bits: int = 2
    angle_bits: int = 4
    group_size: int = 128
    pairing: str = "half"
    angle_range: str = "shortest-arc"

    def __post_init__(self) -> None:
        check_positive_int("radius_bits", self.radius_bits)
        check_positive_int("angle_bits", self.angle_bits)
        if self.radius_bits + self.angle_bits > MAX_BITS:
            raise allowed(
                "radius_bits + angle_bits", self.radius_bits + self.angle_bits,
                f"at most {MAX_BITS} (radius_bits={self.radius_bits}, angle_bits={self.angle_bits})",
            )
        check_positive_int("group_size", self.group_size)
        check_choice("pairing", self.pairing, PAIRINGS)
        check_choice("angle_range", self.angle_range, ANGLE_RANGES)


@quantized_tensor_class
class PolarRopeTensor(QuantizedTensor):
    """Polar-quantized keys.

    codes: uint8 ``[..., T, ceil((D/2) * (radius_bits + angle_bits) / 8)]``;
    radius_scale, radius_min, angle_scale, angle_min: ``[..., ceil(T/G), D/2]`` in the input dtype.
    """

    codes: torch.Tensor = stored(token_axis=-2)
    radius_scale: torch.Tensor = stored(token_axis=-2)
    radius_min: torch.Tensor = stored(token_axis=-2)
    angle_scale: torch.Tensor = stored(token_axis=-2)
    angle_min: torch.Tensor = stored(token_axis=-2)
    radius_bits: int = 2
    angle_bits: int = 4
    group_size: int = 128
    pairing: str = "half"
    angle_range: str = "shortest-arc"

    @property
    def token_group(self) -> int:  # type: ignore[override]
        return self.group_size

    @property
    def code_bits(self) -> int:
        return self.radius_bits + self.angle_bits


# ----- pairs and polar coordinates --------------------------------------------------------------
def split_pairs(x: torch.Tensor, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., D]`` -> the two coordinates of each RoPE pair, ``[..., D/2]`` each."""
    if pairing == "half":
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def merge_pairs(px: torch.Tensor, py: torch.Tensor, pairing: str) -> torch.Tensor:
    """Inverse of :func:`split_pairs`: two ``[..., D/2]`` tensors -> ``[..., D]``."""
    if pairing == "half":
        return torch.cat([px, py], dim=-1)
    return torch.stack([px, py], dim=-1).flatten(-2)


def to_polar(px: torch.Tensor, py: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 radius and angle in ``[0, 2*pi]`` (``2*pi`` only by float rounding of tiny negatives)."""
    r = torch.sqrt(px * px + py * py)
    theta = torch.atan2(py, px)
    return r, torch.where(theta < 0, theta + TWO_PI, theta)


def angle_span(theta: torch.Tensor, angle_range: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Range of angles per group and the angles placed in it.

    Args:
        theta: ``[..., n_groups, G, P]`` float32 in ``[0, 2*pi]``.
    Returns:
        ``lo, hi``: ``[..., n_groups, P]`` float32; ``unwrapped``: ``theta`` shifted by a multiple of
        ``2*pi`` into ``[lo, hi]`` (``theta`` itself for ``"minmax"``).
    """
    if angle_range == "minmax":
        return theta.amin(-2), theta.amax(-2), theta
    # Shortest arc: it starts at the angle after the largest gap between sorted angles (the wrap-around
    # gap included). The span is then measured from that start exactly as the Triton encoder does.
    ordered, order = theta.sort(dim=-2)
    gaps = torch.cat([ordered[..., 1:, :] - ordered[..., :-1, :], ordered[..., :1, :] + TWO_PI - ordered[..., -1:, :]], dim=-2)
    after_gap = (gaps.argmax(dim=-2, keepdim=True) + 1) % theta.shape[-2]
    start = order.gather(-2, after_gap).squeeze(-2)
    lo = theta.gather(-2, start.unsqueeze(-2)).squeeze(-2)
    d = theta - lo.unsqueeze(-2)
    d = torch.where(d < 0, d + TWO_PI, d)
    span = d.amax(-2)
    unwrapped = lo.unsqueeze(-2) + d
    shift = torch.where(lo >= math.pi, TWO_PI, 0.0)  # keep |angle_min| <= pi: finer 16-bit rounding
    return lo - shift, (lo + span) - shift, unwrapped - shift.unsqueeze(-2)


# ----- quantize / dequantize ---------------------------------------------------------------------
def quantize_polar(
    x: torch.Tensor, radius_bits: int, angle_bits: int, group_size: int, pairing: str, angle_range: str
) -> PolarRopeTensor:
    """PyTorch reference quantizer: ``x`` ``[..., T, D]`` (D even) -> :class:`PolarRopeTensor`."""
    tokens, dim = x.shape[-2], x.shape[-1]
    px, py = split_pairs(x.float(), pairing)
    r, theta = to_polar(px, py)
    n_groups = math.ceil(tokens / group_size)

    def grouped(t: torch.Tensor) -> torch.Tensor:
        t = uniform.pad_to_multiple(t, group_size, dim=-2)
        return t.reshape(*t.shape[:-2], n_groups, group_size, dim // 2)

    r, theta = grouped(r), grouped(theta)
    r_scale, r_min = uniform.minmax_scale(r.amin(-2), r.amax(-2), radius_bits, x.dtype)
    lo, hi, unwrapped = angle_span(theta, angle_range)
    a_scale, a_min = uniform.minmax_scale(lo, hi, angle_bits, x.dtype)
    rc = uniform.encode(r, r_scale.unsqueeze(-2), r_min.unsqueeze(-2), radius_bits).int()
    ac = uniform.encode(unwrapped, a_scale.unsqueeze(-2), a_min.unsqueeze(-2), angle_bits).int()
    code = ((rc << angle_bits) | ac).flatten(-3, -2)[..., :tokens, :]
    return PolarRopeTensor(
        shape=x.shape, dtype=x.dtype,
        codes=pack_bits(code, radius_bits + angle_bits, check_range=False),  # (both fields clamped)
        radius_scale=r_scale, radius_min=r_min, angle_scale=a_scale, angle_min=a_min,
        radius_bits=radius_bits, angle_bits=angle_bits, group_size=group_size, pairing=pairing,
        angle_range=angle_range,
    )


def unpack_codes(p: PolarRopeTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radius and angle codes, uint8 ``[..., T, D/2]`` each."""
    codes = unpack_bits(p.codes, p.code_bits, p.head_dim // 2)
    return codes >> p.angle_bits, codes & ((1 << p.angle_bits) - 1)


def expand_groups(meta: torch.Tensor, group_size: int, tokens: int) -> torch.Tensor:
    """``[..., ceil(T/G), P]`` per-group metadata -> ``[..., T, P]`` per token."""
    return meta.repeat_interleave(group_size, dim=-2)[..., :tokens, :]


def decode_polar(p: PolarRopeTensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded radius and angle ``[..., T, D/2]`` (computed in ``dtype``: float32, or float64 for tests)."""
    rc, ac = unpack_codes(p)
    t = p.num_tokens

    def meta(m: torch.Tensor) -> torch.Tensor:
        return expand_groups(m, p.group_size, t).to(dtype)

    r = meta(p.radius_min) + rc.to(dtype) * meta(p.radius_scale)
    theta = meta(p.angle_min) + ac.to(dtype) * meta(p.angle_scale)
    return r, theta


def dequantize_polar(p: PolarRopeTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstructed keys ``[..., T, D]`` in ``dtype`` (not rounded to the input dtype)."""
    r, theta = decode_polar(p, dtype)
    return merge_pairs(r * torch.cos(theta), r * torch.sin(theta), p.pairing)


# ----- scores by table lookup --------------------------------------------------------------------
def table_scores(q: torch.Tensor, p: PolarRopeTensor) -> torch.Tensor:
    """``q @ k^T`` against polar keys by table lookup, never rebuilding the keys (reference).

    Per (group, query, pair) a table over the ``2**angle_bits`` angle levels,
    ``T[a] = qx cos(theta_a) + qy sin(theta_a)``; a key's score is
    ``sum_j r_j * T_j[angle_code_j]`` with ``r_j`` the decoded radius.

    Args:
        q: ``[..., Tq, D]`` float, leading shape of ``p``; p: ``[..., T, D]``.
    Returns:
        ``[..., Tq, T]`` float32.
    """
    tokens, g = p.num_tokens, p.group_size
    n_groups = math.ceil(tokens / g)
    qx, qy = split_pairs(q.float(), p.pairing)  # [..., Tq, P]
    levels = torch.arange(1 << p.angle_bits, device=q.device, dtype=torch.float32)
    theta = p.angle_min.float().unsqueeze(-2) + levels[:, None] * p.angle_scale.float().unsqueeze(-2)
    cos, sin = torch.cos(theta).unsqueeze(-3), torch.sin(theta).unsqueeze(-3)  # [..., ng, 1, A, P]
    table = qx[..., None, :, None, :] * cos + qy[..., None, :, None, :] * sin  # [..., ng, Tq, A, P]
    rc, ac = unpack_codes(p)

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [..., T, P] -> [..., ng, 1, G, P]
        t = uniform.pad_to_multiple(t, g, dim=-2)
        return t.reshape(*t.shape[:-2], n_groups, 1, g, t.shape[-1])

    index = grouped(ac).long().expand(*table.shape[:-2], g, table.shape[-1])
    looked_up = table.gather(-2, index)  # [..., ng, Tq, G, P]
    radius = p.radius_min.float().unsqueeze(-2) + grouped(rc).squeeze(-3).float() * p.radius_scale.float().unsqueeze(-2)
    per_group = (looked_up * radius.unsqueeze(-3)).sum(-1)  # [..., ng, Tq, G]
    return per_group.movedim(-3, -2).flatten(-2)[..., :tokens]


@register
class PolarRope(Quantizer):
    """Keys only (values: use e.g. ``kivi`` per token)."""

    name = "polar-rope"
    Config = PolarRopeConfig
    stored_type = PolarRopeTensor
    stored_params = {name: name for name in ("radius_bits", "angle_bits", "group_size", "pairing")}
    dequantize_kernel = True

    config: PolarRopeConfig

    def check_head_dim(self, head_dim: int) -> None:
        if head_dim % 2:
            raise ValueError(
                f"head dim {head_dim} is odd; polar-rope quantizes RoPE pairs and needs an even head dim"
            )

    def _quantize(self, x: torch.Tensor) -> PolarRopeTensor:
        c = self.config
        if x.is_cuda and triton_available():
            from kvpolar.kernels.polar_rope_encode import polar_rope_encode

            return polar_rope_encode(x, c.radius_bits, c.angle_bits, c.group_size, c.pairing, c.angle_range)
        return quantize_polar(x, c.radius_bits, c.angle_bits, c.group_size, c.pairing, c.angle_range)

    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, PolarRopeTensor)
        return dequantize_polar(p).to(p.dtype)

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, PolarRopeTensor)
        if q.is_cuda and triton_available():
            from kvpolar.kernels.polar_rope_scores import polar_rope_scores

            return polar_rope_scores(q, p)
        return table_scores(q, p)


