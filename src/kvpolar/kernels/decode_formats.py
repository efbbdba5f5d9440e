"""Stored formats the fused decode attention reads as a ``[BLOCK_N, D]`` tile times a per-token factor.

:mod:`kvpolar.kernels.decode_attention` reads KIVI and polar-rope codes with its own tricks; the
formats here plug into its classic split kernel (``_split_kernel``) through one Triton function,
:func:`format_tile`, which rebuilds a block of keys or values in registers:

* ``turbo`` (``TurboTensor``): codes of ``bits`` bits per coordinate, looked up in the shared
  Lloyd-Max codebook; factor = the stored per-token factor (``TurboTensor.norms``). The tile lives
  in the rotated domain ``R x``. (Head dims with at least 16 code units, e.g. 128 at any bits, take
  the transposed kernel by parts instead: :mod:`kvpolar.kernels.turbo_parts`.)
* ``fp8`` (``Fp8Tensor``): the float8 bytes turned into float16 by moving bits (no fp8 dtype needed:
  e5m2 ``b << 8``; e4m3 ``sign << 8 | rest << 7`` is the value / 256, subnormals included);
  factor = the chunk's fp32 scale (times 256 for e4m3). Compiled, e4m3 takes the GPU's float8
  conversion instead (two bytes per instruction; compute capability 8.9+) and the kernel divides the
  factor by 256.
* ``polar-recursive`` (``PolarRecursiveTensor``, radii in the input dtype): the stored radii split
  level by level into ``(r cos psi, r sin psi)`` with the kernel helpers of
  :mod:`kvpolar.kernels.polar_recursive_scores` (cos/sin of every codebook entry looked up by code);
  factor = 1. The tile lives in the rotated domain ``R x``. (The paper's setting, 4 levels with bits
  4/2/2/2 and analytic codebooks, takes the transposed kernel by parts instead:
  :mod:`kvpolar.kernels.polar_recursive_parts`.)

The kernel applies a value tile's factor to the probabilities (``[rows, block]``), not to the tile.

Rotated-domain formats never un-rotate a token: the wrapper rotates the query once (keys) and the
combined output once (values), see :func:`rotation_matrix`.

Reference: :func:`kvpolar.decode_attention.reference_decode_attention` (through
``fused_decode_attention``; tests: ``tests/test_kernels_decode_formats.py``). Compiled for sm_90
without a GPU by ``benchmarks/inspect_format_sass.py``; timed with every other preset by ``benchmarks/bench_attention.py``.
"""

from __future__ import annotations

import functools

import torch

from kvpolar.quantized import QuantizedTensor
from kvpolar.quantizers.rotations import Rotation, rotation

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

#: The paper's polar-recursive setting, which the transposed kernel reads by parts
#: (``polar_recursive_parts``; head dim >= 128); any other levels / bits take the classic kernel.
PARTS_LEVELS, PARTS_BITS = 4, (4, 2, 2, 2)
# format ids of the split kernel's KEY_FMT / VAL_FMT (0-2: full precision, KIVI, polar-rope)
FMT_TURBO, FMT_FP8_E4M3, FMT_FP8_E5M2, FMT_POLAR_RECURSIVE = 3, 4, 5, 6
#: class name -> what the kernel reads of it (the format's own limits are checked by ``reason``).
FORMATS = {
    "TurboTensor": "bits 1-4, hadamard or orthogonal rotation, with or without norm_correction",
    "Fp8Tensor": "e4m3 / e5m2, scale per tensor or per head, any number of chunks",
    "PolarRecursiveTensor": "any levels / bits, analytic or online codebooks, radii in the input dtype",
}
TURBO_BITS = (1, 2, 3, 4)
FP8_FORMATS = ("e4m3", "e5m2")
E4M3_SHIFT = 256.0  # e4m3 bytes decode to value / 2**8 (see fp8_to_f16)
#: Tokens per block, warps and pipelining stages of the split kernel when either operand is
#: polar-recursive (None: ``LaunchConfig``'s). The level-by-level rebuild of a ``[BLOCK_N, D]`` tile
#: is register-hungry (sm_90, D = 128, GQA 4, fp16, 4 warps: 64 tokens spill 1376 bytes per thread,
#: 32 spill 232, 16 spill 16), but 16-token blocks on 4 warps compute WRONG results on the H100
#: (relative error 2.0; the Triton interpreter is right), while 32-token blocks on 8 warps are correct
#: (relative error 5e-4 fp16 / 4e-3 bf16 for every key/value pairing): benchmarks/
#: polar_recursive_launch_check.py, results/polar_recursive_launch_h100.json. Re-check on a GPU
#: before changing them. The block is also the least: 16-token blocks of polar-recursive values with
#: KIVI keys in 16-token groups (or a ``LaunchConfig.block_n`` of 16) were wrong on the H100 in both
#: kernels (error about 1 against outputs of order 1; twenty-sixth session, benchmarks/README.md), so
#: such pairs take the classic kernel on 32-token blocks (``decode_operands.pair_reason``).
POLAR_RECURSIVE_BLOCK_N = 32
POLAR_RECURSIVE_WARPS: int | None = 8
POLAR_RECURSIVE_STAGES: int | None = None


