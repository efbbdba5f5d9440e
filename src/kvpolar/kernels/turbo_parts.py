"""turbo codes "by parts" for the transposed decode-attention kernel.

A turbo token is ``D`` codes of ``bits`` bits packed densely (``kvpolar.packing.pack_bits``) plus one
float16 factor (``TurboTensor.norms``): coordinate ``d`` of the rotated vector is
``factor * codebook[code_d]``. The kernel reads the codes in units: one byte of ``U = 8 / bits`` codes
for 1, 2 and 4 bits, three bytes of ``U = 8`` codes for 3 bits. Part ``K`` is code ``K`` of every unit
(coordinates ``u * U + K``), a ``[tokens, D / U]`` tile looked up in the codebook and used as the
register operand of one tensor-core product: against the rotated query gathered at the part's
coordinates (keys), or into an accumulator of its own (values, with the factor folded into the
probabilities). No tile is interleaved across parts.

The lookup, compiled for a GPU in float16 / bfloat16 (``LOOKUP`` > 0): the codebook's 16-bit patterns
as byte tables in registers (:func:`lut_words`, eight int32 words per codebook), and per four codes
one ``prmt`` for the low bytes, one for the high bytes and two to interleave them into two packed
pairs; codes of 4 bits take a second pair of tables and a per-byte select on the code's top bit, or,
for an antisymmetric codebook (:func:`antisymmetric`: the sphere's), the first 8 entries and a sign
flip (``LOOKUP`` 2). Elsewhere (the interpreter, float32) the codebook is gathered from memory. All
give the codebook rounded to the product dtype.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from kvpolar.kernels.polar_pairs import load_units24, load_units24_t, unit_words_at

#: bits of a turbo code -> (bytes per unit, codes per unit) the transposed kernel reads
UNITS = {1: (1, 8), 2: (1, 4), 3: (3, 8), 4: (1, 2)}


#: id(codebook) -> (weak reference, codebook version, {dtype: table words, ("antisymmetric", dtype): bool});
#: entries leave with their codebook
_LUTS: dict[int, tuple[weakref.ref, int, dict]] = {}


def _lut_on_device(codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    entries = torch.zeros(16, dtype=dtype, device=codebook.device)
    entries[: codebook.numel()] = codebook.to(dtype)
    pattern = entries.view(torch.int16).to(torch.int64) & 0xFFFF
    tables = torch.stack([pattern & 0xFF, pattern >> 8])  # [low / high byte, entry]
    shifts = torch.tensor([0, 8, 16, 24], device=codebook.device)
    words = (tables.view(2, 2, 2, 4) << shifts).sum(-1)  # [byte, half of the entries, word]
    words = words.permute(1, 0, 2).reshape(8)  # entries 0-7: low words, high words; then entries 8-15
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _table_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the tables are rounded to: float16 or bfloat16 as asked, float16 for any other (only the
    float16 / bfloat16 lookup reads them)."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _codebook_cache(codebook: torch.Tensor) -> dict:
    """What is kept for ``codebook`` (:data:`_LUTS`): a fresh dict when the tensor is new or has changed
    since, else the one kept."""
    key = id(codebook)
    entry = _LUTS.get(key)
    if entry is None or entry[0]() is not codebook or entry[1] != codebook._version:
        ref = weakref.ref(codebook, lambda _, k=key: _LUTS.pop(k, None))
        entry = _LUTS[key] = (ref, codebook._version, {})
    return entry[2]


def lut_words(codebook: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 ``[8]`` on the codebook's device: the codebook (``2**bits <= 16`` entries) rounded to
    ``dtype`` (float16 or bfloat16; other dtypes: float16) as ``prmt`` byte tables: words 0-1 the low
    bytes of entries 0-7 (entry ``i`` at byte ``i``), 2-3 their high bytes, 4-7 the same for entries
    8-15 (zero past the codebook). Built with device ops (no host copy: CUDA-graph safe) and kept per
    codebook tensor while it lives and is unchanged."""
    dtype = _table_dtype(dtype)
    cache = _codebook_cache(codebook)
    if dtype not in cache:
        cache[dtype] = _lut_on_device(codebook, dtype)
    return cache[dtype]


