"""Triton kernels: dequantize packed keys and values into a 16-bit buffer on the GPU.

For steps too long for the fused decode kernel (a prefill in chunks, the next turn of a
conversation: ``kvpolar.cache.attention``), the cache rebuilds its 16-bit keys and values and
attends through SDPA. The PyTorch references (each quantizer's ``dequantize``) unpack the codes into
integer tensors, expand the metadata per token and compute in float32, several passes over tensors
twice the size of the 16-bit result; these kernels read each packed byte and metadata entry once
and write the result once, into a caller's buffer (so the 16-bit window can follow it in place).

Formats (by stored class): ``KiviChannelTensor`` (KIVI and SQuat keys), ``KiviTokenTensor`` (KIVI
values), ``PolarRopeTensor`` (polar-rope keys), every bit width the quantizers store (codes that
straddle bytes included), and the formats the classic decode kernel rebuilds by
``decode_formats.format_tile`` (``TurboTensor``, ``Fp8Tensor``, ``PolarRecursiveTensor`` with radii
in the input dtype; head dims that are powers of two >= 16): the tile times its per-token factor,
and for the rotated-domain formats (turbo, polar-recursive) the un-rotation, loaded once per program:
for a randomized Hadamard rotation (the presets') the tile split into three bfloat16 terms that add up
to it exactly, each times the +-1 Hadamard matrix in bfloat16 (exact products, float32 sums), then
the signs and ``1 / sqrt(D)`` per column; for a dense orthogonal one a product with ``R`` in
``TENSOR_CORE_DOT`` precision. :func:`dequantize_into` returns False for any other format
(e.g. polar-recursive with quantized radii); the caller then runs the quantizer's PyTorch
``dequantize``.

Agreement with the references: KIVI and fp8 compute the reference's float32 products and round once
to the output dtype (KIVI launched without multiply-add fusion), so bit for bit; polar-rope computes
``r * cos(theta)``, ``r * sin(theta)`` in float32 with Triton's ``cos`` / ``sin``, and turbo and
polar-recursive sum the un-rotation's products (``TENSOR_CORE_DOT``) in another order than the
reference's Walsh-Hadamard passes, so their results agree within one rounding of the output dtype
(plus float32's error on the vector's largest entry).

Reference: each quantizer's ``dequantize`` (tests: ``tests/test_kernels_dequantize.py``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kvpolar.kernels import decode_formats as formats
from kvpolar.kernels import interpreting
from kvpolar.kernels.polar_pairs import pair_channels
from kvpolar.kernels.uniform_encode import rounded_to
from kvpolar.quantized import QuantizedTensor
from kvpolar.quantizers.kivi import KiviChannelTensor, KiviTokenTensor
from kvpolar.quantizers.polar_rope import PolarRopeTensor
from kvpolar.quantizers.rotations import is_power_of_two, walsh_hadamard

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: tokens per program (KIVI: the whole head dim per token; polar-rope: every pair)
BLOCK_TOKENS = 32
#: ``tl.dot`` precision of the un-rotation (float32 operands): "tf32x3" (three tensor-core products
#: of split operands, about float32's accuracy) or "ieee" (float32 multiply-adds; on the H100 11x
#: slower for turbo keys, benchmarks/README.md)
TENSOR_CORE_DOT = "tf32x3"
#: randomized Hadamard rotations (the default of turbo and polar-recursive) un-rotated as three exact
#: bfloat16 terms of the tile times the +-1 Hadamard matrix in bfloat16 (float32's accuracy, and no
#: split of the matrix); False: as the dense float32 ``R`` in ``TENSOR_CORE_DOT`` precision
HADAMARD_BFLOAT16 = True
#: ``format_tile`` formats: tokens per block and warps per program, and programs per SM (each loads
#: R ``[D, D]`` once and loops over its share of a row's token blocks)
FORMAT_BLOCK_TOKENS = 64
FORMAT_WARPS = 4
FORMAT_PROGRAMS_PER_SM = 4
#: polar-recursive's tokens per block and warps. 64-token blocks on 4 warps take ``wgmma`` with the
#: bfloat16 un-rotation in the sm_90 compile (131 instead of 481 instructions per token) and dequantize
#: 2.4x faster than the classic decode kernel's 32 x 8 on the H100 (B = 8, 32k tokens: 4.46 -> 1.85 ms,
#: checks passed, benchmarks/README.md, twenty-first session); 16-token blocks on 4 warps once gave
#: wrong results on the H100 in the classic kernel (``decode_formats.POLAR_RECURSIVE_BLOCK_N``), so
#: check another setting on a GPU first (``benchmarks/bench_dequantize.py --polar-recursive-launch``)
POLAR_RECURSIVE_LAUNCH = (64, 4)


def supports(p: QuantizedTensor) -> bool:
    """Whether :func:`dequantize_into` has a kernel for ``p``'s stored format."""
    if isinstance(p, PolarRopeTensor):
        return p.pairing in ("half", "interleaved") and p.head_dim % 2 == 0
    if type(p).__name__ in formats.FORMATS:
        return formats.reason(p, "key") is None and is_power_of_two(p.head_dim) and p.head_dim >= 16
    return isinstance(p, (KiviChannelTensor, KiviTokenTensor))


