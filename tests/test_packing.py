import pytest
import torch

from kvpolar.packing import pack_bits, packed_length, unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 13, 64, 129])
def test_round_trip_and_exact_size(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, 5, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, (n * bits + 7) // 8) == (3, 5, packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_pack_along_other_axis(bits):
    codes = torch.randint(0, 1 << bits, (4, 11, 6), dtype=torch.int64)
    packed = pack_bits(codes, bits, dim=1)
    assert packed.shape == (4, packed_length(11, bits), 6)
    assert torch.equal(unpack_bits(packed, bits, 11, dim=1), codes.to(torch.uint8))


def test_bit_layout_is_little_endian_stream():
    # 3-bit codes 5, 3, 6 at bit offsets 0, 3, 6: 5 | 3 << 3 | 6 << 6 = 413 -> bytes 157, 1
    packed = pack_bits(torch.tensor([5, 3, 6]), 3)
    assert packed.tolist() == [(5 | 3 << 3 | 6 << 6) & 0xFF, (5 | 3 << 3 | 6 << 6) >> 8]


def test_bad_input():
    with pytest.raises(ValueError, match="bits=9"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bits=0"):
        packed_length(4, 0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_unchecked_packing_packs_the_same(bits):
    """``check_range=False`` (quantizers whose codes are in range by construction: no host read of
    their min / max) packs exactly what the checked call does; the default still checks."""
    codes = torch.randint(0, 1 << bits, (3, 37), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(pack_bits(codes, bits, check_range=False), pack_bits(codes, bits))
    if bits < 8:
        with pytest.raises(ValueError, match=r"must lie in"):
            pack_bits(codes + (1 << bits), bits)
