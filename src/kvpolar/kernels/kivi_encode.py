"""Triton kernel: quantize (encode) KIVI keys (per channel) and values (per token) on the GPU.

Reference: :func:`kvpolar.quantizers.kivi.quantize_per_channel` (keys) and ``Kivi._quantize`` with
``axis="token"`` (values). One program encodes one group of ``G`` tokens of a (sequence, head) for
keys (each channel's minimum and maximum over the group's tokens), or ``BLOCK_T`` tokens for values
(each token's groups of ``G`` channels): minimum / maximum in float32, the statistics rounded to the
input dtype, round-to-nearest codes against the rounded statistics, the dense bit packing
(:mod:`kvpolar.kernels.uniform_encode`), with the reference's arithmetic, so bit for bit. The
prefill quantizes every layer's prompt this way; the PyTorch reference takes several float32 passes
over tensors twice the size of the input.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpolar.kernels.uniform_encode import encode, stats, store_packed
from kvpolar.packing import packed_length
from kvpolar.quantized import tokens_contiguous
from kvpolar.quantizers.kivi import KiviChannelTensor, KiviTokenTensor, quantize_per_channel
from kvpolar.quantizers.rotations import is_power_of_two

REFERENCE = quantize_per_channel
#: tokens per program of the value kernel
VALUE_BLOCK_TOKENS = 32


def kivi_encode(x: torch.Tensor, bits: int, group_size: int, axis: str) -> KiviChannelTensor | KiviTokenTensor:
    """Quantize ``x`` ``[..., T, D]`` (float16 / bfloat16 / float32, CUDA or the interpreter) as KIVI:
    the same arguments and result as the quantizer (``kvpolar.quantizer("kivi", bits=..., group_size=...,
    axis=...)``). ``axis="token"`` needs ``D`` and ``group_size`` powers of two (``Kivi.quantize`` takes
    its PyTorch path for other values)."""
    *lead, tokens, dim = x.shape
    if axis == "token" and not (is_power_of_two(dim) and is_power_of_two(group_size) and group_size <= dim):
        raise ValueError(f"kivi_encode(axis='token') got head dim {dim} and group_size={group_size}: "
                         "allowed: powers of two, group_size <= head dim")
    n, nbytes = math.prod(lead), packed_length(dim, bits)
    xf = x.reshape(n, tokens, dim)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    codes = torch.empty(n, tokens, nbytes, device=x.device, dtype=torch.uint8)
    common = dict(D=dim, D_PAD=triton.next_power_of_2(dim), BITS=bits, NBYTES=nbytes,
                  NB_PAD=triton.next_power_of_2(nbytes))
    if axis == "channel":
        groups = triton.cdiv(tokens, group_size)
        scale, minimum = (torch.empty(n, groups, dim, device=x.device, dtype=x.dtype) for _ in range(2))
        if n and tokens:
            _channel_kernel[(groups, n)](
                xf, codes, scale, minimum, tokens, xf.stride(0), xf.stride(1), codes.stride(0), codes.stride(1),
                scale.stride(0), scale.stride(1), G=group_size, G_PAD=triton.next_power_of_2(group_size), **common,
                enable_fp_fusion=False,  # (v - min) * inv fused into the rounding's subtraction breaks exact ties
            )
        return KiviChannelTensor(
            shape=x.shape, dtype=x.dtype, codes=codes.reshape(*lead, tokens, nbytes),
            scale=scale.reshape(*lead, groups, dim), minimum=minimum.reshape(*lead, groups, dim), bits=bits,
            group_size=group_size,
        )
    groups = dim // group_size
    # the values' metadata laid out with the tokens adjacent (``quantized.tokens_contiguous``)
    scale, minimum = (torch.empty(n, groups, tokens, device=x.device, dtype=x.dtype) for _ in range(2))
    if n and tokens:
        _token_kernel[(triton.cdiv(tokens, VALUE_BLOCK_TOKENS), n)](
            xf, codes, scale, minimum, tokens, xf.stride(0), xf.stride(1), codes.stride(0), codes.stride(1),
            scale.stride(0), scale.stride(1), G=group_size, NG=groups, BLOCK_T=VALUE_BLOCK_TOKENS, **common,
            enable_fp_fusion=False,
        )
    scale, minimum = (m.transpose(-1, -2).reshape(*lead, tokens, groups) for m in (scale, minimum))
    return KiviTokenTensor(
        shape=x.shape, dtype=x.dtype, codes=codes.reshape(*lead, tokens, nbytes),
        scale=tokens_contiguous(scale), minimum=tokens_contiguous(minimum), bits=bits, group_size=group_size,
    )


@triton.jit
def _channel_kernel(
    x_ptr, codes_ptr, scale_ptr, min_ptr, T, s_xn, s_xt, s_cn, s_ct, s_mn, s_mg,
    D: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr, NB_PAD: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr,
):
    """Keys: group ``program_id(0)`` of ``G`` tokens of row ``program_id(1)``: per channel the
    minimum / maximum over the group's tokens (a partial last group: its own tokens), then codes."""
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    t = g * G + tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    tok = (tl.arange(0, G_PAD) < G) & (t < T)
    ok = tok[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + n * s_xn + t[:, None].to(tl.int64) * s_xt + d[None, :], mask=ok, other=0).to(tl.float32)
    lo = tl.where(d < D, tl.min(tl.where(ok, x, float("inf")), 0), 0.0)  # (padding channels: 0, no inf)
    hi = tl.where(d < D, tl.max(tl.where(ok, x, -float("inf")), 0), 0.0)
    minimum, scale = stats(lo, hi, BITS, scale_ptr.dtype.element_ty)
    meta = n * s_mn + g * s_mg + d
    tl.store(scale_ptr + meta, scale, mask=d < D)
    tl.store(min_ptr + meta, minimum, mask=d < D)
    store_packed(codes_ptr + n * s_cn, t, tok, encode(x, minimum[None, :], scale[None, :], BITS), s_ct,
                 D, BITS, NBYTES, NB_PAD)


@triton.jit
def _token_kernel(
    x_ptr, codes_ptr, scale_ptr, min_ptr, T, s_xn, s_xt, s_cn, s_ct, s_mn, s_mg,
    D: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr, NB_PAD: tl.constexpr,
    G: tl.constexpr, NG: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Values: ``BLOCK_T`` tokens of row ``program_id(1)``: per token the minimum / maximum of each
    group of ``G`` channels (``NG = D / G`` groups; metadata ``[n, NG, T]``, tokens adjacent), then codes."""
    n = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok = t < T
    x = tl.load(x_ptr + n * s_xn + t[:, None].to(tl.int64) * s_xt + tl.arange(0, D)[None, :], mask=tok[:, None],
                other=0).to(tl.float32)
    grouped = tl.reshape(x, [BLOCK_T, NG, G])
    lo = tl.min(grouped, 2)
    hi = tl.max(grouped, 2)
    minimum, scale = stats(lo, hi, BITS, scale_ptr.dtype.element_ty)
    meta = n * s_mn + tl.arange(0, NG)[None, :] * s_mg + t[:, None]
    tl.store(scale_ptr + meta, scale, mask=tok[:, None])
    tl.store(min_ptr + meta, minimum, mask=tok[:, None])
    code = tl.reshape(encode(grouped, minimum[:, :, None], scale[:, :, None], BITS), [BLOCK_T, D])
    store_packed(codes_ptr + n * s_cn, t, tok, code, s_ct, D, BITS, NBYTES, NB_PAD)