def refusal(out: torch.Tensor, p: QuantizedTensor) -> str | None:
    """Why :func:`dequantize_into` cannot write ``p`` into ``out`` as it is laid out, or None: it
    takes ``p``'s shape and device, float16 / bfloat16 / float32, the last dimension contiguous and
    the leading dimensions mergeable into one (e.g. the first ``T`` tokens of a ``[B, H, N, D]``
    buffer)."""
    if tuple(out.shape) != tuple(p.shape):
        return f"out has shape {tuple(out.shape)}; the stored tensor has {tuple(p.shape)}"
    if out.device != p.codes.device:
        return f"out is on {out.device}; the stored tensor on {p.codes.device}"
    if out.dtype not in OUT_DTYPES:
        return f"out has dtype {out.dtype} (allowed: float16, bfloat16, float32)"
    if out.stride(-1) != 1:
        return f"out's last dimension must be contiguous; its strides are {out.stride()}"
    if out.numel():
        try:
            out.view(-1, p.num_tokens, p.head_dim)
        except RuntimeError:  # e.g. a transposed batch / head
            return (f"out's leading dimensions do not merge into one (strides {out.stride()}); pass a buffer "
                    "whose batch and head axes are laid out one after the other")
    return None


def takes(out: torch.Tensor, p: QuantizedTensor) -> bool:
    """Whether :func:`dequantize_into` writes into ``out`` as it is (:func:`refusal` has no reason);
    callers with another buffer write through a copy (``Quantizer.dequantize_into`` does)."""
    return refusal(out, p) is None


def dequantize_into(p: QuantizedTensor, out: torch.Tensor) -> bool:
    """Write ``p`` dequantized into ``out`` and return True, or return False (``out`` untouched) when
    no kernel reads ``p``'s format (:func:`supports`). ``ValueError`` (:func:`refusal`) for a buffer
    it cannot write as laid out.

    Args:
        p: stored keys or values ``[..., T, D]`` on the device that runs Triton (CUDA, or the CPU
            under ``TRITON_INTERPRET=1``).
        out: float16 / bfloat16 / float32 ``[..., T, D]`` with ``p``'s shape and device, last
            dimension contiguous, its leading dimensions mergeable into one (e.g. the first ``T``
            tokens of a larger ``[B, H, N, D]`` buffer).
    """
    if not supports(p):
        return False
    reason = refusal(out, p)
    if reason is not None:
        raise ValueError(reason)
    _write(p, out)
    return True


def write_if_taken(p: QuantizedTensor, out: torch.Tensor) -> bool:
    """:func:`dequantize_into` where a kernel reads ``p`` and ``out`` is laid out as it takes, else
    False (``out`` untouched) rather than an error: the caller copies the PyTorch result instead."""
    if not (supports(p) and takes(out, p)):
        return False
    _write(p, out)
    return True


