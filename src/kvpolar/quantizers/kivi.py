"""KIVI (Liu et al. 2024): asymmetric min-max quantization, per channel for keys, per token for values.

``axis="channel"``: groups of ``group_size`` tokens share a per-channel minimum and scale (keys).
A token count that is not a multiple of the group leaves a partial last group, quantized with its
own statistics. ``axis="token"``: each token's channels are split into groups of ``group_size``
sharing a minimum and scale (values); ``group_size`` must divide the head dim.

Stored: codes packed along the head dim (``ceil(D * bits / 8)`` bytes per token), scale and minimum
in the input dtype: ``bits + 32 / group_size`` bits per element for 16-bit input. The values'
per-token scale and minimum ``[..., T, D/G]`` are laid out with consecutive tokens adjacent
(``[..., D/G, T]`` in memory, ``quantized.tokens_contiguous``): the fused decode kernel then reads
a channel group's scales of a block of tokens as one vector, in the pairs of consecutive tokens its
tensor-core products take.
"""

from __future__ import annotations

import dataclasses
import math
import torch

from kvpolar.kernels import triton_available
from kvpolar.packing import pack_bits, unpack_bits
from kvpolar.quantized import QuantizedTensor, quantized_tensor_class, stored, tokens_contiguous
from kvpolar.quantizers import uniform
from kvpolar.quantizers.base import Quantizer
from kvpolar.quantizers.rotations import is_power_of_two
from kvpolar.registry import register
from kvpolar.validation import check_choice, check_positive_int

KIVI_BITS = (2, 3, 4, 8)
KIVI_AXES = ("channel", "token")


@dataclasses.dataclass(frozen=True)
class KiviConfig:
    bits: int = 2
    group_size: int = 32
    axis: str = "channel"

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, KIVI_BITS)
        check_positive_int("group_size", self.group_size)
        check_choice("axis", self.axis, KIVI_AXES)


@quantized_tensor_class
class KiviChannelTensor(QuantizedTensor):
    """KIVI keys. codes: uint8 ``[..., T, ceil(D*bits/8)]``; scale, minimum: ``[..., ceil(T/G), D]``."""

    codes: torch.Tensor = stored(token_axis=-2)
    scale: torch.Tensor = stored(token_axis=-2)
    minimum: torch.Tensor = stored(token_axis=-2)
    bits: int = 2
    group_size: int = 32

    @property
    def token_group(self) -> int:  # type: ignore[override]
        return self.group_size


@quantized_tensor_class
class KiviTokenTensor(QuantizedTensor):
    """KIVI values. codes: uint8 ``[..., T, ceil(D*bits/8)]``; scale, minimum: ``[..., T, D/G]``, laid
    out ``[..., D/G, T]`` in memory by the quantizer and by ``cat`` (any layout is read correctly)."""

    codes: torch.Tensor = stored(token_axis=-2)
    scale: torch.Tensor = stored(token_axis=-2, tokens_contiguous=True)
    minimum: torch.Tensor = stored(token_axis=-2, tokens_contiguous=True)
    bits: int = 2
    group_size: int = 32


def quantize_per_channel(x: torch.Tensor, bits: int, group_size: int) -> KiviChannelTensor:
    """KIVI key quantization of ``x`` ``[..., T, D]``: groups of ``group_size`` tokens per channel."""
    tokens = x.shape[-2]
    padded = uniform.pad_to_multiple(x, group_size, dim=-2)
    grouped = padded.reshape(*x.shape[:-2], -1, group_size, x.shape[-1]).float()
    scale, minimum = uniform.minmax_scale(grouped.amin(-2), grouped.amax(-2), bits, x.dtype)
    codes = uniform.encode(grouped, scale.unsqueeze(-2), minimum.unsqueeze(-2), bits)
    codes = codes.reshape(*x.shape[:-2], -1, x.shape[-1])[..., :tokens, :]
    return KiviChannelTensor(
        shape=x.shape, dtype=x.dtype, codes=pack_bits(codes, bits, check_range=False), scale=scale,  # (clamped)
        minimum=minimum, bits=bits, group_size=group_size,
    )


def encodes_on_device(x: torch.Tensor, config: KiviConfig) -> bool:
    """Whether ``Kivi.quantize`` takes the Triton encoder (``kvpolar.kernels.kivi_encode``) for ``x``:
    on CUDA with Triton; per token only where the head dim and the group are powers of two."""
    shapes_fit = config.axis == "channel" or (is_power_of_two(x.shape[-1]) and is_power_of_two(config.group_size))
    return x.is_cuda and triton_available() and shapes_fit


def expand_groups(meta: torch.Tensor, group_size: int, tokens: int) -> torch.Tensor:
    """``[..., ceil(T/G), D]`` per-group metadata -> ``[..., T, D]`` per token."""
    return meta.repeat_interleave(group_size, dim=-2)[..., :tokens, :]


