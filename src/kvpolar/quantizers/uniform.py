"""Asymmetric min-max uniform quantization with round-to-nearest, the arithmetic KIVI, SQuat and
polar-rope share. Statistics are computed in float32, stored in the caller's dtype, and codes are
computed against the *stored* (rounded) scale and minimum so that reconstruction matches them.
"""

from __future__ import annotations

import torch


def minmax_scale(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, store_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum for codes ``0 .. 2**bits - 1`` spanning ``[lo, hi]``, in ``store_dtype``.

    The scale is the float32 quotient ``(hi - minimum) / levels`` rounded once (IEEE division) on every
    device: divided by a tensor, because PyTorch on CUDA turns a division by a Python number into a
    multiplication by its reciprocal, which rounds differently where the quotient is a float16 tie
    (``0.9047698974609375 / 15`` is 1976.5 float16 units: divided, it rounds to even, 0.060302734375;
    multiplied by ``1/15``, it lands just above, 0.060333251953125). So the stored bytes do not depend
    on the device, and the GPU encoders (``kvpolar.kernels.uniform_encode``) match them."""
    levels = (1 << bits) - 1
    minimum = lo.to(store_dtype)
    span = hi.float() - minimum.float()
    scale = (span / span.new_full((), float(levels))).to(store_dtype)
    return scale, minimum


def encode(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-to-nearest codes of ``x`` (broadcast against ``scale``/``minimum``), uint8."""
    levels = (1 << bits) - 1
    s = scale.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = torch.round((x.float() - minimum.float()) * inv)
    return codes.clamp_(0, levels).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """``codes * scale + minimum`` in float32 (broadcasting)."""
    return codes.float() * scale.float() + minimum.float()


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int) -> torch.Tensor:
    """Pad ``dim`` up to a multiple by repeating the last slice (min/max stay unchanged)."""
    size = x.shape[dim]
    extra = -size % multiple
    if extra == 0:
        return x
    last = x.narrow(dim, size - 1, 1)
    reps = [1] * x.dim()
    reps[dim] = extra
    return torch.cat([x, last.repeat(*reps)], dim=dim)