def _write(p: QuantizedTensor, out: torch.Tensor) -> None:
    """Launch the kernel of ``p``'s format into ``out`` (checked by :func:`refusal`)."""
    tokens, dim = p.num_tokens, p.head_dim
    n = out.numel() // max(1, tokens * dim)
    if n == 0 or tokens == 0:
        return
    target = out.view(n, tokens, dim)
    if type(p).__name__ in formats.FORMATS:
        _launch_format_kernel(p, target, n)
        return
    codes = _rows(p.codes, n)
    grid = (n, triton.cdiv(tokens, BLOCK_TOKENS))
    if isinstance(p, PolarRopeTensor):
        metas = [_rows(m, n) for m in (p.radius_scale, p.radius_min, p.angle_scale, p.angle_min)]
        if len({m.stride() for m in metas}) != 1:
            metas = [m.contiguous() for m in metas]
        pairs = dim // 2
        _polar_rope_kernel[grid](
            codes, *metas, target, tokens,
            codes.stride(0), codes.stride(1), metas[0].stride(0), metas[0].stride(1), metas[0].stride(2),
            target.stride(0), target.stride(1),
            P=pairs, P_PAD=triton.next_power_of_2(pairs), RB=p.radius_bits, AB=p.angle_bits,
            NBYTES=codes.shape[-1], G=p.group_size, HALF=p.pairing == "half", BLOCK_T=BLOCK_TOKENS,
        )
        return
    scale, minimum = _rows(p.scale, n), _rows(p.minimum, n)
    if scale.stride() != minimum.stride():
        scale, minimum = scale.contiguous(), minimum.contiguous()
    by_channel = isinstance(p, KiviChannelTensor)
    _uniform_kernel[grid](
        codes, scale, minimum, target, tokens,
        codes.stride(0), codes.stride(1), scale.stride(0), scale.stride(1), scale.stride(2),
        target.stride(0), target.stride(1),
        D=dim, D_PAD=triton.next_power_of_2(dim), BITS=p.bits, NBYTES=codes.shape[-1],
        TOKEN_GROUP=p.group_size if by_channel else 1, CHANNEL_GROUP=1 if by_channel else p.group_size,
        BLOCK_T=BLOCK_TOKENS, enable_fp_fusion=False,
    )


def _launch_format_kernel(p: QuantizedTensor, target: torch.Tensor, n: int) -> None:
    """turbo / fp8 / polar-recursive ``p`` into ``target`` ``[n, T, D]`` through ``format_tile``."""
    fields = formats.operand_fields(p)
    data, meta = _rows(fields["data"], n), fields["meta"][0]
    meta = meta.reshape(n, meta.shape[-1]) if meta.dim() == p.codes.dim() - 1 else _rows(meta, n)  # fp8: [.., T]
    # format_tile reads each token's bytes (and radii) as one row: tokens-contiguous layouts are copied
    data = data if data.stride(-1) == 1 else data.contiguous()
    meta = meta if meta.dim() == 2 or meta.stride(-1) == 1 else meta.contiguous()
    tables = tuple(fields.get("tables", ()))
    tables += (data,) * (3 - len(tables))  # (placeholders for the tables a format has not)
    unrotate, column_scale, rotated = _unrotation(p)
    polar = fields["fmt"] == formats.FMT_POLAR_RECURSIVE
    block, warps = POLAR_RECURSIVE_LAUNCH if polar else (FORMAT_BLOCK_TOKENS, FORMAT_WARPS)
    blocks = triton.cdiv(p.num_tokens, block)
    sms, fp8_convert = _device_traits(target.device.index) if target.is_cuda else (4, False)
    per_row = max(1, min(blocks, triton.cdiv(FORMAT_PROGRAMS_PER_SM * sms, n)))
    _format_kernel[(n, per_row)](
        data, meta, *tables, data if unrotate is None else unrotate, data if column_scale is None else column_scale,
        target, p.num_tokens,
        data.stride(0), data.stride(1), meta.stride(0), meta.stride(1), fields.get("book_stride", 0),
        target.stride(0), target.stride(1),
        FMT=fields["fmt"], BITS=fields["bits"], NB=fields["row_bytes"], LEVELS=fields.get("levels", 0),
        D=p.head_dim, BLOCK_T=block, ROTATED=rotated, DOT=TENSOR_CORE_DOT, FP8_CONVERT=fp8_convert,
        NATIVE=not interpreting(), STEPS_CONST=triton.cdiv(blocks, per_row) if interpreting() else 0,
        num_warps=warps,
        num_stages=1,  # no software pipelining of the loop: R (or H) and the tile already fill shared memory
    )