def fixed_block_n(key_fmt: int, value_fmt: int) -> int | None:
    """The ``block_n`` this pair of format ids always takes (a polar-recursive tensor: exactly
    ``POLAR_RECURSIVE_BLOCK_N``), or None (the launch config's, within the key groups)."""
    return POLAR_RECURSIVE_BLOCK_N if FMT_POLAR_RECURSIVE in (key_fmt, value_fmt) else None


def launch_overrides(key_fmt: int, value_fmt: int) -> dict:
    """``num_warps`` / ``num_stages`` this pair of format ids fixes for the split kernel ({} = none)."""
    if FMT_POLAR_RECURSIVE not in (key_fmt, value_fmt):
        return {}
    out = {"num_warps": POLAR_RECURSIVE_WARPS, "num_stages": POLAR_RECURSIVE_STAGES}
    return {k: v for k, v in out.items() if v is not None}


def reason(p: QuantizedTensor, role: str) -> str | None:
    """Why the kernel cannot read ``p`` (a format of :data:`FORMATS`) as ``role``, or None."""
    name = type(p).__name__
    if name == "TurboTensor" and p.bits not in TURBO_BITS:
        return f"turbo {role} bits={p.bits} (supported: {TURBO_BITS})"
    if name == "Fp8Tensor" and p.format not in FP8_FORMATS:
        return f"fp8 {role} format={p.format!r} (supported: {FP8_FORMATS})"
    if name == "PolarRecursiveTensor":
        if p.radius_bits is not None:
            return (f"polar-recursive {role} radius_bits={p.radius_bits} "
                    "(supported: None, radii stored in the input dtype)")
        if p.codebook not in ("analytic", "online"):
            return f"polar-recursive {role} codebook={p.codebook!r} (supported: 'analytic', 'online')"
    return None


# ----- rotations (turbo, polar-recursive) -------------------------------------------------------------
def rotation_matrix(p: QuantizedTensor | None) -> torch.Tensor | None:
    """Dense float32 ``R`` ``[D, D]`` of a rotated-domain format (``x @ R.T`` rotates rows, ``y @ R``
    un-rotates them), or None for formats stored in the original basis: :func:`stored_rotation`'s
    ``dense`` matrix. One matmul per call instead of the ``log2 D`` butterfly passes of the randomized
    Hadamard transform."""
    r = stored_rotation(p)
    return None if r is None else r.dense


def stored_rotation(p: QuantizedTensor | None) -> Rotation | None:
    """The rotation a rotated-domain format's vectors are stored in (turbo: ``rotation_kind``,
    polar-recursive: ``preconditioner``), or None for formats stored in the original basis. When ``p``
    holds the layer's shared rotation from :func:`~kvpolar.quantizers.rotations.rotation` (the
    quantizers store exactly that object), that cached object, whose ``dense`` matrix and column scale
    are then computed once; any other stored rotation is expanded from ``p`` itself, so ``p`` always
    decides."""
    name = type(p).__name__
    if name == "TurboTensor":
        kind = p.rotation_kind
    elif name == "PolarRecursiveTensor":
        kind = p.preconditioner
    else:
        return None
    shared = rotation(kind, p.head_dim, p.seed, p.rotation.device)
    if p.rotation is shared.stored:
        return shared
    return Rotation(kind=kind, dim=p.head_dim, seed=p.seed, stored=p.rotation)


