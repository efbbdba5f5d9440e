"""fp8: float8 storage with an fp32 amax scale, the KV-cache format most serving engines run today.

``kvpolar.quantizer("fp8", format="e4m3"|"e5m2", scale="tensor"|"head")``. Each element is stored as
``x / s`` cast to ``torch.float8_e4m3fn`` (max 448) or ``torch.float8_e5m2`` (max 57344), with
``s = amax(|x|) / format_max`` so the largest magnitude lands on the format's largest value
(``s = 1`` for an all-zero slice). ``scale="tensor"``: one ``s`` for the whole tensor;
``scale="head"``: one ``s`` per ``[..., T, D]`` slice, i.e. per leading index: for keys
``[B, H, T, D]`` one per (sequence, KV head), for ``[H, T, D]`` one per head, for ``[T, D]`` a
single one (the same as ``"tensor"``).

Growth: a cache appends tokens quantized later with their own scales, so every ``quantize`` call
makes one *chunk*: ``scale`` holds one column per chunk (``[..., C]`` for ``head``, ``[1, ..., 1, C]``
for ``tensor``) and ``chunk_tokens`` (int32 ``[C]``) the tokens of each, and ``kvpolar.cat``
concatenates both along their chunk axis. Token ``t`` reads the scale of the chunk holding it.

Bits per element: ``8 + 32 * (n_scales + n_chunks) / numel`` (every stored scale and chunk length
is counted): ``8.0003`` for one ``[1, 8, 1024, 128]`` tensor with per-head scales.
"""

from __future__ import annotations

import dataclasses

import torch

from kvpolar.quantized import QuantizedTensor, quantized_tensor_class, stored
from kvpolar.quantizers.base import Quantizer
from kvpolar.registry import register
from kvpolar.validation import check_choice

FP8_FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_SCALES = ("tensor", "head")


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """``format``: float8 layout (``"e4m3"``: 3 mantissa bits, max 448; ``"e5m2"``: 2, max 57344).
    ``scale``: one fp32 scale per tensor or per ``[..., T, D]`` slice (KV head)."""

    format: str = "e4m3"
    scale: str = "head"

    def __post_init__(self) -> None:
        check_choice("format", self.format, tuple(FP8_FORMATS))
        check_choice("scale", self.scale, FP8_SCALES)


@quantized_tensor_class
class Fp8Tensor(QuantizedTensor):
    """codes: float8 ``[..., T, D]``; scale: float32 ``[..., C]`` (head) or ``[1, .., 1, C]``
    (tensor), one column per chunk; chunk_tokens: int32 ``[C]``, tokens per chunk (sum = T)."""

    codes: torch.Tensor = stored(token_axis=-2)
    scale: torch.Tensor = stored(token_axis=-1)
    chunk_tokens: torch.Tensor = stored(token_axis=-1)
    format: str = "e4m3"
    scale_granularity: str = "head"

    def token_scales(self) -> torch.Tensor:
        """float32 ``[..., T]`` (broadcastable): the scale of every token."""
        return self.scale.repeat_interleave(self.chunk_tokens, dim=-1, output_size=self.num_tokens)


def fp8_max(fmt: str) -> float:
    """Largest finite value of the float8 format."""
    return float(torch.finfo(FP8_FORMATS[fmt]).max)


@register
class Fp8Quantizer(Quantizer):
    name = "fp8"
    Config = Fp8Config
    stored_type = Fp8Tensor
    stored_params = {"format": "format", "scale": "scale_granularity"}
    dequantize_kernel = True

    config: Fp8Config

    def _quantize(self, x: torch.Tensor) -> Fp8Tensor:
        c = self.config
        xf = x.float()
        if c.scale == "head":
            amax = xf.abs().amax(dim=(-2, -1))  # [...]
        else:
            amax = xf.abs().amax().reshape([1] * (x.dim() - 2))
        scale = torch.where(amax > 0, amax / fp8_max(c.format), torch.ones_like(amax))
        codes = (xf / scale[..., None, None]).to(FP8_FORMATS[c.format])
        return Fp8Tensor(
            shape=x.shape, dtype=x.dtype, codes=codes, scale=scale.unsqueeze(-1),
            chunk_tokens=torch.tensor([x.shape[-2]], dtype=torch.int32, device=x.device),
            format=c.format, scale_granularity=c.scale,
        )

    def _dequantize(self, p: QuantizedTensor) -> torch.Tensor:
        assert isinstance(p, Fp8Tensor)
        return (p.codes.float() * p.token_scales().unsqueeze(-1)).to(p.dtype)

    def _scores(self, q: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        """``(q @ codes^T) * s_t``: the scale is applied per key token after the fp8 product."""
        assert isinstance(p, Fp8Tensor)
        return (q.float() @ p.codes.float().transpose(-1, -2)) * p.token_scales().unsqueeze(-2)

    def _weighted_sum(self, weights: torch.Tensor, p: QuantizedTensor) -> torch.Tensor:
        """``(w * s_t) @ codes``: the per-token scale folds into the weights."""
        assert isinstance(p, Fp8Tensor)
        return (weights.float() * p.token_scales().unsqueeze(-2)) @ p.codes.float()
