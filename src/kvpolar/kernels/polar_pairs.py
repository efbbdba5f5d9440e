"""Triton helpers: polar-rope key pairs decoded in registers, shared by the scores and attention kernels.

Polar-rope codes of ``BITS = radius_bits + angle_bits`` bits in {2, 4, 6, 8} pack four pairs into a
unit of ``BITS / 2`` whole bytes (little-endian). Both kernels read a tile of units ``[tokens, NU]``
as int32 words and decode "by parts": part ``K`` of every unit is pair ``4 u + K``, so no codes are
interleaved and each part is the register (A) operand of its own tensor-core product with the query
at those pairs' channels (``s^T += X_K q_x,K^T + Y_K q_y,K^T``).

Per pair the decode costs one AND per code on its unit word with the exponent of 1.0 ORed in (the
code then reads as ``1 + code * 2**(at - 23)`` in float32 for a code at mantissa bit ``at``; no
int->float converter), that word being shared by the codes read from it unshifted or after one of a
few shifts (:func:`read_code`); one FMA each for the radius and the angle (the metadata are
pre-folded: ``r = f_r * (2**(23 - at) rs) + (r_min - 2**(23 - at) rs)``), and ``cos.approx`` /
``sin.approx`` on the special-function unit (absolute error ~1e-6).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: pair bits whose units hold four codes in whole bytes (the transposed / by-parts decode)
UNIT_PAIR_BITS = (2, 4, 6, 8)


def unit_words(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, int]:
    """``(tensor, unit bytes)`` to pass as the kernels' code pointer: for 8-, 6- and 4-bit pairs the
    byte rows viewed as int32 / int16 words when the layout allows; else the bytes."""
    ub = bits // 2
    view = {4: torch.int32, 3: torch.int16, 2: torch.int16}.get(ub)
    if view is not None and codes.shape[-1] % ub == 0:
        try:
            return codes.view(view), ub
        except RuntimeError:  # storage offset or strides not a multiple of the word size
            pass
    return codes, ub


@triton.jit
def load_unit_words(row_ptrs, row_ok, NU: tl.constexpr, UB: tl.constexpr, WORDS: tl.constexpr):
    """``[BN, NU]`` int32 units of ``UB`` bytes from ``row_ptrs`` ``[BN, 1]`` (:func:`unit_words_at`;
    ``WORDS == 2``: 3-byte units from int32 words, :func:`load_units24`)."""
    if WORDS == 2:
        out = load_units24(row_ptrs, row_ok, NU)
    else:
        out = unit_words_at(row_ptrs, row_ok, tl.arange(0, NU)[None, :], UB, WORDS)
    return out


@triton.jit
def units_from_words(w):
    """24-bit units ``[BN, NU]`` from int32 words ``[BN, NU]`` laid out four slots per three words
    (slot ``k`` of group ``v`` holds word ``3 v + k`` of the row, slot 3 unused): unit ``4 v + j``
    is bytes ``12 v + 3 j`` .. ``12 v + 3 j + 2`` of the row, assembled by shifts and ORs."""
    BN: tl.constexpr = w.shape[0]
    NU: tl.constexpr = w.shape[1]
    w_even, w_odd = tl.split(tl.reshape(w, [BN, NU // 4, 2, 2]))  # words (0, 2) and (1, 3) of each 12 bytes
    w0, w2 = tl.split(w_even)
    w1, w3 = tl.split(w_odd)
    u0 = w0 & 0xFFFFFF
    u1 = ((w0 >> 24) & 0xFF) | ((w1 & 0xFFFF) << 8)
    u2 = ((w1 >> 16) & 0xFFFF) | ((w2 & 0xFF) << 16)
    u3 = (w2 >> 8) & 0xFFFFFF
    return tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BN, NU])  # [.., i, o]: unit 4 v + 2 i + o


@triton.jit
def load_units24(row_ptrs, row_ok, NU: tl.constexpr):
    """``[BN, NU]`` 24-bit units from rows of int32 words (``row_ptrs`` ``[BN, 1]``, 4-byte aligned):
    every word is read once, three per four units (:func:`units_from_words`)."""
    c = tl.arange(0, NU)[None, :]  # slot k = c % 4 of group v = c // 4 holds word 3 v + k (k < 3)
    return units_from_words(tl.load(row_ptrs + (c // 4) * 3 + c % 4, mask=row_ok & (c % 4 < 3), other=0))


@triton.jit
def load_units24_t(col_ptrs, col_ok, NU: tl.constexpr):
    """``[NU, BN]`` 24-bit units from columns of int32 words (``col_ptrs`` ``[1, BN]``): the
    transposed orientation of :func:`load_units24` (values: units along the rows)."""
    c = tl.arange(0, NU)[:, None]
    w = tl.load(col_ptrs + (c // 4) * 3 + c % 4, mask=col_ok & (c % 4 < 3), other=0)  # [NU, BN]
    return tl.trans(units_from_words(tl.trans(w)))


@triton.jit
def unit_words_at(row_ptrs, row_ok, u, UB: tl.constexpr, WORDS: tl.constexpr):
    """int32 units ``u`` of ``UB`` bytes from ``row_ptrs``, any orientation (``u`` broadcast against
    ``row_ptrs`` / ``row_ok``): with ``WORDS`` (pointers to int32 words for UB=4, int16 for UB=2 or
    3) one load per unit (UB=3: three per two units), else ``UB`` byte loads combined little-endian."""
    if WORDS and UB == 3:  # int16 words: unit u = bytes 3u .. 3u+2 = halfwords 3v+p, 3v+1+p >> 8p (v = u // 2, p = u % 2)
        h = (u // 2) * 3 + (u % 2)
        lo = tl.load(row_ptrs + h, mask=row_ok, other=0).to(tl.int32) & 0xFFFF
        hi = tl.load(row_ptrs + h + 1, mask=row_ok, other=0).to(tl.int32)
        word = ((lo | (hi << 16)) >> ((u % 2) * 8)) & 0xFFFFFF
    elif WORDS:
        word = tl.load(row_ptrs + u, mask=row_ok, other=0).to(tl.int32)
        if UB == 2:
            word = word & 0xFFFF
    else:
        cols = u * UB
        word = tl.load(row_ptrs + cols, mask=row_ok, other=0).to(tl.int32)
        if UB >= 2:
            word = word | (tl.load(row_ptrs + cols + 1, mask=row_ok, other=0).to(tl.int32) << 8)
        if UB >= 3:
            word = word | (tl.load(row_ptrs + cols + 2, mask=row_ok, other=0).to(tl.int32) << 16)
        if UB >= 4:
            word = word | (tl.load(row_ptrs + cols + 3, mask=row_ok, other=0).to(tl.int32) << 24)
    return word


@triton.jit
def pair_channels(j, P: tl.constexpr, HALF: tl.constexpr):
    """Channels ``(x, y)`` of pair ``j`` of a head with ``P`` pairs: ``(j, j + P)`` for the "half"
    pairing (rotate-half RoPE), ``(2 j, 2 j + 1)`` for "interleaved"."""
    if HALF:
        cx = j
        cy = j + P
    else:
        cx = 2 * j
        cy = 2 * j + 1
    return cx, cy


@triton.constexpr_function
def field_asm(shift, at, keep, exponent=0x3F800000):
    """The PTX of a code read into a float's mantissa (:func:`field_as_float` compiled; also
    ``kivi_parts.half_code_asm``, two half-precision fields per register): the word, shifted from bit
    ``shift`` to bit ``at`` unless they are equal, ORed with ``exponent``, then one AND with ``keep``
    as its immediate. The exponent comes from a register the compiler cannot prove constant (the
    dynamic shared memory size shifted out, zero, ORed with ``exponent``): written as a constant, the
    compiler folded it into each AND-OR and, short of registers for the second constant, reloaded it
    before most codes (one ``IMAD.MOV`` each). The compiler shares the shifted-and-ORed word among
    the codes read from it."""
    if shift == at:
        word = "or.b32 t, $1, e;"
    elif shift < at:
        word = f"shl.b32 t, $1, {at - shift}; or.b32 t, t, e;"
    else:
        word = f"shr.u32 t, $1, {shift - at}; or.b32 t, t, e;"
    return ("{ .reg .b32 t, e; mov.u32 e, %dynamic_smem_size; shr.u32 e, e, 31; "
            + f"or.b32 e, e, {exponent:#x}; {word} and.b32 $0, t, {keep:#x}; }}")


@triton.jit
def field_as_float(word, SHIFT: tl.constexpr, WIDTH: tl.constexpr, AT: tl.constexpr, NATIVE: tl.constexpr):
    """``1 + ((word >> SHIFT) & (2**WIDTH - 1)) * 2**(AT - 23)`` as float32 (``AT + WIDTH <= 23``): the
    word (shifted unless ``AT == SHIFT``) with the exponent of 1.0 ORed in, then one AND keeping the
    code and that exponent. The compiler shares the shifted-and-ORed word between the codes read
    from it, and each AND has one constant, which the instruction takes as its immediate (an AND-OR
    of the code into 1.0 needs two constants: at 255 registers the compiler rematerialized the mask
    before most of them). ``NATIVE`` (compiled): the same in PTX (:func:`field_asm`), the exponent
    held in one register."""
    KEEP: tl.constexpr = (((1 << WIDTH) - 1) << AT) | 0x3F800000
    if NATIVE:
        bits = tl.inline_asm_elementwise(field_asm(SHIFT, AT, KEEP), "=r,r", [word], dtype=tl.int32,
                                         is_pure=True, pack=1)
    elif SHIFT == AT:
        bits = (word | 0x3F800000) & KEEP
    elif SHIFT < AT:
        bits = ((word << (AT - SHIFT)) | 0x3F800000) & KEEP
    else:
        bits = ((word >> (SHIFT - AT)) | 0x3F800000) & KEEP
    return bits.to(tl.float32, bitcast=True)


@triton.constexpr_function
def read_position(shift, width, lo):
    """The mantissa bit :func:`read_code` reads a ``width``-bit code at bit ``shift`` at: where it lies,
    else 12 bits up, else 9 bits down, else bit 16; never below ``lo``."""
    if shift >= lo and shift + width <= 23:
        return shift
    if shift + 12 >= lo and shift + 12 + width <= 23:
        return shift + 12
    if shift - 9 >= lo and shift - 9 + width <= 23:
        return shift - 9
    return 16


@triton.jit
def read_code(word, SHIFT: tl.constexpr, WIDTH: tl.constexpr, LO: tl.constexpr, NATIVE: tl.constexpr):
    """The ``WIDTH``-bit code at bit ``SHIFT`` of ``word`` as ``(f, unit)``: ``f`` float32 ``1 + code /
    unit`` (:func:`field_as_float`) and ``unit`` = ``2**(23 - at)`` (a float32 constant), so a grid
    ``min + code * scale`` is the one FMA ``f * (scale * unit) + (min - scale * unit)``. The
    mantissa bit ``at`` the code is read at: where it lies, else 12 bits up (one left shift that the
    compiler shares between the word's low codes), else 9 bits down (one right shift shared by the
    high codes), else bit 16 (a shift of its own); never below ``LO``: folding ``unit`` into the
    grid rounds ``min - scale * unit`` in float32 within ``scale * 2**(-1 - at)``, which the caller
    keeps below its tolerance (:func:`pair_xy`). For four 6- or 8-bit pairs a unit word takes 3
    shifts instead of 7. ``NATIVE``: :func:`field_as_float`'s compiled form."""
    AT: tl.constexpr = read_position(SHIFT, WIDTH, LO)
    return field_as_float(word, SHIFT, WIDTH, AT, NATIVE), tl.full((), (1 << (23 - AT)) * 1.0, tl.float32)


