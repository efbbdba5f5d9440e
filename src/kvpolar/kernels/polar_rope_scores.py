"""Triton kernel: query-key scores against polar-rope keys, straight from the packed codes.

Reference: :func:`kvpolar.quantizers.polar_rope.table_scores` (same inputs, same result up to float
rounding). One program serves a block of ``BLOCK_T`` tokens of one KV head for a block of query rows:
with GQA the ``Hq / Hkv`` query heads (times ``Tq``) that share the KV head are the rows, so each packed
key is read once per KV head, not once per query head.

Per program: load the ``(rb+ab)``-bit codes of ``[BLOCK_T, D/2]`` pairs (a code may straddle two bytes:
both bytes are loaded), rebuild the key pair coordinates ``r cos(theta), r sin(theta)`` in registers
and multiply with the queries, on the tensor cores (``tl.dot``, ``dot=True``) or, for the few query rows
of GQA decoding, on the CUDA cores (``dot=False``); nothing dequantized is written to memory. Two ways
to get ``(cos theta, sin theta)`` (``mode``):

* ``"direct"``: decode ``theta`` and evaluate cos/sin per element (any block size); with
  ``fast_trig`` on the GPU's special-function unit (``sin.approx.f32``, abs. error ~1e-6);
* ``"angle_table"``: a per-block table of cos/sin over the ``2**ab`` angle levels of each pair,
  gathered by angle code (``tl.gather``); needs each token block inside one metadata group
  (``group_size % block_t == 0``), otherwise ``"direct"`` is used.

* ``"transposed"`` (default for decoding): ``s^T = X q_x^T + Y q_y^T`` on the tensor cores with the
  decoded key tile as the register (A) operand, read "by parts" (``polar_pairs``: four pairs per unit
  of whole bytes, part ``K`` = pairs ``4 u + K``), ``cos.approx`` / ``sin.approx``, one warp per
  or two warps per program looping over ``blocks`` blocks of ``gcd(block_t, group_size)`` tokens.
  Needs 2/4/6/8 bits per pair, head dim >= 128, blocks of at least 16 tokens and at most 16 query
  rows per KV head; otherwise ``"direct"`` is used.

A radius-folded table over all ``2**(rb+ab)`` codes (the paper's variant) was tried and dropped: slower
than the angle table on the H100, and ``tl.gather`` with a 64-row table gave wrong results there.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from kvpolar.kernels import interpreting
from kvpolar.kernels.polar_pairs import (UNIT_PAIR_BITS, load_unit_words, pair_channels, query_pairs_t, scores_t,
                                         unit_words)
from kvpolar.kernels.polar_pairs import cos_sin as _cos_sin
from kvpolar.quantizers.polar_rope import PolarRopeTensor, table_scores

REFERENCE = table_scores
MODES = ("direct", "angle_table", "transposed")


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    """Launch parameters.

    ``block_q``: query rows per program (0: all rows of a KV head, at least 16 and at most 64 with
    ``dot``, at most 8 without). ``dot=None``: tensor cores when a KV head has more than 8 query rows
    (prefill), CUDA cores otherwise (decoding). ``fast_trig`` is ignored under ``TRITON_INTERPRET``.
    ``mode="transposed"`` (see the module docstring) uses ``block_t`` tokens per step, ``blocks``
    steps per program and ``transposed_warps`` warps; ``block_q``, ``dot`` and ``num_warps`` are
    those of the ``"direct"`` fallback.
    """

    block_t: int = 64
    block_q: int = 0
    num_warps: int = 4
    num_stages: int = 2
    mode: str = "transposed"
    dot: bool | None = None
    fast_trig: bool = True
    blocks: int = 4
    transposed_warps: int = 2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; allowed: {', '.join(MODES)}")
        if self.blocks < 1:
            raise ValueError(f"blocks={self.blocks} is not supported; allowed: an integer >= 1")
        for name in ("block_t", "num_warps", "transposed_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} is not supported; allowed: a power of two")


#: Transposed decode (see benchmarks/README.md for the H100 sweep); ``"direct"`` where it does not apply.
DEFAULT_CONFIG = ScoresConfig()


def _transposed_applies(p: PolarRopeTensor, rows: int, cfg: ScoresConfig) -> bool:
    return (p.code_bits in UNIT_PAIR_BITS and (p.head_dim >= 128 or _interpreting()) and p.head_dim % 8 == 0
            and math.gcd(cfg.block_t, p.group_size) >= 16 and rows <= 16)


def polar_rope_scores(q: torch.Tensor, p: PolarRopeTensor, config: ScoresConfig | None = None) -> torch.Tensor:
    """Scores ``q @ dequantize(p)^T`` by the Triton kernel.

    Args:
        q: ``[..., Hq, Tq, D]`` float16/bfloat16/float32 (CUDA, or CPU under ``TRITON_INTERPRET=1``);
            leading shape of ``p`` or GQA-grouped (``Hq`` a multiple of ``p``'s ``Hkv``).
        p: polar-rope keys ``[..., Hkv, T, D]`` on ``q``'s device.
        config: launch parameters (default :data:`DEFAULT_CONFIG`).
    Returns:
        ``[..., Hq, Tq, T]`` float32.
    """
    cfg = config or DEFAULT_CONFIG
    lead_p, tokens, dim = tuple(p.shape[:-2]), p.num_tokens, p.head_dim
    lead_q, tq = tuple(q.shape[:-2]), q.shape[-2]
    if q.shape[-1] != dim:
        raise ValueError(f"q has head dim {q.shape[-1]}; the quantized keys have {dim}")
    if lead_q != lead_p and not (
        len(lead_q) == len(lead_p) >= 1 and lead_q[:-1] == lead_p[:-1] and lead_q[-1] % lead_p[-1] == 0
    ):
        raise ValueError(f"q leading shape {lead_q} does not match the keys' {lead_p} (same, or GQA on heads)")
    n = math.prod(lead_p)
    rows = math.prod(lead_q) // max(n, 1) * tq  # query rows per KV head
    pairs = dim // 2
    out = torch.empty(*lead_q, tq, tokens, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    qf = q.reshape(n, rows, dim)
    if qf.stride(-1) != 1:
        qf = qf.contiguous()
    codes = p.codes.reshape(n, tokens, -1).contiguous()
    metas = [m.reshape(n, -1, pairs).contiguous() for m in (p.radius_scale, p.radius_min, p.angle_scale, p.angle_min)]
    o = out.view(n, rows, tokens)
    if cfg.mode == "transposed" and _transposed_applies(p, rows, cfg):
        _launch_transposed(qf, p, codes, metas, o, rows, cfg)
        return out
    if cfg.mode == "transposed":
        cfg = dataclasses.replace(cfg, mode="direct", block_t=128 if p.group_size % 128 == 0 else cfg.block_t)
    one_group = p.group_size % cfg.block_t == 0
    mode = cfg.mode if one_group else "direct"
    dot = cfg.dot if cfg.dot is not None else rows > 8
    if dot:
        block_q = cfg.block_q or min(64, max(16, triton.next_power_of_2(rows)))
    else:
        block_q = cfg.block_q or min(8, triton.next_power_of_2(rows))
    grid = (triton.cdiv(tokens, cfg.block_t), triton.cdiv(rows, block_q), n)
    polar_rope_scores_kernel[grid](
        qf, codes, *metas, o,
        tokens, rows,
        qf.stride(0), qf.stride(1), codes.stride(0), codes.stride(1),
        metas[0].stride(0), metas[0].stride(1), o.stride(0), o.stride(1),
        P=pairs, P_PAD=max(16, triton.next_power_of_2(pairs)), RB=p.radius_bits, AB=p.angle_bits,
        G=p.group_size, HALF=p.pairing == "half", BLOCK_T=cfg.block_t, BLOCK_Q=block_q,
        MODE=MODES.index(mode), ONE_GROUP=one_group, IEEE=q.dtype == torch.float32 or _interpreting(),
        DOT=dot, FAST=cfg.fast_trig and not _interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out



def _launch_transposed(qf, p, codes, metas, o, rows, cfg):
    n, tokens, dim = codes.shape[0], p.num_tokens, p.head_dim
    words, ub = unit_words(codes, p.code_bits)
    ieee = qf.dtype == torch.float32 or _interpreting()
    dt = tl.float32 if ieee else (tl.float16 if qf.dtype == torch.float16 else tl.bfloat16)
    block_t = math.gcd(cfg.block_t, p.group_size)  # blocks inside one metadata group
    per_program = block_t * cfg.blocks
    grid = (triton.cdiv(tokens, per_program), n)
    polar_rope_scores_t_kernel[grid](
        qf, words, *metas, o,
        tokens, rows,
        qf.stride(0), qf.stride(1), words.stride(0), words.stride(1),
        metas[0].stride(0), metas[0].stride(1), o.stride(0), o.stride(1),
        D=dim, BITS=p.code_bits, AB=p.angle_bits, G=p.group_size, HALF=p.pairing == "half",
        UB=ub, WORDS=words is not codes, BLOCK_T=block_t, BLOCK_Q=max(8, triton.next_power_of_2(rows)),
        BLOCKS=cfg.blocks, DT=dt, PREC="ieee" if ieee else "tf32", FAST=cfg.fast_trig and not _interpreting(),
        num_warps=cfg.transposed_warps, num_stages=cfg.num_stages,
    )


_interpreting = interpreting  # (the module's name for it: benchmarks and tests patch it here)


@triton.jit
def _to_float(c):
    """Small non-negative int32 -> float32 exactly, on the FMA pipe (no quarter-rate I2F)."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def polar_rope_scores_kernel(
    q_ptr, codes_ptr, rs_ptr, rm_ptr, as_ptr, am_ptr, out_ptr,
    T, NQ,
    stride_qn, stride_qq, stride_cn, stride_ct, stride_mn, stride_mg, stride_on, stride_oq,
    P: tl.constexpr, P_PAD: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, G: tl.constexpr,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, MODE: tl.constexpr,
    ONE_GROUP: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr, FAST: tl.constexpr,
):
    BITS: tl.constexpr = RB + AB
    pid_t = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)
    j = tl.arange(0, P_PAD)
    jmask = j < P
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    mask = tmask[:, None] & jmask[None, :]

    # ---- packed codes, [BLOCK_T, P_PAD]: code j at bits [j*BITS, (j+1)*BITS) of the token's row.
    # Pairs run fastest across lanes, so a warp's loads fall in one or two sectors of a row.
    bit = j * BITS
    byte = bit // 8
    shift = bit % 8
    row = codes_ptr + pid_n * stride_cn + t[:, None].to(tl.int64) * stride_ct + byte[None, :]
    v = tl.load(row, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # a code may straddle two bytes: load the second one only where needed
        spill = (shift + BITS) > 8
        hi = tl.load(row + 1, mask=mask & spill[None, :], other=0).to(tl.int32)
        v = v | (hi << 8)
    code = (v >> shift[None, :]) & ((1 << BITS) - 1)
    ac = code & ((1 << AB) - 1)

    # ---- metadata of the pairs: per block (one group) or per token
    meta = pid_n * stride_mn
    if ONE_GROUP:
        g = (pid_t * BLOCK_T) // G
        off = meta + g * stride_mg + j
        rs = tl.load(rs_ptr + off, mask=jmask, other=0).to(tl.float32)
        rm = tl.load(rm_ptr + off, mask=jmask, other=0).to(tl.float32)
        a_s = tl.load(as_ptr + off, mask=jmask, other=0).to(tl.float32)
        am = tl.load(am_ptr + off, mask=jmask, other=0).to(tl.float32)
        if MODE == 0:
            rs, rm, a_s, am = rs[None, :], rm[None, :], a_s[None, :], am[None, :]
    else:
        off = meta + (t // G)[:, None] * stride_mg + j[None, :]
        rs = tl.load(rs_ptr + off, mask=mask, other=0).to(tl.float32)
        rm = tl.load(rm_ptr + off, mask=mask, other=0).to(tl.float32)
        a_s = tl.load(as_ptr + off, mask=mask, other=0).to(tl.float32)
        am = tl.load(am_ptr + off, mask=mask, other=0).to(tl.float32)

    # ---- key pair coordinates in registers, [BLOCK_T, P_PAD]
    if MODE == 0:  # direct
        r = rm + _to_float(code >> AB) * rs
        c, s = _cos_sin(am + _to_float(ac) * a_s, FAST)
    else:  # angle table: cos/sin of the 2**AB levels of each pair, gathered by angle code
        level = tl.arange(0, 1 << AB).to(tl.float32)
        c_tab, s_tab = _cos_sin(am[None, :] + level[:, None] * a_s[None, :], FAST)  # [2**AB, P_PAD]
        r = rm[None, :] + _to_float(code >> AB) * rs[None, :]
        c = tl.gather(c_tab, ac, 0)
        s = tl.gather(s_tab, ac, 0)
    kx = r * c
    ky = r * s

    # ---- queries and the product
    xcol, ycol = pair_channels(j, P, HALF)
    if DOT:  # [BLOCK_Q, P_PAD] x [P_PAD, BLOCK_T] on the tensor cores
        qi = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qmask = qi < NQ
        qrow = q_ptr + pid_n * stride_qn + qi[:, None] * stride_qq
        qm = qmask[:, None] & jmask[None, :]
        qx = tl.load(qrow + xcol[None, :], mask=qm, other=0)
        qy = tl.load(qrow + ycol[None, :], mask=qm, other=0)
        if IEEE:  # float32 queries, or the interpreter (its bfloat16 dot is wrong): exact float32 product
            acc = tl.dot(qx.to(tl.float32), tl.trans(kx), input_precision="ieee")
            acc = tl.dot(qy.to(tl.float32), tl.trans(ky), acc, input_precision="ieee")
        else:
            acc = tl.dot(qx, tl.trans(kx.to(qx.dtype)))
            acc = tl.dot(qy, tl.trans(ky.to(qy.dtype)), acc)
        out = out_ptr + pid_n * stride_on + qi[:, None] * stride_oq + t[None, :]
        tl.store(out, acc, mask=qmask[:, None] & tmask[None, :])
    else:  # few rows (GQA decoding): multiply-add and reduce over pairs on the CUDA cores
        for i in tl.static_range(BLOCK_Q):
            qrow = pid_q * BLOCK_Q + i
            base = q_ptr + pid_n * stride_qn + qrow * stride_qq
            # the row test as a block (not a scalar), which every Triton interpreter accepts in a mask
            qx = tl.load(base + xcol, mask=jmask & (xcol * 0 + qrow < NQ), other=0).to(tl.float32)
            qy = tl.load(base + ycol, mask=jmask & (ycol * 0 + qrow < NQ), other=0).to(tl.float32)
            score = tl.sum(kx * qx[None, :] + ky * qy[None, :], axis=1)
            tl.store(out_ptr + pid_n * stride_on + qrow * stride_oq + t, score, mask=tmask & (t * 0 + qrow < NQ))


@triton.jit
def polar_rope_scores_t_kernel(
    q_ptr, codes_ptr, rs_ptr, rm_ptr, as_ptr, am_ptr, out_ptr,
    T, NQ,
    stride_qn, stride_qq, stride_cn, stride_ct, stride_mn, stride_mg, stride_on, stride_oq,
    D: tl.constexpr, BITS: tl.constexpr, AB: tl.constexpr, G: tl.constexpr, HALF: tl.constexpr,
    UB: tl.constexpr, WORDS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCKS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FAST: tl.constexpr,
):
    """Scores of ``BLOCKS`` blocks of ``BLOCK_T`` tokens of one KV head for all its ``NQ`` query rows:
    ``s^T [BLOCK_T, BLOCK_Q] = sum_K X_K q_x,K^T + Y_K q_y,K^T`` (see ``polar_pairs``)."""
    NU: tl.constexpr = D // 8
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = tl.arange(0, BLOCK_Q)
    row_ok = rows < NQ
    q_rows = q_ptr + pid_n * stride_qn + rows * stride_qq
    uk = tl.arange(0, NU)
    qx0, qy0 = query_pairs_t(q_rows, row_ok, uk, 0, D, HALF, DT)
    qx1, qy1 = query_pairs_t(q_rows, row_ok, uk, 1, D, HALF, DT)
    qx2, qy2 = query_pairs_t(q_rows, row_ok, uk, 2, D, HALF, DT)
    qx3, qy3 = query_pairs_t(q_rows, row_ok, uk, 3, D, HALF, DT)
    c_base = codes_ptr + pid_n * stride_cn
    m_base = pid_n * stride_mn
    o_rows = out_ptr + pid_n * stride_on + rows[None, :] * stride_oq
    for i in range(BLOCKS):
        t0 = (pid_t * BLOCKS + i) * BLOCK_T
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        word = load_unit_words(c_base + t[:, None].to(tl.int64) * stride_ct, t_ok[:, None], NU, UB, WORDS)
        mo = m_base + (t0 // G) * stride_mg
        meta_ok = (uk * 0 + t0) < T
        s_t = scores_t(tl.zeros([BLOCK_T, BLOCK_Q], tl.float32), word, qx0, qy0, qx1, qy1, qx2, qy2, qx3, qy3,
                       rs_ptr + mo, rm_ptr + mo, as_ptr + mo, am_ptr + mo, meta_ok, uk, BITS, AB, DT, FAST, PREC)
        tl.store(o_rows + t[:, None], s_t, mask=t_ok[:, None] & row_ok[None, :])
