"""Triton kernel: polar-recursive encoding (preconditioning + recursive polar transform + codebook
search + bit packing) of ``[N, D]`` rows in one pass.

Reference: :meth:`kvpolar.quantizers.polar_recursive.PolarRecursive.quantize` (analytic codebooks,
``radius_bits=None``); :func:`polar_recursive_encode` returns the same ``PolarRecursiveTensor``.

Per program (``BLOCK_N`` rows): ``y = x R^T`` on the tensor cores (the rotation as a dense matrix,
IEEE float32), then level by level: pairs are split in registers, the radius is ``sqrt(a^2 + b^2)``
and the angle code is found without ``atan2`` by counting the codebook boundaries ``beta`` the
angle lies beyond: for levels ``>= 2`` (angles in ``[0, pi/2]``) ``b cos(beta) - a sin(beta) > 0``;
for level 1 (angles in ``[0, 2 pi)``) the same cross product combined with the half-plane the pair
lies in. Codes are placed into int32 words of the token's little-endian bit stream in registers
(a code may straddle two words) and stored once: byte for byte the stored ``codes`` layout. Radii are stored in the
input dtype. A value exactly on a boundary may get the neighbouring code (measure zero; the codes
differ from the reference only within float32 rounding of a boundary).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpolar.quantizers.polar_recursive import (
    PolarRecursive,
    PolarRecursiveTensor,
    analytic_codebooks,
    code_bits_per_token,
)
from kvpolar.quantizers.codebooks import boundaries_of
from kvpolar.quantizers.rotations import rotation

REFERENCE = PolarRecursive.quantize

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def polar_recursive_encode(quantizer: PolarRecursive, x: torch.Tensor, block_n: int = 16) -> PolarRecursiveTensor:
    """Quantize ``x`` ``[..., T, D]`` (float16/bfloat16/float32) like ``quantizer.quantize(x)``.

    Supported: ``codebook="analytic"``, ``radius_bits=None``, ``D`` a power of two, ``D >= 16``.
    """
    c = quantizer.config
    if c.codebook != "analytic" or c.radius_bits is not None:
        raise ValueError(
            f"the encode kernel supports codebook='analytic' with radius_bits=None; got "
            f"codebook={c.codebook!r}, radius_bits={c.radius_bits!r} (use quantizer.quantize)"
        )
    d = x.shape[-1]
    quantizer.check_head_dim(d)
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim {d} must be a power of two >= 16 for the encode kernel")
    rot = rotation(c.preconditioner, d, c.seed, x.device)
    matrix = _dense(c.preconditioner, d, c.seed, str(x.device))
    books = analytic_codebooks(c.bits, str(x.device))
    bounds = [boundaries_of(book) for book in books]
    max_count = max(bd.numel() for bd in bounds)
    pad = torch.zeros(max_count, device=x.device)  # keeps the fixed-length boundary loop in bounds
    cos_b = torch.cat([b.cos() for b in bounds] + [pad]).contiguous()
    sin_b = torch.cat([b.sin() for b in bounds] + [pad]).contiguous()
    meta, bit, entry = [], 0, 0
    for level, (b, bd) in enumerate(zip(c.bits, bounds), start=1):
        meta.append((bit, b, entry, bd.numel()))
        bit += (d >> level) * b
        entry += bd.numel()
    meta_t = torch.tensor(meta, dtype=torch.int32, device=x.device)
    total_bits = code_bits_per_token(d, c.bits)
    words = math.ceil(total_bits / 32)
    rows = x.reshape(-1, d).contiguous()
    n = rows.shape[0]
    code_words = torch.empty(n, words, dtype=torch.int32, device=x.device)
    m = d >> c.levels
    radii = torch.empty(n, m, dtype=x.dtype, device=x.device)
    _encode_kernel[(triton.cdiv(n, block_n),)](
        rows, matrix, cos_b, sin_b, meta_t, code_words, radii, n, words,
        D=d, LEVELS=c.levels, MAX_COUNT=max_count, OUT_DTYPE=_TL_DTYPES[x.dtype],
        WORD_SLOTS=triton.next_power_of_2(words), BLOCK_N=block_n,
    )
    codes = code_words.view(torch.uint8)[:, : math.ceil(total_bits / 8)]
    return PolarRecursiveTensor(
        shape=x.shape, dtype=x.dtype, codes=codes.reshape(*x.shape[:-1], -1),
        radii=radii.reshape(*x.shape[:-1], m),
        radius_codes=x.new_empty(*x.shape[:-1], 0, dtype=torch.uint8),
        radius_scale=x.new_empty(*x.shape[:-1], 0), radius_min=x.new_empty(*x.shape[:-1], 0),
        codebooks=torch.empty(0, device=x.device), rotation=rot.stored,
        analytic_codebooks=torch.cat(books), levels=c.levels, bits=c.bits, codebook=c.codebook,
        preconditioner=c.preconditioner, seed=c.seed, radius_bits=None,
    )


_DENSE: dict[tuple[str, int, int, str], torch.Tensor] = {}


def _dense(kind: str, d: int, seed: int, device: str) -> torch.Tensor:
    """The rotation as a dense float32 ``[D, D]`` matrix (cached per layer setting and device)."""
    key = (kind, d, seed, device)
    if key not in _DENSE:
        _DENSE[key] = rotation(kind, d, seed, device).matrix().contiguous()
    return _DENSE[key]


@triton.jit
def _place_codes(code, first_bit, width, N: tl.constexpr, WORD_SLOTS: tl.constexpr):
    """``width``-bit codes ``[BLOCK_N, n]`` at bits ``first_bit + i * width``, as int32 words
    ``[BLOCK_N, WORD_SLOTS]`` (a code may straddle two words). Fields are disjoint, so summing
    them is OR-ing them: no atomics, no carries."""
    i = tl.arange(0, N)
    bit = first_bit + i * width
    word = (bit >> 5)[None, :, None]
    shift = (bit & 31)[None, :]
    low = code << shift
    high = tl.where(shift + width > 32, code >> (32 - shift), 0)
    slot = tl.arange(0, WORD_SLOTS)[None, None, :]
    placed = tl.where(word == slot, low[:, :, None], 0) + tl.where(word + 1 == slot, high[:, :, None], 0)
    return tl.sum(placed, axis=1)


@triton.jit
def _count_beyond(a, b, cos_ptr, sin_ptr, first, count, FULL_CIRCLE: tl.constexpr, MAX_COUNT: tl.constexpr):
    """Number of the ``count`` boundaries the angle of ``(a, b)`` lies beyond (the bucketize code)."""
    code = tl.zeros(a.shape, dtype=tl.int32)
    lower = (b < 0) | ((b == 0) & (a < 0))  # angle in [pi, 2 pi)
    for k in tl.static_range(MAX_COUNT):
        cb = tl.load(cos_ptr + first + k)
        sb = tl.load(sin_ptr + first + k)
        beyond = b * cb - a * sb > 0
        if FULL_CIRCLE:
            # boundary in the upper half: beyond if the pair is in the lower half or past it
            beyond = tl.where(sb >= 0, lower | beyond, lower & beyond)
        code += (beyond & (k < count)).to(tl.int32)
    return code


@triton.jit
def _encode_level(radius, words, cos_ptr, sin_ptr, meta_ptr, LEVEL: tl.constexpr, D: tl.constexpr,
                  MAX_COUNT: tl.constexpr, WORD_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One polar level: ``[BLOCK_N, 2n]`` -> radii ``[BLOCK_N, n]``, codes placed into ``words``."""
    N: tl.constexpr = D >> (LEVEL + 1)
    a, b = tl.split(tl.reshape(radius, [BLOCK_N, N, 2]))
    first_bit = tl.load(meta_ptr + 4 * LEVEL)
    width = tl.load(meta_ptr + 4 * LEVEL + 1)
    first = tl.load(meta_ptr + 4 * LEVEL + 2)
    count = tl.load(meta_ptr + 4 * LEVEL + 3)
    code = _count_beyond(a, b, cos_ptr, sin_ptr, first, count, LEVEL == 0, MAX_COUNT)
    words += _place_codes(code, first_bit, width, N, WORD_SLOTS)
    return tl.sqrt(a * a + b * b), words


