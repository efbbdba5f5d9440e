"""What the fused decode attention reads: which stored formats it handles (``supports``, with the
reason when not), and each format's tensors and static parameters as the kernels take them
(``Operand``: codes, metadata, bits, groups; ``key_operand`` / ``value_operand`` / ``full_operand``),
with the strides the kernels address them through."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from kvpolar.kernels import decode_formats as formats
from kvpolar.kernels.decode_formats import last_contiguous, rows_or_tokens_contiguous
from kvpolar.kernels import triton_available
from kvpolar.quantized import QuantizedTensor
from kvpolar.quantizers.rotations import is_power_of_two


#: Stored formats (by class name) of keys and values this kernel reads, with the bit widths (KIVI) or
#: what is read of them (decode_formats).
KEY_FORMATS = {"FullPrecisionTensor": None, "KiviChannelTensor": (2, 3, 4, 8), "PolarRopeTensor": None,
               **formats.FORMATS}
VALUE_FORMATS = {"FullPrecisionTensor": None, "KiviTokenTensor": (2, 3, 4, 8), **formats.FORMATS}
POLAR_PAIR_BITS = (2, 3, 4, 6, 8)  # radius_bits + angle_bits that unpack in whole 1- or 3-byte units

FMT_FULL, FMT_KIVI, FMT_POLAR = 0, 1, 2


def packed_unit(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest whole unit of the packed bit stream: 1 byte or 3 bytes."""
    if 8 % bits == 0:
        return 1, 8 // bits
    return 3, 24 // bits


def _reason(p: QuantizedTensor | None, role: str, table: dict, own_checks) -> str | None:
    """Why the kernel cannot read ``p`` as ``role``, or None when it can (or ``p`` is None): the checks
    every stored format shares (known format, head dim), then those of the formats of
    ``decode_formats``, or else ``own_checks(p)`` (the KIVI / polar-rope settings)."""
    if p is None:
        return None
    name = type(p).__name__
    if name not in table:
        return f"{role} format {name} (supported: {sorted(table)})"
    if not (is_power_of_two(p.head_dim) and p.head_dim >= 32):
        return f"head dim {p.head_dim} (supported: powers of two >= 32)"
    if name in formats.FORMATS:
        return formats.reason(p, role)
    return own_checks(p)


def key_reason(keys: QuantizedTensor | None) -> str | None:
    """Why the kernel cannot read these keys, or None when it can."""
    return _reason(keys, "key", KEY_FORMATS, _key_format_reason)


def _key_format_reason(keys: QuantizedTensor) -> str | None:
    """The KIVI and polar-rope key settings the kernel reads (after ``_reason``'s shared checks)."""
    name = type(keys).__name__
    if name == "KiviChannelTensor":
        if keys.bits not in KEY_FORMATS[name]:
            return f"KIVI key bits={keys.bits} (supported: {KEY_FORMATS[name]})"
        if keys.group_size % 16:
            return f"KIVI key group_size={keys.group_size} (supported: multiples of 16)"
    if name == "PolarRopeTensor":
        bits = keys.radius_bits + keys.angle_bits
        if bits not in POLAR_PAIR_BITS:
            return f"polar-rope radius_bits+angle_bits={bits} (supported: {POLAR_PAIR_BITS})"
        if keys.group_size % 16:
            return f"polar-rope group_size={keys.group_size} (supported: multiples of 16)"
        if keys.pairing not in ("half", "interleaved"):
            return f"polar-rope pairing={keys.pairing!r} (supported: 'half', 'interleaved')"
    return None


def value_reason(values: QuantizedTensor | None) -> str | None:
    """Why the kernel cannot read these values, or None when it can."""
    return _reason(values, "value", VALUE_FORMATS, _value_format_reason)


def _value_format_reason(values: QuantizedTensor) -> str | None:
    """The KIVI value settings the kernel reads (after ``_reason``'s shared checks)."""
    if type(values).__name__ == "KiviTokenTensor":
        if values.bits not in VALUE_FORMATS["KiviTokenTensor"]:
            return f"KIVI value bits={values.bits} (supported: {VALUE_FORMATS['KiviTokenTensor']})"
        if not (is_power_of_two(values.group_size) and values.group_size >= 8):
            return f"KIVI value group_size={values.group_size} (supported: powers of two >= 8)"
    return None


