"""Triton kernel: query-key scores against polar-recursive keys, straight from the packed codes.

Reference: :func:`kvpolar.quantizers.polar_recursive.rotated_scores` (same signature, same result up
to float rounding). The query is rotated once (``R q``, in PyTorch: ``O(D log D)`` per query row);
keys are never un-rotated. One program rebuilds a ``[BLOCK_T, D]`` tile of keys in the rotated
domain in registers and multiplies it with a ``[BLOCK_Q, D]`` tile of query rows (``tl.dot``);
nothing dequantized is written to memory. With GQA the query heads sharing a KV head are rows of the
same program, so each packed key is read once per KV head.

Rebuilding keys runs the inverse transform top-down in registers: the remaining radii split level by
level into ``(r cos psi, r sin psi)`` (``tl.join``), with ``cos``/``sin`` of every codebook value
looked up by code from tables computed once per call (a few dozen floats; online codebooks have one
row per KV head), so no transcendental is evaluated per key. Angle ``i`` of level ``l`` is the
``bits[l-1]``-bit code at bit ``o_l + i * bits[l-1]`` of the token's bit stream (it may straddle two
bytes: both are loaded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpolar.quantizers.polar_recursive import PolarRecursiveTensor, _rotation_of, rotated_scores
from kvpolar.quantizers.rotations import is_power_of_two

REFERENCE = rotated_scores


def level_table(p: PolarRecursiveTensor, device: torch.device) -> torch.Tensor:
    """int32 ``[levels, 3]``: bit offset of the level in the token's stream, bits, codebook offset."""
    rows, bit, entry = [], 0, 0
    for level, b in enumerate(p.bits, start=1):
        rows.append((bit, b, entry))
        bit += (p.head_dim >> level) * b
        entry += 2**b
    return torch.tensor(rows, dtype=torch.int32, device=device)


def polar_recursive_scores(
    q: torch.Tensor, p: PolarRecursiveTensor, block_t: int = 32, block_q: int = 16
) -> torch.Tensor:
    """``q @ x_hat^T`` from packed polar-recursive keys.

    Args:
        q: ``[..., Tq, D]`` float16/bfloat16/float32, leading shape of ``p`` (GQA: fold the query
            heads of a KV head into ``Tq``, as ``Quantizer.scores`` does).
        p: ``PolarRecursiveTensor`` ``[..., T, D]`` on the same device; ``D`` a power of two.
        block_t, block_q: tokens and query rows per program (powers of two, ``block_q >= 16``).

    Returns:
        ``[..., Tq, T]`` float32.
    """
    d, tokens, tq = p.head_dim, p.num_tokens, q.shape[-2]
    if not is_power_of_two(d):
        raise ValueError(f"head dim {d} is not a power of two; the Triton kernel needs one (use REFERENCE)")
    if tuple(q.shape[:-2]) != tuple(p.shape[:-2]) or q.shape[-1] != d:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected [{', '.join(map(str, p.shape[:-2]))}, Tq, {d}]")

    q_rot = _rotation_of(p).apply(q).reshape(-1, tq, d).contiguous()
    bh = q_rot.shape[0]
    codes = _rows(p.codes, bh, tokens)
    if p.codebook == "online":
        books, book_stride = p.codebooks.reshape(bh, -1).float(), p.codebooks.shape[-1]
    else:
        books, book_stride = p.analytic_codebooks.float(), 0
    cos_table, sin_table = books.cos().contiguous(), books.sin().contiguous()
    rb = p.radius_bits or 0
    if rb:
        radii = _rows(p.radius_codes, bh, tokens)
        scale = p.radius_scale.reshape(bh, tokens).contiguous()
        minimum = p.radius_min.reshape(bh, tokens).contiguous()
    else:
        radii = _rows(p.radii, bh, tokens)
        scale = minimum = radii  # unused
    out = torch.empty(bh, tq, tokens, dtype=torch.float32, device=q.device)
    grid = (bh, triton.cdiv(tokens, block_t), triton.cdiv(tq, block_q))
    _scores_kernel[grid](
        q_rot, codes, radii, scale, minimum, cos_table, sin_table, level_table(p, q.device), out,
        tokens, tq, codes.shape[-1], radii.shape[-1], *codes.stride(), *radii.stride(), book_stride,
        D=d, LEVELS=p.levels, RADIUS_BITS=rb, BLOCK_T=block_t, BLOCK_Q=block_q,
    )
    return out.reshape(*p.shape[:-2], tq, tokens)


