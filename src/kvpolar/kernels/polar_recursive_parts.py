"""polar-recursive tiles "by parts" for the transposed decode-attention kernel.

The paper setting (4 levels, angle bits ``(4, 2, 2, 2)``, radii in the input dtype;
``decode_formats.PARTS_LEVELS`` / ``PARTS_BITS``, head dim >= 128) splits a head
vector of ``D`` rotated coordinates into ``NJ = D / 16`` subtrees: radius ``r_j`` and the angles of
levels 4, 3, 2, 1 below it. Coordinate ``d = 16 j + 2 P + b1`` with path ``P = 4 b4 + 2 b3 + b2`` is

    r_j * f(psi4_j, b4) * f(psi3_{2j+b4}, b3) * f(psi2_{4j+2b4+b3}, b2) * f(psi1_{8j+P}, b1)

with ``f(psi, 0) = cos psi`` and ``f(psi, 1) = sin psi``. Part ``P`` is the ``[tokens, 2 NJ]`` tile of
coordinates ``16 j + 2 P + b1`` (``k = 2 j + b1``): built from ``[tokens, NJ]`` tiles by elementwise
products, one level at a time, then one ``join`` of its cos / sin halves. No tile is interleaved
across parts, so the tensor-core products take each part as their register operand (the query is
gathered at the part's coordinates for keys; for values part ``P`` has its own accumulator, stored
at those coordinates).

Angle ``i`` of level ``l`` sits at bit ``o_l + i * bits`` of the token's little-endian bit stream
(``kvpolar.quantizers.polar_recursive``): level 1 (4 bits) of subtree ``j`` is the 32-bit word of
bytes ``4j .. 4j+3`` (nibble ``P``); level 2 (2 bits) byte ``D/4 + j`` (field ``2 b4 + b3``); level
3 byte ``D/4 + D/16 + j // 2`` (field ``2 (j % 2) + b4``); level 4 byte ``D/4 + D/16 + D/32 + j // 4``
(field ``j % 4``). cos / sin of every codebook entry come from tables (entries 0-15 level 1, 16-19
level 2, 20-23 level 3, 24-27 level 4): level 1 is computed (its analytic codebook is a uniform grid),
levels 2-4 are cubics through their four entries, fitted once per program (:func:`level_values`).

Every helper works on tiles of any orientation: ``rows`` are pointers to the tokens' code bytes and
``jj`` the subtree index, broadcast against each other (``[BN, 1]`` and ``[1, NJ]`` for keys,
``[1, BN]`` and ``[NJ, 1]`` for values).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpolar.kernels.polar_pairs import cos_sin, field_as_float, read_code

#: first codebook entry of levels 2..4 in the cos / sin tables (level 1: entries 0-15)
ENTRY_L2, ENTRY_L3, ENTRY_L4 = (tl.constexpr(e) for e in (16, 20, 24))
#: level-1 angle of code c: (c + 1/2) * 2 pi / 16, as ``f * (STEP * unit) + (STEP / 2 - STEP * unit)``
#: with ``(f, unit)`` from ``polar_pairs.read_code`` (the code read into the mantissa of 1.0 at a bit
#: no lower than 12: the folding's rounding stays under 2**-14 rad)
_STEP = 2 * math.pi / 16
LEVEL1_STEP = tl.constexpr(_STEP)
LEVEL1_HALF_STEP = tl.constexpr(_STEP / 2)
HALF_PI = tl.constexpr(math.pi / 2)
#: How the parts are built: from ``[tokens, NJ]`` tiles with each part's cos / sin halves joined
#: (True), or from ``[tokens, 2 NJ]`` tiles, each subtree read twice and one SFU op per coordinate
#: (False). Joined key parts are WRONG when compiled for the H100 (Triton 3.6; relative error 1.4,
#: the interpreter is right), joined value parts are right: benchmarks/polar_recursive_parts_check.py,
#: results/polar_recursive_parts_check_h100.json. Re-check on a GPU before changing them. (A third
#: form for keys, ``LaunchConfig.polar_recursive_keys="subtrees"``, the default, is chosen per launch.)
KEY_JOIN = False
VALUE_JOIN = True
#: The key parts' third form, ``JOIN`` of :func:`key_part_t` (``LaunchConfig.polar_recursive_keys="subtrees"``)
KEY_SUBTREES = tl.constexpr(2)


def uniform_level1(codebook: torch.Tensor, tol: float = 1e-5) -> bool:
    """Whether the first 16 entries of a codebook table (level 1, 4 bits) are the uniform grid the
    parts kernel computes instead of looking up."""
    grid = (torch.arange(16, dtype=torch.float64) + 0.5) * _STEP
    return bool((codebook[:16].double().cpu() - grid).abs().max() <= tol)


@triton.jit
def subtree_codes(rows, ok, jj, D: tl.constexpr, byte_stride):
    """The codes of every subtree, as int32 tiles: (level-1 word: nibble ``P`` = code of path ``P``;
    level-2 byte: field ``Q = 2 b4 + b3``; level-3 byte shifted so field ``b4`` is its path's;
    level-4 code). ``rows`` point at each token's first code byte, ``byte_stride`` apart from one
    byte of the token to the next (1: a row per token; the token count where consecutive tokens are
    adjacent, which makes every load a vector over tokens); ``ok`` masks absent tokens (codes 0)."""
    w_lo = tl.load(rows + (4 * jj) * byte_stride, mask=ok, other=0).to(tl.int32)
    w_1 = tl.load(rows + (4 * jj + 1) * byte_stride, mask=ok, other=0).to(tl.int32)
    w_2 = tl.load(rows + (4 * jj + 2) * byte_stride, mask=ok, other=0).to(tl.int32)
    w_3 = tl.load(rows + (4 * jj + 3) * byte_stride, mask=ok, other=0).to(tl.int32)
    word1 = w_lo | (w_1 << 8) | (w_2 << 16) | (w_3 << 24)
    base2: tl.constexpr = D // 4
    base3: tl.constexpr = base2 + D // 16
    base4: tl.constexpr = base3 + D // 32
    byte2 = tl.load(rows + (base2 + jj) * byte_stride, mask=ok, other=0).to(tl.int32)
    byte3 = tl.load(rows + (base3 + jj // 2) * byte_stride, mask=ok, other=0).to(tl.int32) >> (4 * (jj % 2))
    code4 = (tl.load(rows + (base4 + jj // 4) * byte_stride, mask=ok, other=0).to(tl.int32) >> (2 * (jj % 4))) & 3
    return word1, byte2, byte3, code4


@triton.jit
def _cubic(v0, v1, v2, v3):
    """Coefficients ``(c0, c1, c2, c3)`` of the cubic through ``(t, v)`` at ``t = -3/2, -1/2, 1/2, 3/2``
    (float32 scalars; exact up to float32 rounding, the nodes being symmetric and small)."""
    c0 = (9.0 / 16.0) * (v1 + v2) - (1.0 / 16.0) * (v0 + v3)
    c1 = (9.0 / 8.0) * (v2 - v1) + (1.0 / 24.0) * (v0 - v3)
    c2 = 0.25 * ((v0 + v3) - (v1 + v2))
    c3 = 0.5 * (v1 - v2) + (1.0 / 6.0) * (v3 - v0)
    return c0, c1, c2, c3


@triton.jit
def level_values(cos_ptr, sin_ptr, ENTRY: tl.constexpr):
    """The cos and sin of a 2-bit level's four codebook entries as two cubics in ``t = code - 3/2``: a
    tuple of 8 float32 scalars (cos's ``c0 .. c3``, then sin's; :func:`_cubic`), computed once per
    program, so the block loop reads no table and selects nothing."""
    a0, a1, a2, a3 = _cubic(tl.load(cos_ptr + ENTRY), tl.load(cos_ptr + ENTRY + 1), tl.load(cos_ptr + ENTRY + 2),
                            tl.load(cos_ptr + ENTRY + 3))
    b0, b1, b2, b3 = _cubic(tl.load(sin_ptr + ENTRY), tl.load(sin_ptr + ENTRY + 1), tl.load(sin_ptr + ENTRY + 2),
                            tl.load(sin_ptr + ENTRY + 3))
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def angle_factor(word, SHIFT: tl.constexpr, values, SIN: tl.constexpr, NATIVE: tl.constexpr):
    """``cos`` (``SIN`` False) or ``sin`` of entry ``code`` = ``(word >> SHIFT) & 3`` of a 2-bit level
    (``values`` from ``level_values``; ``word`` int32, any shape): the code read into the mantissa of
    1.0 at bit 20 (``polar_pairs.field_as_float``; compiled, 1.0's exponent held in one register), so
    ``8 f - 9.5`` is ``t = code - 3/2`` exactly (no conversion instruction), then the level's cubic in
    three FMAs. Two selects on the code's bits gave the same values and took the H100 1.23-1.35x as
    long per call (``benchmarks/inspect_level_polynomials.py --time``)."""
    t = field_as_float(word, SHIFT, 2, 20, NATIVE) * 8.0 - 9.5
    if SIN:
        out = ((values[7] * t + values[6]) * t + values[5]) * t + values[4]
    else:
        out = ((values[3] * t + values[2]) * t + values[1]) * t + values[0]
    return out


@triton.jit
def level4_branch(radius, code4, lv4, B4: tl.constexpr, NATIVE: tl.constexpr):
    """``r_j * f(psi4_j, B4)``: the radius of level-3 node ``2 j + B4``."""
    return radius * angle_factor(code4, 0, lv4, B4 == 1, NATIVE)


@triton.jit
def level3_branch(r4, byte3, lv3, B4: tl.constexpr, B3: tl.constexpr, NATIVE: tl.constexpr):
    """Radius of level-2 node ``4 j + 2 B4 + B3`` from its parent's ``r4``."""
    return r4 * angle_factor(byte3, 2 * B4, lv3, B3 == 1, NATIVE)


@triton.jit
def level2_branch(r3, byte2, lv2, Q: tl.constexpr, B2: tl.constexpr, NATIVE: tl.constexpr):
    """Radius of level-1 node ``8 j + 2 Q + B2`` from its parent's ``r3`` (``Q = 2 b4 + b3``)."""
    return r3 * angle_factor(byte2, 2 * Q, lv2, B2 == 1, NATIVE)


@triton.jit
def leaf_pair(r2, word1, P: tl.constexpr, FAST: tl.constexpr):
    """The two coordinates ``(r2 cos psi1, r2 sin psi1)`` of path ``P`` (``b1`` = 0, 1). Level 1's
    analytic codebook is the uniform grid ``(c + 1/2) 2 pi / 16`` (Lloyd-Max on the uniform
    density; the tests check the stored table with ``uniform_level1``): the angle is one FMA on
    the code read into a float's mantissa, its cos / sin one SFU op each when ``FAST``."""
    f, unit = read_code(word1, 4 * P, 4, 12, FAST)
    theta = f * (LEVEL1_STEP * unit) + (LEVEL1_HALF_STEP - LEVEL1_STEP * unit)
    c, s = cos_sin(theta, FAST)
    return r2 * c, r2 * s


@triton.jit
def leaf_tile(r2, word1, odd, P: tl.constexpr, FAST: tl.constexpr):
    """Coordinates ``r2 f(psi1, b1)`` of path ``P`` on tiles whose columns (keys) or rows (values)
    are ``k = 2 j + b1`` (``odd`` = ``b1`` as float32): ``sin psi = cos(psi - pi/2)``, so one SFU op
    per coordinate and no ``join`` of cos / sin halves."""
    f, unit = read_code(word1, 4 * P, 4, 12, FAST)
    theta = f * (LEVEL1_STEP * unit) + ((LEVEL1_HALF_STEP - LEVEL1_STEP * unit) - odd * HALF_PI)
    c, s = cos_sin(theta, FAST)
    return r2 * c


@triton.jit
def key_part_t(s_t, r2, word1, odd, q_part, P: tl.constexpr, BN: tl.constexpr, NJ: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr, JOIN: tl.constexpr):
    """``s_t [BN, BM] += X_P [BN, 2 NJ] @ q_P [2 NJ, BM]``: from ``[BN, NJ]`` tiles ``r2``, ``word1``
    joined (``JOIN`` 1), from ``[BN, NJ, 1]`` tiles whose ``[BN, NJ, 2]`` leaves (``odd`` ``[1, 1, 2]``)
    are reshaped (``JOIN`` 2, ``LaunchConfig.polar_recursive_keys="subtrees"``), or from ``[BN, 2 NJ]``
    tiles (column ``k`` = subtree ``k // 2``; ``JOIN`` 0)."""
    if JOIN == KEY_SUBTREES:  # [BN, NJ, 1] subtree tiles, the leaf [BN, NJ, 2] (b1 last), one reshape
        tile = tl.reshape(leaf_tile(r2, word1, odd, P, FAST), [BN, 2 * NJ]).to(DT)
    elif JOIN:
        x, y = leaf_pair(r2, word1, P, FAST)
        tile = tl.reshape(tl.join(x, y), [BN, 2 * NJ]).to(DT)
    else:
        tile = leaf_tile(r2, word1, odd, P, FAST).to(DT)
    return tl.dot(tile, q_part, s_t, input_precision=PREC)


@triton.jit
def value_part_t(acc, r2, word1, odd, p_t, alpha, P: tl.constexpr, BN: tl.constexpr, NJ: tl.constexpr,
                 DT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr, JOIN: tl.constexpr):
    """``acc [2 NJ, BM] = acc * alpha + X_P^T [2 NJ, BN] @ p^T [BN, BM]``: from ``[NJ, BN]`` tiles
    joined (``JOIN``), or from ``[2 NJ, BN]`` tiles (row ``k`` = subtree ``k // 2``)."""
    if JOIN:
        x, y = leaf_pair(r2, word1, P, FAST)
        tile = tl.reshape(tl.permute(tl.join(x, y), (0, 2, 1)), [2 * NJ, BN]).to(DT)
    else:
        tile = leaf_tile(r2, word1, odd, P, FAST).to(DT)
    return tl.dot(tile, p_t, acc * alpha[None, :], input_precision=PREC)


@triton.jit
def query_part_t(q_rows, row_ok, P: tl.constexpr, NJ: tl.constexpr, DT: tl.constexpr):
    """The (rotated) query at part ``P``'s coordinates ``16 j + 2 P + b1``, transposed: ``[2 NJ, BM]``."""
    ch = part_channels(P, NJ)
    return tl.load(q_rows[None, :] + ch[:, None], mask=row_ok[None, :], other=0.0).to(DT)


@triton.jit
def part_channels(P: tl.constexpr, NJ: tl.constexpr):
    """Coordinates ``[2 NJ]`` of part ``P`` (rows of its value accumulator)."""
    k = tl.arange(0, 2 * NJ)
    return (k // 2) * 16 + 2 * P + (k % 2)


@triton.jit
def key_scores_t(s_t, radius, word1, byte2, byte3, code4, odd, q0, q1, q2, q3, q4, q5, q6, q7, lv2, lv3, lv4,
                 BN: tl.constexpr, NJ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
                 JOIN: tl.constexpr):
    """``s_t [BN, BM] += sum_P X_P q_P`` over the eight parts of ``[BN, NJ]`` subtree tiles
    (``subtree_codes``, radii ``radius`` float32); ``q0 .. q7``: ``query_part_t`` of parts 0-7;
    ``lv2 .. lv4``: ``level_values`` of levels 2-4."""
    r4 = level4_branch(radius, code4, lv4, 0, FAST)
    r3 = level3_branch(r4, byte3, lv3, 0, 0, FAST)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 0, 0, FAST), word1, odd, q0, 0, BN, NJ, DT, PREC, FAST, JOIN)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 0, 1, FAST), word1, odd, q1, 1, BN, NJ, DT, PREC, FAST, JOIN)
    r3 = level3_branch(r4, byte3, lv3, 0, 1, FAST)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 1, 0, FAST), word1, odd, q2, 2, BN, NJ, DT, PREC, FAST, JOIN)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 1, 1, FAST), word1, odd, q3, 3, BN, NJ, DT, PREC, FAST, JOIN)
    r4 = level4_branch(radius, code4, lv4, 1, FAST)
    r3 = level3_branch(r4, byte3, lv3, 1, 0, FAST)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 2, 0, FAST), word1, odd, q4, 4, BN, NJ, DT, PREC, FAST, JOIN)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 2, 1, FAST), word1, odd, q5, 5, BN, NJ, DT, PREC, FAST, JOIN)
    r3 = level3_branch(r4, byte3, lv3, 1, 1, FAST)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 3, 0, FAST), word1, odd, q6, 6, BN, NJ, DT, PREC, FAST, JOIN)
    s_t = key_part_t(s_t, level2_branch(r3, byte2, lv2, 3, 1, FAST), word1, odd, q7, 7, BN, NJ, DT, PREC, FAST, JOIN)
    return s_t