def pair_reason(keys: QuantizedTensor | None, values: QuantizedTensor | None) -> str | None:
    """Why the kernel cannot read these keys with these values (each readable alone), or None.
    A pair with a polar-recursive tensor takes blocks of exactly ``POLAR_RECURSIVE_BLOCK_N`` (32)
    tokens, because 16-token blocks of it compute wrong results compiled for the H100
    (``decode_formats.POLAR_RECURSIVE_BLOCK_N``); grouped keys allow that where their token groups
    fill whole blocks (KIVI: 16 or a multiple of 32; polar-rope, whose blocks hold one group at
    most: a multiple of 32)."""
    if keys is None or values is None:
        return None
    names = (type(keys).__name__, type(values).__name__)
    if "PolarRecursiveTensor" not in names or names[0] not in ("KiviChannelTensor", "PolarRopeTensor"):
        return None
    block, group = formats.POLAR_RECURSIVE_BLOCK_N, keys.group_size
    fits = group % block == 0 or (names[0] == "KiviChannelTensor" and block % group == 0)
    if fits:
        return None
    kind = "KIVI" if names[0] == "KiviChannelTensor" else "polar-rope"
    allowed = "16 or multiples of 32" if kind == "KIVI" else "multiples of 32"
    return (f"polar-recursive values with {kind} keys of group_size={group} (supported with polar-recursive "
            f"tensors: {allowed}, which fill {block}-token blocks)")


def unsupported_reason(keys: QuantizedTensor | None, values: QuantizedTensor | None) -> str | None:
    """What about these keys and values the kernel cannot read (the keys', the values', the pair's
    setting), or None when it reads them (``supports`` says it as a bool)."""
    for reason in (key_reason(keys), value_reason(values), pair_reason(keys, values)):
        if reason is not None:
            return reason
    return None


def refuse_unsupported(keys: QuantizedTensor | None, values: QuantizedTensor | None) -> None:
    """ValueError naming the stored format the kernel cannot read (``supports`` says it as a bool)."""
    reason = unsupported_reason(keys, values)
    if reason is not None:
        raise ValueError(f"fused_decode_attention does not support {reason}; check supports() first")


#: packed keys -> (weak reference to their values, ``supports`` verdict): a decode step asks once per
#: layer about the same pair (the pair changes when the cache moves tokens into the packed part)
_VERDICTS: "weakref.WeakKeyDictionary[QuantizedTensor, tuple]" = weakref.WeakKeyDictionary()


def supports(keys: QuantizedTensor | None, values: QuantizedTensor | None) -> bool:
    """True when :func:`fused_decode_attention` can read this pair of stored formats (the verdict is
    kept per packed pair while both live)."""
    entry = None if keys is None or values is None else _VERDICTS.get(keys)
    if entry is not None and entry[0]() is values:
        return entry[1]
    verdict = triton_available() and unsupported_reason(keys, values) is None
    if keys is not None and values is not None:
        _VERDICTS[keys] = (weakref.ref(values), verdict)
    return verdict


# ----- operands: a format's tensors and static parameters, as the kernel takes them -------------------
@dataclasses.dataclass
class Operand:
    fmt: int
    data: torch.Tensor  # codes (uint8) or full-precision vectors, last dim contiguous
    meta: tuple[torch.Tensor, ...]  # metadata tensors sharing one layout; () for full precision
    bits: int = 16
    group: int = 1
    radius_bits: int = 0
    angle_bits: int = 0
    pair_half: bool = True
    # decode_formats (turbo, fp8, polar-recursive): lookup tables, their per-KV-head stride, levels,
    # packed bytes per token
    tables: tuple[torch.Tensor, ...] = ()
    book_stride: int = 0
    levels: int = 0
    row_bytes: int = 0
    parts: bool = False  # polar-recursive in the paper's setting: the transposed kernel reads it by parts

    @property
    def tokens(self) -> int:
        return self.data.shape[-2]


