"""KIVI codes in the decode-attention kernels: codes turned into float16 / bfloat16 tile values
without the integer-to-float converter, and the transposed kernel's KIVI parts.

Byte units (``byte_codes``, about one instruction per code) or 16-bit units (``half_codes``, one AND
per two codes into the mantissa of 1024 / 128, ``LaunchConfig.kivi_code_units``); the key group's
scaled query and score bias (``key_group_part``), the scores of one block (``kivi_scores_t``) and the
value parts (``value_part_t``) of :func:`kvpolar.kernels.decode_transposed._split_kernel_t`. The
reference is :func:`kvpolar.decode_attention.reference_decode_attention` through
``fused_decode_attention`` (``tests/test_kernels_decode_attention.py``, which also runs the inline PTX
of ``half_code_asm`` on the host for every unit value).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvpolar.kernels.polar_pairs import field_asm, split4


@triton.jit
def codes_to(codes, DT: tl.constexpr, BITS: tl.constexpr, NATIVE: tl.constexpr):
    """int32 codes -> ``DT`` values ``code + offset`` (``_code_offset``) without the slow int->float converter:
    the code is OR-ed into the mantissa of 1024 (float16) or 128 (bfloat16, codes < 128)."""
    if DT == tl.float16:
        out = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif DT == tl.bfloat16 and BITS <= 7 and NATIVE:  # (the interpreter lacks bf16 bitcasts)
        out = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = codes.to(tl.float32).to(DT)
    return out


@triton.jit
def byte_codes(word8, K: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr):
    """Code ``K`` of every packed byte of ``word8`` (uint8) as ``DT`` ``code + offset``
    (``_code_offset``). Compiled fp16 / bf16 (codes < 128): four bytes per inline-PTX call,
    shift + mask + two byte permutes that OR each code into the mantissa of 1024 (0x64..)
    or 128 (0x43..): about one instruction per code, two codes per register."""
    if NATIVE and (DT == tl.float16 or (DT == tl.bfloat16 and BITS <= 4)):
        if DT == tl.float16 and BITS == 2 and K == 0:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.float16 and BITS == 2 and K == 1:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.float16 and BITS == 2 and K == 2:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.float16 and BITS == 2 and K == 3:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 6; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.float16 and BITS == 4 and K == 0:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.float16 and BITS == 4 and K == 1:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.float16 and BITS == 8 and K == 0:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
        elif DT == tl.bfloat16 and BITS == 2 and K == 0:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
        elif DT == tl.bfloat16 and BITS == 2 and K == 1:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
        elif DT == tl.bfloat16 and BITS == 2 and K == 2:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
        elif DT == tl.bfloat16 and BITS == 2 and K == 3:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 6; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
        elif DT == tl.bfloat16 and BITS == 4 and K == 0:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
        elif DT == tl.bfloat16 and BITS == 4 and K == 1:
            out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
        else:
            out = codes_to((word8.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
    else:
        out = codes_to((word8.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
    return out

@triton.constexpr_function
def half_code_place(k, bits, dt):
    """(shift, bit) of code ``k`` of a 16-bit unit (codes of ``bits`` bits, code ``k`` at bit
    ``k * bits``) in ``half_codes``: the unit shifted right by ``shift``, the code then lies at
    ``bit``, inside the mantissa of ``dt`` (10 bits float16, 7 bfloat16). The codes of one
    window of the mantissa's width share a shift (2-bit codes in float16: codes 0-4 unshifted,
    5-7 shifted by 10)."""
    per = (10 if dt == tl.float16 else 7) // bits
    return (k // per) * per * bits, (k % per) * bits

@triton.constexpr_function
def half_code_asm(k, bits, dt):
    """The PTX of code ``k`` in ``half_codes`` (two 16-bit units per register): the unit word,
    shifted where the code lies beyond the mantissa's first window, ORed with the exponent bits
    of ``_code_offset`` (once per window: the compiler shares it among the window's codes), then
    one AND keeping the code and the exponent, its one constant the instruction's immediate; the
    exponent held in one register (``polar_pairs.field_asm``, which builds the PTX)."""
    shift, at = half_code_place(k, bits, dt)
    exponent = 0x6400 if dt == tl.float16 else 0x4300
    keep = ((((1 << bits) - 1) << at) | exponent) * 0x10001
    return field_asm(shift, 0, keep, exponent * 0x10001)

@triton.constexpr_function
def unit_code_step(k, bits, unit_bytes, dt):
    """What one step of code ``k`` of a unit weighs in ``unit_codes``' result: 1 for byte
    units, the power of two at the code's bit in its mantissa window for 16-bit units (``half_codes``)."""
    return float(1 << half_code_place(k, bits, dt)[1]) if unit_bytes == 2 else 1.0

@triton.jit
def half_codes(units, K: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr,
                OFFSET: tl.constexpr):
    """Code ``K`` of every 16-bit unit of ``units`` (int16, any shape; code ``K`` at bit ``K * BITS``)
    as ``DT`` ``OFFSET + code * step`` (``OFFSET``: ``_code_offset``; ``step``: ``unit_code_step``).
    Compiled fp16 / bf16 (``half_code_asm``): two units per register, the code kept in place in
    the mantissa of ``OFFSET`` (1024 / 128: a mantissa unit of 1), so step = 2**bit: one AND per
    two codes, plus an OR (and a shift beyond the first) per window of the mantissa's width, shared
    by that window's codes; bytes (``byte_codes``) take about one instruction per code, spreading
    them to 16-bit lanes.  The interpreter computes the same values with integer arithmetic.
    (Tried and dropped: the exponent as a broadcast kernel argument, one register for every code:
    Triton then gave the codes a layout of their own and moved them to the products through
    shared memory.)"""
    STEP: tl.constexpr = unit_code_step(K, BITS, 2, DT)
    if NATIVE and (DT == tl.float16 or DT == tl.bfloat16):
        if DT == tl.float16:  # (one call per dtype: the compiler rejects ``dtype=DT`` here)
            out = tl.inline_asm_elementwise(half_code_asm(K, BITS, DT), "=r,r", [units],
                                            dtype=tl.float16, is_pure=True, pack=2)
        else:
            out = tl.inline_asm_elementwise(half_code_asm(K, BITS, DT), "=r,r", [units],
                                            dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        code = ((units.to(tl.int32) & 0xFFFF) >> (K * BITS)) & ((1 << BITS) - 1)
        out = (code.to(tl.float32) * STEP + OFFSET).to(DT)
    return out

@triton.jit
def unit_parts(x, U: tl.constexpr):
    """Columns of ``x`` ``[NU, U]`` (U in 1, 2, 4, 8) as eight ``[NU]`` tensors (repeated where
    U < 8): the code positions of a packed unit, from one contiguous load of a row of metadata."""
    if U == 8:
        even, odd = tl.split(tl.reshape(x, [x.shape[0], 4, 2]))  # columns 0, 2, 4, 6 and 1, 3, 5, 7
        x0, x2, x4, x6 = split4(even)
        x1, x3, x5, x7 = split4(odd)
    elif U == 4:
        x0, x1, x2, x3 = split4(x)
    elif U == 2:
        x0, x1 = tl.split(x)
        x2 = x0
        x3 = x1
    else:
        x0 = tl.reshape(x, [x.shape[0]])
        x1 = x0
        x2 = x0
        x3 = x0
    if U < 8:
        x4 = x0
        x5 = x1
        x6 = x2
        x7 = x3
    return x0, x1, x2, x3, x4, x5, x6, x7

@triton.jit
def unit_codes(word, K: tl.constexpr, BITS: tl.constexpr, UB: tl.constexpr, DT: tl.constexpr,
                NATIVE: tl.constexpr, OFFSET: tl.constexpr):
    """Code ``K`` of every packed unit of ``word`` as ``DT`` ``OFFSET + code * unit_code_step(K, ..)``:
    int16 units of 16 bits (``half_codes``), uint8 bytes or 3-byte units in int32 (``byte_codes``)."""
    if UB == 2:
        out = half_codes(word, K, BITS, DT, NATIVE, OFFSET)
    else:
        out = byte_codes(word, K, BITS, DT, NATIVE)
    return out

@triton.jit
def key_group_part(k_bias, q_t, k_scale, k_min, K: tl.constexpr, BITS: tl.constexpr, UB: tl.constexpr,
                    BN: tl.constexpr, DT: tl.constexpr, OFFSET: tl.constexpr, PREC: tl.constexpr):
    """One key group's terms for code position ``K`` of every packed unit (channels ``u * U + K``):
    the query part scaled by the group's scale, ``(q_K * scale) [NU, BM]`` in ``DT`` (the B operand
    of ``codes_K [BN, NU] @ (q_K * scale)``, the codes being ``code + OFFSET``), and ``k_bias``
    ``[BN, BM]`` float32 plus the part's score bias ``q_K . min - OFFSET * sum(q_K * scale)``,
    the same in every token row, on the tensor cores: the minimum repeated over the block's rows
    times the query, and a constant ``-OFFSET`` tile times the scaled query (every product exact,
    float32 sums; computed elementwise in float32 and reduced across threads, the bias took about
    twice the instructions). ``k_scale`` / ``k_min``: ``[NU]``. Where a code step weighs more than 1
    in the codes (``unit_code_step``: 16-bit units), the scaled query carries its inverse, a power of two,
    applied to the query before the scale: ``q_K / step`` does not change from block to block, so the
    compiler computes it once, outside the loop (sm_90: kivi-2 737 -> 709 instructions per block, its
    16-byte stack gone). The product is the same ``(q_K * scale) / step`` rounded once, except where
    ``q_K / step`` falls below float16's normal range (``|q| < 2**-14 * step``): there ``q_K`` loses
    bits under ``2**-25 * step``, the float16 rounding of a query entry of ``2**-14 * step``."""
    STEP: tl.constexpr = unit_code_step(K, BITS, UB, DT)
    if STEP != 1:
        q_scaled = (q_t * (1.0 / STEP)) * k_scale.to(DT)[:, None]  # (DT x DT: exact product rounded once)
    else:
        q_scaled = q_t * k_scale.to(DT)[:, None]
    nu: tl.constexpr = q_t.shape[0]
    k_bias = tl.dot(tl.broadcast_to(k_min.to(DT)[None, :], [BN, nu]), q_t, k_bias, input_precision=PREC)
    if OFFSET != 0:
        k_bias = tl.dot(tl.full([BN, nu], -OFFSET, DT), q_scaled, k_bias, input_precision=PREC)
    return q_scaled, k_bias

@triton.jit
def key_group_terms(q0, q1, q2, q3, q4, q5, q6, q7, k_scale_row, k_min_row, U: tl.constexpr,
                    BITS: tl.constexpr, UB: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr,
                    DT: tl.constexpr, OFFSET: tl.constexpr, PREC: tl.constexpr):
    """A key group's eight scaled query parts ``qs_K [NU, BM]`` in ``DT`` and its score bias
    ``[BN, BM]`` float32 (``key_group_part`` for the ``U`` code positions of a unit; the parts past
    ``U`` repeat the query). ``q_K``: ``[NU, BM]`` query parts; ``k_scale_row`` / ``k_min_row``:
    ``[NU, U]`` the group's scale and minimum of every channel ``u * U + K``."""
    sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7 = unit_parts(k_scale_row, U)
    mn0, mn1, mn2, mn3, mn4, mn5, mn6, mn7 = unit_parts(k_min_row, U)
    k_bias = tl.zeros([BN, BM], tl.float32)
    qs0, k_bias = key_group_part(k_bias, q0, sc0, mn0, 0, BITS, UB, BN, DT, OFFSET, PREC)
    qs1, qs2, qs3, qs4, qs5, qs6, qs7 = q1, q2, q3, q4, q5, q6, q7  # (the parts a unit has replace them)
    if U >= 2:
        qs1, k_bias = key_group_part(k_bias, q1, sc1, mn1, 1, BITS, UB, BN, DT, OFFSET, PREC)
    if U >= 4:
        qs2, k_bias = key_group_part(k_bias, q2, sc2, mn2, 2, BITS, UB, BN, DT, OFFSET, PREC)
        qs3, k_bias = key_group_part(k_bias, q3, sc3, mn3, 3, BITS, UB, BN, DT, OFFSET, PREC)
    if U >= 8:
        qs4, k_bias = key_group_part(k_bias, q4, sc4, mn4, 4, BITS, UB, BN, DT, OFFSET, PREC)
        qs5, k_bias = key_group_part(k_bias, q5, sc5, mn5, 5, BITS, UB, BN, DT, OFFSET, PREC)
        qs6, k_bias = key_group_part(k_bias, q6, sc6, mn6, 6, BITS, UB, BN, DT, OFFSET, PREC)
        qs7, k_bias = key_group_part(k_bias, q7, sc7, mn7, 7, BITS, UB, BN, DT, OFFSET, PREC)
    return qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7, k_bias

@triton.jit
def kivi_scores_t(k_bias, word, qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7, U: tl.constexpr, BITS: tl.constexpr,
                   UB: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr, OFFSET: tl.constexpr,
                   PREC: tl.constexpr):
    """KIVI keys' transposed scores ``[BN, BM]`` float32 of one block: ``k_bias`` (the group's score
    bias, the first product's accumulator) plus code ``K`` of every unit of ``word`` times the
    group-scaled query part ``qs_K``, for the ``U`` code positions of a unit (``unit_codes``)."""
    s_t = tl.dot(unit_codes(word, 0, BITS, UB, DT, NATIVE, OFFSET), qs0, k_bias, input_precision=PREC)
    if U >= 2:
        s_t = tl.dot(unit_codes(word, 1, BITS, UB, DT, NATIVE, OFFSET), qs1, s_t, input_precision=PREC)
    if U >= 4:
        s_t = tl.dot(unit_codes(word, 2, BITS, UB, DT, NATIVE, OFFSET), qs2, s_t, input_precision=PREC)
        s_t = tl.dot(unit_codes(word, 3, BITS, UB, DT, NATIVE, OFFSET), qs3, s_t, input_precision=PREC)
    if U >= 8:
        s_t = tl.dot(unit_codes(word, 4, BITS, UB, DT, NATIVE, OFFSET), qs4, s_t, input_precision=PREC)
        s_t = tl.dot(unit_codes(word, 5, BITS, UB, DT, NATIVE, OFFSET), qs5, s_t, input_precision=PREC)
        s_t = tl.dot(unit_codes(word, 6, BITS, UB, DT, NATIVE, OFFSET), qs6, s_t, input_precision=PREC)
        s_t = tl.dot(unit_codes(word, 7, BITS, UB, DT, NATIVE, OFFSET), qs7, s_t, input_precision=PREC)
    return s_t

@triton.jit
def word_halves(words, shift, DT: tl.constexpr):
    """The 16-bit values of ``DT`` (float16 / bfloat16) at bit ``shift`` (0 or 16) of int32 ``words``."""
    return ((words >> shift) & 0xFFFF).to(tl.int16).to(DT, bitcast=True)

@triton.jit
def group_units(meta, NU: tl.constexpr):
    """Per-(group, token) metadata ``[NG, BN]`` as ``[NU, BN]`` per packed unit: the units of a
    group are consecutive (unit ``u`` of ``NU`` is in group ``u // (NU / NG)``)."""
    ng: tl.constexpr = meta.shape[0]
    bn: tl.constexpr = meta.shape[1]
    return tl.reshape(tl.broadcast_to(meta[:, None, :], [ng, NU // ng, bn]), [NU, bn])

@triton.constexpr_function
def value_fma_factor(dt):
    """The power of two ``F`` that ``kivi_value_min="product"`` folds into a KIVI value group's scale:
    the fused multiply-add computes ``(OFFSET + code * step) * (F * scale) - OFFSET * F * scale``.
    float16 (``OFFSET`` 1024): ``2**-5``, so that ``OFFSET * F * scale`` overflows only for scales above
    2047 and ``F * scale`` is subnormal (each value then off by at most ``code * 2**-20``) only below
    ``2**-9``; bfloat16 (``OFFSET`` 128, float32's range): 1."""
    return 2.0 ** -5 if dt == tl.float16 else 1.0

@triton.jit
def value_part_t(acc_t, p_t, word_t, v_scale_t, v_min_t, alpha, K: tl.constexpr, BITS: tl.constexpr,
                  UB: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr, OFFSET: tl.constexpr,
                  PREC: tl.constexpr, MIN_APART: tl.constexpr):
    """``acc_K^T [NU, BM] = acc_K^T * alpha + v_K^T [NU, BN] @ p^T [BN, BM]`` (values as the A operand;
    codes read by ``unit_codes``). ``MIN_APART`` (``LaunchConfig.kivi_value_min="product"``):
    ``v_scale_t`` holds ``F * scale`` and ``v_min_t`` ``-OFFSET * F * scale`` (``value_fma_factor``), and
    the part is ``code * step * F * scale`` by one fused multiply-add of the code value
    ``OFFSET + code * step`` (exact product and sum, rounded once); the minimum and ``1 / (step * F)``
    are applied elsewhere (``value_sums``)."""
    v = unit_codes(word_t, K, BITS, UB, DT, NATIVE, OFFSET)
    STEP: tl.constexpr = unit_code_step(K, BITS, UB, DT)
    if MIN_APART and NATIVE:
        v = tl.fma(v, v_scale_t, v_min_t)
    elif MIN_APART:  # the interpreter: in float32, which holds the exact product and sum (one rounding,
        # to DT below, as the GPU's fma; Triton 3.6's interpreter rounds a DT product before the add)
        v = tl.fma(v.to(tl.float32), v_scale_t.to(tl.float32), v_min_t.to(tl.float32))
    elif STEP != 1:  # (v - OFFSET) / STEP, exactly: one multiply-add by powers of two
        v = (v * (1.0 / STEP) - OFFSET / STEP) * v_scale_t + v_min_t
    else:
        v = (v - OFFSET) * v_scale_t + v_min_t
    v = v.to(DT)
    return tl.dot(v, p_t, acc_t * alpha[None, :], input_precision=PREC)

@triton.jit
def value_sums(acc_t, acc_min, K: tl.constexpr, BITS: tl.constexpr, UB: tl.constexpr, DT: tl.constexpr,
               MIN_APART: tl.constexpr):
    """Code position ``K``'s output sums ``[NU, BM]`` float32 after the loop: as accumulated, or
    (``MIN_APART``) times ``1 / (step * F)`` (a power of two: exact) plus the minimum's sums."""
    if MIN_APART:
        STEP: tl.constexpr = unit_code_step(K, BITS, UB, DT)
        F: tl.constexpr = value_fma_factor(DT)
        acc_t = acc_t * (1.0 / (STEP * F)) + acc_min
    return acc_t