def _rows(field: torch.Tensor, bh: int, tokens: int) -> torch.Tensor:
    """``field`` ``[..., T, n]`` as ``[bh, T, n]``: a view in either stored layout (one row per token,
    or consecutive tokens adjacent, as the quantizer stores the codes the decode kernel reads by
    parts; the kernel takes the strides), a copy only where the leading dimensions do not merge."""
    return field.reshape(bh, tokens, field.shape[-1])


@triton.jit
def _read_code(base, row_mask, bit, width, nbytes, s_byte):
    """``width``-bit codes at bit offsets ``bit`` ``[D]`` of the rows at ``base`` ``[BLOCK_T, 1]``
    (``s_byte``: elements between consecutive bytes of a row)."""
    byte = bit >> 3
    lo = tl.load(base + byte[None, :] * s_byte, mask=row_mask, other=0).to(tl.int32)
    hi = tl.load(base + (byte[None, :] + 1) * s_byte, mask=row_mask & (byte[None, :] + 1 < nbytes), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bit & 7)[None, :]) & ((1 << width) - 1)


@triton.jit
def _split_level(y, code_base, t_mask, level_ptr, cos_ptr, sin_ptr, NB, s_cn,
                 LEVEL: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """Radii ``[BLOCK_T, n]`` of 0-based level ``LEVEL`` -> ``[BLOCK_T, 2n]`` children ``(r cos, r sin)``."""
    N: tl.constexpr = D >> (LEVEL + 1)
    offset = tl.load(level_ptr + 3 * LEVEL)
    width = tl.load(level_ptr + 3 * LEVEL + 1)
    entry = tl.load(level_ptr + 3 * LEVEL + 2)
    code = _read_code(code_base, t_mask, offset + tl.arange(0, N) * width, width, NB, s_cn)
    cos = tl.load(cos_ptr + entry + code)
    sin = tl.load(sin_ptr + entry + code)
    return tl.reshape(tl.join(y * cos, y * sin), [BLOCK_T, 2 * N])


@triton.jit
def _scores_kernel(
    q_ptr, codes_ptr, radii_ptr, scale_ptr, min_ptr, cos_ptr, sin_ptr, level_ptr, out_ptr,
    T, TQ, NB, NR, s_cb, s_ct, s_cn, s_rb, s_rt, s_rn, book_stride,
    D: tl.constexpr, LEVELS: tl.constexpr, RADIUS_BITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    bh = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    t_mask = (t < T)[:, None]

    # the remaining radii [BLOCK_T, D >> LEVELS]
    m: tl.constexpr = D >> LEVELS
    j = tl.arange(0, m)
    if RADIUS_BITS == 0:
        y = tl.load(radii_ptr + bh * s_rb + t[:, None] * s_rt + j[None, :] * s_rn, mask=t_mask, other=0.0).to(tl.float32)
    else:
        code = _read_code(radii_ptr + bh * s_rb + t[:, None] * s_rt, t_mask, j * RADIUS_BITS, RADIUS_BITS, NR, s_rn)
        scale = tl.load(scale_ptr + bh * T + t, mask=t < T, other=0.0).to(tl.float32)
        minimum = tl.load(min_ptr + bh * T + t, mask=t < T, other=0.0).to(tl.float32)
        y = tl.exp(code.to(tl.float32) * scale[:, None] + minimum[:, None])

    # top-down inverse transform: each radius splits into (r cos, r sin) by its level's angle
    code_base = codes_ptr + bh * s_cb + t[:, None] * s_ct
    book = bh * book_stride
    for level in tl.static_range(LEVELS - 1, -1, -1):  # 0-based; the paper's level is level + 1
        y = _split_level(y, code_base, t_mask, level_ptr, cos_ptr + book, sin_ptr + book, NB, s_cn, level, D, BLOCK_T)

    d = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * TQ + rows)[:, None] * D + d[None, :], mask=(rows < TQ)[:, None], other=0.0)
    s = tl.dot(q, tl.trans(y), input_precision="ieee")  # [BLOCK_Q, BLOCK_T]
    out = out_ptr + (bh * TQ + rows)[:, None] * T + t[None, :]
    tl.store(out, s, mask=(rows < TQ)[:, None] & (t < T)[None, :])