class Kivi(Quantizer):
    name = "kivi"
    Config = KiviConfig
    stored_type = QuantizedTensor  # narrowed per axis in _check_stored
    stored_params = {"bits": "bits", "group_size": "group_size"}
    dequantize_kernel = True

    config: KiviConfig

    def check_head_dim(self, head_dim: int) -> None:
        if self.config.axis == "token" and head_dim % self.config.group_size:
            raise ValueError(
                f"head dim {head_dim} is not divisible by group_size={self.config.group_size}: "
                "axis='token' groups the channels of each token; pick a group_size dividing it"
            )

    @property
    def _stored_cls(self) -> type[QuantizedTensor]:
        return KiviChannelTensor if self.config.axis == "channel" else KiviTokenTensor

    def _check_stored(self, p: object) -> None:
        if not isinstance(p, self._stored_cls):
            raise TypeError(
                f"kivi(axis={self.config.axis!r}) expects a {self._stored_cls.__name__}; "
                f"got {type(p).__name__}"
            )
        self._check_stored_params(p)

    def _quantize(self, x: torch.Tensor) -> QuantizedTensor:
        c = self.config
        if encodes_on_device(x, c):
            from kvpolar.kernels.kivi_encode import kivi_encode

            return kivi_encode(x, c.bits, c.group_size, c.axis)  # the same tensors, one pass on the GPU
        if c.axis == "channel":
            return quantize_per_channel(x, c.bits, c.group_size)
        grouped = x.reshape(*x.shape[:-1], -1, c.group_size).float()
        scale, minimum = uniform.minmax_scale(grouped.amin(-1), grouped.amax(-1), c.bits, x.dtype)
        codes = uniform.encode(grouped, scale.unsqueeze(-1), minimum.unsqueeze(-1), c.bits)
        return KiviTokenTensor(
            shape=x.shape, dtype=x.dtype, codes=pack_bits(codes.flatten(-2), c.bits, check_range=False),  # (clamped)
            scale=tokens_contiguous(scale), minimum=tokens_contiguous(minimum), bits=c.bits, group_size=c.group_size,
        )

    def _codes(self, p: KiviChannelTensor | KiviTokenTensor) -> torch.Tensor:
        return unpack_bits(p.codes, p.bits, p.head_dim)

    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, (KiviChannelTensor, KiviTokenTensor))
        codes = self._codes(p)
        if isinstance(p, KiviChannelTensor):
            scale = expand_groups(p.scale, p.group_size, p.num_tokens)
            minimum = expand_groups(p.minimum, p.group_size, p.num_tokens)
            return uniform.decode(codes, scale, minimum).to(p.dtype)
        grouped = codes.reshape(*codes.shape[:-1], -1, p.group_size)
        out = uniform.decode(grouped, p.scale.unsqueeze(-1), p.minimum.unsqueeze(-1))
        return out.flatten(-2).to(p.dtype)

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        if isinstance(p, KiviChannelTensor):
            return channel_scores(q, p)
        return super()._scores(q, p)

    def _weighted_sum(self, weights: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        if isinstance(p, KiviTokenTensor):
            return token_weighted_sum(weights, p)
        return super()._weighted_sum(weights, p)


def channel_scores(q: torch.Tensor, p: KiviChannelTensor) -> torch.Tensor:
    """Scores against per-channel keys without dequantizing them (reference of the fused path).

    ``q . k_t = sum_d (q_d * scale_gd) * code_td + sum_d q_d * min_gd`` for token ``t`` in group
    ``g``: the query is scaled once per group, then multiplied with the integer codes.

    Args:
        q: ``[..., Tq, D]`` float; p: ``[..., T, D]`` per-channel KIVI keys.
    Returns:
        ``[..., Tq, T]`` float32.
    """
    tokens, g = p.num_tokens, p.group_size
    n_groups = math.ceil(tokens / g)
    codes = unpack_bits(p.codes, p.bits, p.head_dim).float()
    codes = uniform.pad_to_multiple(codes, g, dim=-2).reshape(*codes.shape[:-2], n_groups, g, -1)
    qf = q.float()
    q_scaled = qf.unsqueeze(-3) * p.scale.float().unsqueeze(-2)  # [..., ng, Tq, D]
    per_group = q_scaled @ codes.transpose(-1, -2)  # [..., ng, Tq, G]
    offset = qf @ p.minimum.float().transpose(-1, -2)  # [..., Tq, ng]
    per_group = per_group + offset.transpose(-1, -2).unsqueeze(-1)
    return per_group.movedim(-3, -2).flatten(-2)[..., :tokens]


def token_weighted_sum(weights: torch.Tensor, p: KiviTokenTensor) -> torch.Tensor:
    """``weights @ values`` against per-token values without dequantizing them.

    ``sum_t w_t v_td = sum_t (w_t * scale_tg) * code_td + sum_t w_t * min_tg`` for channel ``d`` in
    channel group ``g``.

    Args:
        weights: ``[..., Tq, T]``; p: ``[..., T, D]`` per-token KIVI values.
    Returns:
        ``[..., Tq, D]`` float32.
    """
    codes = unpack_bits(p.codes, p.bits, p.head_dim).float()
    codes = codes.reshape(*codes.shape[:-1], -1, p.group_size)  # [..., T, ngc, G]
    w = weights.float()
    scaled = w.unsqueeze(-1) * p.scale.float().unsqueeze(-3)  # [..., Tq, T, ngc]
    out = torch.einsum("...qtn,...tng->...qng", scaled, codes)
    out = out + (w @ p.minimum.float()).unsqueeze(-1)
    return out.flatten(-2)


register(Kivi)