@triton.jit
def value_parts_t(a0, a1, a2, a3, a4, a5, a6, a7, radius, word1, byte2, byte3, code4, odd, p_t, alpha, lv2, lv3, lv4,
                  BN: tl.constexpr, NJ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
                  JOIN: tl.constexpr):
    """The eight accumulators ``[2 NJ, BM]`` (part ``P``: ``part_channels(P)``) after one block of
    ``[NJ, BN]`` subtree tiles weighted by ``p_t [BN, BM]``, rescaled by ``alpha`` first."""
    r4 = level4_branch(radius, code4, lv4, 0, FAST)
    r3 = level3_branch(r4, byte3, lv3, 0, 0, FAST)
    a0 = value_part_t(a0, level2_branch(r3, byte2, lv2, 0, 0, FAST), word1, odd, p_t, alpha, 0, BN, NJ, DT, PREC, FAST, JOIN)
    a1 = value_part_t(a1, level2_branch(r3, byte2, lv2, 0, 1, FAST), word1, odd, p_t, alpha, 1, BN, NJ, DT, PREC, FAST, JOIN)
    r3 = level3_branch(r4, byte3, lv3, 0, 1, FAST)
    a2 = value_part_t(a2, level2_branch(r3, byte2, lv2, 1, 0, FAST), word1, odd, p_t, alpha, 2, BN, NJ, DT, PREC, FAST, JOIN)
    a3 = value_part_t(a3, level2_branch(r3, byte2, lv2, 1, 1, FAST), word1, odd, p_t, alpha, 3, BN, NJ, DT, PREC, FAST, JOIN)
    r4 = level4_branch(radius, code4, lv4, 1, FAST)
    r3 = level3_branch(r4, byte3, lv3, 1, 0, FAST)
    a4 = value_part_t(a4, level2_branch(r3, byte2, lv2, 2, 0, FAST), word1, odd, p_t, alpha, 4, BN, NJ, DT, PREC, FAST, JOIN)
    a5 = value_part_t(a5, level2_branch(r3, byte2, lv2, 2, 1, FAST), word1, odd, p_t, alpha, 5, BN, NJ, DT, PREC, FAST, JOIN)
    r3 = level3_branch(r4, byte3, lv3, 1, 1, FAST)
    a6 = value_part_t(a6, level2_branch(r3, byte2, lv2, 3, 0, FAST), word1, odd, p_t, alpha, 6, BN, NJ, DT, PREC, FAST, JOIN)
    a7 = value_part_t(a7, level2_branch(r3, byte2, lv2, 3, 1, FAST), word1, odd, p_t, alpha, 7, BN, NJ, DT, PREC, FAST, JOIN)
    return a0, a1, a2, a3, a4, a5, a6, a7
