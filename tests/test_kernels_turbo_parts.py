"""turbo keys and values by parts in the transposed decode kernel (kernels/turbo_parts.py).

Two halves:
- the GPU-only ``prmt`` lookups, run on a small emulator of the PTX instructions they use against
  the codebook rounded to float16 / bfloat16 (the interpreter never executes inline assembly);
- the kernel under TRITON_INTERPRET=1 (memory gathers instead of the lookups) against the float64
  oracle, with a spy checking that the transposed kernel ran.
"""

import pytest
import torch

import kvpolar
from kvpolar.kernels import decode_attention as da

pytest.importorskip("triton")
from kvpolar.kernels import turbo_parts as tp  # noqa: E402
from test_kernels_decode_attention import record_three_byte_readings, small_caches_transposed  # noqa: E402
from test_kernels_decode_formats import check, polar, turbo  # noqa: E402
from test_kernels_polar_recursive_parts import transposed_launches  # noqa: E402, F401

D = 128
MASK32 = 0xFFFFFFFF
KIVI2_K = ("kivi", {"bits": 2, "group_size": 32, "axis": "channel"})
KIVI2_V = ("kivi", {"bits": 2, "group_size": 32, "axis": "token"})

# ----- a PTX emulator for the lookups ---------------------------------------------------------------------
def _prmt(a: int, b: int, c: int) -> int:
    pool = (a & MASK32) | ((b & MASK32) << 32)
    out = 0
    for k in range(4):
        sel = (c >> (4 * k)) & 0xF
        byte = (pool >> (8 * (sel & 7))) & 0xFF
        if sel & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out

OPS = {
    "shr.u32": lambda a, b: (a & MASK32) >> b,
    "shl.b32": lambda a, b: (a << b) & MASK32,
    "and.b32": lambda a, b: a & b,
    "or.b32": lambda a, b: a | b,
    "xor.b32": lambda a, b: a ^ b,
    "mov.b32": lambda a: a,
    "sub.u32": lambda a, b: (a - b) & MASK32,
    "prmt.b32": _prmt,
}

def run_ptx(asm: str, operands: list[int]) -> tuple[int, int]:
    """Execute one of ``turbo_parts``'s asm strings; ``operands`` are $2 onwards; returns ($0, $1)."""
    regs = {f"${i + 2}": v & MASK32 for i, v in enumerate(operands)}
    body = asm.strip()[1:-1]
    for stmt in filter(None, (s.strip() for s in body.split(";"))):
        if stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *srcs = (x.strip() for x in args.split(","))
        vals = [regs[s] if s in regs else int(s, 0) for s in srcs]
        assert op in OPS, f"the emulator lacks {op}"
        regs[dst] = OPS[op](*vals) & MASK32
    return regs["$0"], regs["$1"]

def _halves(word: int) -> tuple[int, int]:
    return word & 0xFFFF, word >> 16

def _lookup(asm: str, units: list[int], unit_bytes: int) -> list[int]:
    """The four 16-bit results of one lookup program on 4 units (``unit_bytes`` 3: a register each; 1:
    one register of 4 bytes)."""
    operands = list(units) if unit_bytes == 3 else [units[0] | units[1] << 8 | units[2] << 16 | units[3] << 24]
    out0, out1 = run_ptx(asm, operands)
    return [*_halves(out0), *_halves(out1)]

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_prmt_lookups_give_the_rounded_codebook(bits, dtype):
    """Every code position's program of ``lookup_programs`` (the table words, shift and mask as
    immediates) gives the codebook rounded to the dtype, for random units."""
    book = torch.sort(torch.randn(2**bits))[0]
    expected = book.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    ub, u = tp.UNITS[bits]
    joined = tp.lookup_programs(book, dtype, bits, 1)
    programs = joined.split(tp.PROGRAM_SEPARATOR)
    assert len(programs) == u
    assert programs[1] == tp.lookup_asm(bits, 1, 1, tp.table_constant(book, dtype))
    assert [tp.nth_program(joined, k) for k in range(u)] == programs  # what the kernel takes at compile time
    gen = torch.Generator().manual_seed(bits)
    for _ in range(64):
        units = torch.randint(0, 1 << (8 * ub), (4,), generator=gen).tolist()  # 4 units of random codes
        for k in range(u):
            shift = k * bits
            got = _lookup(programs[k], units, ub)
            want = [int(expected[(w >> shift) & (2**bits - 1)]) for w in units]
            assert got == want, (bits, k, units)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_antisymmetric_4bit_lookup_gives_the_rounded_codebook(dtype):
    """4-bit codes of an antisymmetric codebook: the 8-entry lookup with a sign flip for codes >= 8
    gives every entry, for both code positions of a byte."""
    half = torch.sort(torch.rand(8, generator=torch.Generator().manual_seed(3)) * -2.0)[0]
    book = torch.cat([half, -half.flip(0)])
    assert tp.antisymmetric(book, dtype)
    expected = book.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    programs = tp.lookup_programs(book, dtype, 4, 2).split(tp.PROGRAM_SEPARATOR)
    gen = torch.Generator().manual_seed(4)
    for _ in range(128):
        units = torch.randint(0, 256, (4,), generator=gen).tolist()
        for k, shift in enumerate((0, 4)):
            got = _lookup(programs[k], units, 1)
            assert got == [int(expected[(u >> shift) & 15]) for u in units]


