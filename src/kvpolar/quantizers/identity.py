"""``"none"``: the full-precision baseline. Stores the tensor as it is (16 bits/element for 16-bit input)."""

from __future__ import annotations

import dataclasses

import torch

from kvpolar.quantized import QuantizedTensor, quantized_tensor_class, stored
from kvpolar.quantizers.base import Quantizer
from kvpolar.registry import register


@dataclasses.dataclass(frozen=True)
class IdentityConfig:
    """No parameters."""


@quantized_tensor_class
class FullPrecisionTensor(QuantizedTensor):
    """values: ``[..., T, D]`` in the input dtype."""

    values: torch.Tensor = stored(token_axis=-2)


@register
class Identity(Quantizer):
    name = "none"
    Config = IdentityConfig
    stored_type = FullPrecisionTensor

    def _quantize(self, x: torch.Tensor) -> FullPrecisionTensor:
        return FullPrecisionTensor(shape=x.shape, dtype=x.dtype, values=x.detach().clone())

    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, FullPrecisionTensor)
        return p.values.clone()
