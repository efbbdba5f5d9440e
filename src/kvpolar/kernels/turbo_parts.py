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
as byte tables (:func:`lut_words`, eight 32-bit words per codebook), and per four codes one ``prmt``
for the low bytes, one for the high bytes and two to interleave them into two packed pairs; codes of
4 bits take a second pair of tables and a per-byte select on the code's top bit, or, for an
antisymmetric codebook (:func:`antisymmetric`: the sphere's), the first 8 entries and a sign flip
(``LOOKUP`` 2). The table words are immediates of the inline assembly (:func:`lookup_asm`; the kernel
takes every code position's program as one compile-time string, :func:`lookup_programs`), as are the
code's shift and mask: the lookup's only operand is the unit tile, so Triton's layout pass converts
that tile once, ahead of the parts, into the layout the tensor-core operand needs. With the table
words as runtime operands (scalars broadcast to the tile) it left each part's looked-up tile in the
tile's layout and converted it through shared memory, one 16-bit store per value (sm_90, instructions
per block: turbo-3 2011 -> 1747, turbo-k3v4 1443 -> 1117, turbo-4 1279 -> 1152, the last two without
their 64-80 byte stacks). Elsewhere (the interpreter, float32) the codebook is gathered
from memory. All give the codebook rounded to the product dtype.
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
    8-15 (zero past the codebook). Built with device ops and kept per codebook tensor while it lives
    and is unchanged."""
    dtype = _table_dtype(dtype)
    cache = _codebook_cache(codebook)
    if dtype not in cache:
        cache[dtype] = _lut_on_device(codebook, dtype)
    return cache[dtype]


def table_constant(codebook: torch.Tensor, dtype: torch.dtype) -> str:
    """:func:`lut_words` as the kernel's compile-time table: the eight words in hexadecimal, comma
    separated (one kernel compiled per codebook and dtype; the sphere's codebooks are one per head dim
    and bits). Read to the host once per codebook tensor and dtype (one host read, as
    :func:`antisymmetric`), kept with its table words."""
    dtype = _table_dtype(dtype)
    cache = _codebook_cache(codebook)
    if ("constant", dtype) not in cache:
        words = lut_words(codebook, dtype).tolist()
        cache["constant", dtype] = ",".join(f"{w & 0xFFFFFFFF:#010x}" for w in words)
    return cache["constant", dtype]


def antisymmetric(codebook: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the codebook rounded to ``dtype`` (as :func:`lut_words`) has entry ``K - 1 - i`` equal to
    minus entry ``i`` bit for bit: the sphere's Lloyd-Max codebooks do, and their 4-bit lookups then
    read an 8-entry table and flip the sign (:func:`lookup_asm`, mode 2). Computed once per codebook
    tensor and dtype (one host read), kept with its table words."""
    dtype = _table_dtype(dtype)
    cache = _codebook_cache(codebook)
    if ("antisymmetric", dtype) not in cache:
        entries = codebook.to(dtype)
        cache["antisymmetric", dtype] = bool(torch.equal(entries.view(torch.int16) ^ -0x8000,
                                                         entries.flip(0).view(torch.int16)))
    return cache["antisymmetric", dtype]


# ``prmt`` lookups (PTX). The asm takes 4 codes: one register of 4 bytes (byte units, code K at bit
# ``shift`` of each byte) or 4 registers of one 24-bit unit each (3-bit codes). Selector nibble k =
# code k, so ``prmt lo, L0, L1, sel`` gathers the low bytes of the 4 entries; two more ``prmt``
# interleave low and high bytes into the pairs (codes 0, 1) and (2, 3). Shifts, masks and table words
# are immediates (``lookup_asm``), the table words moved into ``ta`` / ``tb`` (loop invariant: the
# compiler keeps them in registers).
_REGS = "{ .reg .b32 t, s, c, m, lo, hi, ta, tb; "
_BYTE_CODES = "shr.u32 t, $2, {shift}; and.b32 t, t, {mask}; "  # the 4 codes, one per byte of t
_PACK_SELECTOR = "prmt.b32 t, t, 0, 0x3120; shr.u32 s, t, 12; or.b32 s, s, t; "  # byte k of t -> nibble k of s
#: the eight table words' names in :func:`lut_words`' order
_TABLE_NAMES = ("l0", "l1", "h0", "h1", "l2", "l3", "h2", "h3")
#: mask of one code per byte, by bits
_BYTE_MASKS = {1: "0x01010101", 2: "0x03030303", 4: "0x0F0F0F0F"}


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


def _gather(dst: str, first: str, second: str, selector: str) -> str:
    """``prmt`` of the bytes of two table words (immediates moved into ``ta`` / ``tb``)."""
    return f"mov.b32 ta, {first}; mov.b32 tb, {second}; prmt.b32 {dst}, ta, tb, {selector}; "


_INTERLEAVE = "prmt.b32 $0, lo, hi, 0x5140; prmt.b32 $1, lo, hi, 0x7362; "
# 4-bit codes of an antisymmetric codebook (entry 15 - i = -entry i, as the sphere's Lloyd-Max ones):
# code c >= 8 reads entry 15 - c = (c ^ 7) & 7 of the 8-entry table (_FOLD_HALF, before the selector
# is packed) and the sign bit of its result is flipped (_FLIP_SIGNS, after the 8-entry lookup)
_FOLD_HALF = ("and.b32 c, t, 0x08080808; shr.u32 m, c, 3; sub.u32 m, c, m; xor.b32 t, t, m; "
              "and.b32 t, t, 0x07070707; ")
_FLIP_SIGNS = "shl.b32 c, c, 4; prmt.b32 m, c, 0, 0x1404; xor.b32 $0, $0, m; prmt.b32 m, c, 0, 0x3424; xor.b32 $1, $1, m; "


def _lookup8(w: dict) -> str:
    """Entries 0-7 of the table words ``w`` at selector ``s`` into ``$0`` / ``$1``."""
    return _gather("lo", w["l0"], w["l1"], "s") + _gather("hi", w["h0"], w["h1"], "s") + _INTERLEAVE


def _lookup16(w: dict) -> str:
    """All 16 entries: the selector nibbles' low 3 bits into both halves' tables, then a per-byte
    select on each code's top bit."""
    return ("and.b32 c, s, 0x7777; " + _gather("lo", w["l0"], w["l1"], "c") + _gather("t", w["l2"], w["l3"], "c")
            + _gather("hi", w["h0"], w["h1"], "c") + _gather("c", w["h2"], w["h3"], "c")
            # byte mask: 0xFF where code k >= 8 (its bit 3 moved to the msb of byte k, then sign-replicated)
            + "prmt.b32 m, s, 0, 0x1100; shl.b32 s, m, 4; and.b32 s, s, 0x00800080; and.b32 m, m, 0x80008000; "
            "or.b32 m, m, s; prmt.b32 m, m, 0, 0xBA98; "
            "xor.b32 t, t, lo; and.b32 t, t, m; xor.b32 lo, lo, t; "
            "xor.b32 c, c, hi; and.b32 c, c, m; xor.b32 hi, hi, c; " + _INTERLEAVE)


def lookup_asm(bits: int, mode: int, k: int, table: str) -> str:
    """The inline PTX of code position ``k``'s lookup (``bits``-bit codes, ``mode`` = ``LOOKUP``, the
    table words of :func:`table_constant`): operands ``$0`` / ``$1`` the two packed pairs out, then
    the unit register(s) in (four 24-bit units for 3 bits, else one register of four byte units)."""
    words = table.split(",")
    if len(words) != len(_TABLE_NAMES):
        raise ValueError(f"table={table!r}: expected {len(_TABLE_NAMES)} comma-separated words (table_constant)")
    w = dict(zip(_TABLE_NAMES, words))
    if bits == 3:
        return _REGS + _words_to_selector(3 * k) + _lookup8(w) + "}"
    if bits not in _BYTE_MASKS:
        raise ValueError(f"bits={bits}: the lookups read codes of 1, 2, 3 or 4 bits")
    codes = _BYTE_CODES.format(shift=k * bits, mask=_BYTE_MASKS[bits])
    if bits == 4 and mode == 2:
        return _REGS + codes + _FOLD_HALF + _PACK_SELECTOR + _lookup8(w) + _FLIP_SIGNS + "}"
    if bits == 4:
        return _REGS + codes + _PACK_SELECTOR + _lookup16(w) + "}"
    return _REGS + codes + _PACK_SELECTOR + _lookup8(w) + "}"


#: separates the code positions' programs in :func:`lookup_programs`
PROGRAM_SEPARATOR = "|"


def lookup_programs(codebook: torch.Tensor, dtype: torch.dtype, bits: int, mode: int) -> str:
    """Every code position's lookup (:func:`lookup_asm`, ``UNITS[bits]`` of them) of ``codebook``
    rounded to ``dtype``, joined by :data:`PROGRAM_SEPARATOR`: the kernel's compile-time argument
    (``KEY_PROGRAMS`` / ``VAL_PROGRAMS``), from which :func:`nth_program` takes part ``K``'s. Kept
    per codebook tensor (:func:`table_constant`)."""
    cache = _codebook_cache(codebook)
    key = ("programs", _table_dtype(dtype), bits, mode)
    if key not in cache:
        table = table_constant(codebook, dtype)
        cache[key] = PROGRAM_SEPARATOR.join(lookup_asm(bits, mode, k, table) for k in range(UNITS[bits][1]))
    return cache[key]


@triton.constexpr_function
def nth_program(programs, k):
    """Code position ``k``'s inline PTX of :func:`lookup_programs`' string (compile time; the literal
    is :data:`PROGRAM_SEPARATOR`, written out as in the form run on the GPU's Triton 3.6)."""
    return programs.split("|")[k]


@triton.constexpr_function
def lookup_constraints(bits):
    """The lookup's asm constraints: two packed pairs out; four 24-bit units (3 bits) or one register
    of four byte units in."""
    return "=r,=r,r,r,r,r" if bits == 3 else "=r,=r,r"


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
def part_values(word, K: tl.constexpr, BITS: tl.constexpr, PROGRAMS: tl.constexpr, book_ptr, DT: tl.constexpr,
                LOOKUP: tl.constexpr):
    """Codebook value of code ``K`` of every unit of ``word`` (:func:`load_units`), in ``DT``.
    ``LOOKUP``: 0 gathers from the codebook in memory (the interpreter), 1 looks it up with ``prmt``
    (compiled, float16 / bfloat16; ``PROGRAMS``: :func:`lookup_programs`), 2 the same with 4-bit codes
    of an antisymmetric codebook (:func:`antisymmetric`) read from its first 8 entries."""
    if LOOKUP > 0 and (DT == tl.float16 or DT == tl.bfloat16):
        asm: tl.constexpr = nth_program(PROGRAMS, K)
        out = tl.inline_asm_elementwise(asm, lookup_constraints(BITS), [word], dtype=DT.value, is_pure=True,
                                        pack=4)
    else:
        code = (word.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1)
        out = tl.load(book_ptr + code).to(DT)
    return out


@triton.jit
def key_part_t(s_t, word, q_t, K: tl.constexpr, BITS: tl.constexpr, PROGRAMS: tl.constexpr, book_ptr,
               DT: tl.constexpr, LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """``s_t [BN, BM] += codebook[codes_K] [BN, NU] @ q_K [NU, BM]`` (``q_K``: the rotated query at
    coordinates ``u * U + K``, in ``DT``)."""
    return tl.dot(part_values(word, K, BITS, PROGRAMS, book_ptr, DT, LOOKUP), q_t, s_t, input_precision=PREC)


@triton.jit
def value_part_t(acc_t, word_t, p_t, alpha, K: tl.constexpr, BITS: tl.constexpr, PROGRAMS: tl.constexpr,
                 book_ptr, DT: tl.constexpr, LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """``acc_K^T [NU, BM] = acc_K^T * alpha + codebook[codes_K]^T [NU, BN] @ p_t [BN, BM]`` (``p_t``:
    the probabilities times each token's factor)."""
    v = part_values(word_t, K, BITS, PROGRAMS, book_ptr, DT, LOOKUP)
    return tl.dot(v, p_t, acc_t * alpha[None, :], input_precision=PREC)


@triton.jit
def query_part_t(q_rows, row_ok, uk, K: tl.constexpr, U: tl.constexpr, DT: tl.constexpr):
    """The query rows ``q_rows`` ``[BM]`` at channels ``u * U + K`` (``uk`` = ``arange(NU)``),
    transposed: ``[NU, BM]`` in ``DT`` (parts ``K >= U`` repeat part ``K % U``; the kernel never reads them)."""
    return tl.load(q_rows[None, :] + (uk * U + K % U)[:, None], mask=row_ok[None, :], other=0.0).to(DT)


@triton.jit
def key_scores_t(s_t, word, q0, q1, q2, q3, q4, q5, q6, q7, U: tl.constexpr, BITS: tl.constexpr,
                 PROGRAMS: tl.constexpr, book_ptr, DT: tl.constexpr, LOOKUP: tl.constexpr, PREC: tl.constexpr):
    """``s_t [BN, BM]`` plus the products of all ``U`` parts of ``word`` (:func:`key_part_t`)."""
    s_t = key_part_t(s_t, word, q0, 0, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    if U >= 2:
        s_t = key_part_t(s_t, word, q1, 1, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    if U >= 4:
        s_t = key_part_t(s_t, word, q2, 2, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q3, 3, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    if U >= 8:
        s_t = key_part_t(s_t, word, q4, 4, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q5, 5, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q6, 6, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        s_t = key_part_t(s_t, word, q7, 7, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    return s_t


@triton.jit
def value_parts_t(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, word_t, p_t, alpha, U: tl.constexpr,
                  BITS: tl.constexpr, PROGRAMS: tl.constexpr, book_ptr, DT: tl.constexpr, LOOKUP: tl.constexpr,
                  PREC: tl.constexpr):
    """The ``U`` accumulators (:func:`value_part_t`); the others are returned unchanged."""
    acc0 = value_part_t(acc0, word_t, p_t, alpha, 0, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    if U >= 2:
        acc1 = value_part_t(acc1, word_t, p_t, alpha, 1, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    if U >= 4:
        acc2 = value_part_t(acc2, word_t, p_t, alpha, 2, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        acc3 = value_part_t(acc3, word_t, p_t, alpha, 3, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    if U >= 8:
        acc4 = value_part_t(acc4, word_t, p_t, alpha, 4, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        acc5 = value_part_t(acc5, word_t, p_t, alpha, 5, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        acc6 = value_part_t(acc6, word_t, p_t, alpha, 6, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
        acc7 = value_part_t(acc7, word_t, p_t, alpha, 7, BITS, PROGRAMS, book_ptr, DT, LOOKUP, PREC)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7