def one_layout(meta: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``meta`` as is where all its tensors have one set of strides (the kernels address them all
    through the first one's), else contiguous copies."""
    if all(m.stride() == meta[0].stride() for m in meta):
        return meta
    return tuple(m.contiguous() for m in meta)


def tokens_adjacent(meta: torch.Tensor) -> bool:
    """Whether per-(token, group) metadata ``[..., T, G]`` has consecutive tokens adjacent in memory
    (the layout ``KiviTokenTensor`` stores, ``quantized.tokens_contiguous``)."""
    return meta.stride(-2) == 1


def key_operand(keys: QuantizedTensor) -> Operand:
    name = type(keys).__name__
    if name in formats.FORMATS:
        return Operand(**formats.operand_fields(keys))
    if name == "FullPrecisionTensor":
        return Operand(FMT_FULL, last_contiguous(keys.values), ())
    if name == "KiviChannelTensor":
        meta = (keys.scale, keys.minimum)
        return Operand(FMT_KIVI, last_contiguous(keys.codes),
                        one_layout(tuple(last_contiguous(m) for m in meta)),
                        bits=keys.bits, group=keys.group_size)
    meta = (keys.radius_scale, keys.radius_min, keys.angle_scale, keys.angle_min)
    return Operand(FMT_POLAR, last_contiguous(keys.codes),
                    one_layout(tuple(last_contiguous(m) for m in meta)),
                    bits=keys.radius_bits + keys.angle_bits, group=keys.group_size,
                    radius_bits=keys.radius_bits, angle_bits=keys.angle_bits,
                    pair_half=keys.pairing == "half")


def value_operand(values: QuantizedTensor) -> Operand:
    if type(values).__name__ in formats.FORMATS:
        return Operand(**formats.operand_fields(values))
    if type(values).__name__ == "FullPrecisionTensor":
        return Operand(FMT_FULL, last_contiguous(values.values), ())
    meta = (values.scale, values.minimum)
    return Operand(FMT_KIVI, last_contiguous(values.codes), one_layout(tuple(rows_or_tokens_contiguous(m) for m in meta)),
                    bits=values.bits, group=values.group_size)


def full_operand(x: torch.Tensor) -> Operand:
    return Operand(FMT_FULL, last_contiguous(x), ())


def row_major(op: Operand) -> Operand:
    """``op`` with one row per token, as the classic kernel reads codes and metadata: polar-recursive
    tensors laid out with consecutive tokens adjacent (the transposed kernel's layout) are copied,
    per call, where the launch policy sends them to the classic kernel (small caches, many query
    rows); every other operand as it is."""
    if op.fmt != formats.FMT_POLAR_RECURSIVE or (op.data.stride(-1) == 1 and op.meta[0].stride(-1) == 1):
        return op
    return dataclasses.replace(op, data=op.data.contiguous(), meta=tuple(m.contiguous() for m in op.meta))


def byte_stride(op: Operand) -> int:
    """Stride between the code bytes of one token: 1 (a row per token), or the token count's for
    polar-recursive codes laid out with consecutive tokens adjacent (the transposed kernel reads
    both; every other format's codes are rows)."""
    return op.data.stride(-1) if op.fmt == formats.FMT_POLAR_RECURSIVE else 1


def column_stride(op: Operand) -> int:
    """Stride between the per-token metadata columns of one token (polar-recursive radii: 1, or the
    token count's where consecutive tokens are adjacent); 1 for every other format's key metadata."""
    return op.meta[0].stride(-1) if op.fmt == formats.FMT_POLAR_RECURSIVE else 1


def metadata_strides(meta: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, token, group) strides of per-token metadata ``[B, H, T]`` or ``[B, H, T, G]``
    (group stride 0 where there is no group axis)."""
    strides = meta.stride()
    return (*strides[:3], strides[3] if meta.dim() > 3 else 0)