@triton.jit
def _encode_kernel(
    x_ptr, r_ptr, cos_ptr, sin_ptr, meta_ptr, words_ptr, radii_ptr, N, WORDS,
    D: tl.constexpr, LEVELS: tl.constexpr, MAX_COUNT: tl.constexpr, OUT_DTYPE: tl.constexpr,
    WORD_SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = (row < N)[:, None]
    d = tl.arange(0, D)
    x = tl.load(x_ptr + row[:, None] * D + d[None, :], mask=row_mask, other=0.0).to(tl.float32)
    r_t = tl.load(r_ptr + d[None, :] * D + d[:, None])  # R^T: [k, j] = R[j, k]
    radius = tl.dot(x, r_t, input_precision="ieee")  # y = x R^T, [BLOCK_N, D]
    words = tl.zeros([BLOCK_N, WORD_SLOTS], dtype=tl.int32)
    for level in tl.static_range(LEVELS):  # 0-based; the paper's level is level + 1
        radius, words = _encode_level(radius, words, cos_ptr, sin_ptr, meta_ptr, level, D, MAX_COUNT,
                                      WORD_SLOTS, BLOCK_N)
    m: tl.constexpr = D >> LEVELS
    j = tl.arange(0, m)
    tl.store(radii_ptr + row[:, None] * m + j[None, :], radius.to(OUT_DTYPE), mask=row_mask)
    slot = tl.arange(0, WORD_SLOTS)[None, :]
    tl.store(words_ptr + row[:, None] * WORDS + slot, words, mask=row_mask & (slot < WORDS))