# ----- operands: what the kernel takes of each format ------------------------------------------------
def reads_by_parts(levels: int, bits: tuple[int, ...], head_dim: int, codebook: str) -> bool:
    """Whether the transposed kernel reads a polar-recursive tensor of this setting by parts (the
    paper's setting with analytic codebooks, head dim >= 128). The quantizer stores such tensors'
    codes and radii with consecutive tokens adjacent (``quantized.tokens_contiguous``), which the
    kernel's pipeliner copies ahead in whole words; every other setting keeps one row per token."""
    return levels == PARTS_LEVELS and tuple(bits) == PARTS_BITS and head_dim >= 128 and codebook == "analytic"


def last_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` as is where its last axis is contiguous (a row per token), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rows_or_tokens_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``[..., T, G]`` as is where its last axis or its tokens are adjacent in memory (the
    kernels read both layouts through their strides), else a contiguous copy."""
    return t if 1 in (t.stride(-1), t.stride(-2)) else t.contiguous()


@functools.lru_cache(maxsize=32)
def _level_table(head_dim: int, bits: tuple[int, ...], device: str) -> torch.Tensor:
    """int32 ``[levels, 3]``: bit offset of the level in a token's stream, bits, codebook offset
    (the layout of ``polar_recursive_scores.level_table``, cached: no host copy per call)."""
    rows, bit, entry = [], 0, 0
    for level, b in enumerate(bits, start=1):
        rows.append((bit, b, entry))
        bit += (head_dim >> level) * b
        entry += 2**b
    return torch.tensor(rows, dtype=torch.int32, device=device)


def operand_fields(p: QuantizedTensor) -> dict:
    """Keyword arguments of ``decode_operands.Operand`` for a format of :data:`FORMATS`.

    ``meta[0]`` holds one row per token (``[B, H, T, ...]``, strides read by the launcher);
    ``tables`` are up to three small lookup tables; ``book_stride`` the per-(sequence, KV head)
    stride of per-head tables (online codebooks), 0 when shared.
    """
    name = type(p).__name__
    if name == "TurboTensor":
        codes = last_contiguous(p.codes)
        return dict(fmt=FMT_TURBO, data=codes, meta=(last_contiguous(p.norms),), bits=p.bits,
                    tables=(p.codebook.float().contiguous(),), row_bytes=codes.shape[-1])
    if name == "Fp8Tensor":
        codes = last_contiguous(p.codes)
        # the chunk scales expanded to one fp32 scale per token (4 bytes/token next to D bytes of
        # codes): the kernel reads a token's scale like any per-token metadata
        scale = p.token_scales().float()
        if p.format == "e4m3":
            scale = scale * E4M3_SHIFT
        scale = scale.expand(*p.shape[:-1])
        fmt = FMT_FP8_E4M3 if p.format == "e4m3" else FMT_FP8_E5M2
        return dict(fmt=fmt, data=codes.view(torch.uint8), meta=(scale,), bits=8, row_bytes=codes.shape[-1])
    # polar-recursive: cos / sin of every codebook entry, one row per (sequence, KV head) when online
    if p.codebook == "online":
        books = p.codebooks.float().reshape(-1, p.codebooks.shape[-1])
        book_stride = books.shape[-1]
    else:
        books, book_stride = p.analytic_codebooks.float(), 0
    parts = reads_by_parts(p.levels, p.bits, p.head_dim, p.codebook)
    if parts:  # either layout as stored (the transposed kernel addresses both through their strides)
        codes, radii = rows_or_tokens_contiguous(p.codes), rows_or_tokens_contiguous(p.radii)
    else:
        codes, radii = last_contiguous(p.codes), last_contiguous(p.radii)
    table = _level_table(p.head_dim, tuple(p.bits), str(codes.device))
    return dict(fmt=FMT_POLAR_RECURSIVE, data=codes, meta=(radii,), bits=8,
                tables=(books.cos().contiguous(), books.sin().contiguous(), table), book_stride=book_stride,
                levels=p.levels, row_bytes=codes.shape[-1], parts=parts)


def kernel_args(k_op, v_op, placeholder: torch.Tensor) -> dict:
    """The split kernel's format arguments (tables and static parameters) of both operands."""
    out = {}
    for prefix, op in (("k", k_op), ("v", v_op)):
        tables = tuple(op.tables) + (placeholder,) * (3 - len(op.tables))
        out.update({f"{prefix}tab0": tables[0], f"{prefix}tab1": tables[1], f"{prefix}tab2": tables[2],
                    f"{prefix}_book_stride": op.book_stride})
        role = "KEY" if prefix == "k" else "VAL"
        out.update({f"{role}_NB": op.row_bytes, f"{role}_LEVELS": op.levels})
    return out


# ----- Triton tile decoders -----------------------------------------------------------------------------
if triton is not None:
    from kvpolar.kernels.polar_recursive_scores import _read_code, _split_level

    _E4M3_UNSHIFT = tl.constexpr(1.0 / E4M3_SHIFT)  # (the factor's 256 undone where the GPU converts e4m3)

    @triton.jit
    def fp8_to_f16(byte, E4M3: tl.constexpr):
        """float8 bytes (int32 ``0..255``) -> float16 by moving bits: e5m2 is float16's top byte;
        e4m3 (bias 7) lands as ``value / 2**8`` (bias 15), subnormals included. NaN codes unsupported."""
        if E4M3:
            bits = ((byte & 0x80) << 8) | ((byte & 0x7F) << 7)
        else:
            bits = byte << 8
        return bits.to(tl.uint16).to(tl.float16, bitcast=True)

    @triton.jit
    def format_tile(rows, row_ok, meta_tok, tab0, tab1, tab2, book,
                    FMT: tl.constexpr, BITS: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, FP8_CONVERT: tl.constexpr = False):
        """A block of stored vectors: ``(tile [BLOCK_N, D], factor [BLOCK_N] float32)`` with
        ``x_hat = tile * factor`` per token (rotated domain for turbo / polar-recursive).

        rows: ``[BLOCK_N]`` pointers to the tokens' packed bytes; row_ok ``[BLOCK_N]``; meta_tok
        ``[BLOCK_N]`` pointers to each token's metadata row (norm, scale or radii); tab0..2 and
        ``book`` (element offset of this KV head's tables): see ``operand_fields``. Masked rows
        give finite values. ``FP8_CONVERT`` (compiled for compute capability 8.9+): e4m3 bytes
        converted by the GPU's float8 conversion (two per instruction; the bit moving took about
        four instructions per byte), the tile then holding the values themselves and the factor
        divided by 256.
        """
        dcol = tl.arange(0, D)
        if FMT == 3:  # turbo: codebook value per coordinate; norm (/ ||codewords||) per token
            if 8 % BITS == 0:  # codes never straddle two bytes: one byte load per code
                byte = tl.load(rows[:, None] + (dcol // (8 // BITS))[None, :], mask=row_ok[:, None], other=0)
                codes = (byte.to(tl.int32) >> ((dcol % (8 // BITS)) * BITS)[None, :]) & ((1 << BITS) - 1)
            else:
                codes = _read_code(rows[:, None], row_ok[:, None], dcol * BITS, BITS, NB, 1)
            tile = tl.load(tab0 + codes)
            factor = tl.load(meta_tok, mask=row_ok, other=0.0).to(tl.float32)
        elif FMT == 4 and FP8_CONVERT:  # fp8 e4m3, the hardware conversion: exact values
            byte = tl.load(rows[:, None] + dcol[None, :], mask=row_ok[:, None], other=0)
            tile = byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
            factor = tl.load(meta_tok, mask=row_ok, other=0.0) * _E4M3_UNSHIFT
        elif FMT == 4 or FMT == 5:  # fp8 e4m3 / e5m2: one fp32 scale per token
            byte = tl.load(rows[:, None] + dcol[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
            tile = fp8_to_f16(byte, FMT == 4)
            factor = tl.load(meta_tok, mask=row_ok, other=0.0)
        else:  # polar-recursive: the inverse transform top-down from the stored radii
            M: tl.constexpr = D >> LEVELS
            tile = tl.load(meta_tok[:, None] + tl.arange(0, M)[None, :], mask=row_ok[:, None],
                           other=0.0).to(tl.float32)
            for level in tl.static_range(LEVELS - 1, -1, -1):
                tile = _split_level(tile, rows[:, None], row_ok[:, None], tab2, tab0 + book, tab1 + book, NB, 1,
                                    level, D, BLOCK_N)
            factor = tl.full([BLOCK_N], 1.0, tl.float32)
        return tile, factor