def antisymmetric(codebook: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the codebook rounded to ``dtype`` (as :func:`lut_words`) has entry ``K - 1 - i`` equal to
    minus entry ``i`` bit for bit: the sphere's Lloyd-Max codebooks do, and their 4-bit lookups then
    read an 8-entry table and flip the sign (``ASM_BYTES_4_SYMMETRIC``). Computed once per codebook
    tensor and dtype (one host read), kept with its table words."""
    dtype = _table_dtype(dtype)
    cache = _codebook_cache(codebook)
    if ("antisymmetric", dtype) not in cache:
        entries = codebook.to(dtype)
        cache["antisymmetric", dtype] = bool(torch.equal(entries.view(torch.int16) ^ -0x8000,
                                                         entries.flip(0).view(torch.int16)))
    return cache["antisymmetric", dtype]


# ``prmt`` lookups (PTX). The asm takes 4 codes: one register of 4 bytes (byte units, code K at bit
# ``$shift`` of each byte) or 4 registers of one 24-bit unit each (3-bit codes), and the shift and the
# table words broadcast (4 copies each, the first one read). Selector nibble k = code k, so
# ``prmt lo, LO0, LO1, sel`` gathers the low bytes of the 4 entries; two more ``prmt`` interleave low and
# high bytes into the pairs (codes 0, 1) and (2, 3).
_BYTE_CODES = "shr.u32 t, $2, $3; and.b32 t, t, {mask}; "  # the 4 codes, one per byte of t
_PACK_SELECTOR = "prmt.b32 t, t, 0, 0x3120; shr.u32 s, t, 12; or.b32 s, s, t; "  # byte k of t -> nibble k of s
_BYTES_TO_SELECTOR = _BYTE_CODES + _PACK_SELECTOR


def _words_to_selector(shift: int) -> str:
    """Selector nibbles ``k`` = the 3-bit code at bit ``shift`` of word ``$2 + k`` (24-bit units): each
    word shifted by a constant so its code lands in nibble ``k``, masked and ORed in (a shift and one
    AND-OR each; ``bfe`` / ``bfi``, which sm_90 emulates with several instructions, took about twice
    as many)."""
    parts = []
    for k in range(4):
        move = shift - 4 * k  # right shift that puts the code at bit 4 k
        word = f"${2 + k}"
        if move > 0:
            parts.append(f"shr.u32 t, {word}, {move}; ")
        elif move < 0:
            parts.append(f"shl.b32 t, {word}, {-move}; ")
        else:
            parts.append(f"mov.b32 t, {word}; ")
        parts.append(f"and.b32 t, t, {7 << (4 * k):#x}; " + ("mov.b32 s, t; " if k == 0 else "or.b32 s, s, t; "))
    return "".join(parts)


_LOOKUP8 = (
    "prmt.b32 lo, ${l0}, ${l1}, s; prmt.b32 hi, ${h0}, ${h1}, s; "
    "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; "
)
_LOOKUP16 = (
    "and.b32 c, s, 0x7777; "
    "prmt.b32 lo, ${l0}, ${l1}, c; prmt.b32 t, ${l2}, ${l3}, c; "
    "prmt.b32 hi, ${h0}, ${h1}, c; prmt.b32 c, ${h2}, ${h3}, c; "
    # byte mask: 0xFF where code k >= 8 (its bit 3 moved to the msb of byte k, then sign-replicated)
    "prmt.b32 m, s, 0, 0x1100; shl.b32 s, m, 4; and.b32 s, s, 0x00800080; and.b32 m, m, 0x80008000; "
    "or.b32 m, m, s; prmt.b32 m, m, 0, 0xBA98; "
    "xor.b32 t, t, lo; and.b32 t, t, m; xor.b32 lo, lo, t; "
    "xor.b32 c, c, hi; and.b32 c, c, m; xor.b32 hi, hi, c; "
    "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; "
)
# 4-bit codes of an antisymmetric codebook (entry 15 - i = -entry i, as the sphere's Lloyd-Max ones):
# code c >= 8 reads entry 15 - c = (c ^ 7) & 7 of the 8-entry table (_FOLD_HALF, before the selector
# is packed) and the sign bit of its result is flipped (_FLIP_SIGNS, after the 8-entry lookup)
_FOLD_HALF = "and.b32 c, t, 0x08080808; shr.u32 m, c, 3; sub.u32 m, c, m; xor.b32 t, t, m; and.b32 t, t, 0x07070707; "
_FLIP_SIGNS = "shl.b32 c, c, 4; prmt.b32 m, c, 0, 0x1404; xor.b32 $0, $0, m; prmt.b32 m, c, 0, 0x3424; xor.b32 $1, $1, m; "
_REGS = "{ .reg .b32 t, s, c, m, lo, hi; "


def _asm(selector: str, lookup: str, first_table: int, mask: str = "") -> str:
    regs = {name: first_table + 4 * i for i, name in enumerate(("l0", "l1", "h0", "h1", "l2", "l3", "h2", "h3"))}
    return _REGS + selector.format(mask=mask) + lookup.format(**regs) + "}"


# operands: $0, $1 out; byte units: $2 bytes, $3-$6 shift, tables from $7; 3-bit: $2-$5 words, $6-$9 shift
# (unread: those strings shift by constants), tables from $10
ASM_BYTES_1 = tl.constexpr(_asm(_BYTES_TO_SELECTOR, _LOOKUP8, 7, "0x01010101"))
ASM_BYTES_2 = tl.constexpr(_asm(_BYTES_TO_SELECTOR, _LOOKUP8, 7, "0x03030303"))
ASM_BYTES_4 = tl.constexpr(_asm(_BYTES_TO_SELECTOR, _LOOKUP16, 7, "0x0F0F0F0F"))
ASM_BYTES_4_SYMMETRIC = tl.constexpr(_asm(_BYTE_CODES + _FOLD_HALF + _PACK_SELECTOR, _LOOKUP8 + _FLIP_SIGNS, 7,
                                          "0x0F0F0F0F"))
# 3-bit codes, one string per code position K (the shifts are immediates): code K is at bit 3 K
ASM_WORDS_3 = tuple(tl.constexpr(_asm(_words_to_selector(3 * k), _LOOKUP8, 10)) for k in range(8))
(ASM_WORDS_3_0, ASM_WORDS_3_1, ASM_WORDS_3_2, ASM_WORDS_3_3,
 ASM_WORDS_3_4, ASM_WORDS_3_5, ASM_WORDS_3_6, ASM_WORDS_3_7) = ASM_WORDS_3
# constraints: 4 uint8 codes pack into one register, every int32 operand takes 4
_C_BYTES8 = tl.constexpr("=r,=r" + ",r" * (1 + 4 * 5))
_C_BYTES16 = tl.constexpr("=r,=r" + ",r" * (1 + 4 * 9))
_C_WORDS8 = tl.constexpr("=r,=r" + ",r" * (4 + 4 * 5))


@triton.jit
def load_lut(lut_ptr):
    """The eight table words of :func:`lut_words` (scalars, loaded once per program)."""
    return (tl.load(lut_ptr), tl.load(lut_ptr + 1), tl.load(lut_ptr + 2), tl.load(lut_ptr + 3),
            tl.load(lut_ptr + 4), tl.load(lut_ptr + 5), tl.load(lut_ptr + 6), tl.load(lut_ptr + 7))


@triton.jit
def load_units(ptrs, ok, u, UB: tl.constexpr, WORDS: tl.constexpr):
    """Units ``u`` (any orientation, broadcast against ``ptrs`` / ``ok``): uint8 bytes for byte units,
    int32 words of 24 bits for 3-byte units (``WORDS``: ``ptrs`` point to int16 halfwords; ``WORDS ==
    2``: to int32 words, ``u`` all the units as a row ``[1, NU]`` or a column ``[NU, 1]``,
    :func:`load_units24` / :func:`load_units24_t`)."""
    if UB == 3 and WORDS == 2 and u.shape[0] == 1:  # a row of units per token
        word = load_units24(ptrs, ok, u.shape[1])
    elif UB == 3 and WORDS == 2:  # a column of units per token
        word = load_units24_t(ptrs, ok, u.shape[0])
    elif UB == 3:
        word = unit_words_at(ptrs, ok, u, 3, WORDS)
    else:
        word = tl.load(ptrs + u, mask=ok, other=0)
    return word


@triton.jit
def part_values(word, K: tl.constexpr, BITS: tl.constexpr, lut, book_ptr, DT: tl.constexpr, LOOKUP: tl.constexpr):
    """Codebook value of code ``K`` of every unit of ``word`` (:func:`load_units`), in ``DT``.
    ``LOOKUP``: 0 gathers from the codebook in memory (the interpreter), 1 looks up the table words
    with ``prmt`` (compiled, float16 / bfloat16), 2 the same with 4-bit codes of an antisymmetric
    codebook (:func:`antisymmetric`) read from its first 8 entries."""
    if LOOKUP > 0 and (DT == tl.float16 or DT == tl.bfloat16):
        shift = tl.full(word.shape, K * BITS, tl.int32)
        l0, l1, h0, h1, l2, l3, h2, h3 = lut
        if BITS == 3:
            asm: tl.constexpr = (ASM_WORDS_3_0 if K == 0 else ASM_WORDS_3_1 if K == 1 else ASM_WORDS_3_2 if K == 2
                                 else ASM_WORDS_3_3 if K == 3 else ASM_WORDS_3_4 if K == 4 else ASM_WORDS_3_5 if K == 5
                                 else ASM_WORDS_3_6 if K == 6 else ASM_WORDS_3_7)
            out = tl.inline_asm_elementwise(asm, _C_WORDS8, [word, shift, l0, l1, h0, h1], dtype=DT.value,
                                            is_pure=True, pack=4)
        elif BITS == 4 and LOOKUP == 2:
            out = tl.inline_asm_elementwise(ASM_BYTES_4_SYMMETRIC, _C_BYTES8, [word, shift, l0, l1, h0, h1],
                                            dtype=DT.value, is_pure=True, pack=4)
        elif BITS == 4:
            out = tl.inline_asm_elementwise(ASM_BYTES_4, _C_BYTES16, [word, shift, l0, l1, h0, h1, l2, l3, h2, h3],
                                            dtype=DT.value, is_pure=True, pack=4)
        elif BITS == 2:
            out = tl.inline_asm_elementwise(ASM_BYTES_2, _C_BYTES8, [word, shift, l0, l1, h0, h1], dtype=DT.value,
                                            is_pure=True, pack=4)
        else:
            out = tl.inline_asm_elementwise(ASM_BYTES_1, _C_BYTES8, [word, shift, l0, l1, h0, h1], dtype=DT.value,
                                            is_pure=True, pack=4)
    else:
        code = (word.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1)
        out = tl.load(book_ptr + code).to(DT)
    return out


@triton.jit
def key_part_t(s_t, word, q_t, K: tl.constexpr, BITS: tl.constexpr, lut, book_ptr, DT: tl.constexpr,
               LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """``s_t [BN, BM] += codebook[codes_K] [BN, NU] @ q_K [NU, BM]`` (``q_K``: the rotated query at
    coordinates ``u * U + K``, in ``DT``)."""
    return tl.dot(part_values(word, K, BITS, lut, book_ptr, DT, LOOKUP), q_t, s_t, input_precision=PREC)


@triton.jit
def value_part_t(acc_t, word_t, p_t, alpha, K: tl.constexpr, BITS: tl.constexpr, lut, book_ptr,
                 DT: tl.constexpr, LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """``acc_K^T [NU, BM] = acc_K^T * alpha + codebook[codes_K]^T [NU, BN] @ p_t [BN, BM]`` (``p_t``:
    the probabilities times each token's factor)."""
    v = part_values(word_t, K, BITS, lut, book_ptr, DT, LOOKUP)
    return tl.dot(v, p_t, acc_t * alpha[None, :], input_precision=PREC)


@triton.jit
def query_part_t(q_rows, row_ok, uk, K: tl.constexpr, U: tl.constexpr, DT: tl.constexpr):
    """The query rows ``q_rows`` ``[BM]`` at channels ``u * U + K`` (``uk`` = ``arange(NU)``),
    transposed: ``[NU, BM]`` in ``DT`` (parts ``K >= U`` repeat part ``K % U``; the kernel never reads them)."""
    return tl.load(q_rows[None, :] + (uk * U + K % U)[:, None], mask=row_ok[None, :], other=0.0).to(DT)


@triton.jit
def key_scores_t(s_t, word, q0, q1, q2, q3, q4, q5, q6, q7, U: tl.constexpr, BITS: tl.constexpr, lut, book_ptr,
                 DT: tl.constexpr, LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """``s_t [BN, BM]`` plus the products of all ``U`` parts of ``word`` (:func:`key_part_t`)."""
    s_t = key_part_t(s_t, word, q0, 0, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    if U >= 2:
        s_t = key_part_t(s_t, word, q1, 1, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    if U >= 4:
        s_t = key_part_t(s_t, word, q2, 2, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q3, 3, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    if U >= 8:
        s_t = key_part_t(s_t, word, q4, 4, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q5, 5, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q6, 6, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q7, 7, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    return s_t


@triton.jit
def value_parts_t(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, word_t, p_t, alpha, U: tl.constexpr,
                  BITS: tl.constexpr, lut, book_ptr, DT: tl.constexpr, LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """The ``U`` accumulators (:func:`value_part_t`); the others are returned unchanged."""
    acc0 = value_part_t(acc0, word_t, p_t, alpha, 0, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    if U >= 2:
        acc1 = value_part_t(acc1, word_t, p_t, alpha, 1, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    if U >= 4:
        acc2 = value_part_t(acc2, word_t, p_t, alpha, 2, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        acc3 = value_part_t(acc3, word_t, p_t, alpha, 3, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    if U >= 8:
        acc4 = value_part_t(acc4, word_t, p_t, alpha, 4, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        acc5 = value_part_t(acc5, word_t, p_t, alpha, 5, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        acc6 = value_part_t(acc6, word_t, p_t, alpha, 6, BITS, lut, book_ptr, DT, LOOKUP, PREC)
        acc7 = value_part_t(acc7, word_t, p_t, alpha, 7, BITS, lut, book_ptr, DT, LOOKUP, PREC)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7