@triton.jit
def _bfloat16_term(x, NATIVE: tl.constexpr):
    """float32 ``x`` rounded to bfloat16: as bfloat16, or (the interpreter) as float32 holding it."""
    if NATIVE:
        out = x.to(tl.bfloat16)
    else:
        out = rounded_to(x, tl.bfloat16)
    return out


def _unrotation(p: QuantizedTensor) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """``(unrotate, column scale, ROTATED)`` of ``_format_kernel`` for ``p``: nothing (0) for formats in
    the model's basis; the bfloat16 Sylvester Hadamard matrix and float32 ``s / sqrt(D)`` (2) for a
    randomized Hadamard rotation; else the dense float32 ``R`` (1)."""
    r = formats.stored_rotation(p)
    if r is None:
        return None, None, 0
    if r.kind == "hadamard" and HADAMARD_BFLOAT16:
        return _sylvester(r.dim, str(r.stored.device)), r.hadamard_column_scale, 2
    return r.dense, None, 1


@functools.lru_cache(maxsize=8)
def _sylvester(dim: int, device: str) -> torch.Tensor:
    """The Sylvester Hadamard matrix ``H`` ``[dim, dim]`` (entries +-1) in bfloat16."""
    return walsh_hadamard(torch.eye(dim)).to(device=device, dtype=torch.bfloat16).contiguous()


