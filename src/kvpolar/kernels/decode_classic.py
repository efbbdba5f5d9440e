"""The classic split kernel of the fused decode attention (``_split_kernel``: ``[block, D]`` tiles,
``num_warps`` warps sharing the query rows); the splits are merged by :mod:`kvpolar.kernels.decode_combine`.

Launched by :mod:`kvpolar.kernels.decode_attention` (``_launch_split``, residual windows it does not fold and the
caches the launch policy does not send to the transposed kernel; ``fused_decode_attention`` then
``decode_combine``). Reference: :func:`kvpolar.decode_attention.reference_decode_attention`.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvpolar.kernels import decode_formats as formats
from kvpolar.kernels import kivi_parts as _kp
from kvpolar.kernels.dependent_launch import launch_dependents
from kvpolar.kernels.polar_pairs import pair_channels as _pair_channels


@triton.jit
def _unpack(row_ptrs, row_ok, scale, minimum, BITS: tl.constexpr, UB: tl.constexpr, U: tl.constexpr,
            NCODES: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr, AFFINE: tl.constexpr,
            RAW: tl.constexpr, OFFSET: tl.constexpr):
    """Codes of ``BITS`` bits, densely packed from ``row_ptrs`` (uint8 ``[BN, 1]``), as
    ``[BN, NCODES]`` in their natural order. Units of ``UB`` bytes hold ``U`` codes each.

    RAW: int32 codes. Else ``DT`` values: ``(code - offset) * scale + minimum`` with AFFINE
    (``scale``/``minimum`` ``[BN, NCODES // U]``, one per unit, applied before interleaving),
    or ``code + OFFSET`` without (``OFFSET = _code_offset(...)``; the caller corrects for it).
    """
    word = _load_units(row_ptrs, row_ok, NCODES // U, UB)
    CMASK: tl.constexpr = (1 << BITS) - 1
    codes = (word[:, :, None] >> (tl.arange(0, U) * BITS)[None, None, :]) & CMASK  # [BN, NU, U]
    if RAW:
        out = codes
    else:
        out = _kp.codes_to(codes, DT, BITS, NATIVE)
        if AFFINE:
            out = ((out - OFFSET) * scale[:, :, None] + minimum[:, :, None]).to(DT)
    return tl.reshape(out, [out.shape[0], NCODES])  # merge (unit, code in unit): natural order

@triton.jit
def _load_units(row_ptrs, row_ok, NU: tl.constexpr, UB: tl.constexpr):
    """``[BN, NU]`` int32 words, one per packed unit of ``UB`` bytes (little-endian)."""
    cols = tl.arange(0, NU)[None, :] * UB
    word = tl.load(row_ptrs + cols, mask=row_ok, other=0).to(tl.int32)
    if UB == 3:
        word = word | (tl.load(row_ptrs + cols + 1, mask=row_ok, other=0).to(tl.int32) << 8)
        word = word | (tl.load(row_ptrs + cols + 2, mask=row_ok, other=0).to(tl.int32) << 16)
    return word

@triton.jit
def _kivi_key_part(s, bias, q_rows, row_ok, word, meta_ptr0, meta_ptr1, meta_ok, K: tl.constexpr,
                   U: tl.constexpr, BITS: tl.constexpr, NU: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr,
                   OFFSET: tl.constexpr, PREC: tl.constexpr):
    """Scores of code ``K`` of every unit (channels ``u * U + K``): no interleaving needed. ``meta_ok``:
    whether the block holds tokens (a short last split's surplus blocks have no key group to read)."""
    ch = tl.arange(0, NU) * U + K
    qk = tl.load(q_rows[:, None] + ch[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    k_scale = tl.load(meta_ptr0 + ch, mask=meta_ok, other=0.0).to(tl.float32)
    k_min = tl.load(meta_ptr1 + ch, mask=meta_ok, other=0.0).to(tl.float32)
    q_scaled = (qk * k_scale[None, :]).to(DT)
    codes = _kp.codes_to((word >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
    s = tl.dot(q_scaled, tl.trans(codes), s, input_precision=PREC)
    bias += tl.sum(qk * k_min[None, :] - OFFSET * q_scaled.to(tl.float32), axis=1)
    return s, bias

@triton.jit
def _kivi_value_part(acc, p, word, v_scale, v_min, alpha, K: tl.constexpr, BITS: tl.constexpr,
                     DT: tl.constexpr, NATIVE: tl.constexpr, OFFSET: tl.constexpr, PREC: tl.constexpr):
    """``acc_K = acc_K * alpha + p @ v_K`` for code ``K`` of every unit (channels ``u * U + K``)."""
    v = _kp.codes_to((word >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
    v = ((v - OFFSET) * v_scale + v_min).to(DT)
    return tl.dot(p, v, acc * alpha[:, None], input_precision=PREC)

@triton.jit
def online_softmax_rows(s, m_i, l_i):
    """One block of the online softmax (base 2) over the rows of ``s`` ``[M, N]`` float32 scores
    (masked entries -inf): returns the new running maximum ``[M]``, the factor ``alpha`` ``[M]`` that
    rescales the running output, the probabilities ``p`` ``[M, N]`` and the new running sum ``[M]``.
    A row with every score -inf so far keeps a maximum of -inf and adds nothing."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _split_kernel(
    q_ptr, sq_b, sq_h, sq_t,
    k_ptr, sk_b, sk_h, sk_t, km0, km1, km2, km3, skm_b, skm_h, skm_g,
    v_ptr, sv_b, sv_h, sv_t, vm0, vm1, svm_b, svm_h, svm_t, svm_g,
    mask_ptr, smk_b, smk_h, smk_t, smk_n,
    part_max, part_sum, part_acc,
    n_tokens, mask_offset, blocks_per_split, split_base, total_splits, n_kv_heads,
    qk_scale,
    D: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCKS_CONST: tl.constexpr,
    KEY_FMT: tl.constexpr, KEY_BITS: tl.constexpr, KEY_UB: tl.constexpr, KEY_U: tl.constexpr,
    KEY_GROUP: tl.constexpr, ANGLE_BITS: tl.constexpr, PAIR_HALF: tl.constexpr,
    VAL_FMT: tl.constexpr, VAL_BITS: tl.constexpr, VAL_UB: tl.constexpr, VAL_U: tl.constexpr,
    VAL_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, NATIVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    KEY_OFFSET: tl.constexpr, VAL_OFFSET: tl.constexpr, PARTS: tl.constexpr, FP8_CONVERT: tl.constexpr,
    ktab0, ktab1, ktab2, k_book_stride, vtab0, vtab1, vtab2, v_book_stride,
    KEY_NB: tl.constexpr, KEY_LEVELS: tl.constexpr,
    VAL_NB: tl.constexpr, VAL_LEVELS: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = 0,
):
    """The split step (see the module docstring); ``ktab*`` / ``vtab*``, ``*_book_stride``,
    ``*_NB``, ``*_LEVELS``: the formats of ``decode_formats`` (``kernel_args``); ``FP8_CONVERT``:
    e4m3 by the GPU's conversion (``_fp8_conversion``); LAUNCH_DEPENDENTS: let the combine kernel,
    launched next as a dependent launch, start: 1 at the programs' start, 2 after their block loop, 0
    never (``dependent_launch.SIGNAL_AT``)."""
    launch_dependents(LAUNCH_DEPENDENTS == 1)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // n_kv_heads
    hkv = pid % n_kv_heads
    start = split * blocks_per_split * BLOCK_N  # a short last split masks its surplus blocks
    DT: tl.constexpr = DOT_DTYPE  # operand dtype of the tensor-core products (the query's)
    PREC: tl.constexpr = "ieee" if DT == tl.float32 else "tf32"
    HALF: tl.constexpr = D // 2

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GQA * TQ
    head = hkv * GQA + rows // TQ
    tok = rows % TQ
    q_rows = q_ptr + b.to(tl.int64) * sq_b + head * sq_h + tok * sq_t
    dcol = tl.arange(0, D)
    if KEY_FMT == 2:  # polar-rope: the query split into the x and y channel of every pair
        ix, iy = _pair_channels(tl.arange(0, HALF), HALF, PAIR_HALF)
        qx = tl.load(q_rows[:, None] + ix[None, :], mask=row_ok[:, None], other=0.0).to(DT)
        qy = tl.load(q_rows[:, None] + iy[None, :], mask=row_ok[:, None], other=0.0).to(DT)
    else:
        qf = tl.load(q_rows[:, None] + dcol[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q = qf.to(DT)

    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    km_base = b.to(tl.int64) * skm_b + hkv.to(tl.int64) * skm_h
    vm_base = b.to(tl.int64) * svm_b + hkv.to(tl.int64) * svm_h
    if HAS_MASK:
        mask_rows = mask_ptr + b.to(tl.int64) * smk_b + head * smk_h + tok * smk_t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # KIVI values by parts: accumulator K holds channels u * VAL_U + K (no interleaving)
    VAL_PARTS: tl.constexpr = VAL_FMT == 1 and VAL_U <= 4 and PARTS
    NUV: tl.constexpr = D // VAL_U
    acc0 = tl.zeros([BLOCK_M, NUV], tl.float32)
    acc1 = tl.zeros([BLOCK_M, NUV], tl.float32)
    acc2 = tl.zeros([BLOCK_M, NUV], tl.float32)
    acc3 = tl.zeros([BLOCK_M, NUV], tl.float32)
    # (the interpreter needs a compile-time loop count; compiled kernels take it at run time)
    for i in range(BLOCKS_CONST if BLOCKS_CONST > 0 else blocks_per_split):
        n0 = start + i * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_tokens
        # (``meta_ok``: the surplus blocks of a short last split hold no tokens, and their key group no
        # metadata; a read there leaves the metadata tensors, which on a GPU faults where one ends a segment)
        # ---- scores [BLOCK_M, BLOCK_N] from the stored keys
        if KEY_FMT == 0:
            k = tl.load(k_base + offs_n[:, None] * sk_t + dcol[None, :], mask=n_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(DT)), input_precision=PREC)
        elif KEY_FMT == 1 and BLOCK_N <= KEY_GROUP and KEY_U <= 4 and PARTS:  # KIVI, by parts:
            NUK: tl.constexpr = D // KEY_U  # per code position K of the packed units,
            word = _load_units(k_base + offs_n[:, None] * sk_t, n_ok[:, None], NUK, KEY_UB)
            meta = km_base + (n0 // KEY_GROUP) * skm_g  # (q * scale_g) . codes + q . min_g
            meta_ok = (tl.arange(0, NUK) * 0 + n0) < n_tokens
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            bias = tl.zeros([BLOCK_M], tl.float32)
            s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, meta_ok, 0, KEY_U,
                                     KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
            if KEY_U >= 2:
                s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, meta_ok, 1, KEY_U,
                                         KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
            if KEY_U >= 4:
                s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, meta_ok, 2, KEY_U,
                                         KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
                s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, meta_ok, 3, KEY_U,
                                         KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
            s += bias[:, None]
        elif KEY_FMT == 1 and BLOCK_N <= KEY_GROUP:  # KIVI, one token group per block:
            meta = km_base + (n0 // KEY_GROUP) * skm_g + dcol  # (q * scale_g) . codes + q . min_g
            meta_ok = (dcol * 0 + n0) < n_tokens
            k_scale = tl.load(km0 + meta, mask=meta_ok, other=0.0).to(tl.float32)
            k_min = tl.load(km1 + meta, mask=meta_ok, other=0.0).to(tl.float32)
            codes = _unpack(k_base + offs_n[:, None] * sk_t, n_ok[:, None], 0, 0, KEY_BITS, KEY_UB, KEY_U,
                            D, DT, NATIVE, False, False, KEY_OFFSET)  # code + offset
            q_scaled = (qf * k_scale[None, :]).to(DT)
            s = tl.dot(q_scaled, tl.trans(codes), input_precision=PREC)
            bias = qf * k_min[None, :] - KEY_OFFSET * q_scaled.to(tl.float32)
            s += tl.sum(bias, axis=1)[:, None]
        elif KEY_FMT == 1:  # KIVI, several token groups per block: dequantize in registers
            NGK: tl.constexpr = BLOCK_N // KEY_GROUP
            groups = n0 // KEY_GROUP + tl.arange(0, NGK)
            meta = km_base + groups[:, None] * skm_g + dcol[None, :]
            g_ok = (groups * KEY_GROUP < n_tokens)[:, None]
            k_scale = tl.load(km0 + meta, mask=g_ok, other=0.0).to(DT)
            k_min = tl.load(km1 + meta, mask=g_ok, other=0.0).to(DT)
            k_scale = tl.reshape(tl.broadcast_to(k_scale[:, None, :], [NGK, KEY_GROUP, D]), [BLOCK_N, D])
            k_min = tl.reshape(tl.broadcast_to(k_min[:, None, :], [NGK, KEY_GROUP, D]), [BLOCK_N, D])
            codes = _unpack(k_base + offs_n[:, None] * sk_t, n_ok[:, None], 0, 0, KEY_BITS, KEY_UB, KEY_U,
                            D, DT, NATIVE, False, False, KEY_OFFSET)
            k = ((codes - KEY_OFFSET) * k_scale + k_min).to(DT)
            s = tl.dot(q, tl.trans(k), input_precision=PREC)
        elif KEY_FMT >= 3:  # turbo / fp8 / polar-recursive: a tile, the per-token factor on the scores
            k, k_tok = formats.format_tile(
                k_base + offs_n * sk_t, n_ok, km0 + km_base + offs_n * skm_g, ktab0, ktab1, ktab2,
                (b * n_kv_heads + hkv) * k_book_stride, KEY_FMT, KEY_BITS, KEY_NB, KEY_LEVELS,
                D, BLOCK_N, FP8_CONVERT)
            s = tl.dot(q, tl.trans(k.to(DT)), input_precision=PREC) * k_tok[None, :]
        else:  # polar-rope: (x, y) = r (cos, sin) theta per pair, then q_x . x + q_y . y
            meta = km_base + (n0 // KEY_GROUP) * skm_g + tl.arange(0, HALF)
            meta_ok = (tl.arange(0, HALF) * 0 + n0) < n_tokens
            r_scale = tl.load(km0 + meta, mask=meta_ok, other=0.0).to(tl.float32)
            r_min = tl.load(km1 + meta, mask=meta_ok, other=0.0).to(tl.float32)
            a_scale = tl.load(km2 + meta, mask=meta_ok, other=0.0).to(tl.float32)
            a_min = tl.load(km3 + meta, mask=meta_ok, other=0.0).to(tl.float32)
            codes = _unpack(k_base + offs_n[:, None] * sk_t, n_ok[:, None], 0, 0, KEY_BITS, KEY_UB, KEY_U,
                            HALF, DT, NATIVE, False, True, 0.0)
            radius = r_min[None, :] + (codes >> ANGLE_BITS).to(tl.float32) * r_scale[None, :]
            angle = a_min[None, :] + (codes & ((1 << ANGLE_BITS) - 1)).to(tl.float32) * a_scale[None, :]
            if NATIVE:
                cos = libdevice.fast_cosf(angle)
                sin = libdevice.fast_sinf(angle)
            else:
                cos = tl.cos(angle)
                sin = tl.sin(angle)
            s = tl.dot(qx, tl.trans((radius * cos).to(DT)), input_precision=PREC)
            s = tl.dot(qy, tl.trans((radius * sin).to(DT)), s, input_precision=PREC)
        # ---- online softmax (base 2); masked entries are -inf, fully masked rows stay at 0
        s = s * qk_scale
        keep = n_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            allowed = tl.load(mask_rows[:, None] + (offs_n + mask_offset)[None, :] * smk_n,
                              mask=keep, other=0)
            keep = keep & (allowed != 0)
        m_i, alpha, p, l_i = online_softmax_rows(tl.where(keep, s, float("-inf")), m_i, l_i)
        # ---- p @ values
        if VAL_PARTS:
            word = _load_units(v_base + offs_n[:, None] * sv_t, n_ok[:, None], NUV, VAL_UB)
            meta = vm_base + offs_n[:, None] * svm_t + ((tl.arange(0, NUV) * VAL_U) // VAL_GROUP)[None, :] * svm_g
            v_scale = tl.load(vm0 + meta, mask=n_ok[:, None], other=0.0).to(DT)
            v_min = tl.load(vm1 + meta, mask=n_ok[:, None], other=0.0).to(DT)
            p16 = p.to(DT)
            acc0 = _kivi_value_part(acc0, p16, word, v_scale, v_min, alpha, 0, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
            if VAL_U >= 2:
                acc1 = _kivi_value_part(acc1, p16, word, v_scale, v_min, alpha, 1, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
            if VAL_U >= 4:
                acc2 = _kivi_value_part(acc2, p16, word, v_scale, v_min, alpha, 2, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
                acc3 = _kivi_value_part(acc3, p16, word, v_scale, v_min, alpha, 3, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
        else:
            if VAL_FMT == 0:
                v = tl.load(v_base + offs_n[:, None] * sv_t + dcol[None, :], mask=n_ok[:, None], other=0.0)
                v = v.to(DT)
            elif VAL_FMT == 1:  # KIVI per-token: codes * scale + min, per packed unit (one channel group)
                NUV2: tl.constexpr = D // VAL_U
                meta = (vm_base + offs_n[:, None] * svm_t
                        + ((tl.arange(0, NUV2) * VAL_U) // VAL_GROUP)[None, :] * svm_g)
                v_scale = tl.load(vm0 + meta, mask=n_ok[:, None], other=0.0).to(DT)
                v_min = tl.load(vm1 + meta, mask=n_ok[:, None], other=0.0).to(DT)
                v = _unpack(v_base + offs_n[:, None] * sv_t, n_ok[:, None], v_scale, v_min, VAL_BITS, VAL_UB,
                            VAL_U, D, DT, NATIVE, True, False, VAL_OFFSET)
            elif VAL_FMT >= 3:  # turbo / fp8 / polar-recursive: the tile, and a per-token factor
                v, v_tok = formats.format_tile(
                    v_base + offs_n * sv_t, n_ok, vm0 + vm_base + offs_n * svm_t, vtab0, vtab1, vtab2,
                    (b * n_kv_heads + hkv) * v_book_stride, VAL_FMT, VAL_BITS, VAL_NB, VAL_LEVELS,
                    D, BLOCK_N, FP8_CONVERT)
                v = v.to(DT)
            if VAL_FMT >= 3 and VAL_FMT != 6:  # the factor on the probabilities: [BM, BN], not [BN, D]
                acc = tl.dot((p * v_tok[None, :]).to(DT), v, acc * alpha[:, None], input_precision=PREC)
            else:
                acc = tl.dot(p.to(DT), v, acc * alpha[:, None], input_precision=PREC)

    launch_dependents(LAUNCH_DEPENDENTS == 2)
    slot = ((b * (n_kv_heads * GQA) + head) * TQ + tok) * total_splits + split_base + split
    tl.store(part_max + slot, m_i, mask=row_ok)
    tl.store(part_sum + slot, l_i, mask=row_ok)
    acc_rows = part_acc + slot.to(tl.int64)[:, None] * D
    if VAL_PARTS:
        ch = tl.arange(0, NUV)[None, :] * VAL_U
        tl.store(acc_rows + ch, acc0, mask=row_ok[:, None])
        if VAL_U >= 2:
            tl.store(acc_rows + ch + 1, acc1, mask=row_ok[:, None])
        if VAL_U >= 4:
            tl.store(acc_rows + ch + 2, acc2, mask=row_ok[:, None])
            tl.store(acc_rows + ch + 3, acc3, mask=row_ok[:, None])
    else:
        tl.store(acc_rows + dcol[None, :], acc, mask=row_ok[:, None])
