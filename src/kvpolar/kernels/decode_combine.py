"""The second pass of the fused decode attention: the splits merged into one output row, and the
short full-precision residual window attended in that same pass.

* ``_combine_kernel``, one program per ``(sequence, query head, query token)`` row, grid ``(batch *
  query_heads * query_tokens,)``, merges the row's ``n_splits`` partials ``(max, sum, unnormalised
  output)`` (base-2 logits, written by the split kernels of :mod:`kvpolar.kernels.decode_classic` /
  :mod:`kvpolar.kernels.decode_transposed`) into the normalised output;
* ``_window_combine_kernel``, same grid, first runs the row's online softmax over the residual window
  (16/32-bit keys and values ``[B, Hkv, R, D]``, ``BLOCK_N`` tokens a step, products in float32), then
  merges that partial with the packed splits' the same way. It replaces a launch of the split kernel
  over the window plus the combine launch: a decode step of an eager model is bound by host time at
  small batches, and each launch costs tens of microseconds there (``benchmarks/launch_cost.py``).
  Each query head's program reads its KV head's window itself (``Hq / Hkv`` reads, the repeats from
  L2), which is why ``kvpolar.kernels.decode_attention`` folds only windows of at most
  ``MAX_FOLDED_WINDOW`` tokens in calls of at most ``MAX_FOLDED_ROWS`` query rows;
* ``_kv_head_window_combine_kernel``, one program per ``(sequence, KV head)``, grid ``(batch *
  kv_heads,)``, does the same for all ``Hq / Hkv * query_tokens`` rows of the KV head at once: the
  window read once, its scores and value products as tile products, then each row merged in turn.
  Where batch x KV heads fill the GPU (large batches) it costs what the window's own launch costs;
  with few programs (batch 1) the rows' merges run in turn and the per-row form is faster
  (``decode_attention.WINDOW_BY_KV_HEAD_SM_SHARE``).

Both window kernels can read the window's length from memory (``WINDOW_IN_MEMORY``): the window then
lies in buffers of a fixed size and the launch can be recorded once in a CUDA graph and replayed as
the window grows (``kvpolar.cache.graphed``).

Values stored in a rotated domain (turbo, polar-recursive: ``y = x @ R.T`` per vector, ``R`` orthogonal
``[D, D]``) give packed partial outputs in that domain. With ``ROTATED`` the merge takes the first
``n_rotated`` splits as rotated and un-rotates their weighted sum by ``R`` (float32, ``rot_ptr``, read
in ``ROT_ROWS``-row slices from L2), the other splits and the folded window's partial as stored: the
caller then issues no matrix products of its own around the kernels (two fewer host-side launches per
call, and the window of such a cache can be folded too).

Reference: :func:`kvpolar.decode_attention.reference_decode_attention`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvpolar.kernels.decode_classic import online_softmax_rows
from kvpolar.kernels.dependent_launch import wait_for_primary


#: rows of the rotation matrix read per step of the rotated merge (``_merge_splits``)
ROT_ROWS = tl.constexpr(32)


@triton.jit
def _merge_splits(part_max, part_sum, part_acc, out_ptr, row, n_splits, m_w, l_w, acc_w, rot_ptr, n_rotated,
                  D: tl.constexpr, BLOCK_S: tl.constexpr, WINDOW: tl.constexpr, ROTATED: tl.constexpr):
    """Store the normalised output of ``row``: its ``n_splits`` partials (``part_*`` float32
    ``[rows, n_splits]`` and ``[rows, n_splits, D]``) merged, with WINDOW one more partial
    ``(m_w, l_w, acc_w [D])``; a row with nothing to attend gives zeros. With ROTATED, splits
    ``0 .. n_rotated - 1`` are in the values' rotated domain: their weighted sum is multiplied by
    ``R`` (``rot_ptr``, float32 ``[D, D]`` row-major) before the others are added."""
    sp = tl.arange(0, BLOCK_S)
    ok = sp < n_splits
    m = tl.load(part_max + row * n_splits + sp, mask=ok, other=float("-inf"))
    l = tl.load(part_sum + row * n_splits + sp, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    if WINDOW:
        m_max = tl.maximum(m_max, m_w)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_safe)
    total = tl.sum(w * l, axis=0)
    dcol = tl.arange(0, D)
    plain = ok
    if ROTATED:
        plain = ok & (sp >= n_rotated)
    acc = tl.load(part_acc + (row * n_splits + sp)[:, None] * D + dcol[None, :], mask=plain[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0)
    if ROTATED:  # sum_s w_s acc_s over the rotated splits, times R, a slice of R's rows at a time
        RC: tl.constexpr = ROT_ROWS if D > ROT_ROWS else D
        rotated = ok & (sp < n_rotated)
        for c in tl.static_range(D // RC):
            rr = c * RC + tl.arange(0, RC)
            a = tl.load(part_acc + (row * n_splits + sp)[:, None] * D + rr[None, :], mask=rotated[:, None], other=0.0)
            a_w = tl.sum(a * w[:, None], axis=0)  # [RC]
            r_rows = tl.load(rot_ptr + rr[:, None] * D + dcol[None, :])  # [RC, D]
            o += tl.sum(a_w[:, None] * r_rows, axis=0)
    if WINDOW:
        w_w = tl.exp2(m_w - m_safe)
        total += w_w * l_w
        o += acc_w * w_w
    o = o / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + dcol, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(part_max, part_sum, part_acc, out_ptr, n_splits, rot_ptr, n_rotated,
                    D: tl.constexpr, BLOCK_S: tl.constexpr, ROTATED: tl.constexpr, WAIT_PRIMARY: tl.constexpr = False):
    """Merge the splits of one (sequence, query head, query token) row; empty rows give 0. ROTATED:
    the first ``n_rotated`` splits are in the rotated domain of ``rot_ptr`` (``_merge_splits``).
    WAIT_PRIMARY: launched as a dependent launch, wait for the split kernel first (``dependent_launch``)."""
    wait_for_primary(WAIT_PRIMARY)
    row = tl.program_id(0).to(tl.int64)
    _merge_splits(part_max, part_sum, part_acc, out_ptr, row, n_splits, 0.0, 0.0, 0.0, rot_ptr, n_rotated, D,
                  BLOCK_S, False, ROTATED)


#: integers that change from one decode step to the next (the window's length, the packed part's, the
#: mask's row length): one compiled kernel for all their values rather than Triton's three classes
#: (== 1, a multiple of 16, other), each a compile in the middle of a generation
_STEP_INTEGERS = ["n_splits", "n_rotated", "n_window", "window_blocks", "mask_offset", "smk_b", "smk_h", "smk_t"]


@triton.jit(do_not_specialize=_STEP_INTEGERS)
def _window_combine_kernel(
    part_max, part_sum, part_acc, out_ptr, n_splits, rot_ptr, n_rotated,
    q_ptr, sq_b, sq_h, sq_t,
    k_ptr, sk_b, sk_h, sk_t, v_ptr, sv_b, sv_h, sv_t,
    mask_ptr, smk_b, smk_h, smk_t, smk_n,
    n_window, n_window_ptr, window_blocks, mask_offset, n_heads, gqa, n_query, qk_scale,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_CONST: tl.constexpr,
    HAS_MASK: tl.constexpr, ROTATED: tl.constexpr, WINDOW_IN_MEMORY: tl.constexpr,
    WAIT_PRIMARY: tl.constexpr = False,
):
    """Attend one row over the residual window, then merge with the packed splits (module docstring).

    ``q_ptr``: the query ``[B, Hq, Tq, D]`` (strides ``sq_*``, last 1); ``k_ptr`` / ``v_ptr``: the
    window's keys / values ``[B, Hkv, n_window, D]`` (strides ``sk_*`` / ``sv_*``, last 1), KV head
    ``query head // gqa``; ``mask_ptr``: uint8 ``[B, Hq, Tq, packed + window]`` (strides ``smk_*``;
    with HAS_MASK), the window's tokens at columns ``mask_offset + j``; ``window_blocks``: ``ceil(n_window
    / BLOCK_N)`` (the interpreter takes it as the constant BLOCKS_CONST); ``qk_scale``: softmax scale
    times log2(e); ``part_*`` / ``n_splits``: the packed splits (0: none); ROTATED: the first
    ``n_rotated`` of them in the values' rotated domain of ``rot_ptr`` (``_merge_splits``).
    WINDOW_IN_MEMORY: the window's length is read from ``n_window_ptr`` (int32 ``[1]``, at most
    ``n_window`` = the buffers' tokens, which ``window_blocks`` covers): a launch recorded in a CUDA
    graph then attends a window that grows from one replay to the next."""
    if WINDOW_IN_MEMORY:
        n_window = tl.load(n_window_ptr)
    row = tl.program_id(0).to(tl.int64)
    tok = row % n_query
    head = (row // n_query) % n_heads
    b = row // (n_query * n_heads)
    hkv = head // gqa
    dcol = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + head * sq_h + tok * sq_t + dcol).to(tl.float32) * qk_scale
    k_rows = k_ptr + b * sk_b + hkv * sk_h
    v_rows = v_ptr + b * sv_b + hkv * sv_h
    if HAS_MASK:
        mask_row = mask_ptr + b * smk_b + head * smk_h + tok * smk_t
    m_w = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l_w = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
    acc_w = tl.zeros([D], tl.float32)
    for i in range(BLOCKS_CONST if BLOCKS_CONST > 0 else window_blocks):
        n = i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_window
        k = tl.load(k_rows + n[:, None] * sk_t + dcol[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_rows + n[:, None] * sv_t + dcol[None, :], mask=n_ok[:, None], other=0.0)  # (both in flight)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        keep = n_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_row + (n + mask_offset) * smk_n, mask=n_ok, other=0) != 0)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_w, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_w - m_safe)
        p = tl.exp2(s - m_safe)
        l_w = l_w * alpha + tl.sum(p, axis=0)
        acc_w = acc_w * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_w = m_new
    wait_for_primary(WAIT_PRIMARY)  # (the window needs nothing of the split kernel; its partials do)
    _merge_splits(part_max, part_sum, part_acc, out_ptr, row, n_splits, m_w, l_w, acc_w, rot_ptr, n_rotated, D,
                  BLOCK_S, True, ROTATED)


@triton.jit(do_not_specialize=_STEP_INTEGERS)
def _kv_head_window_combine_kernel(
    part_max, part_sum, part_acc, out_ptr, n_splits, rot_ptr, n_rotated,
    q_ptr, sq_b, sq_h, sq_t,
    k_ptr, sk_b, sk_h, sk_t, v_ptr, sv_b, sv_h, sv_t,
    mask_ptr, smk_b, smk_h, smk_t, smk_n,
    n_window, n_window_ptr, window_blocks, mask_offset, n_kv_heads, gqa, n_query, qk_scale,
    D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCKS_CONST: tl.constexpr, ROWS_CONST: tl.constexpr, HAS_MASK: tl.constexpr, ROTATED: tl.constexpr,
    WINDOW_IN_MEMORY: tl.constexpr, WAIT_PRIMARY: tl.constexpr = False,
):
    """``_window_combine_kernel`` for all ``gqa * n_query`` rows of one KV head of one sequence at once,
    grid ``(batch * kv_heads,)``: the window's keys and values are read once per KV head, not once per
    query head, and its scores and value products are tile products (``[BLOCK_M, D]`` query rows,
    ``BLOCK_M >= 16`` a power of two >= ``gqa * n_query``; operands in ``DOT_DTYPE``, float32
    accumulation, as the split kernels' full-precision path). The group's rows are the consecutive
    output rows ``pid * gqa * n_query + j``, each then merged with its packed splits (``_merge_splits``).
    Arguments as ``_window_combine_kernel``'s, ``n_kv_heads`` in place of ``n_heads``; the interpreter
    takes the rows' count as the constant ROWS_CONST too (a loop bound; compiled: 0, the count at run time)."""
    if WINDOW_IN_MEMORY:
        n_window = tl.load(n_window_ptr)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_kv_heads
    hkv = pid % n_kv_heads
    n_rows = gqa * n_query
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    head = hkv * gqa + rows // n_query
    tok = rows % n_query
    dcol = tl.arange(0, D)
    DT: tl.constexpr = DOT_DTYPE
    PREC: tl.constexpr = "ieee" if DT == tl.float32 else "tf32"
    q = tl.load(q_ptr + b * sq_b + head[:, None] * sq_h + tok[:, None] * sq_t + dcol[None, :], mask=row_ok[:, None],
                other=0.0).to(DT)
    k_rows = k_ptr + b * sk_b + hkv * sk_h
    v_rows = v_ptr + b * sv_b + hkv * sv_h
    if HAS_MASK:
        mask_rows = mask_ptr + b * smk_b + head * smk_h + tok * smk_t
    m_w = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_w = tl.zeros([BLOCK_M], tl.float32)
    acc_w = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(BLOCKS_CONST if BLOCKS_CONST > 0 else window_blocks):
        n = i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_window
        k = tl.load(k_rows + n[:, None] * sk_t + dcol[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_rows + n[:, None] * sv_t + dcol[None, :], mask=n_ok[:, None], other=0.0)  # (both in flight)
        s = tl.dot(q, tl.trans(k.to(DT)), input_precision=PREC) * qk_scale
        keep = n_ok[None, :]
        if HAS_MASK:
            keep = keep & (tl.load(mask_rows[:, None] + (n[None, :] + mask_offset) * smk_n,
                                   mask=row_ok[:, None] & n_ok[None, :], other=0) != 0)
        m_w, alpha, p, l_w = online_softmax_rows(tl.where(keep, s, float("-inf")), m_w, l_w)
        acc_w = tl.dot(p.to(DT), v.to(DT), acc_w * alpha[:, None], input_precision=PREC)
    wait_for_primary(WAIT_PRIMARY)  # (the window needs nothing of the split kernel; its partials do)
    # each row's window partial taken out of the tiles, merged with its splits
    for j in range(ROWS_CONST if ROWS_CONST > 0 else n_rows):
        this = rows == j
        m_j = tl.max(tl.where(this, m_w, float("-inf")), axis=0)
        l_j = tl.sum(tl.where(this, l_w, 0.0), axis=0)
        acc_j = tl.sum(tl.where(this[:, None], acc_w, 0.0), axis=0)
        _merge_splits(part_max, part_sum, part_acc, out_ptr, pid * n_rows + j, n_splits, m_j, l_j, acc_j, rot_ptr,
                      n_rotated, D, BLOCK_S, True, ROTATED)