def dequantize(p: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``p`` dequantized into a new ``[..., T, D]`` tensor (``dtype``, default ``p.dtype``), or None
    when no kernel reads its format."""
    if not supports(p):
        return None
    out = torch.empty(tuple(p.shape), dtype=dtype or p.dtype, device=p.codes.device)
    dequantize_into(p, out)
    return out


@functools.lru_cache(maxsize=8)
def _device_traits(index: int | None) -> tuple[int, bool]:
    """(SM count, whether float8 e4m3 converts in hardware: compute capability 8.9+) of a CUDA device."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return props.multi_processor_count, (props.major, props.minor) >= (8, 9)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A stored ``[..., rows, cols]`` tensor as ``[n, rows, cols]`` (a view where the strides allow)."""
    return t.reshape(n, t.shape[-2], t.shape[-1])


@triton.jit
def _codes_at(row_ptr, row_ok, index, BITS: tl.constexpr, NBYTES: tl.constexpr):
    """int32 codes ``index`` of ``BITS`` bits from the packed bytes at ``row_ptr`` (little-endian bit
    stream, :mod:`kvpolar.packing`); a code that straddles two bytes reads both."""
    bit = index * BITS
    byte = bit // 8
    word = tl.load(row_ptr + byte, mask=row_ok, other=0).to(tl.int32)
    if 8 % BITS != 0:
        word = word | (tl.load(row_ptr + byte + 1, mask=row_ok & (byte + 1 < NBYTES), other=0).to(tl.int32) << 8)
    return (word >> (bit % 8)) & ((1 << BITS) - 1)


@triton.jit
def _uniform_kernel(
    codes_ptr, scale_ptr, min_ptr, out_ptr, T,
    s_cn, s_ct, s_mn, s_mt, s_md, s_on, s_ot,
    D: tl.constexpr, D_PAD: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr,
    TOKEN_GROUP: tl.constexpr, CHANNEL_GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """KIVI codes ``[n, T, NBYTES]`` -> ``code * scale + minimum`` ``[n, T, D]``; metadata ``[n, T /
    TOKEN_GROUP, D / CHANNEL_GROUP]`` (keys: groups of tokens per channel; values: groups of
    channels per token). Program (row n, block of ``BLOCK_T`` tokens)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    ok = (t < T) & (d < D)
    code = _codes_at(codes_ptr + row * s_cn + t * s_ct, ok, d, BITS, NBYTES)
    meta = row * s_mn + (t // TOKEN_GROUP) * s_mt + (d // CHANNEL_GROUP) * s_md
    scale = tl.load(scale_ptr + meta, mask=ok, other=0).to(tl.float32)
    minimum = tl.load(min_ptr + meta, mask=ok, other=0).to(tl.float32)
    value = code.to(tl.float32) * scale + minimum
    tl.store(out_ptr + row * s_on + t * s_ot + d, value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _polar_rope_kernel(
    codes_ptr, rs_ptr, rm_ptr, as_ptr, am_ptr, out_ptr, T,
    s_cn, s_ct, s_mn, s_mt, s_mp, s_on, s_ot,
    P: tl.constexpr, P_PAD: tl.constexpr, RB: tl.constexpr, AB: tl.constexpr, NBYTES: tl.constexpr,
    G: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """polar-rope codes ``[n, T, NBYTES]`` (``(radius << AB) | angle`` per pair) -> keys ``[n, T, 2P]``:
    ``r = r_min + rc * r_scale``, ``theta = a_min + ac * a_scale`` (metadata ``[n, T / G, P]``),
    ``(r cos theta, r sin theta)`` at the pair's channels (rotate-half or interleaved)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    j = tl.arange(0, P_PAD)[None, :]
    ok = (t < T) & (j < P)
    code = _codes_at(codes_ptr + row * s_cn + t * s_ct, ok, j, RB + AB, NBYTES)
    meta = row * s_mn + (t // G) * s_mt + j * s_mp
    r_scale = tl.load(rs_ptr + meta, mask=ok, other=0).to(tl.float32)
    r_min = tl.load(rm_ptr + meta, mask=ok, other=0).to(tl.float32)
    a_scale = tl.load(as_ptr + meta, mask=ok, other=0).to(tl.float32)
    a_min = tl.load(am_ptr + meta, mask=ok, other=0).to(tl.float32)
    r = r_min + (code >> AB).to(tl.float32) * r_scale
    theta = a_min + (code & ((1 << AB) - 1)).to(tl.float32) * a_scale
    cx, cy = pair_channels(j, P, HALF)
    out_row = out_ptr + row * s_on + t * s_ot
    tl.store(out_row + cx, (r * tl.cos(theta)).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_row + cy, (r * tl.sin(theta)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _format_kernel(
    data_ptr, meta_ptr, tab0, tab1, tab2, unrotate_ptr, column_scale_ptr, out_ptr, T,
    s_dn, s_dt, s_mn, s_mt, book_stride, s_on, s_ot,
    FMT: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, ROTATED: tl.constexpr, DOT: tl.constexpr, FP8_CONVERT: tl.constexpr,
    NATIVE: tl.constexpr, STEPS_CONST: tl.constexpr,
):
    """turbo / fp8 / polar-recursive rows ``[n, T, NB]`` bytes with per-token metadata ``[n, T, ...]``
    -> ``[n, T, D]``: ``format_tile``'s tile ``y`` times its per-token factor, then un-rotated, ``x = y @ R``:
    ``ROTATED`` 1, ``unrotate_ptr`` the float32 ``R`` ``[D, D]``, one product in ``DOT`` precision;
    ``ROTATED`` 2 (randomized Hadamard, ``R = H diag(s) / sqrt(D)``), ``unrotate_ptr`` the Sylvester
    ``H`` ``[D, D]`` in bfloat16 (its +-1 entries exact) and ``column_scale_ptr`` float32 ``s / sqrt(D)``
    ``[D]``: ``y`` split into three bfloat16 terms that add up to it exactly, three bfloat16 products
    with ``H`` summed in float32, then the column scale (float32's accuracy, no split of ``R``; under
    the CPU interpreter, whose bfloat16 products are wrong, the terms are float32 holding the same
    bfloat16 values, ``NATIVE`` False). Program (row n, every ``num_programs(1)``-th block of
    ``BLOCK_T`` tokens from block ``program_id(1)``). ``STEPS_CONST`` (interpreter only, else 0): the
    loop's count as a constant, blocks past the end masked off: Triton 3.6's interpreter (3.9's does
    not) cannot take tensors as ``range`` bounds under NumPy 2.5 (``int`` of a one-element array)."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D)[None, :]
    unrotate = 0.0  # (placeholders where ROTATED takes none)
    hadamard = 0.0
    column_scale = 0.0
    if ROTATED == 1:
        unrotate = tl.load(unrotate_ptr + tl.arange(0, D)[:, None] * D + d)
    elif ROTATED == 2:
        hadamard = tl.load(unrotate_ptr + tl.arange(0, D)[:, None] * D + d)
        if not NATIVE:
            hadamard = hadamard.to(tl.float32)
        column_scale = tl.load(column_scale_ptr + d)
    if STEPS_CONST > 0:
        for step in range(STEPS_CONST):
            _format_block(
                data_ptr, meta_ptr, tab0, tab1, tab2, out_ptr, T, s_dn, s_dt, s_mn, s_mt, book_stride, s_on, s_ot,
                row, tl.program_id(1) + step * tl.num_programs(1), unrotate, hadamard, column_scale,
                FMT, BITS, NB, LEVELS, D, BLOCK_T, ROTATED, DOT, FP8_CONVERT, NATIVE)
    else:
        for block in range(tl.program_id(1), tl.cdiv(T, BLOCK_T), tl.num_programs(1)):
            _format_block(
                data_ptr, meta_ptr, tab0, tab1, tab2, out_ptr, T, s_dn, s_dt, s_mn, s_mt, book_stride, s_on, s_ot,
                row, block, unrotate, hadamard, column_scale,
                FMT, BITS, NB, LEVELS, D, BLOCK_T, ROTATED, DOT, FP8_CONVERT, NATIVE)


@triton.jit
def _format_block(
    data_ptr, meta_ptr, tab0, tab1, tab2, out_ptr, T, s_dn, s_dt, s_mn, s_mt, book_stride, s_on, s_ot,
    row, block, unrotate, hadamard, column_scale,
    FMT: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, ROTATED: tl.constexpr, DOT: tl.constexpr, FP8_CONVERT: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """One block of :func:`_format_kernel`: tokens ``block * BLOCK_T + [0, BLOCK_T)`` of row ``row``
    (none past ``T``) dequantized, un-rotated and stored."""
    d = tl.arange(0, D)[None, :]
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = t < T
    tile, factor = formats.format_tile(
        data_ptr + row * s_dn + t * s_dt, ok, meta_ptr + row * s_mn + t * s_mt, tab0, tab1, tab2,
        row * book_stride, FMT, BITS, NB, LEVELS, D, BLOCK_T, FP8_CONVERT)
    value = tile.to(tl.float32) * factor[:, None]
    if ROTATED == 1:
        value = tl.dot(value, unrotate, input_precision=DOT)
    elif ROTATED == 2:  # y = hi + mid + lo exactly (8 significant bits each), each times H exactly
        hi = _bfloat16_term(value, NATIVE)
        rest = value - hi.to(tl.float32)
        mid = _bfloat16_term(rest, NATIVE)
        lo = _bfloat16_term(rest - mid.to(tl.float32), NATIVE)
        product = tl.dot(hi, hadamard, input_precision="ieee")
        product = tl.dot(mid, hadamard, product, input_precision="ieee")
        value = tl.dot(lo, hadamard, product, input_precision="ieee") * column_scale
    tl.store(out_ptr + row * s_on + t[:, None] * s_ot + d, value.to(out_ptr.dtype.element_ty), mask=ok[:, None])