def test_lookup_programs_are_kept_per_codebook_and_refuse_bad_tables():
    """The programs are built once per codebook tensor, dtype, bits and mode (the kernel compiles one
    variant per string), follow the codebook when it changes in place, and a malformed table or an
    unsupported width is refused with what was expected."""
    book = torch.sort(torch.randn(8))[0]
    first = tp.lookup_programs(book, torch.float16, 3, 1)
    assert tp.lookup_programs(book, torch.float16, 3, 1) is first
    assert tp.lookup_programs(book, torch.bfloat16, 3, 1) != first
    book[0] -= 1.0  # changed in place: new table words
    assert tp.lookup_programs(book, torch.float16, 3, 1) != first
    with pytest.raises(ValueError, match="expected 8 comma-separated words"):
        tp.lookup_asm(3, 1, 0, "0x1,0x2")
    with pytest.raises(ValueError, match="bits=5"):
        tp.lookup_asm(5, 1, 0, tp.table_constant(book, torch.float16))


def test_antisymmetry_decides_the_lookup(monkeypatch):
    """The kernel takes the 8-entry lookup only for 4-bit codebooks that are antisymmetric once
    rounded to the query's dtype (the sphere's are); any other codebook keeps the 16-entry one, and
    the interpreter gathers from memory."""
    sphere = kvpolar.quantizers.turbo.sphere_codebook(D, 4)
    assert tp.antisymmetric(sphere, torch.float16) and tp.antisymmetric(sphere, torch.bfloat16)
    skewed = sphere.clone()
    skewed[3] += 0.01
    assert not tp.antisymmetric(skewed, torch.float16)
    monkeypatch.setattr(da, "_interpreting", lambda: False)
    q = torch.zeros(1, 4, 1, D, dtype=torch.float16)
    op = lambda book, bits: da.Operand(fmt=da.formats.FMT_TURBO, data=q, meta=(), bits=bits, tables=(book,))  # noqa: E731
    assert da._turbo_tables(op(sphere, 4), q)[2] == 2
    assert da._turbo_tables(op(skewed, 4), q)[2] == 1
    assert da._turbo_tables(op(kvpolar.quantizers.turbo.sphere_codebook(D, 3), 3), q)[2] == 1
    monkeypatch.setattr(da, "_interpreting", lambda: True)
    assert da._turbo_tables(op(sphere, 4), q)[2] == 0


def test_lut_words_layout():
    book = torch.tensor([-1.5, -0.25, 0.25, 1.5])
    lut = tp.lut_words(book, torch.float16)
    assert lut.dtype == torch.int32 and lut.shape == (8,)
    pattern = book.half().view(torch.int16).to(torch.int64) & 0xFFFF
    assert int(lut[0]) & MASK32 == sum(int(p & 0xFF) << (8 * i) for i, p in enumerate(pattern))
    assert int(lut[2]) & MASK32 == sum(int(p >> 8) << (8 * i) for i, p in enumerate(pattern))
    assert int(lut[1]) == 0 and torch.all(lut[4:] == 0)  # entries past the codebook are zero

# ----- the kernel under the interpreter --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turbo_parts_against_the_oracle_ragged(bits, dtype, transposed_launches):
    out = check(turbo(bits), turbo(bits), batch=3, gqa=4, tk=50, r=5, dtype=dtype, lengths=[55, 20, 0], d=D,
                config=small_caches_transposed(None))
    assert transposed_launches == [(3, 3)]
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # a fully masked row gives zeros

@pytest.mark.parametrize("pair", [(turbo(3), KIVI2_V), (KIVI2_K, turbo(4)), (turbo(3, norm_correction=False), turbo(4)),
                                  (turbo(2, rotation="orthogonal"), polar()), (polar(), turbo(3))],
                         ids=["turbo-kivi", "kivi-turbo", "k3v4-plain", "orthogonal-polar", "polar-turbo"])
def test_turbo_mixed_with_other_formats(pair, transposed_launches):
    check(*pair, gqa=4, tk=45, r=3, d=D, config=small_caches_transposed(None))
    assert len(transposed_launches) == 1

