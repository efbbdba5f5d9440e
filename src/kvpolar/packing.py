"""Dense packing of b-bit integer codes into bytes.

Every method stores its codes through this module. ``n`` codes of ``b`` bits occupy exactly
``ceil(n * b / 8)`` bytes: code ``i`` sits in bits ``[i*b, (i+1)*b)`` of the little-endian bit
stream, so a code may straddle two bytes when ``b`` does not divide 8. Kernels that read packed
codes use the same convention (``packed_byte_offset`` / ``packed_bit_shift`` give the arithmetic).
"""

from __future__ import annotations

import torch

MAX_BITS = 8


def packed_length(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int, dim: int = -1, *, check_range: bool = True) -> torch.Tensor:
    """Pack integer codes densely along ``dim``.

    Args:
        codes: integer tensor, any shape, values in ``[0, 2**bits)``; ``n = codes.shape[dim]``.
        bits: code width, 1..8.
        dim: axis along which codes are packed.
        check_range: raise if a code lies outside ``[0, 2**bits)``. The check reads the codes' min
            and max on the host (on a GPU, a synchronization); quantizers whose codes are in range
            by construction (clamped, or indices into a codebook of ``2**bits`` entries) skip it.

    Returns:
        uint8 tensor of the same shape except ``shape[dim] = ceil(n * bits / 8)``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor; got dtype {codes.dtype}")
    if check_range and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(
            f"codes must lie in [0, {1 << bits}) for bits={bits}; "
            f"got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    moved = codes.movedim(dim, -1).to(torch.uint8)
    n = moved.shape[-1]
    nbytes = packed_length(n, bits)
    if 8 % bits == 0:
        packed = _pack_aligned(moved, bits, n, nbytes)
    else:
        packed = _pack_bitstream(moved, bits, n, nbytes)
    return packed.movedim(-1, dim)


def unpack_bits(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 tensor, ``packed.shape[dim] == ceil(n * bits / 8)``.
        bits: code width, 1..8.
        n: number of codes along ``dim``.
        dim: packed axis.

    Returns:
        uint8 tensor of codes with ``shape[dim] = n``.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor; got dtype {packed.dtype}")
    expected = packed_length(n, bits)
    if packed.shape[dim] != expected:
        raise ValueError(
            f"packed.shape[{dim}]={packed.shape[dim]} does not hold n={n} codes of {bits} bits; "
            f"expected {expected} bytes"
        )
    moved = packed.movedim(dim, -1)
    if 8 % bits == 0:
        codes = _unpack_aligned(moved, bits, n)
    else:
        codes = _unpack_bitstream(moved, bits, n)
    return codes.movedim(-1, dim)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: integers 1..{MAX_BITS}")


def _pack_aligned(codes: torch.Tensor, bits: int, n: int, nbytes: int) -> torch.Tensor:
    """Fast path for bits in {1, 2, 4, 8}: each byte holds exactly 8 // bits whole codes."""
    per_byte = 8 // bits
    padded = torch.nn.functional.pad(codes, (0, nbytes * per_byte - n))
    grouped = padded.reshape(*codes.shape[:-1], nbytes, per_byte)
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    return (grouped << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unpack_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def _pack_bitstream(codes: torch.Tensor, bits: int, n: int, nbytes: int) -> torch.Tensor:
    """General path: expand to a bit stream, then regroup the stream into bytes."""
    bit_index = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = ((codes.unsqueeze(-1) >> bit_index) & 1).reshape(*codes.shape[:-1], n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    byte_bits = stream.reshape(*codes.shape[:-1], nbytes, 8)
    weights = torch.arange(8, device=codes.device, dtype=torch.uint8)
    return (byte_bits << weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unpack_bitstream(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    weights = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> weights) & 1).reshape(*packed.shape[:-1], -1)
    code_bits = stream[..., : n * bits].reshape(*packed.shape[:-1], n, bits)
    bit_index = torch.arange(bits, device=packed.device, dtype=torch.uint8)
    return (code_bits << bit_index).sum(dim=-1, dtype=torch.int32).to(torch.uint8)
