"""Triton kernel: query-key scores against polar-rope keys, straight from the packed codes.

Reference: :func:`kvpolar.quantizers.polar_rope.table_scores` (same inputs, same result up to float
rounding). One program serves a block of ``BLOCK_T`` tokens of one KV head for a block of query rows:
with GQA the ``Hq / Hkv`` query heads (times ``Tq``) that share the KV head are the rows, so each packed
key is read once per KV head, not once per query head.

Per program: load the ``(rb+ab)``-bit codes of ``[D/2, BLOCK_T]`` pairs (a code may straddle two bytes:
both bytes are loaded), rebuild the key pair coordinates ``r cos(theta), r sin(theta)`` in registers
and multiply with the queries on the tensor cores (``tl.dot``); nothing dequantized is written to
memory. Three ways to get ``(r cos theta, r sin theta)`` (``mode``):

* ``"direct"``: decode ``r`` and ``theta`` and evaluate cos/sin per element (any block size);
* ``"angle_table"``: a per-block table of cos/sin over the ``2**ab`` angle levels of each pair,
  gathered by angle code (``tl.gather``), times the decoded radius;
* ``"folded_table"``: a per-block table over all ``2**(rb+ab)`` combined codes with the radius folded in,
  gathered by the whole code (the paper's table-lookup with the radius folded).

The table modes need each token block inside one metadata group (``group_size % block_t == 0``).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import triton
import triton.language as tl

from kvpolar.quantizers.polar_rope import PolarRopeTensor, table_scores

REFERENCE = table_scores
MODES = ("direct", "angle_table", "folded_table")


@dataclasses.dataclass(frozen=True)
class ScoresConfig:
    """Launch parameters. ``block_q``: query rows per program (0: up to 64, at least 16)."""

    block_t: int = 64
    block_q: int = 0
    num_warps: int = 4
    num_stages: int = 2
    mode: str = "angle_table"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not supported; allowed: {', '.join(MODES)}")
        for name in ("block_t", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name}={v} is not supported; allowed: a power of two")


#: Chosen from benchmarks/bench_scores.py on an H100 (see benchmarks/README.md).
DEFAULT_CONFIG = ScoresConfig()


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
    one_group = p.group_size % cfg.block_t == 0
    mode = cfg.mode if one_group else "direct"
    block_q = cfg.block_q or min(64, max(16, triton.next_power_of_2(rows)))
    grid = (triton.cdiv(tokens, cfg.block_t), triton.cdiv(rows, block_q), n)
    polar_rope_scores_kernel[grid](
        qf, codes, *metas, o,
        tokens, rows,
        qf.stride(0), qf.stride(1), codes.stride(0), codes.stride(1),
        metas[0].stride(0), metas[0].stride(1), o.stride(0), o.stride(1),
        P=pairs, P_PAD=max(16, triton.next_power_of_2(pairs)), RB=p.radius_bits, AB=p.angle_bits,
        G=p.group_size, HALF=p.pairing == "half", BLOCK_T=cfg.block_t, BLOCK_Q=block_q,
        MODE=MODES.index(mode), ONE_GROUP=one_group, IEEE=q.dtype == torch.float32 or _interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out



def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def polar_rope_scores_kernel(
    q_ptr, codes_ptr, rs_ptr, rm_ptr, as_ptr, am_ptr, out_ptr,
    T, NQ,
    stride_qn, stride_qq, stride_cn, stride_ct, stride_mn, stride_mg, stride_on, stride_oq,
    P: tl.constexpr, P_PAD: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, G: tl.constexpr,
    HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, MODE: tl.constexpr,
    ONE_GROUP: tl.constexpr, IEEE: tl.constexpr,
):
    BITS: tl.constexpr = RB + AB
    pid_t = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_n = tl.program_id(2).to(tl.int64)
    j = tl.arange(0, P_PAD)
    jmask = j < P
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    mask = jmask[:, None] & tmask[None, :]

    # ---- packed codes, [P_PAD, BLOCK_T]: code j at bits [j*BITS, (j+1)*BITS) of the row
    bit = j * BITS
    byte = bit // 8
    shift = bit % 8
    row = codes_ptr + pid_n * stride_cn + t[None, :].to(tl.int64) * stride_ct + byte[:, None]
    v = tl.load(row, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # a code may straddle two bytes: load the second one only where needed
        spill = (shift + BITS) > 8
        hi = tl.load(row + 1, mask=mask & spill[:, None], other=0).to(tl.int32)
        v = v | (hi << 8)
    code = (v >> shift[:, None]) & ((1 << BITS) - 1)
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
            rs, rm, a_s, am = rs[:, None], rm[:, None], a_s[:, None], am[:, None]
    else:
        off = meta + (t // G)[None, :] * stride_mg + j[:, None]
        rs = tl.load(rs_ptr + off, mask=mask, other=0).to(tl.float32)
        rm = tl.load(rm_ptr + off, mask=mask, other=0).to(tl.float32)
        a_s = tl.load(as_ptr + off, mask=mask, other=0).to(tl.float32)
        am = tl.load(am_ptr + off, mask=mask, other=0).to(tl.float32)

    # ---- key pair coordinates in registers
    if MODE == 0:  # direct
        r = rm + (code >> AB).to(tl.float32) * rs
        theta = am + ac.to(tl.float32) * a_s
        kx = r * tl.cos(theta)
        ky = r * tl.sin(theta)
    elif MODE == 1:  # angle table: cos/sin of the 2**AB levels of each pair, gathered by angle code
        level = tl.arange(0, 1 << AB).to(tl.float32)
        theta_tab = am[:, None] + level[None, :] * a_s[:, None]  # [P_PAD, 2**AB]
        r = rm[:, None] + (code >> AB).to(tl.float32) * rs[:, None]
        kx = r * tl.gather(tl.cos(theta_tab), ac, 1)
        ky = r * tl.gather(tl.sin(theta_tab), ac, 1)
    else:  # folded table over every combined code: r_level * (cos, sin)(theta_level)
        c = tl.arange(0, 1 << BITS)
        r_tab = rm[:, None] + (c >> AB).to(tl.float32)[None, :] * rs[:, None]
        theta_tab = am[:, None] + (c & ((1 << AB) - 1)).to(tl.float32)[None, :] * a_s[:, None]
        kx = tl.gather(r_tab * tl.cos(theta_tab), code, 1)
        ky = tl.gather(r_tab * tl.sin(theta_tab), code, 1)

    # ---- queries [BLOCK_Q, P_PAD] and the product on the tensor cores
    qi = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = qi < NQ
    if HALF:
        xcol = j
        ycol = j + P
    else:
        xcol = 2 * j
        ycol = 2 * j + 1
    qrow = q_ptr + pid_n * stride_qn + qi[:, None] * stride_qq
    qm = qmask[:, None] & jmask[None, :]
    qx = tl.load(qrow + xcol[None, :], mask=qm, other=0)
    qy = tl.load(qrow + ycol[None, :], mask=qm, other=0)
    if IEEE:  # float32 queries, or the interpreter (its bfloat16 dot is wrong): exact float32 product
        acc = tl.dot(qx.to(tl.float32), kx, input_precision="ieee")
        acc = tl.dot(qy.to(tl.float32), ky, acc, input_precision="ieee")
    else:
        acc = tl.dot(qx, kx.to(qx.dtype))
        acc = tl.dot(qy, ky.to(qy.dtype), acc)
    out = out_ptr + pid_n * stride_on + qi[:, None] * stride_oq + t[None, :]
    tl.store(out, acc, mask=qmask[:, None] & tmask[None, :])
