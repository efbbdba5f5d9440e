"""Triton kernel: quantize (encode) keys to polar-rope on the GPU.

Reference: :func:`kvpolar.quantizers.polar_rope.quantize_polar`. One program encodes one group of
``group_size`` tokens of one head: radius and angle of every pair, the per-pair min/max (or shortest
arc), round-to-nearest codes, and the dense bit packing of the combined codes.

Agreement with the reference is *within rounding*, not bit-for-bit: the angle is an odd polynomial
``atan`` (max error 1e-7 rad; libdevice is not available under ``TRITON_INTERPRET``) and the compiler
may fuse multiply-adds (rounding is to nearest, ties to even, as ``torch.round``:
:mod:`kvpolar.kernels.uniform_encode`). A code can therefore differ by one level where a value sits
within ~1e-6 of a level boundary, and a shortest arc can start at another angle when two gaps tie to
float rounding. The stored statistics use IEEE division, so they match the reference to the storage
dtype's rounding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpolar.kernels.polar_pairs import pair_channels
from kvpolar.kernels.uniform_encode import encode, stats, store_packed
from kvpolar.quantizers.polar_rope import PolarRopeTensor, quantize_polar

REFERENCE = quantize_polar

# atan(a) = a * P(a^2) on [0, 1], least-squares fit on Chebyshev nodes (max error 9e-8 in float32).
_ATAN = (1.0, -0.3333313763141632, 0.19993694126605988, -0.14211106300354004, 0.10667487233877182,
         -0.07556900382041931, 0.04327824339270592, -0.016413189470767975, 0.0029327620286494493)


def polar_rope_encode(
    x: torch.Tensor, radius_bits: int, angle_bits: int, group_size: int, pairing: str, angle_range: str,
    num_warps: int = 4,
) -> PolarRopeTensor:
    """Quantize keys ``x`` ``[..., T, D]`` (float16/bfloat16/float32, CUDA or interpreter) on the device.

    Same arguments and result as :func:`~kvpolar.quantizers.polar_rope.quantize_polar` (within rounding).
    """
    *lead, tokens, dim = x.shape
    n, pairs, bits = math.prod(lead), dim // 2, radius_bits + angle_bits
    if n == 0 or tokens == 0:
        return quantize_polar(x, radius_bits, angle_bits, group_size, pairing, angle_range)
    groups, nbytes = triton.cdiv(tokens, group_size), (pairs * bits + 7) // 8
    xf = x.reshape(n, tokens, dim)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    codes = torch.empty(n, tokens, nbytes, device=x.device, dtype=torch.uint8)
    metas = [torch.empty(n, groups, pairs, device=x.device, dtype=x.dtype) for _ in range(4)]
    polar_rope_encode_kernel[(groups, n)](
        xf, codes, *metas, tokens,
        xf.stride(0), xf.stride(1), codes.stride(0), codes.stride(1), metas[0].stride(0), metas[0].stride(1),
        P=pairs, P_PAD=triton.next_power_of_2(pairs), RB=radius_bits, AB=angle_bits, G=group_size,
        G_PAD=triton.next_power_of_2(group_size), HALF=pairing == "half",
        SHORTEST=angle_range == "shortest-arc", NBYTES=nbytes, NB_PAD=triton.next_power_of_2(nbytes),
        num_warps=num_warps,
    )
    rs, rm, a_s, am = (m.reshape(*lead, groups, pairs) for m in metas)
    return PolarRopeTensor(
        shape=x.shape, dtype=x.dtype, codes=codes.reshape(*lead, tokens, nbytes), radius_scale=rs,
        radius_min=rm, angle_scale=a_s, angle_min=am, radius_bits=radius_bits, angle_bits=angle_bits,
        group_size=group_size, pairing=pairing, angle_range=angle_range,
    )



PI = tl.constexpr(math.pi)
HALF_PI = tl.constexpr(math.pi / 2)
TWO_PI = tl.constexpr(2 * math.pi)
C0, C1, C2, C3, C4, C5, C6, C7, C8 = (tl.constexpr(c) for c in _ATAN)


@triton.jit
def angle(y, x):
    """atan2(y, x) mapped to [0, 2*pi], float32."""
    ax = tl.abs(x)
    ay = tl.abs(y)
    big = tl.maximum(ax, ay)
    a = tl.div_rn(tl.minimum(ax, ay), tl.where(big == 0, 1.0, big))
    s = a * a
    p = C8 * s + C7
    p = p * s + C6
    p = p * s + C5
    p = p * s + C4
    p = p * s + C3
    p = p * s + C2
    p = p * s + C1
    p = p * s + C0
    r = p * a
    r = tl.where(ay > ax, HALF_PI - r, r)
    r = tl.where(x < 0, PI - r, r)
    r = tl.where(y < 0, -r, r)
    return tl.where(r < 0, r + TWO_PI, r)


@triton.jit
def polar_rope_encode_kernel(
    x_ptr, codes_ptr, rs_ptr, rm_ptr, as_ptr, am_ptr, T,
    stride_xn, stride_xt, stride_cn, stride_ct, stride_mn, stride_mg,
    P: tl.constexpr, P_PAD: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, G: tl.constexpr,
    G_PAD: tl.constexpr, HALF: tl.constexpr, SHORTEST: tl.constexpr, NBYTES: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    BITS: tl.constexpr = RB + AB
    g = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    i = tl.arange(0, G_PAD)
    t = g * G + i
    tmask = (i < G) & (t < T)
    j = tl.arange(0, P_PAD)
    jmask = j < P
    mask = tmask[:, None] & jmask[None, :]
    xcol, ycol = pair_channels(j, P, HALF)
    base = x_ptr + n * stride_xn
    rows = base + t[:, None].to(tl.int64) * stride_xt
    px = tl.load(rows + xcol[None, :], mask=mask, other=0).to(tl.float32)
    py = tl.load(rows + ycol[None, :], mask=mask, other=0).to(tl.float32)
    r = tl.sqrt_rn(px * px + py * py)
    theta = angle(py, px)
    r_lo = tl.min(tl.where(mask, r, float("inf")), 0)
    r_hi = tl.max(tl.where(mask, r, -float("inf")), 0)
    if SHORTEST:
        # try each angle of the group as the start of the covering arc; keep the shortest
        best_span = tl.full([P_PAD], float("inf"), tl.float32)
        best_lo = tl.zeros([P_PAD], tl.float32)
        for k in range(0, G):  # past the end of a partial group: the last token again (no effect)
            row_k = base + tl.minimum(g * G + k, T - 1).to(tl.int64) * stride_xt
            kx = tl.load(row_k + xcol, mask=jmask, other=0).to(tl.float32)
            ky = tl.load(row_k + ycol, mask=jmask, other=0).to(tl.float32)
            start = angle(ky, kx)
            d = theta - start[None, :]
            d = tl.where(d < 0, d + TWO_PI, d)
            span = tl.max(tl.where(mask, d, 0.0), 0)
            better = span < best_span
            best_span = tl.where(better, span, best_span)
            best_lo = tl.where(better, start, best_lo)
        d = theta - best_lo[None, :]
        d = tl.where(d < 0, d + TWO_PI, d)
        span = tl.max(tl.where(mask, d, 0.0), 0)
        shift = tl.where(best_lo >= PI, TWO_PI, 0.0)
        a_lo = best_lo - shift
        a_hi = (best_lo + span) - shift
        unwrapped = (best_lo[None, :] + d) - shift[None, :]
    else:
        a_lo = tl.min(tl.where(mask, theta, float("inf")), 0)
        a_hi = tl.max(tl.where(mask, theta, -float("inf")), 0)
        unwrapped = theta
    store_ty: tl.constexpr = rs_ptr.dtype.element_ty
    r_min, r_scale = stats(r_lo, r_hi, RB, store_ty)
    a_min, a_scale = stats(a_lo, a_hi, AB, store_ty)
    meta = n * stride_mn + g * stride_mg + j
    tl.store(rs_ptr + meta, r_scale, mask=jmask)
    tl.store(rm_ptr + meta, r_min, mask=jmask)
    tl.store(as_ptr + meta, a_scale, mask=jmask)
    tl.store(am_ptr + meta, a_min, mask=jmask)
    code = (encode(r, r_min[None, :], r_scale[None, :], RB) << AB) | encode(unwrapped, a_min[None, :],
                                                                            a_scale[None, :], AB)
    store_packed(codes_ptr + n * stride_cn, t, tmask, code, stride_ct, P, BITS, NBYTES, NB_PAD)  # dense bit stream
