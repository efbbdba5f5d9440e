"""Triton helpers of the GPU quantizers (encoders): min-max statistics, round-to-nearest codes and the
dense bit packing, with the arithmetic of :mod:`kvpolar.quantizers.uniform` and :mod:`kvpolar.packing`.

* :func:`stats`: minimum and scale rounded to the storage dtype as ``uniform.minmax_scale`` (the
  minimum rounded first, the scale from it by IEEE division);
* :func:`encode`: ``round((v - minimum) * (1 / scale))`` clamped to the levels, ties to even as
  ``torch.round`` (``uniform.encode``; a zero scale gives code 0);
* :func:`pack_codes`: codes ``[R, P]`` of ``BITS`` bits into bytes ``[R, NB_PAD]``, code ``j`` at
  bits ``[j BITS, (j + 1) BITS)`` of each row's little-endian bit stream (``packing.pack_bits``);
  :func:`store_packed` packs and writes them as token rows of bytes.

Used by :mod:`kvpolar.kernels.kivi_encode` and :mod:`kvpolar.kernels.polar_rope_encode`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rounded_to(x, store_ty: tl.constexpr):
    """float32 ``x`` rounded to ``store_ty`` (to nearest, ties to even, as PyTorch), as float32. For
    bfloat16 by the bits (Triton's CPU interpreter truncates a bfloat16 conversion), the result then
    stored exactly."""
    if store_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = x.to(store_ty).to(tl.float32)
    return out


@triton.jit
def stats(lo, hi, BITS: tl.constexpr, store_ty: tl.constexpr):
    """Minimum and scale rounded to ``store_ty`` (as ``uniform.minmax_scale``), float32."""
    minimum = rounded_to(lo, store_ty)
    scale = rounded_to(tl.div_rn(hi - minimum, ((1 << BITS) - 1) * 1.0), store_ty)
    return minimum, scale


@triton.jit
def encode(v, minimum, scale, BITS: tl.constexpr):
    """int32 codes of float32 ``v`` against the stored ``minimum`` / ``scale`` (broadcast): the
    product with the IEEE reciprocal of the scale rounded to the nearest level, ties to even."""
    safe = tl.where(scale > 0, scale, 1.0)
    inv = tl.where(scale > 0, tl.div_rn(tl.full(scale.shape, 1.0, tl.float32), safe), 0.0)
    x = (v - minimum) * inv
    low = tl.floor(x)
    frac = x - low  # exact: low and x share their exponent's range
    odd = (low - 2.0 * tl.floor(low * 0.5)) != 0
    c = tl.where((frac > 0.5) | ((frac == 0.5) & odd), low + 1.0, low)
    return tl.minimum(tl.maximum(c, 0.0), (1 << BITS) - 1.0).to(tl.int32)


@triton.jit
def pack_codes(code, P: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr, NB_PAD: tl.constexpr):
    """int32 bytes ``[R, NB_PAD]`` (low 8 bits used; columns past ``NBYTES`` zero) of the codes
    ``[R, P_PAD]`` (int32, ``P`` real columns): byte ``u`` holds bits ``[8 u, 8 u + 8)`` of each row's
    bit stream, gathered from the at most ``7 // BITS + 2`` codes that overlap it."""
    R: tl.constexpr = code.shape[0]
    KMAX: tl.constexpr = 7 // BITS + 2
    u = tl.arange(0, NB_PAD)
    umask = u < NBYTES
    first = (u * 8) // BITS
    packed = tl.zeros([R, NB_PAD], tl.int32)
    for k in tl.static_range(KMAX):
        jj = first + k
        valid = umask & (jj < P)
        idx = tl.broadcast_to(tl.where(valid, jj, 0)[None, :], [R, NB_PAD])
        c = tl.gather(code, idx, 1)
        start_bit = jj * BITS - u * 8
        part = tl.where(start_bit[None, :] >= 0, c << tl.maximum(start_bit, 0)[None, :],
                        c >> tl.maximum(-start_bit, 0)[None, :])
        packed = packed | tl.where(valid[None, :], part, 0)
    return packed & 0xFF


@triton.jit
def store_packed(rows_ptr, t, tok, code, s_t, P: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr,
                 NB_PAD: tl.constexpr):
    """Codes ``[R, P_PAD]`` (int32) of tokens ``t`` ``[R]`` packed (:func:`pack_codes`) into the uint8 rows
    at ``rows_ptr + t * s_t`` (``NBYTES`` bytes each; ``tok`` ``[R]``: the tokens that exist)."""
    packed = pack_codes(code, P, BITS, NBYTES, NB_PAD)
    u = tl.arange(0, NB_PAD)
    out = rows_ptr + t[:, None].to(tl.int64) * s_t + u[None, :]
    tl.store(out, packed.to(tl.uint8), mask=tok[:, None] & (u < NBYTES)[None, :])