@triton.jit
def cos_sin(theta, FAST: tl.constexpr):
    """(cos, sin) of float32 ``theta``: ``cos.approx`` / ``sin.approx`` (one SFU op each) when FAST."""
    if FAST:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [theta], dtype=tl.float32,
                                      is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [theta], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        c = tl.cos(theta)
        s = tl.sin(theta)
    return c, s


@triton.jit
def split4(x):
    """Columns 0..3 of ``x`` ``[n, 4]``: four ``[n]`` tensors."""
    even, odd = tl.split(tl.reshape(x, [x.shape[0], 2, 2]))  # columns (0, 2) and (1, 3)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def pair_meta(meta_rs, meta_rm, meta_as, meta_am, uk, ok):
    """Metadata of the pairs of units ``uk`` (``arange(NU)``): radius scale / min and angle scale /
    min, float32 ``[NU, 4]`` each (pair ``4 u + K`` at ``[u, K]``). Each field is one contiguous load
    of ``4 NU`` values (which Triton's pipeliner can copy asynchronously, stages ahead), split into
    the parts by :func:`split4` and folded per part by :func:`pair_xy`; ``ok`` ``[NU]``."""
    offs = (uk * 4)[:, None] + tl.arange(0, 4)[None, :]
    rs = tl.load(meta_rs + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    rm = tl.load(meta_rm + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    a_s = tl.load(meta_as + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    am = tl.load(meta_am + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    return rs, rm, a_s, am


@triton.jit
def pair_xy(word, r_scale, r_min, a_scale, a_min, K: tl.constexpr, BITS: tl.constexpr, AB: tl.constexpr,
            FAST: tl.constexpr):
    """Key coordinates ``(x, y) = r (cos, sin) theta`` float32 of code ``K`` of every unit of ``word``
    (int32 ``[BN, NU]``): ``r = r_min + rc * r_scale``, ``theta = a_min + ac * a_scale`` (metadata
    ``[1, NU]``), each code read by :func:`read_code` and the metadata folded for it on ``[1, NU]``.
    The lowest bit a code is read at keeps the folding's rounding under 2**-14 of the key's scale:
    angles step at most 2 pi / (2**bits - 1), radii r_max / (2**bits - 1). ``FAST`` (compiled
    only): cos / sin on the special-function unit and the codes read by :func:`field_asm`."""
    RB: tl.constexpr = BITS - AB
    LO_A: tl.constexpr = 12 if AB >= 4 else (13 if AB == 3 else (15 if AB == 2 else 16))
    LO_R: tl.constexpr = 10 if RB >= 4 else (11 if RB == 3 else (12 if RB == 2 else 13))
    fa, a_unit = read_code(word, K * BITS, AB, LO_A, FAST)
    fr, r_unit = read_code(word, K * BITS + AB, RB, LO_R, FAST)
    a_mul = a_scale * a_unit
    r_mul = r_scale * r_unit
    c, s = cos_sin(fa * a_mul + (a_min - a_mul), FAST)
    r = fr * r_mul + (r_min - r_mul)
    return r * c, r * s


@triton.jit
def query_pairs_t(q_rows, row_ok, uk, K: tl.constexpr, D: tl.constexpr, PAIR_HALF: tl.constexpr,
                  DT: tl.constexpr):
    """The query rows ``q_rows`` ``[BM]`` at the x and y channels of pairs ``4 u + K`` (``uk`` =
    ``arange(NU)``), transposed: ``[NU, BM]`` each, in ``DT``."""
    cx, cy = pair_channels(uk * 4 + K, D // 2, PAIR_HALF)
    qx = tl.load(q_rows[None, :] + cx[:, None], mask=row_ok[None, :], other=0.0).to(DT)
    qy = tl.load(q_rows[None, :] + cy[:, None], mask=row_ok[None, :], other=0.0).to(DT)
    return qx, qy


@triton.jit
def scores_part_t(s_t, word, qx, qy, r_scale, r_min, a_scale, a_min, K: tl.constexpr, BITS: tl.constexpr,
                  AB: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr):
    """``s_t [BN, BM] += X_K [BN, NU] @ qx_K + Y_K @ qy_K`` for pairs ``4 u + K``: the key pair
    coordinates decoded in registers (:func:`pair_xy`) are the A operands of the products.
    ``r_scale`` .. ``a_min``: part ``K`` of :func:`pair_meta`, ``[NU]``."""
    x, y = pair_xy(word, r_scale[None, :], r_min[None, :], a_scale[None, :], a_min[None, :], K, BITS, AB, FAST)
    s_t = tl.dot(x.to(DT), qx, s_t, input_precision=PREC)
    return tl.dot(y.to(DT), qy, s_t, input_precision=PREC)


@triton.jit
def scores_t(s_t, word, qx0, qy0, qx1, qy1, qx2, qy2, qx3, qy3, m_rs, m_rm, m_as, m_am, meta_ok, uk,
             BITS: tl.constexpr, AB: tl.constexpr, DT: tl.constexpr, FAST: tl.constexpr, PREC: tl.constexpr):
    """``s_t [BN, BM]`` plus the scores of all four parts of ``word`` (:func:`scores_part_t` for parts
    0..3, the query split by :func:`query_pairs_t`). ``m_*``: pointers to the group's radius scale /
    min and angle scale / min rows; ``meta_ok`` ``[NU]``: whether the block has tokens (a short last
    split's surplus blocks read no metadata)."""
    r_scale, r_min, a_scale, a_min = pair_meta(m_rs, m_rm, m_as, m_am, uk, meta_ok)
    rs0, rs1, rs2, rs3 = split4(r_scale)
    rn0, rn1, rn2, rn3 = split4(r_min)
    as0, as1, as2, as3 = split4(a_scale)
    an0, an1, an2, an3 = split4(a_min)
    s_t = scores_part_t(s_t, word, qx0, qy0, rs0, rn0, as0, an0, 0, BITS, AB, DT, FAST, PREC)
    s_t = scores_part_t(s_t, word, qx1, qy1, rs1, rn1, as1, an1, 1, BITS, AB, DT, FAST, PREC)
    s_t = scores_part_t(s_t, word, qx2, qy2, rs2, rn2, as2, an2, 2, BITS, AB, DT, FAST, PREC)
    return scores_part_t(s_t, word, qx3, qy3, rs3, rn3, as3, an3, 3, BITS, AB, DT, FAST, PREC)
