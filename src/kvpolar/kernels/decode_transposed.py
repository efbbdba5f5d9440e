"""The transposed split kernel of the fused decode attention (``_split_kernel_t``): every product
transposed, the dequantized key / value tiles the tensor cores' register operand, one warp per program.

Launched by :mod:`kvpolar.kernels.decode_attention` (``_launch_split_t``; which caches take it:
``_use_transposed``, how: ``transposed_tuning``). The formats' parts: :mod:`kvpolar.kernels.kivi_parts`,
:mod:`kvpolar.kernels.polar_pairs` (polar-rope keys), :mod:`kvpolar.kernels.polar_recursive_parts`,
:mod:`kvpolar.kernels.turbo_parts`. Reference: :func:`kvpolar.decode_attention.reference_decode_attention`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvpolar.kernels import kivi_parts as _kp
from kvpolar.kernels import polar_recursive_parts as _pr
from kvpolar.kernels import turbo_parts as _tq
from kvpolar.kernels.dependent_launch import launch_dependents
from kvpolar.kernels.polar_pairs import load_unit_words
from kvpolar.kernels.polar_pairs import query_pairs_t as _polar_query_t
from kvpolar.kernels.polar_pairs import scores_t as _polar_key_scores_t


@triton.jit(do_not_specialize=["blocks_per_split", "total_splits"])  # (``_transposed_residency``)
def _split_kernel_t(
    q_ptr, sq_b, sq_h, sq_t,
    k_ptr, sk_b, sk_h, sk_t, sk_c, km0, km1, km2, km3, skm_b, skm_h, skm_g, skm_c,
    v_ptr, sv_b, sv_h, sv_t, sv_c, vm0, vm1, svm_b, svm_h, svm_t, svm_g,
    mask_ptr, smk_b, smk_h, smk_t, smk_n,
    part_max, part_sum, part_acc,
    n_tokens, mask_offset, blocks_per_split, split_base, total_splits, n_kv_heads,
    qk_scale,
    D: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCKS_CONST: tl.constexpr,
    KEY_FMT: tl.constexpr, KEY_BITS: tl.constexpr, KEY_UB: tl.constexpr, KEY_U: tl.constexpr,
    KEY_NU: tl.constexpr, KEY_WORDS: tl.constexpr,
    KEY_GROUP: tl.constexpr, ANGLE_BITS: tl.constexpr, PAIR_HALF: tl.constexpr,
    VAL_BITS: tl.constexpr, VAL_U: tl.constexpr, VAL_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, NATIVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    KEY_OFFSET: tl.constexpr, VAL_OFFSET: tl.constexpr,
    VAL_FMT: tl.constexpr, kcos, ksin, vcos, vsin, PR_KEY_JOIN: tl.constexpr, PR_VALUE_JOIN: tl.constexpr,
    VAL_UB: tl.constexpr, VAL_WORDS: tl.constexpr, kbook, KEY_PROGRAMS: tl.constexpr, vbook,
    VAL_PROGRAMS: tl.constexpr, VAL_META: tl.constexpr,
    KEY_LOOKUP: tl.constexpr, VAL_LOOKUP: tl.constexpr, LAZY_RESCALE: tl.constexpr,
    KIVI_BIAS_LAST: tl.constexpr, VAL_MIN_PRODUCT: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr = 0,
):
    """The split step with every product transposed (one key group per block): ``s^T = K q^T`` and
    ``o^T = V^T p^T``, so the large dequantized tiles are the register operand of the tensor-core
    products and only the small query / probability tiles (``BLOCK_M`` = GQA group x query
    tokens, padded to 8) go through shared memory.

    Keys: KIVI in whole bytes (code ``K`` of every byte, channels ``u * U + K``, times the
    group-scaled query plus ``q . min``), or polar-rope with four pairs per unit of ``KEY_UB``
    bytes (part ``K`` = pairs ``4 u + K``: ``(x, y)`` decoded in registers, times the query at
    those pairs' x and y channels), or polar-recursive by parts (``polar_recursive_parts``; the
    query rotated), or turbo by parts (``turbo_parts``: code ``K`` of every unit looked up in the
    codebook, times the rotated query at channels ``u * U + K``, times each token's factor). Values:
    KIVI per token in whole bytes or 3-byte units (3-bit codes), or polar-recursive by parts (one
    accumulator per part; ``kcos`` / ``ksin`` / ``vcos`` / ``vsin``: cos / sin tables of the shared
    analytic codebooks), or turbo by parts (one accumulator per code position; ``kbook`` /
    ``vbook``: the codebooks, ``KEY_PROGRAMS`` / ``VAL_PROGRAMS``: their lookups as
    ``turbo_parts.lookup_programs``). LAUNCH_DEPENDENTS: let the combine kernel, launched next as a
    dependent launch, start: 1 at the programs' start, 2 after their block loop, 0 never
    (``dependent_launch.SIGNAL_AT``)."""
    launch_dependents(LAUNCH_DEPENDENTS == 1)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // n_kv_heads
    hkv = pid % n_kv_heads
    start = split * blocks_per_split * BLOCK_N
    DT: tl.constexpr = DOT_DTYPE
    PREC: tl.constexpr = "ieee" if DT == tl.float32 else "tf32"
    NUK: tl.constexpr = KEY_NU
    NUV: tl.constexpr = D // VAL_U
    NJ: tl.constexpr = D // 16  # polar-recursive subtrees
    NACC: tl.constexpr = 2 * NJ if VAL_FMT == 6 else NUV  # rows of one value accumulator

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GQA * TQ
    head = hkv * GQA + rows // TQ
    tok = rows % TQ
    q_rows = q_ptr + b.to(tl.int64) * sq_b + head * sq_h + tok * sq_t
    uk = tl.arange(0, NUK)
    uv = tl.arange(0, NUV)
    if KEY_FMT == 2:  # the query at the x / y channels of the pairs of each part: [NUK, BM] each
        qx0, qy0 = _polar_query_t(q_rows, row_ok, uk, 0, D, PAIR_HALF, DT)
        qx1, qy1 = _polar_query_t(q_rows, row_ok, uk, 1, D, PAIR_HALF, DT)
        qx2, qy2 = _polar_query_t(q_rows, row_ok, uk, 2, D, PAIR_HALF, DT)
        qx3, qy3 = _polar_query_t(q_rows, row_ok, uk, 3, D, PAIR_HALF, DT)
    elif KEY_FMT == 6:  # polar-recursive: the rotated query at each part's coordinates, [2 NJ, BM] each
        qp0 = _pr.query_part_t(q_rows, row_ok, 0, NJ, DT)
        qp1 = _pr.query_part_t(q_rows, row_ok, 1, NJ, DT)
        qp2 = _pr.query_part_t(q_rows, row_ok, 2, NJ, DT)
        qp3 = _pr.query_part_t(q_rows, row_ok, 3, NJ, DT)
        qp4 = _pr.query_part_t(q_rows, row_ok, 4, NJ, DT)
        qp5 = _pr.query_part_t(q_rows, row_ok, 5, NJ, DT)
        qp6 = _pr.query_part_t(q_rows, row_ok, 6, NJ, DT)
        qp7 = _pr.query_part_t(q_rows, row_ok, 7, NJ, DT)
    elif KEY_FMT == 3:  # turbo: the rotated query at channels u * U + K, [NUK, BM] each, in DT
        q0 = _tq.query_part_t(q_rows, row_ok, uk, 0, KEY_U, DT)
        q1 = _tq.query_part_t(q_rows, row_ok, uk, 1, KEY_U, DT)
        q2 = _tq.query_part_t(q_rows, row_ok, uk, 2, KEY_U, DT)
        q3 = _tq.query_part_t(q_rows, row_ok, uk, 3, KEY_U, DT)
        q4 = _tq.query_part_t(q_rows, row_ok, uk, 4, KEY_U, DT)
        q5 = _tq.query_part_t(q_rows, row_ok, uk, 5, KEY_U, DT)
        q6 = _tq.query_part_t(q_rows, row_ok, uk, 6, KEY_U, DT)
        q7 = _tq.query_part_t(q_rows, row_ok, uk, 7, KEY_U, DT)
    else:  # the query, transposed and split by code position K of the packed bytes: [NUK, BM] each
        q0 = tl.load(q_rows[None, :] + (uk * KEY_U)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
        q1 = q0
        q2 = q0
        q3 = q0
        if KEY_U >= 2:
            q1 = tl.load(q_rows[None, :] + (uk * KEY_U + 1)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
        if KEY_U >= 4:
            q2 = tl.load(q_rows[None, :] + (uk * KEY_U + 2)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            q3 = tl.load(q_rows[None, :] + (uk * KEY_U + 3)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
        q4 = q0
        q5 = q1
        q6 = q2
        q7 = q3
        if KEY_U >= 8:  # (2-bit codes in 16-bit units)
            q4 = tl.load(q_rows[None, :] + (uk * KEY_U + 4)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            q5 = tl.load(q_rows[None, :] + (uk * KEY_U + 5)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            q6 = tl.load(q_rows[None, :] + (uk * KEY_U + 6)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            q7 = tl.load(q_rows[None, :] + (uk * KEY_U + 7)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
        # The key group's scaled query parts and score bias, carried from block to block and
        # recomputed only where a group starts (once per KEY_GROUP // BLOCK_N blocks).
        qs0 = q0
        qs1 = q1
        qs2 = q2
        qs3 = q3
        qs4 = q4
        qs5 = q5
        qs6 = q6
        qs7 = q7
        k_bias = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)

    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    km_base = b.to(tl.int64) * skm_b + hkv.to(tl.int64) * skm_h
    vm_base = b.to(tl.int64) * svm_b + hkv.to(tl.int64) * svm_h
    if HAS_MASK:
        mask_rows = mask_ptr + b.to(tl.int64) * smk_b + head * smk_h + tok * smk_t

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    acc0 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc1 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc2 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc3 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc4 = tl.zeros([NACC, BLOCK_M], tl.float32)  # (polar-recursive values: eight parts)
    acc5 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc6 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc7 = tl.zeros([NACC, BLOCK_M], tl.float32)
    acc_min = tl.zeros([NACC, BLOCK_M], tl.float32)  # (KIVI values, kivi_value_min="product": min @ p)
    if KEY_FMT == 6:  # cos / sin of the 2-bit levels' codebooks (the tables are shared: analytic)
        klv2 = _pr.level_values(kcos, ksin, _pr.ENTRY_L2)
        klv3 = _pr.level_values(kcos, ksin, _pr.ENTRY_L3)
        klv4 = _pr.level_values(kcos, ksin, _pr.ENTRY_L4)
    if VAL_FMT == 6:
        vlv2 = _pr.level_values(vcos, vsin, _pr.ENTRY_L2)
        vlv3 = _pr.level_values(vcos, vsin, _pr.ENTRY_L3)
        vlv4 = _pr.level_values(vcos, vsin, _pr.ENTRY_L4)
    # Per-token metadata: loads that do not feed a product, or gather 16-bit values, are left in the
    # loop by Triton's pipeliner, their latency waited for in every block. Turbo factors are read
    # one block ahead into registers; KIVI value scale / min (VAL_META, ``_value_metadata``) as
    # 16-bit [groups, BN] tiles read where used, which the pipeliner copies ahead (3: one vector
    # per group where the tokens are adjacent in memory, already in the token pairs of the
    # products' operand), as int32 words of two groups that the pipeliner copies ahead (2), as
    # 16-bit [groups, BN] tiles read one block ahead (1), these three broadcast to the units of
    # each group in registers, or gathered per unit where used (0: the fewest registers; with 3-byte
    # units the only reading whose values are not converted through shared memory part by part).
    KIVI_VALUES: tl.constexpr = VAL_FMT != 3 and VAL_FMT != 6
    NGV: tl.constexpr = D // VAL_GROUP if KIVI_VALUES else 1  # value groups per token
    first = start + tl.arange(0, BLOCK_N)
    if KEY_FMT == 3:
        k_factor_next = tl.load(km0 + km_base + first * skm_g, mask=first < n_tokens, other=0.0)
    if VAL_FMT == 3:
        v_factor_next = tl.load(vm0 + vm_base + first * svm_t, mask=first < n_tokens, other=0.0)
    if KIVI_VALUES and VAL_META == 2:  # int32 words of two groups: copied asynchronously by the pipeliner
        v_groups = vm_base + (tl.arange(0, NGV) // 2)[:, None]
        v_half = ((tl.arange(0, NGV) % 2) * 16)[:, None]
    elif KIVI_VALUES and VAL_META == 0:  # gathered per unit where used (fewest registers, latency exposed)
        v_groups = vm_base + ((uv * VAL_U) // VAL_GROUP)[:, None] * svm_g
    elif KIVI_VALUES:  # [groups, BN] tiles: read where used (3, copied ahead by the pipeliner) or a block ahead (1)
        v_groups = vm_base + tl.arange(0, NGV)[:, None] * svm_g
        if VAL_META == 1:
            v_scale_next = tl.load(vm0 + v_groups + first[None, :] * svm_t, mask=(first < n_tokens)[None, :],
                                   other=0.0)
            v_min_next = tl.load(vm1 + v_groups + first[None, :] * svm_t, mask=(first < n_tokens)[None, :],
                                 other=0.0)
    for i in range(BLOCKS_CONST if BLOCKS_CONST > 0 else blocks_per_split):
        n0 = start + i * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_tokens
        ahead = offs_n + BLOCK_N  # the next block's tokens (the next split's first, at the end: still valid)
        if KEY_FMT == 3:
            k_factor = k_factor_next.to(tl.float32)
            k_factor_next = tl.load(km0 + km_base + ahead * skm_g, mask=ahead < n_tokens, other=0.0)
        if VAL_FMT == 3:
            v_factor = v_factor_next.to(tl.float32)
            v_factor_next = tl.load(vm0 + vm_base + ahead * svm_t, mask=ahead < n_tokens, other=0.0)
        if KIVI_VALUES and VAL_META == 0:
            v_scale = tl.load(vm0 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :], other=0.0).to(DT)
            v_min = tl.load(vm1 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :], other=0.0).to(DT)
        elif KIVI_VALUES and VAL_META == 3:
            v_scale = _kp.group_units(tl.load(vm0 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :],
                                           other=0.0).to(DT), NUV)
            v_min = _kp.group_units(tl.load(vm1 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :],
                                         other=0.0).to(DT), NUV)
        elif KIVI_VALUES and VAL_META == 2:
            v_scale = _kp.group_units(_kp.word_halves(tl.load(vm0 + v_groups + offs_n[None, :] * svm_t,
                                                        mask=n_ok[None, :], other=0), v_half, DT), NUV)
            v_min = _kp.group_units(_kp.word_halves(tl.load(vm1 + v_groups + offs_n[None, :] * svm_t,
                                                      mask=n_ok[None, :], other=0), v_half, DT), NUV)
        elif KIVI_VALUES:
            v_scale = _kp.group_units(v_scale_next.to(DT), NUV)
            v_min = _kp.group_units(v_min_next.to(DT), NUV)
            v_scale_next = tl.load(vm0 + v_groups + ahead[None, :] * svm_t, mask=(ahead < n_tokens)[None, :],
                                   other=0.0)
            v_min_next = tl.load(vm1 + v_groups + ahead[None, :] * svm_t, mask=(ahead < n_tokens)[None, :],
                                 other=0.0)
        # ---- transposed scores [BN, BM]
        s_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if KEY_FMT == 2:  # polar-rope: four parts of NUK pairs, each decoded into (x, y) in registers
            word = load_unit_words(k_base + offs_n[:, None] * sk_t, n_ok[:, None], NUK, KEY_UB, KEY_WORDS)
            mo = km_base + (n0 // KEY_GROUP) * skm_g
            meta_ok = (uk * 0 + n0) < n_tokens  # (surplus blocks of a short last split read no metadata)
            s_t = _polar_key_scores_t(s_t, word, qx0, qy0, qx1, qy1, qx2, qy2, qx3, qy3, km0 + mo, km1 + mo,
                                      km2 + mo, km3 + mo, meta_ok, uk, KEY_BITS, ANGLE_BITS, DT, NATIVE, PREC)
            s_t = s_t * qk_scale
        elif KEY_FMT == 6:  # polar-recursive: eight parts rebuilt level by level from the radii
            if PR_KEY_JOIN == _pr.KEY_SUBTREES:  # [BN, NJ, 1] subtree tiles, leaves [BN, NJ, 2] reshaped
                ok_k = n_ok[:, None, None]
                k_rows = k_base + offs_n[:, None, None] * sk_t
                r_rows = km0 + km_base + offs_n[:, None, None] * skm_g
                jk = tl.arange(0, NJ)[None, :, None]
                odd_k = tl.arange(0, 2).to(tl.float32)[None, None, :]
            else:
                ok_k = n_ok[:, None]
                k_rows = k_base + offs_n[:, None] * sk_t
                r_rows = km0 + km_base + offs_n[:, None] * skm_g
                if PR_KEY_JOIN:  # [BN, NJ] subtree tiles, each part's cos / sin halves joined (wrong on sm_90)
                    jk = tl.arange(0, NJ)[None, :]
                    odd_k = 0.0
                else:  # [BN, 2 NJ] tiles: column k = 2 j + b1 (each subtree read twice)
                    jk = (tl.arange(0, 2 * NJ) // 2)[None, :]
                    odd_k = (tl.arange(0, 2 * NJ) % 2).to(tl.float32)[None, :]
            radius = tl.load(r_rows + jk * skm_c, mask=ok_k, other=0.0).to(tl.float32)
            w1, b2, b3, c4 = _pr.subtree_codes(k_rows, ok_k, jk, D, sk_c)
            s_t = _pr.key_scores_t(s_t, radius, w1, b2, b3, c4, odd_k, qp0, qp1, qp2, qp3, qp4, qp5, qp6, qp7,
                                   klv2, klv3, klv4, BLOCK_N, NJ, DT, PREC, NATIVE, PR_KEY_JOIN)
            s_t = s_t * qk_scale
        elif KEY_FMT == 3:  # turbo: one product per code position, then each token's factor
            word = _tq.load_units(k_base + offs_n[:, None] * sk_t, n_ok[:, None], uk[None, :], KEY_UB, KEY_WORDS)
            s_t = _tq.key_scores_t(s_t, word, q0, q1, q2, q3, q4, q5, q6, q7, KEY_U, KEY_BITS, KEY_PROGRAMS,
                                   kbook, DT, KEY_LOOKUP, PREC)
            s_t = s_t * (k_factor * qk_scale)[:, None]
        else:  # KIVI: code K of every byte times the group-scaled query, plus q . min
            word = tl.load(k_base + offs_n[:, None] * sk_t + uk[None, :], mask=n_ok[:, None], other=0)
            meta = km_base + (n0 // KEY_GROUP) * skm_g + (uk * KEY_U)[:, None] + tl.arange(0, KEY_U)[None, :]
            meta_ok = ((uk * 0 + n0) < n_tokens)[:, None]  # (surplus blocks of a short last split read none)
            k_scale_row = tl.load(km0 + meta, mask=meta_ok, other=0.0)  # (one contiguous row each)
            k_min_row = tl.load(km1 + meta, mask=meta_ok, other=0.0)
            if (i == 0) | (n0 % KEY_GROUP == 0):  # a new key group (or the split's first block)
                qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7, k_bias = _kp.key_group_terms(
                    q0, q1, q2, q3, q4, q5, q6, q7, k_scale_row, k_min_row, KEY_U, KEY_BITS, KEY_UB,
                    BLOCK_N, BLOCK_M, DT, KEY_OFFSET, PREC)
            # the key products start from zero, their chain independent of the bias chain, the bias summed
            # after (KIVI_BIAS_LAST), or start from the bias
            s_t = _kp.kivi_scores_t(s_t if KIVI_BIAS_LAST else k_bias, word, qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7,
                                    KEY_U, KEY_BITS, KEY_UB, DT, NATIVE, KEY_OFFSET, PREC)
            if KIVI_BIAS_LAST:
                s_t = s_t + k_bias
            s_t = s_t * qk_scale
        # ---- online softmax over axis 0 (tokens)
        keep = n_ok[:, None] & row_ok[None, :]
        if HAS_MASK:
            allowed = tl.load(mask_rows[None, :] + (offs_n + mask_offset)[:, None] * smk_n, mask=keep, other=0)
            keep = keep & (allowed != 0)
        s_t = tl.where(keep, s_t, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_t, axis=0))
        if LAZY_RESCALE:  # the running sums rescaled only in blocks where some row's maximum grew
            if tl.max((m_new > m_i).to(tl.int32), axis=0) > 0:
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                l_t = l_t * alpha[None, :]
                acc0 = acc0 * alpha[None, :]
                acc1 = acc1 * alpha[None, :]
                acc2 = acc2 * alpha[None, :]
                acc3 = acc3 * alpha[None, :]
                acc4 = acc4 * alpha[None, :]
                acc5 = acc5 * alpha[None, :]
                acc6 = acc6 * alpha[None, :]
                acc7 = acc7 * alpha[None, :]
                if VAL_MIN_PRODUCT:
                    acc_min = acc_min * alpha[None, :]
                m_i = m_new
            alpha = tl.full([BLOCK_M], 1.0, tl.float32)  # (the products' rescaling folds away)
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.exp2(s_t - m_safe[None, :])
            l_t = l_t + p
        else:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s_t - m_safe[None, :])
            l_t = l_t * alpha[None, :] + p  # summed over tokens once, after the loop
            m_i = m_new
        p_t = p.to(DT)
        if VAL_FMT == 6:  # ---- values, polar-recursive: [NJ, BN] subtree tiles, eight parts
            ok_v = n_ok[None, :]
            if PR_VALUE_JOIN:  # [NJ, BN] subtree tiles, each part's cos / sin halves joined
                jv = tl.arange(0, NJ)[:, None]
                odd_v = 0.0
            else:
                jv = (tl.arange(0, 2 * NJ) // 2)[:, None]
                odd_v = (tl.arange(0, 2 * NJ) % 2).to(tl.float32)[:, None]
            radius_v = tl.load(vm0 + vm_base + offs_n[None, :] * svm_t + jv * svm_g, mask=ok_v,
                               other=0.0).to(tl.float32)
            vw1, vb2, vb3, vc4 = _pr.subtree_codes(v_base + offs_n[None, :] * sv_t, ok_v, jv, D, sv_c)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _pr.value_parts_t(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, radius_v, vw1, vb2, vb3, vc4, odd_v, p_t, alpha,
                vlv2, vlv3, vlv4, BLOCK_N, NJ, DT, PREC, NATIVE, PR_VALUE_JOIN)
        elif VAL_FMT == 3:  # ---- values, turbo: [NUV, BN] units, each token's factor on its probabilities
            word_t = _tq.load_units(v_base + offs_n[None, :] * sv_t, n_ok[None, :], uv[:, None], VAL_UB, VAL_WORDS)
            p_v = (p * v_factor[:, None]).to(DT)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _tq.value_parts_t(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, word_t, p_v, alpha, VAL_U, VAL_BITS, VAL_PROGRAMS,
                vbook, DT, VAL_LOOKUP, PREC)
        else:  # ---- values, KIVI transposed: [NUV, BN] packed units and per-(unit, token) scale / min
            word_t = _tq.load_units(v_base + offs_n[None, :] * sv_t, n_ok[None, :], uv[:, None], VAL_UB, VAL_WORDS)
            if VAL_MIN_PRODUCT:  # the minimum as its own product; each code then one fused multiply-add
                acc_min = tl.dot(v_min, p_t, acc_min * alpha[None, :], input_precision=PREC)
                v_scale = v_scale * _kp.value_fma_factor(DT)
                v_min = v_scale * (-VAL_OFFSET)
            acc0 = _kp.value_part_t(acc0, p_t, word_t, v_scale, v_min, alpha, 0, VAL_BITS, VAL_UB, DT, NATIVE,
                                 VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
            if VAL_U >= 2:
                acc1 = _kp.value_part_t(acc1, p_t, word_t, v_scale, v_min, alpha, 1, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
            if VAL_U >= 4:
                acc2 = _kp.value_part_t(acc2, p_t, word_t, v_scale, v_min, alpha, 2, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
                acc3 = _kp.value_part_t(acc3, p_t, word_t, v_scale, v_min, alpha, 3, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
            if VAL_U >= 8:  # (3-bit codes: eight per 3-byte unit)
                acc4 = _kp.value_part_t(acc4, p_t, word_t, v_scale, v_min, alpha, 4, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
                acc5 = _kp.value_part_t(acc5, p_t, word_t, v_scale, v_min, alpha, 5, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
                acc6 = _kp.value_part_t(acc6, p_t, word_t, v_scale, v_min, alpha, 6, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)
                acc7 = _kp.value_part_t(acc7, p_t, word_t, v_scale, v_min, alpha, 7, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC, VAL_MIN_PRODUCT)

    launch_dependents(LAUNCH_DEPENDENTS == 2)
    slot = ((b * (n_kv_heads * GQA) + head) * TQ + tok) * total_splits + split_base + split
    tl.store(part_max + slot, m_i, mask=row_ok)
    tl.store(part_sum + slot, tl.sum(l_t, axis=0), mask=row_ok)
    acc_cols = part_acc + slot.to(tl.int64)[None, :] * D  # [1, BM]
    if VAL_FMT == 6:  # part P holds coordinates 16 j + 2 P + b1
        tl.store(acc_cols + _pr.part_channels(0, NJ)[:, None], acc0, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(1, NJ)[:, None], acc1, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(2, NJ)[:, None], acc2, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(3, NJ)[:, None], acc3, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(4, NJ)[:, None], acc4, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(5, NJ)[:, None], acc5, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(6, NJ)[:, None], acc6, mask=row_ok[None, :])
        tl.store(acc_cols + _pr.part_channels(7, NJ)[:, None], acc7, mask=row_ok[None, :])
    else:
        ch = (uv * VAL_U)[:, None]
        acc0 = _kp.value_sums(acc0, acc_min, 0, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc1 = _kp.value_sums(acc1, acc_min, 1, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc2 = _kp.value_sums(acc2, acc_min, 2, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc3 = _kp.value_sums(acc3, acc_min, 3, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc4 = _kp.value_sums(acc4, acc_min, 4, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc5 = _kp.value_sums(acc5, acc_min, 5, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc6 = _kp.value_sums(acc6, acc_min, 6, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        acc7 = _kp.value_sums(acc7, acc_min, 7, VAL_BITS, VAL_UB, DT, VAL_MIN_PRODUCT)
        tl.store(acc_cols + ch, acc0, mask=row_ok[None, :])
        if VAL_U >= 2:
            tl.store(acc_cols + ch + 1, acc1, mask=row_ok[None, :])
        if VAL_U >= 4:
            tl.store(acc_cols + ch + 2, acc2, mask=row_ok[None, :])
            tl.store(acc_cols + ch + 3, acc3, mask=row_ok[None, :])
        if VAL_U >= 8:  # (eight codes per unit: turbo 1- and 3-bit, KIVI 3-bit)
            tl.store(acc_cols + ch + 4, acc4, mask=row_ok[None, :])
            tl.store(acc_cols + ch + 5, acc5, mask=row_ok[None, :])
            tl.store(acc_cols + ch + 6, acc6, mask=row_ok[None, :])
            tl.store(acc_cols + ch + 7, acc7, mask=row_ok[None, :])