def test_lazy_rescale_turbo_and_polar_recursive(transposed_launches):
    """``lazy_rescale`` with turbo keys and polar-recursive values (their own value products):
    the oracle's attention over one split of several blocks, with a fully masked row."""
    out = check(turbo(3), polar(), batch=2, gqa=4, tk=130, r=3, lengths=[133, 0], d=D,
                config=small_caches_transposed(da.LaunchConfig(lazy_rescale=True, num_splits=1)))
    assert len(transposed_launches) == 1
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("tk,gqa,tq", [(1, 1, 1), (33, 8, 1), (70, 4, 3)])
def test_lengths_gqa_and_query_tokens(tk, gqa, tq, transposed_launches):
    check(turbo(3), turbo(3), hkv=1 if gqa == 8 else 2, gqa=gqa, tq=tq, tk=tk, r=0 if tk == 1 else 3, d=D,
          config=small_caches_transposed(None))
    assert transposed_launches == [(3, 3)]

def test_narrow_heads_take_the_classic_kernel(transposed_launches):
    # head dim 64 with 3-bit codes: 8 units per vector, under the tensor cores' K of 16
    check(turbo(3), turbo(3), gqa=4, tk=40, r=3, d=64, config=small_caches_transposed(None))
    assert transposed_launches == []
    check(turbo(2), turbo(2), gqa=4, tk=40, r=3, d=64, config=small_caches_transposed(None))
    assert transposed_launches == [(3, 3)]  # 2-bit codes: 16 units of 4 codes

def test_quantizer_codebook_is_what_the_kernel_tables_hold():
    p = kvpolar.quantizer("turbo", bits=3).quantize(torch.randn(1, 1, 4, D))
    lut = tp.lut_words(p.codebook, torch.float16)
    low = [(int(lut[i // 4]) >> (8 * (i % 4))) & 0xFF for i in range(8)]
    high = [(int(lut[2 + i // 4]) >> (8 * (i % 4))) & 0xFF for i in range(8)]
    halves = torch.tensor([lo | hi << 8 for lo, hi in zip(low, high)], dtype=torch.int32).to(torch.int16)
    assert torch.equal(halves.view(torch.float16), p.codebook.half())


def test_turbo_takes_the_transposed_kernel_at_every_cache_size(transposed_launches):
    # a 20-token cache, far under ``transposed_min_rows``: the launch policy lets turbo in anyway
    check(turbo(4), KIVI2_V, gqa=4, tk=20, r=3, d=D)
    assert transposed_launches == [(3, 1)]
    check(turbo(3), turbo(3), gqa=4, tk=20, r=3, d=D, config=da.LaunchConfig(transposed=False))
    assert transposed_launches == [(3, 1)]  # switched off: the classic kernel ran


KIVI3_V = ("kivi", {"bits": 3, "group_size": 32, "axis": "token"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key,key_fmt", [(turbo(3), 3), (KIVI2_K, 1)], ids=["turbo-3-preset", "kivi2-kivi3"])
def test_kivi_3bit_values_in_three_byte_units(key, key_fmt, dtype, transposed_launches):
    # the turbo-3 preset's values: KIVI 3-bit codes, eight per 3-byte unit, one accumulator per position
    check(key, KIVI3_V, batch=2, gqa=4, tk=50, r=5, dtype=dtype, lengths=[55, 21], d=D,
          config=small_caches_transposed(None))
    assert transposed_launches == [(key_fmt, 1)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("key,value,reads", [(turbo(3), turbo(3), 2), (turbo(3), KIVI2_V, 1), (KIVI2_K, KIVI3_V, 1),
                                             (turbo(3), KIVI3_V, 2)],
                         ids=["turbo3-turbo3", "turbo3-kivi2", "kivi2-kivi3", "turbo-3-preset"])
@pytest.mark.parametrize("reading,mode", [("words", 2), ("halfwords", 1)])
def test_three_byte_units_both_readings(monkeypatch, key, value, reads, dtype, reading, mode, transposed_launches):
    """3-bit turbo keys and values and 3-bit KIVI values (eight codes per 3-byte unit) read as the rows'
    int32 words (``three_byte_units="words"``, the default: three words per four units, the units
    assembled in registers; keys: a row of units per token, values: a column) or by 16-bit gathers
    ("halfwords"), against the oracle; the reading asked for is the one taken, once per operand in
    3-byte units."""
    taken = record_three_byte_readings(monkeypatch, da)
    check(key, value, batch=2, gqa=4, tq=2, tk=45, r=3, dtype=dtype, lengths=[48, 20], d=D,
          config=small_caches_transposed(da.LaunchConfig(three_byte_units=reading)))
    assert len(transposed_launches) == 1 and list(taken.values()) == [mode] * reads
