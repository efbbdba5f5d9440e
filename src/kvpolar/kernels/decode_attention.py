"""Fused split-K decode attention over the packed KV cache (flash-decoding over quantized codes).

Reference: :func:`kvpolar.decode_attention.reference_decode_attention` (same signature, same result
up to rounding). ``fused_decode_attention`` is what the transformers cache calls on CUDA;
``supports(keys, values)`` says which stored formats it handles.

How it runs (two Triton kernels):

1. ``_split_kernel``, grid ``(batch * kv_heads, splits)``: each program takes one KV head of one
   sequence and one contiguous range of tokens, reads that range's packed key and value bytes
   ONCE for all ``Hq / Hkv`` query heads of the GQA group and all ``Tq`` query tokens (the rows of
   one ``[BLOCK_M, D]`` query tile), and runs an online softmax over it:

   * keys, KIVI per-channel: codes are unpacked in registers; the query is scaled per token group
     (``q * scale_g``), multiplied with the integer codes on the tensor cores, plus ``q . min_g``;
   * keys, polar-rope: per pair ``r = r_min + rc * r_scale``, ``theta = a_min + ac * a_scale``,
     ``(x, y) = r (cos, sin) theta`` in registers, then ``q_x . x + q_y . y``;
   * turbo, fp8 and polar-recursive keys or values (:mod:`kvpolar.kernels.decode_formats`): a
     ``[BLOCK_N, D]`` tile rebuilt in registers (turbo: codebook values; fp8: the bytes as float16;
     polar-recursive: the inverse polar transform from the stored radii and codebook cos/sin tables)
     times a per-token factor (turbo: norm; fp8: chunk scale) applied to the scores, or to the tile
     for values;
   * values, KIVI per-token: codes unpacked and dequantized in registers, then ``p @ v``;
   * ``none`` (full precision) keys/values: the plain fp16/bf16 path of the same kernel.

   It writes a partial ``(max, sum, unnormalised output)`` per split. The full-precision residual
   window is one more launch of the same kernel (``none`` format) writing the last split(s).
2. ``_combine_kernel``, one program per ``(batch, query head, query token)``: merges the splits.

The number of splits grows until ``batch * kv_heads * splits`` fills one wave of the programs an SM
holds at once (``choose_splits``; for the transposed kernel, counted from its compiled registers and
shared memory, ``programs_per_sm_of``), so batch 1 at 128k tokens fills every SM and no launch ends
in a partly filled second wave. ``describe_launch`` reports the launch a cache gets. Formats that live in a rotated domain (turbo,
polar-recursive; ``decode_formats.rotation_matrix``) never un-rotate a token: rotated keys get the
query rotated once (the residual window's launch keeps the plain query); rotated values accumulate
in the rotated domain, the residual window's partial outputs are rotated into it (one row per
query, not per token), and the combined output is un-rotated once.

Stored formats read (any key format with any value format; ``supports`` checks the parameters):
keys: full precision, KIVI per-channel, polar-rope, turbo, fp8, polar-recursive; values: full
precision, KIVI per-token, turbo, fp8, polar-recursive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import weakref

import torch

from kvpolar.kernels import decode_formats as formats
from kvpolar.quantized import QuantizedTensor

try:  # Triton is optional: the PyTorch reference works without it.
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

#: Stored formats (by class name) of keys and values this kernel reads, with the bit widths (KIVI) or
#: what is read of them (decode_formats).
KEY_FORMATS = {"FullPrecisionTensor": None, "KiviChannelTensor": (2, 3, 4, 8), "PolarRopeTensor": None,
               **formats.FORMATS}
VALUE_FORMATS = {"FullPrecisionTensor": None, "KiviTokenTensor": (2, 3, 4, 8), **formats.FORMATS}
POLAR_PAIR_BITS = (2, 3, 4, 6, 8)  # radius_bits + angle_bits that unpack in whole 1- or 3-byte units

_FMT_FULL, _FMT_KIVI, _FMT_POLAR = 0, 1, 2
_LOG2E = 1.4426950408889634


# ----- which inputs the kernel handles ----------------------------------------------------------------
def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1): ``triton.next_power_of_2`` without its call
    overhead (several microseconds in Triton 3.9, four calls per decode attention)."""
    return 1 << max(0, n - 1).bit_length()


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _unit(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest whole unit of the packed bit stream: 1 byte or 3 bytes."""
    if 8 % bits == 0:
        return 1, 8 // bits
    return 3, 24 // bits


def _common_reason(p: QuantizedTensor, role: str, table: dict) -> str | None:
    """The checks every stored format shares (known format, head dim), then those of the formats of
    ``decode_formats``; None when these pass."""
    name = type(p).__name__
    if name not in table:
        return f"{role} format {name} (supported: {sorted(table)})"
    if not (_pow2(p.head_dim) and p.head_dim >= 32):
        return f"head dim {p.head_dim} (supported: powers of two >= 32)"
    if name in formats.FORMATS:
        return formats.reason(p, role)
    return None


def _key_reason(keys: QuantizedTensor | None) -> str | None:
    """Why the kernel cannot read these keys, or None when it can."""
    if keys is None:
        return None
    common = _common_reason(keys, "key", KEY_FORMATS)
    if common is not None:
        return common
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


def _value_reason(values: QuantizedTensor | None) -> str | None:
    """Why the kernel cannot read these values, or None when it can."""
    if values is None:
        return None
    common = _common_reason(values, "value", VALUE_FORMATS)
    if common is not None:
        return common
    if type(values).__name__ == "KiviTokenTensor":
        if values.bits not in VALUE_FORMATS["KiviTokenTensor"]:
            return f"KIVI value bits={values.bits} (supported: {VALUE_FORMATS['KiviTokenTensor']})"
        if not (_pow2(values.group_size) and values.group_size >= 8):
            return f"KIVI value group_size={values.group_size} (supported: powers of two >= 8)"
    return None


def _refuse_unsupported(keys: QuantizedTensor | None, values: QuantizedTensor | None) -> None:
    """ValueError naming the stored format the kernel cannot read (``supports`` says it as a bool)."""
    for reason in (_key_reason(keys), _value_reason(values)):
        if reason is not None:
            raise ValueError(f"fused_decode_attention does not support {reason}; check supports() first")


def supports(keys: QuantizedTensor | None, values: QuantizedTensor | None) -> bool:
    """True when :func:`fused_decode_attention` can read this pair of stored formats."""
    return triton is not None and _key_reason(keys) is None and _value_reason(values) is None


# ----- operands: a format's tensors and static parameters, as the kernel takes them -------------------
@dataclasses.dataclass
class _Operand:
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


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_metadata(t: torch.Tensor) -> torch.Tensor:
    """Per-(token, group) metadata ``[..., T, G]`` as is where its tokens or its groups are adjacent
    in memory (both layouts are read through their strides), else a contiguous copy."""
    return t if 1 in (t.stride(-1), t.stride(-2)) else t.contiguous()


def _one_layout(meta: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``meta`` as is where all its tensors have one set of strides (the kernels address them all
    through the first one's), else contiguous copies."""
    if all(m.stride() == meta[0].stride() for m in meta):
        return meta
    return tuple(m.contiguous() for m in meta)


def tokens_adjacent(meta: torch.Tensor) -> bool:
    """Whether per-(token, group) metadata ``[..., T, G]`` has consecutive tokens adjacent in memory
    (the layout ``KiviTokenTensor`` stores, ``quantized.tokens_contiguous``)."""
    return meta.stride(-2) == 1


def _key_operand(keys: QuantizedTensor) -> _Operand:
    name = type(keys).__name__
    if name in formats.FORMATS:
        return _Operand(**formats.operand_fields(keys))
    if name == "FullPrecisionTensor":
        return _Operand(_FMT_FULL, _last_contiguous(keys.values), ())
    if name == "KiviChannelTensor":
        meta = (keys.scale, keys.minimum)
        return _Operand(_FMT_KIVI, _last_contiguous(keys.codes),
                        _one_layout(tuple(_last_contiguous(m) for m in meta)),
                        bits=keys.bits, group=keys.group_size)
    meta = (keys.radius_scale, keys.radius_min, keys.angle_scale, keys.angle_min)
    return _Operand(_FMT_POLAR, _last_contiguous(keys.codes),
                    _one_layout(tuple(_last_contiguous(m) for m in meta)),
                    bits=keys.radius_bits + keys.angle_bits, group=keys.group_size,
                    radius_bits=keys.radius_bits, angle_bits=keys.angle_bits,
                    pair_half=keys.pairing == "half")


def _value_operand(values: QuantizedTensor) -> _Operand:
    if type(values).__name__ in formats.FORMATS:
        return _Operand(**formats.operand_fields(values))
    if type(values).__name__ == "FullPrecisionTensor":
        return _Operand(_FMT_FULL, _last_contiguous(values.values), ())
    meta = (values.scale, values.minimum)
    return _Operand(_FMT_KIVI, _last_contiguous(values.codes), _one_layout(tuple(_row_metadata(m) for m in meta)),
                    bits=values.bits, group=values.group_size)


def _full_operand(x: torch.Tensor) -> _Operand:
    return _Operand(_FMT_FULL, _last_contiguous(x), ())


# ----- launch parameters ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tuning knobs (defaults tuned on an H100; see benchmarks/bench_attention.py).

    block_n: tokens per inner step (capped by the key group size, which it must divide).
    num_splits: splits of the packed tokens per (sequence, KV head); None = from the SM count.
    programs_per_sm: target of the automatic split count.
    min_split_tokens: no split gets fewer tokens than this (automatic split count).
    by_parts: KIVI codes with at most 4 per packed unit are never interleaved: code position K of
        every unit is one operand of its own product (the query gathered at channels u*U + K for
        keys, one accumulator per K for values).
    transposed: KIVI keys (2, 4, 8 bits) or polar-rope keys (2, 4, 6, 8 bits per pair, head dim >= 128,
        large caches) with KIVI values in whole bytes (or 3-bit, head dim >= 128), polar-recursive
        keys / values in the paper's setting (``polar_recursive_parts``) and turbo keys / values
        (``turbo_parts``), run ``_split_kernel_t``: every
        product transposed (``s^T = K q^T``, ``o^T = V^T p^T``) so the dequantized cache tiles are
        the register operand of the tensor-core products; blocks then hold one key group at most.
    transposed_warps: warps per program of the transposed kernel (its tiles are 32 rows: 1 or 2
        warps of 16-row MMA tiles; more warps would repeat work).
    transposed_programs_per_sm: ``programs_per_sm`` of the transposed kernel (it is latency-bound:
        more, shorter splits keep more loads in flight); None = the measured policy of
        ``transposed_tuning`` (12, or 16 for polar-rope keys with 2-bit values at batch sizes with
        >= 64 (sequence, KV head) pairs), capped on the GPU by the programs of the compiled kernel
        that fit on one SM (``programs_per_sm_of``): a launch of more than one wave waits a whole
        split's time for its last few programs (H100, ``results/sweep_splits_h100.json``).
    transposed_stages: software-pipelining stages of the transposed kernel's loads (the second
        sweep on the H100: 3 stages with 12 programs per SM beat 2 with 8 for kivi-2 and kivi-4 at
        every measured shape, benchmarks/README.md).
    max_registers: register cap per thread of the transposed kernel (Triton's ``maxnreg``). Fewer
        registers, more programs per SM. None = the measured policy of ``transposed_tuning``
        (168 for 4-bit KIVI keys, for 2-bit KIVI keys and values and for turbo codes where the cache
        fills a wave of 12 programs per SM, else the compiler's choice); 255 = no cap.
    transposed_min_rows: caches of fewer packed (sequence, KV head, token) rows take the classic
        kernel, whose shorter per-split latency wins there (H100, 8 KV heads: batch 1 at 4k and 8k
        tokens; see ``_use_transposed``). Turbo keys or values take the transposed kernel at every size.
    value_metadata: how the transposed kernel reads KIVI values' per-(token, group) scale and minimum:
        "tiles" (16-bit [groups, block] tiles copied ahead by Triton's pipeliner: one vector per group
        where the tokens are adjacent in memory, the layout ``KiviTokenTensor`` stores), "words"
        (int32 words of two groups, copied ahead by Triton's pipeliner; metadata stored with the
        groups adjacent, else "tiles"), "ahead" (16-bit tiles read one block ahead into registers),
        "gather" (per packed unit where used: the fewest registers, its latency waited for in every
        block); None = the policy of ``value_metadata_policy``.
    three_byte_units: how the transposed kernel reads codes packed in 3-byte units (polar-rope keys
        of 6-bit pairs: r2a4, r3a3; 3-bit turbo keys and values; 3-bit KIVI values): "words" (the
        rows' int32 words, each read once by an asynchronous copy, three per four units, the units
        assembled in registers; rows not made of whole words fall back to halfwords) or "halfwords"
        (two 16-bit gathers per unit, left in the loop by Triton's pipeliner, the decoded tiles then
        moved through shared memory). Measured on the H200 at B=32 / 32k tokens (eleventh session,
        ``benchmarks/results/layouts_h200.json``), halfwords -> words: polar-rope-3 0.989 -> 0.686 ms
        (0.95x -> 1.37x fp16 SDPA), turbo-k3v4 0.848 -> 0.808 ms, turbo-3 1.268 -> 1.274 ms (B=1 /
        128k: 0.191 -> 0.196 ms), hence the default.
    kivi_code_units: how the transposed kernel reads KIVI codes of 2 and 4 bits (keys and values):
        "bytes" (each code spread from its byte to a 16-bit lane by byte permutes: about one
        instruction per code) or "halfwords" (16-bit units of 8 / 4 codes, two units per register:
        one AND per two codes, into the mantissa of 1024 / 128; a shift and an OR per further window
        of the mantissa's width). Rows not made of whole halfwords, or of fewer than 16 (head dim
        below 128 for 2-bit codes, below 64 for 4-bit), read bytes. Measured on the H200
        (twelfth session, ``benchmarks/results/halfwords_h200.json``, bytes -> halfwords, speed-up over
        fp16 SDPA at B=32 / 32k tokens): kivi-2 and squat-2 1.86x -> 2.43x, kivi-4 1.72x -> 2.15x,
        polar-rope-3 (its 2-bit values) 1.39x -> 1.49x, polar-rope-4 1.39x -> 1.53x; hence the default.
    lazy_rescale: the transposed kernel rescales its running output sums only in blocks where some
        query row's running maximum grew (exact: the probabilities are taken against the running
        maximum either way), instead of in every block.
    polar_recursive_keys: how the transposed kernel builds polar-recursive key parts (the paper's
        setting, ``polar_recursive_parts``): "columns" (``[block, 2 D/16]`` tiles, column ``2 j + b1``:
        the levels above the leaves computed once per column, so twice per subtree; checked on the
        H100) or "subtrees" (``[block, D/16, 1]`` tiles for the levels above the leaves, once per
        subtree, the leaves ``[block, D/16, 2]`` reshaped into the part: sm_90 compile 4448 -> 3695
        instructions per block, B=32 / 32k). "subtrees" passes the interpreter's tests but has not
        run on a GPU, where Triton 3.6 miscompiled the joined form of these tiles
        (``benchmarks/polar_recursive_parts_check.py``), hence not the default.
    transposed_rows: at least this many query rows (GQA group x query tokens, padded to a power of
        two) in the transposed kernel's products (the MMA's N dimension is 8).
    transposed_max_rows: at most this many query rows per KV head (GQA group x query tokens) take the
        transposed kernel; more (a draft verification step of speculative or assisted decoding)
        take the classic kernel, whose warps share the rows. The transposed kernel's single warp
        holds every row's running output: in the sm_90 compile (``benchmarks/inspect_preset_kernel.py
        --query-tokens``, GQA 4) 16 rows spill at most 0.2 KB per thread, 20 rows up to 0.9 KB and 84
        rows (20 draft tokens) 4-11 KB, against at most 0.2 KB for the classic kernel at 84 rows
        (turbo-3: 1 KB). Not yet timed on a GPU.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None
    programs_per_sm: int = 4
    min_split_tokens: int = 256
    by_parts: bool = True
    transposed: bool = True
    transposed_warps: int = 1
    transposed_rows: int = 8
    transposed_max_rows: int = 16
    transposed_programs_per_sm: int | None = None
    transposed_stages: int = 3
    max_registers: int | None = None
    transposed_min_rows: int = 1 << 16
    value_metadata: str | None = None
    three_byte_units: str = "words"
    kivi_code_units: str = "halfwords"
    lazy_rescale: bool = False
    polar_recursive_keys: str = "columns"

    def __post_init__(self) -> None:
        if not (_pow2(self.block_n) and self.block_n >= 16):
            raise ValueError(f"block_n={self.block_n} (allowed: powers of two >= 16)")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps} (allowed: 1, 2, 4, 8, 16)")
        if self.transposed_warps not in (1, 2, 4):
            raise ValueError(f"transposed_warps={self.transposed_warps} (allowed: 1, 2, 4)")
        if not 1 <= self.transposed_stages <= 6:
            raise ValueError(f"transposed_stages={self.transposed_stages} (allowed: 1..6)")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"max_registers={self.max_registers} (allowed: None or 24..255)")
        if self.transposed_programs_per_sm is not None and self.transposed_programs_per_sm < 1:
            raise ValueError(f"transposed_programs_per_sm={self.transposed_programs_per_sm} (allowed: None or >= 1)")
        if self.value_metadata not in (None, "tiles", "words", "ahead", "gather"):
            raise ValueError(f"value_metadata={self.value_metadata!r} "
                             "(allowed: None, 'tiles', 'words', 'ahead', 'gather')")
        if self.three_byte_units not in ("halfwords", "words"):
            raise ValueError(f"three_byte_units={self.three_byte_units!r} (allowed: 'halfwords', 'words')")
        if self.kivi_code_units not in ("bytes", "halfwords"):
            raise ValueError(f"kivi_code_units={self.kivi_code_units!r} (allowed: 'bytes', 'halfwords')")
        if self.polar_recursive_keys not in ("columns", "subtrees"):
            raise ValueError(f"polar_recursive_keys={self.polar_recursive_keys!r} (allowed: 'columns', 'subtrees')")
        if self.transposed_min_rows < 0:
            raise ValueError(f"transposed_min_rows={self.transposed_min_rows} (allowed: >= 0)")
        if self.transposed_max_rows < 1:
            raise ValueError(f"transposed_max_rows={self.transposed_max_rows} (allowed: >= 1)")


#: The defaults, made once (a decode step would otherwise build and compare a new one per layer).
_DEFAULT_CONFIG = LaunchConfig()


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _fp8_conversion(device: torch.device) -> bool:
    """Whether the compiled classic kernel on ``device`` converts float8 e4m3 in hardware (compute
    capability 8.9 or newer: Ada, Hopper); older GPUs and the interpreter move the bits instead
    (``decode_formats.fp8_to_f16``)."""
    if _interpreting() or device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # interpreter runs: a few splits, so tests exercise the combine step


def choose_splits(tokens: int, programs: int, sms: int, block_n: int, cfg: LaunchConfig) -> tuple[int, int]:
    """(splits, tokens per split) for ``tokens`` tokens and ``programs`` (sequence, KV head) pairs.

    As many splits as fit ONE wave of ``programs_per_sm`` programs per SM (``programs * splits <=
    programs_per_sm * sms``: a second, partly filled wave would cost a whole split's time for a few
    programs), none shorter than ``min_split_tokens``, so batch 1 at 128k fills the GPU. Under the
    interpreter tokens per split are ``block_n`` times a power of two (its loop count is a
    compile-time constant: few distinct values as caches grow); compiled, any multiple of ``block_n``.
    """
    if tokens <= 0:
        return 0, block_n
    if cfg.num_splits is not None:
        wanted = cfg.num_splits
    else:
        wanted = max(1, cfg.programs_per_sm * sms // programs)
        wanted = min(wanted, math.ceil(tokens / cfg.min_split_tokens))
    blocks = math.ceil(tokens / block_n)
    per_split_blocks = math.ceil(blocks / max(1, wanted))
    if _interpreting():
        per_split_blocks = _next_pow2(per_split_blocks)
    per_split = per_split_blocks * block_n
    return math.ceil(tokens / per_split), per_split


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _code_offset(dtype: torch.dtype, bits: int) -> float:
    """The constant the kernel's int->float bit trick (``_codes_to``) leaves on every code."""
    if dtype == torch.float16:
        return 1024.0
    if dtype == torch.bfloat16 and bits <= 7 and not _interpreting():
        return 128.0
    return 0.0


def _dot_dtype(dtype: torch.dtype):
    """Operands of the in-kernel products: the query's dtype (float32 under the interpreter for
    bfloat16, which numpy cannot multiply)."""
    if dtype == torch.bfloat16:
        return tl.float32 if _interpreting() else tl.bfloat16
    return tl.float16 if dtype == torch.float16 else tl.float32


# ----- public entry point ----------------------------------------------------------------------------------
def fused_decode_attention(
    query: torch.Tensor,
    keys: QuantizedTensor | None,
    values: QuantizedTensor | None,
    key_quantizer: object,
    value_quantizer: object,
    residual_keys: torch.Tensor | None,
    residual_values: torch.Tensor | None,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query`` over packed keys/values plus the residual window, fused.

    Same arguments and result as :func:`kvpolar.decode_attention.reference_decode_attention`
    (the quantizers are accepted for that symmetry; the stored tensors carry what the kernel needs):

    Args:
        query: ``[B, Hq, Tq, D]`` float16/bfloat16/float32 (Tq small: decoding, speculative steps).
        keys, values: packed ``[B, Hkv, Tk, D]`` (both or neither); formats: see ``supports``.
        residual_keys, residual_values: ``[B, Hkv, R, D]`` full precision, or None.
        scale: softmax scale.
        attention_mask: bool broadcastable to ``[B, Hq, Tq, Tk + R]``, True = attend; fully
            masked rows give zeros.
        config: launch tuning (block size, warps, stages, splits); None = defaults.

    Returns:
        ``[B, Hq, Tq, D]`` in ``query.dtype``.
    """
    if triton is None:
        raise RuntimeError("fused_decode_attention needs triton; use reference_decode_attention instead")
    if (keys is None) != (values is None):
        raise ValueError("keys and values must be both given or both None")
    if keys is None and residual_keys is None:
        raise ValueError("attention needs keys: both the packed part and the residual window are empty")
    if (residual_keys is None) != (residual_values is None):
        raise ValueError("residual_keys and residual_values must be both given or both None")
    _refuse_unsupported(keys, values)
    if query.dim() != 4 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be [B, Hq, Tq, D] float16/bfloat16/float32; got {tuple(query.shape)} {query.dtype}")
    cfg = config or _DEFAULT_CONFIG
    bsz, hq, tq, d = query.shape
    hkv = keys.shape[1] if keys is not None else residual_keys.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    tk = keys.num_tokens if keys is not None else 0
    r = residual_keys.shape[-2] if residual_keys is not None else 0
    if keys is not None and (tuple(keys.shape[:2]) != (bsz, hkv) or keys.head_dim != d or values.num_tokens != tk):
        raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not match query {tuple(query.shape)}")
    if residual_keys is not None and (residual_keys.shape != (bsz, hkv, r, d) or residual_values.shape != (bsz, hkv, r, d)):
        raise ValueError(f"residual keys {tuple(residual_keys.shape)} / values {tuple(residual_values.shape)} "
                         f"must be [B={bsz}, Hkv={hkv}, R, D={d}]")
    n_total = tk + r
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be bool (True = attend); got {attention_mask.dtype}")
        mask = attention_mask.expand(bsz, hq, tq, n_total).view(torch.uint8)

    gqa = hq // hkv
    block_m = max(16, _next_pow2(gqa * tq))
    sms = _device_sms(query.device)
    k_rot, v_rot = formats.rotation_matrix(keys), formats.rotation_matrix(values)  # rotated-domain formats
    # (key operand, value operand, token offset, splits, tokens per split, block_n, query, config, transposed)
    parts = []
    if tk:
        q_packed = _packed_query(query, k_rot)
        plan = _remembered_plan(q_packed, keys, values, mask, scale, cfg)
        parts.append((plan.k_op, plan.v_op, 0, plan.splits, plan.per_split, plan.block_n, q_packed, plan.config,
                      plan.transposed))
    if r:
        block_n = min(cfg.block_n, max(16, _next_pow2(r)))
        splits, per_split = choose_splits(r, bsz * hkv, sms, block_n, _residual_config(cfg))
        parts.append((_full_operand(residual_keys), _full_operand(residual_values), tk, splits, per_split, block_n,
                      query, cfg, False))
    total_splits = sum(p[3] for p in parts)

    dev = query.device
    # Partial (output, max, sum) per split: one allocation, three views, each starting 256 bytes
    # aligned as a separate allocation would (Triton specializes pointers on 16-byte alignment).
    rows = bsz * hq * tq * total_splits
    at_max = -(-rows * d // 64) * 64
    at_sum = at_max + -(-rows // 64) * 64
    partials = torch.empty(at_sum + rows, device=dev, dtype=torch.float32)
    part_acc = partials[: rows * d].view(bsz, hq, tq, total_splits, d)
    part_max = partials[at_max: at_max + rows].view(bsz, hq, tq, total_splits)
    part_sum = partials[at_sum:].view(bsz, hq, tq, total_splits)
    base = 0
    for k_op, v_op, offset, splits, per_split, block_n, q_part, part_cfg, transposed in parts:
        if transposed:
            _launch_split_t(q_part, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                            part_max, part_sum, part_acc, scale, gqa, block_n, part_cfg)
        else:
            _launch_split(q_part, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                          part_max, part_sum, part_acc, scale, gqa, block_m, block_n, part_cfg)
        base += splits
    if v_rot is not None and r:  # the residual window's partial outputs into the values' rotated domain
        n_packed = parts[0][3] if tk else 0
        part_acc[..., n_packed:, :] = part_acc[..., n_packed:, :] @ v_rot.T
    out = torch.empty(bsz, hq, tq, d, device=dev, dtype=query.dtype if v_rot is None else torch.float32)
    _combine_kernel[(bsz * hq * tq,)](
        part_max, part_sum, part_acc, out, total_splits,
        D=d, BLOCK_S=_next_pow2(total_splits), num_warps=4,
    )
    if v_rot is not None:
        out = (out @ v_rot).to(query.dtype)  # R^T o, once
    return out


@functools.lru_cache(maxsize=16)
def _residual_config(cfg: LaunchConfig) -> LaunchConfig:
    """The split policy of the residual window's launch: automatic splits of at least 1024 tokens."""
    return dataclasses.replace(cfg, num_splits=None, min_split_tokens=1024)


def _packed_query(query: torch.Tensor, k_rot: torch.Tensor | None) -> torch.Tensor:
    """The query as the packed keys' kernel reads it: ``R q`` for keys in a rotated domain (once per call)."""
    return query if k_rot is None else (query.float() @ k_rot.T).to(query.dtype)


@dataclasses.dataclass(frozen=True)
class _PackedPlan:
    """How the packed tokens are launched: operands, kernel form, block, splits, tuned config."""

    k_op: _Operand
    v_op: _Operand
    transposed: bool
    block_n: int
    splits: int
    per_split: int
    config: LaunchConfig  # with the programs per SM and register cap that were used


def _packed_plan(query, keys, values, mask, scale, cfg: LaunchConfig) -> _PackedPlan:
    """The launch of the packed tokens (``query``: as the kernel reads it, rotated for rotated formats)."""
    bsz, hq = query.shape[:2]
    hkv = keys.shape[1]
    k_op, v_op = _key_operand(keys), _value_operand(values)
    query_rows = (hq // hkv) * query.shape[2]  # per KV head: GQA group x query tokens
    transposed = _use_transposed(k_op, v_op, cfg, query_rows)
    block_n = cfg.block_n
    grouped = k_op.fmt in (_FMT_POLAR, _FMT_KIVI)
    if grouped and (k_op.fmt == _FMT_POLAR or block_n % k_op.group or transposed):
        block_n = math.gcd(block_n, k_op.group)  # blocks hold one or whole key groups
    block_n = min(block_n, formats.block_n_cap(k_op.fmt, v_op.fmt) or block_n)
    if k_op.fmt == _FMT_POLAR and transposed:
        block_n = min(block_n, _POLAR_T_BLOCK_N)
    if formats.FMT_TURBO in (k_op.fmt, v_op.fmt) and transposed:
        block_n = min(block_n, _TURBO_T_BLOCK_N)
    split_cfg, sms = cfg, _device_sms(query.device)
    if transposed:
        pps, max_registers = transposed_tuning(k_op, v_op, bsz * hkv, cfg, sms, query_rows)
        split_cfg = dataclasses.replace(cfg, max_registers=max_registers,
                                        value_metadata=value_metadata_policy(k_op, v_op, cfg))
        if cfg.transposed_programs_per_sm is None:  # no more than fit at once: the splits fill one wave
            resident = _transposed_residency(query, k_op, v_op, mask, 0, scale, hq // hkv, block_n, split_cfg)
            pps = min(pps, resident or pps)
        split_cfg = dataclasses.replace(split_cfg, programs_per_sm=pps)
    splits, per_split = choose_splits(k_op.tokens, bsz * hkv, sms, block_n, split_cfg)
    return _PackedPlan(k_op, v_op, transposed, block_n, splits, per_split, split_cfg)


#: The last launch plan of each packed keys object (stored tensors are never changed in place: a
#: cache that grows makes a new object), with a weak reference to its values and the signature of
#: the other inputs it was made for. Entries go with their keys.
_PLANS: "weakref.WeakKeyDictionary[QuantizedTensor, tuple]" = weakref.WeakKeyDictionary()


def _remembered_plan(query, keys, values, mask, scale, cfg: LaunchConfig) -> _PackedPlan:
    """``_packed_plan``, made once per packed keys / values pair and kept while the same inputs
    come back (a decode step reuses its layer's plan until the cache moves tokens into the packed
    part): 80-90 us of Python per call on the CPU machine (``benchmarks/host_cost.py``), more on
    the GPU, where the plan also asks the compiled kernel's residency. The signature holds what the
    plan depends on: the query's shape, dtype and device, and how Triton specializes the query and
    mask (alignment, strides equal to 1 or divisible by 16), the scale's type and the config."""
    signature = (tuple(query.shape), query.dtype, query.device, tuple(map(_specialization, query.stride())),
                 _specialization(query), None if mask is None else
                 (_specialization(mask), tuple(map(_specialization, mask.stride()))), type(scale), cfg)
    entry = _PLANS.get(keys)
    if entry is not None and entry[0]() is values and entry[1] == signature:
        return entry[2]
    plan = _packed_plan(query, keys, values, mask, scale, cfg)
    _PLANS[keys] = (weakref.ref(values), signature, plan)
    return plan


def describe_launch(query: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor,
                    config: LaunchConfig | None = None) -> dict:
    """How ``fused_decode_attention`` launches the packed part of this cache (no attention is run;
    on CUDA the kernel may be compiled): ``kernel`` ("transposed" or "classic"), ``block_n``,
    ``splits``, ``tokens_per_split``, ``programs`` (``batch * kv_heads * splits``),
    ``programs_per_sm`` (the one-wave target: the measured policy, capped by how many compiled
    programs fit on an SM), ``max_registers``, ``value_metadata`` and ``kivi_code_units`` (how the
    transposed kernel reads KIVI value metadata and 2- / 4-bit KIVI codes: "halfwords" or "bytes",
    as taken for these tensors; None where neither operand has such codes). ``query``: ``[B, Hq, Tq, D]``."""
    if keys is None or values is None:
        raise ValueError("describe_launch needs packed keys and values (the residual window alone is not launched this way)")
    _refuse_unsupported(keys, values)
    if query.dim() != 4 or query.shape[1] % keys.shape[1]:
        raise ValueError(f"query must be [B, Hq, Tq, D] with Hq a multiple of the {keys.shape[1]} KV heads; "
                         f"got {tuple(query.shape)}")
    cfg = config or _DEFAULT_CONFIG
    plan = _packed_plan(_packed_query(query, formats.rotation_matrix(keys)), keys, values, None,
                        query.shape[-1] ** -0.5, cfg)
    return {"kernel": "transposed" if plan.transposed else "classic", "block_n": plan.block_n,
            "splits": plan.splits, "tokens_per_split": plan.per_split,
            "programs": keys.shape[0] * keys.shape[1] * plan.splits,
            "programs_per_sm": plan.config.programs_per_sm, "max_registers": plan.config.max_registers,
            "value_metadata": plan.config.value_metadata if plan.transposed else None,
            "kivi_code_units": _kivi_reading(plan) if plan.transposed else None}


def _kivi_reading(plan: _PackedPlan) -> str | None:
    """How the transposed kernel reads the plan's 2- / 4-bit KIVI codes ("halfwords" where either
    operand is read as 16-bit units), None where it has none."""
    units = [_kivi_code_units(op, plan.config)[1] for op in (plan.k_op, plan.v_op)
             if op.fmt == _FMT_KIVI and op.bits in (2, 4)]
    if not units:
        return None
    return "halfwords" if 2 in units else "bytes"


#: Largest token block of polar-rope keys in the transposed kernel (H100, B=8/32 at 4k-32k: 32-token
#: blocks 1.10-1.27x over fp16 SDPA, 64-token blocks 0.90-1.22x; benchmarks/README.md).
_POLAR_T_BLOCK_N = 32
#: Largest token block of the transposed kernel with turbo keys or values (the 32-token blocks of the
#: other transposed paths; not tuned separately).
_TURBO_T_BLOCK_N = 32
#: Launches with at least this many (sequence, KV head) pairs count as "batched" in ``transposed_tuning``.
_BATCH_PROGRAMS = 64
#: Register cap of the transposed kernel for KIVI keys of 2 or 4 bits and for turbo codes: 12 one-warp
#: programs per SM instead of the 8 that 192-226 registers allow.
_REGISTER_CAP = 168


def transposed_tuning(k_op: _Operand, v_op: _Operand, programs: int, cfg: LaunchConfig,
                      sms: int = 132, query_rows: int = 1) -> tuple[int, int | None]:
    """(programs per SM, register cap or None) of the transposed kernel for ``programs`` (sequence,
    KV head) pairs on ``sms`` SMs: the config's values where given, else the policy measured on the
    H100 (on the GPU, ``_packed_plan`` then caps the programs per SM by what the compiled kernel
    fits on an SM, and ``choose_splits`` fills one wave of them):

    - a 168-register cap (12 programs per SM) for 2-bit KIVI keys with 2-bit KIVI values (kivi-2,
      squat-2), for 4-bit KIVI keys (with KIVI values of at most 4 bits) read from bytes
      (``kivi_code_units="bytes"``) and for turbo keys or values, where the cache has the tokens to
      fill a wave of 12 programs per SM with splits of ``min_split_tokens``. Read as 16-bit units (the
      default since the twelfth session), kivi-4 is faster uncapped (H200, ``results/halfwords_h200.json``,
      168 -> no cap: B=32/32k 0.470 -> 0.445 ms, B=1/128k 0.0788 -> 0.0725 ms) and kivi-2 keeps the cap
      (0.393 uncapped 0.417 ms; 128 registers: 0.480 ms).
      2-bit KIVI keys lost the cap in the seventh session, when their value metadata was copied ahead by
      the pipeliner and the kernel wanted 245 registers (the cap spilled; ``results/loads_h100.json``,
      ``loads2_h100.json``: kivi-2 uncapped vs 168, B=32/32k 2.57-2.58x vs 2.43-2.46x, B=1/128k 2.32x vs
      2.15x; kivi-4 2.06x vs 2.13x and 1.91x vs 1.90x, so it kept the cap), and got it back in the
      eleventh: with its value metadata stored tokens-adjacent the kernel wants 231 and the cap costs 44
      instructions per block, 24 of them local-memory reloads (sm_90 compile), for 12 instead of 8
      programs per SM (H200, ``results/caps_h200.json``, uncapped -> 168: B=32/32k 0.544 -> 0.512 ms,
      B=1/128k 0.0819 -> 0.0803 ms; 128 registers: 0.652 ms; every other preset there gained nothing
      from 168 or 128). Sixth session (``results/registers_h100.json``, ``registers2_h100.json``,
      speed-up over fp16 SDPA, uncapped -> 168: kivi-2 B=32/32k 2.19x -> 2.32x, B=8/32k 1.88x -> 2.24x,
      B=1/128k 1.86x -> 2.17x; kivi-4 1.69x -> 1.89x, 1.62x -> 1.77x, 1.62x -> 1.72x; turbo-4 B=32/32k
      1.37x -> 1.51x. Caches too short for that wave lose: kivi-4 B=8/4k 1.38x -> 1.28x, B=1/16k 1.01x
      -> 0.94x. 8-bit KIVI loses everywhere, 0.98x -> 0.77x at B=32/32k; polar-recursive is unchanged).
      It replaces the earlier 128-register cap of 2-bit KIVI (16 programs per SM, with spills: B=32/32k
      2.17x, B=1/128k 1.41x);
    - polar-rope keys with 2-bit values (polar-rope-3), 16 programs per SM from 64 pairs on: B=8/32k
      1.14x -> 1.39x, B=32/4k 1.10x -> 1.32x, B=32/32k 1.13x -> 1.40x, B=32/128k 1.14x -> 1.43x (B=1:
      1.13x -> 1.08x at 128k, so single sequences keep 12; with 4-bit values, polar-rope-4, 16 gave
      0.95-1.03x the speed of 12, ``results/attention_policy_v1_h100.json`` against
      ``results/attention_h100.json``, so it keeps 12; both measured before one-wave splits).

    The caps were measured with one query token (GQA 4: row tiles of ``cfg.transposed_rows`` = 8);
    more ``query_rows`` (GQA group x query tokens: speculative decoding) take none. In the sm_90
    compile kivi-2 at 16 rows spills 528 bytes per thread under the 168 cap, 136 without it.
    """
    batched = programs >= _BATCH_PROGRAMS
    kivi_pair = k_op.fmt == _FMT_KIVI and v_op.fmt == _FMT_KIVI
    bytes_4bit = k_op.bits == 4 and v_op.bits <= 4 and cfg.kivi_code_units == "bytes"
    capped_kivi = kivi_pair and (bytes_4bit or k_op.bits == v_op.bits == 2)
    capped_format = capped_kivi or formats.FMT_TURBO in (k_op.fmt, v_op.fmt)
    fills_wave = k_op.tokens >= cfg.min_split_tokens * math.ceil(12 * sms / programs)
    pps = 16 if batched and k_op.fmt == _FMT_POLAR and v_op.bits == 2 else 12
    if cfg.transposed_programs_per_sm is not None:
        pps = cfg.transposed_programs_per_sm
    max_registers = cfg.max_registers
    if max_registers is None and capped_format and fills_wave and query_rows <= cfg.transposed_rows:
        max_registers = _REGISTER_CAP
    return pps, max_registers


def value_metadata_policy(k_op: _Operand, v_op: _Operand, cfg: LaunchConfig) -> str:
    """How the transposed kernel reads KIVI value scale / min (``LaunchConfig.value_metadata``): the
    config's choice where given; else, for metadata with its tokens adjacent in memory (as
    ``KiviTokenTensor`` stores it), "tiles": one vector per group and block, in the pairs of
    consecutive tokens the products take. In the sm_90 compile (``inspect_preset_kernel.py``,
    B=32/32k) that takes kivi-2's loop from 1211 to 1056 instructions per block (the 126 byte
    permutes that paired the scales of consecutive tokens are gone; 231 registers instead of 255),
    kivi-4 1441 -> 1246, kivi-8 1234 -> 1099, polar-rope-3 2005 -> 1920, polar-rope-4 1844 -> 1709,
    turbo-3 2361 -> 2270, turbo-k3v4 1754 -> 1792 (its turbo keys at the 168-register cap);
    not yet timed on a GPU. For metadata stored with its groups adjacent: a block ahead into
    registers with turbo keys and as int32 words copied ahead by the pipeliner with any other keys
    (H100, ``results/loads2_h100.json``, speed-up over fp16 SDPA at B=32/32k and B=1/128k, words /
    ahead / gather: turbo-3 1.01 / 1.08 / 1.05x and 0.95 / 1.00 / 0.99x, turbo-k3v4 1.42 / 1.46 /
    1.33x and 1.21 / 1.23 / 1.15x, kivi-2 2.43 / 2.34 / 2.28x at the 168-register cap, polar-rope-3
    1.34 / 1.30 / 1.34x)."""
    if cfg.value_metadata is not None:
        return cfg.value_metadata
    if v_op.fmt == _FMT_KIVI and v_op.meta and tokens_adjacent(v_op.meta[0]):
        return "tiles"
    return "ahead" if k_op.fmt == formats.FMT_TURBO else "words"


def _use_transposed(k_op: _Operand, v_op: _Operand, cfg: LaunchConfig, query_rows: int = 1) -> bool:
    """KIVI values in whole bytes (or 3-bit codes in 3-byte units, head dim >= 128) or polar-recursive
    values in the paper's setting (``parts``), with
    KIVI keys in whole bytes, polar-rope keys of 2, 4, 6 or 8 bits per pair (four pairs per unit of
    whole bytes; head dim >= 128 so each of the four parts fills the tensor-core K of 16) or
    polar-recursive keys (``parts``), take the transposed kernel, from ``cfg.transposed_min_rows``
    packed (sequence, KV head, token) rows on and for at most ``cfg.transposed_max_rows`` query rows
    (``query_rows``: GQA group x query tokens). Below it the classic kernel's shorter latency wins
    (H100, B=1, 8 KV heads, classic vs transposed: KIVI-2 at 4k 0.020 ms vs 0.028 ms, at 8k (64.5k
    rows) 0.025 vs 0.029, at 16k (130k rows) 0.034 vs 0.030; polar-rope-3 at 4k 0.025 vs 0.043).
    Turbo keys and values of any bits take it too (``turbo_parts``) when each code position fills the
    tensor-core K of 16 (head dim >= 16 x codes per unit), at every cache size: the classic kernel's
    codebook gathers lose even where its latency should win (H100, B=1, ms, classic vs transposed,
    ``results/turbo_parts_small_h100.json``: turbo-3 at 4k 0.073 vs 0.060, turbo-4 0.075 vs 0.054,
    KIVI-2 keys with turbo-4 values 0.043 vs 0.036; at 8k turbo-3 0.103 vs 0.060)."""
    kivi_values = v_op.fmt == _FMT_KIVI and (8 % v_op.bits == 0 or _kivi3_parts(v_op))
    parts_values = v_op.fmt == formats.FMT_POLAR_RECURSIVE and v_op.parts
    if not (cfg.transposed and cfg.by_parts and (kivi_values or parts_values or _turbo_parts(v_op))):
        return False
    if query_rows > cfg.transposed_max_rows:  # (``query_rows``: GQA group x query tokens)
        return False
    rows = math.prod(k_op.data.shape[:-1])
    turbo = formats.FMT_TURBO in (k_op.fmt, v_op.fmt)
    if rows < cfg.transposed_min_rows and not turbo:
        return False
    if k_op.fmt == formats.FMT_POLAR_RECURSIVE:
        return k_op.parts
    if k_op.fmt == formats.FMT_TURBO:
        return _turbo_parts(k_op)
    if k_op.fmt == _FMT_KIVI:
        return 8 % k_op.bits == 0
    if k_op.fmt == _FMT_POLAR and k_op.bits in _POLAR_UNIT_BITS:
        head_dim = k_op.data.shape[-1] * 16 // k_op.bits
        return head_dim >= 128 or _interpreting()
    return False


def _turbo_parts(op: _Operand) -> bool:
    """Turbo codes the transposed kernel reads by parts: at least 16 units per head vector."""
    if op.fmt != formats.FMT_TURBO:
        return False
    head_dim = op.data.shape[-1] * 8 // op.bits
    return head_dim // _tq.UNITS[op.bits][1] >= 16


def _kivi3_parts(op: _Operand) -> bool:
    """3-bit KIVI values the transposed kernel reads by parts (units of 3 bytes, 8 codes): at least 16
    units per head vector."""
    head_dim = op.data.shape[-1] * 8 // 3
    return op.bits == 3 and head_dim // 8 >= 16


def _code_units(op: _Operand, cfg: LaunchConfig) -> tuple[torch.Tensor, int, int, bool]:
    """(code pointer tensor, bytes per unit, codes per unit, int16 words) of turbo codes, and of
    KIVI codes in the transposed kernel (16-bit units or whole bytes, ``_kivi_code_units``; 3-byte
    units of 3-bit codes)."""
    if op.fmt == _FMT_KIVI and 8 % op.bits == 0:
        return (*_kivi_code_units(op, cfg), False)
    ub, u = _tq.UNITS[op.bits] if op.fmt == formats.FMT_TURBO else _unit(op.bits)
    if ub == 3:
        data, _ = _unit_words(op.data, 6)  # 24-bit units, as polar-rope's 6-bit pairs
        return data, ub, u, data is not op.data
    return op.data, ub, u, False


def _kivi_code_units(op: _Operand, cfg: LaunchConfig) -> tuple[torch.Tensor, int, int]:
    """(code tensor, bytes per unit, codes per unit) of KIVI codes in whole bytes in the transposed
    kernel: 16-bit units (the bytes viewed as int16) for 2- and 4-bit codes with
    ``kivi_code_units="halfwords"`` where the rows are whole halfwords, at least 16 of them (each
    code position's units fill the tensor-core dimension of 16: head dim >= 128 for 2-bit codes,
    >= 64 for 4-bit), else bytes."""
    ub, u = _unit(op.bits)
    if cfg.kivi_code_units == "halfwords" and op.bits in (2, 4) and op.data.shape[-1] >= 32:
        try:
            return op.data.view(torch.int16), 2, 16 // op.bits
        except RuntimeError:  # an odd number of bytes per row, or an odd offset / stride
            pass
    return op.data, ub, u


def _value_metadata(op: _Operand, query: torch.Tensor, cfg: "LaunchConfig") -> tuple[tuple[torch.Tensor, ...], int]:
    """(metadata tensors, ``VAL_META`` mode) of KIVI values in the transposed kernel
    (``LaunchConfig.value_metadata``): "tiles" (3): 16-bit [groups, block] tiles read in the block
    that uses them (Triton's pipeliner copies them ahead); "words" (2) views them as int32 words of
    two 16-bit per-(token, group) values, which the pipeliner copies asynchronously, stages ahead,
    where the layout allows (groups adjacent in memory, an even number of them per token, 16-bit
    metadata of the query's dtype, float16 under the interpreter, which has no bfloat16 bitcasts),
    else "tiles" for metadata with its tokens adjacent and "ahead" (1) for any other: 16-bit tiles
    read one block ahead into registers; "gather" (0) gathers them per packed unit where used."""
    mode = cfg.value_metadata or "words"  # (``_packed_plan`` resolves None by ``value_metadata_policy``)
    if op.fmt != _FMT_KIVI or mode == "gather":
        return op.meta, 0
    if mode == "tiles" or (mode == "words" and op.meta[0].stride(-1) != 1 and tokens_adjacent(op.meta[0])):
        return op.meta, 3
    groups = op.meta[0].shape[-1]
    wanted = query.dtype if not _interpreting() else torch.float16
    if mode == "ahead" or groups % 2 or any(m.dtype != wanted for m in op.meta):
        return op.meta, 1
    try:
        words = tuple(m.view(torch.int32) for m in op.meta)
    except RuntimeError:  # storage offset or strides not whole words
        return op.meta, 1
    return (words, 2) if words[0].stride() == words[1].stride() else (op.meta, 1)


def _turbo_tables(op: _Operand, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(float32 codebook, ``turbo_parts.lut_words`` of it in the query's dtype, lookup mode) of turbo
    codes; any tensors for other formats (pointer slots the kernel does not read). The mode
    (``turbo_parts.part_values``' ``LOOKUP``): 0 under the interpreter, 2 for 4-bit codes of an
    antisymmetric codebook, else 1."""
    if op.fmt != formats.FMT_TURBO:
        return query, query, 0
    book = op.tables[0]
    if _interpreting():
        mode = 0
    else:
        mode = 2 if op.bits == 4 and _tq.antisymmetric(book, query.dtype) else 1
    return book, _tq.lut_words(book, query.dtype), mode


def _launch_split(query, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                  part_max, part_sum, part_acc, scale, gqa, block_m, block_n, cfg):
    """Launch ``_split_kernel`` (the classic form) over one packed range of tokens, or the residual window."""
    k_op, v_op = _row_major(k_op), _row_major(v_op)
    bsz, hq, tq, d = query.shape
    hkv = hq // gqa
    km = k_op.meta + (query,) * (4 - len(k_op.meta))  # unused pointer slots get any tensor
    vm = v_op.meta + (query,) * (2 - len(v_op.meta))
    km_strides = k_op.meta[0].stride()[:3] if k_op.meta else (0, 0, 0)
    vm_strides = _metadata_strides(v_op.meta[0]) if v_op.meta else (0, 0, 0, 0)
    k_unit = _unit(k_op.bits) if k_op.fmt != _FMT_FULL else (1, 1)
    v_unit = _unit(v_op.bits) if v_op.fmt != _FMT_FULL else (1, 1)
    mask_t = mask if mask is not None else query
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    _split_kernel[(bsz * hkv, splits)](
        query, *query.stride()[:3],
        k_op.data, *k_op.data.stride()[:3], *km, *km_strides,
        v_op.data, *v_op.data.stride()[:3], *vm, *vm_strides,
        mask_t, *mask_strides,
        part_max, part_sum, part_acc,
        k_op.tokens, offset, per_split // block_n, base, total_splits, hkv,
        scale * _LOG2E,
        D=d, GQA=gqa, TQ=tq, BLOCK_M=block_m, BLOCK_N=block_n, BLOCKS_CONST=per_split // block_n if _interpreting() else 0,
        KEY_FMT=k_op.fmt, KEY_BITS=k_op.bits, KEY_UB=k_unit[0], KEY_U=k_unit[1], KEY_GROUP=k_op.group,
        ANGLE_BITS=k_op.angle_bits, PAIR_HALF=k_op.pair_half,
        VAL_FMT=v_op.fmt, VAL_BITS=v_op.bits, VAL_UB=v_unit[0], VAL_U=v_unit[1], VAL_GROUP=v_op.group,
        HAS_MASK=mask is not None, NATIVE=not _interpreting(),
        DOT_DTYPE=_dot_dtype(query.dtype),
        KEY_OFFSET=_code_offset(query.dtype, k_op.bits), VAL_OFFSET=_code_offset(query.dtype, v_op.bits),
        PARTS=cfg.by_parts, FP8_CONVERT=_fp8_conversion(query.device),
        **{"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **formats.launch_overrides(k_op.fmt, v_op.fmt)},
        **formats.kernel_args(k_op, v_op, query),
    )


def _row_major(op: _Operand) -> _Operand:
    """``op`` with one row per token, as the classic kernel reads codes and metadata: polar-recursive
    tensors laid out with consecutive tokens adjacent (the transposed kernel's layout) are copied,
    per call, where the launch policy sends them to the classic kernel (small caches, many query
    rows); every other operand as it is."""
    if op.fmt != formats.FMT_POLAR_RECURSIVE or (op.data.stride(-1) == 1 and op.meta[0].stride(-1) == 1):
        return op
    return dataclasses.replace(op, data=op.data.contiguous(), meta=tuple(m.contiguous() for m in op.meta))


def _byte_stride(op: _Operand) -> int:
    """Stride between the code bytes of one token: 1 (a row per token), or the token count's for
    polar-recursive codes laid out with consecutive tokens adjacent (the transposed kernel reads
    both; every other format's codes are rows)."""
    return op.data.stride(-1) if op.fmt == formats.FMT_POLAR_RECURSIVE else 1


def _column_stride(op: _Operand) -> int:
    """Stride between the per-token metadata columns of one token (polar-recursive radii: 1, or the
    token count's where consecutive tokens are adjacent); 1 for every other format's key metadata."""
    return op.meta[0].stride(-1) if op.fmt == formats.FMT_POLAR_RECURSIVE else 1


def _metadata_strides(meta: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, token, group) strides of per-token metadata ``[B, H, T]`` or ``[B, H, T, G]``
    (group stride 0 where there is no group axis)."""
    strides = meta.stride()
    return (*strides[:3], strides[3] if meta.dim() > 3 else 0)


def _three_byte_reading(codes: torch.Tensor, data: torch.Tensor, unit_bytes: int, words: bool,
                        cfg: LaunchConfig) -> tuple[torch.Tensor, bool | int]:
    """(pointer tensor, ``WORDS`` mode) of codes read in units of ``unit_bytes``: for 3-byte units
    and ``LaunchConfig.three_byte_units == "words"``, ``codes`` ``[..., bytes]`` uint8 viewed as
    int32 words (mode 2) where the rows are whole 4-byte words; else the reading already chosen
    (``data``, ``words``: the halfword one for 3-byte units)."""
    if unit_bytes == 3 and cfg.three_byte_units == "words" and codes.shape[-1] % 4 == 0:
        try:
            return codes.view(torch.int32), 2
        except RuntimeError:  # storage offset or strides not a multiple of 4 bytes
            pass
    return data, words


def _split_t_arguments(query, k_op, v_op, mask, offset, blocks_per_split, base, total_splits,
                       part_max, part_sum, part_acc, scale, gqa, block_n, cfg) -> tuple[tuple, dict]:
    """(positional, keyword) arguments of ``_split_kernel_t`` over one packed range of tokens."""
    bsz, hq, tq, d = query.shape
    hkv = hq // gqa
    block_m = max(cfg.transposed_rows, _next_pow2(gqa * tq))
    if k_op.fmt == _FMT_POLAR:  # four pairs per unit of bits/2 bytes, read as one word where possible
        k_data, k_ub = _unit_words(k_op.data, k_op.bits)
        k_u, k_nu, k_words = 4, d // 8, k_data is not k_op.data
        k_data, k_words = _three_byte_reading(k_op.data, k_data, k_ub, k_words, cfg)
    elif k_op.fmt in (formats.FMT_TURBO, _FMT_KIVI):
        k_data, k_ub, k_u, k_words = _code_units(k_op, cfg)
        k_nu = d // k_u
        k_data, k_words = _three_byte_reading(k_op.data, k_data, k_ub, k_words, cfg)
    else:  # polar-recursive by parts: bytes
        k_data, (k_ub, k_u) = k_op.data, _unit(k_op.bits)
        k_nu, k_words = d // k_u, False
    if v_op.fmt in (formats.FMT_TURBO, _FMT_KIVI):
        v_data, v_ub, v_u, v_words = _code_units(v_op, cfg)
        v_data, v_words = _three_byte_reading(v_op.data, v_data, v_ub, v_words, cfg)
    else:
        v_data, (v_ub, v_u), v_words = v_op.data, _unit(v_op.bits), False
    k_book, k_lut, k_lookup = _turbo_tables(k_op, query)
    v_book, v_lut, v_lookup = _turbo_tables(v_op, query)
    km = k_op.meta + (query,) * (4 - len(k_op.meta))
    v_meta, v_meta_mode = _value_metadata(v_op, query, cfg)
    vm = v_meta + (query,) * (2 - len(v_meta))
    k_tab = k_op.tables[:2] if k_op.fmt == formats.FMT_POLAR_RECURSIVE else (query, query)
    v_tab = v_op.tables[:2] if v_op.fmt == formats.FMT_POLAR_RECURSIVE else (query, query)
    mask_t = mask if mask is not None else query
    mask_strides = mask.stride() if mask is not None else (0, 0, 0, 0)
    extra = {}
    if cfg.max_registers is not None and not _interpreting():
        extra["maxnreg"] = cfg.max_registers
    args = (
        query, *query.stride()[:3],
        k_data, *k_data.stride()[:3], _byte_stride(k_op), *km, *k_op.meta[0].stride()[:3], _column_stride(k_op),
        v_data, *v_data.stride()[:3], _byte_stride(v_op), *vm, *_metadata_strides(v_meta[0]),
        mask_t, *mask_strides,
        part_max, part_sum, part_acc,
        k_op.tokens, offset, blocks_per_split, base, total_splits, hkv,
        scale * _LOG2E,
    )
    kwargs = dict(
        D=d, GQA=gqa, TQ=tq, BLOCK_M=block_m, BLOCK_N=block_n, BLOCKS_CONST=blocks_per_split if _interpreting() else 0,
        VAL_META=v_meta_mode,
        KEY_FMT=k_op.fmt, KEY_BITS=k_op.bits, KEY_UB=k_ub, KEY_U=k_u, KEY_NU=k_nu, KEY_WORDS=k_words,
        KEY_GROUP=k_op.group, ANGLE_BITS=k_op.angle_bits, PAIR_HALF=k_op.pair_half,
        VAL_BITS=v_op.bits, VAL_U=v_u, VAL_GROUP=v_op.group,
        HAS_MASK=mask is not None, NATIVE=not _interpreting(),
        DOT_DTYPE=_dot_dtype(query.dtype),
        KEY_OFFSET=_code_offset(query.dtype, k_op.bits), VAL_OFFSET=_code_offset(query.dtype, v_op.bits),
        VAL_FMT=v_op.fmt, kcos=k_tab[0], ksin=k_tab[1], vcos=v_tab[0], vsin=v_tab[1], PR_KEY_JOIN=2 if cfg.polar_recursive_keys == "subtrees" else _pr.KEY_JOIN,
        PR_VALUE_JOIN=_pr.VALUE_JOIN,
        VAL_UB=v_ub, VAL_WORDS=v_words, kbook=k_book, klut=k_lut, vbook=v_book, vlut=v_lut,
        KEY_LOOKUP=k_lookup, VAL_LOOKUP=v_lookup, LAZY_RESCALE=cfg.lazy_rescale,
        num_warps=cfg.transposed_warps, num_stages=cfg.transposed_stages, **extra,
    )
    return args, kwargs


def _launch_split_t(query, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                    part_max, part_sum, part_acc, scale, gqa, block_n, cfg):
    """Launch ``_split_kernel_t`` (see ``_use_transposed``) over one packed range of tokens."""
    args, kwargs = _split_t_arguments(query, k_op, v_op, mask, offset, per_split // block_n, base, total_splits,
                                      part_max, part_sum, part_acc, scale, gqa, block_n, cfg)
    hkv = query.shape[1] // gqa
    _split_kernel_t[(query.shape[0] * hkv, splits)](*args, **kwargs)


#: Programs of the compiled transposed kernel resident on one SM, by launch signature (``_resident_key``).
_RESIDENT: dict[tuple, int] = {}


def _specialization(value) -> object:
    """What Triton specializes a launch argument on: a tensor's dtype and 16-byte alignment, an
    integer's being 1 or a multiple of 16 (strides, token counts), a float's type only."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if type(value) is int:
        return value == 1, value % 16 == 0
    return float if isinstance(value, float) else value


def _resident_key(args: tuple, kwargs: dict, device: torch.device) -> tuple:
    """What selects one compiled ``_split_kernel_t``: how each runtime argument is specialized
    (``_specialization``; ``blocks_per_split`` and ``total_splits`` are not) and the compile-time
    arguments themselves. Launches of one preset whose strides differ in divisibility by 16 compile
    to different register counts (H100: polar-rope-4's kernel, first compiled for a 2001-token
    cache, gave its residency to a 32k one and 4 splits instead of 6, 1.31x instead of 1.49x,
    ``results/registers3_h100.json``)."""
    tensor = torch.Tensor
    return (tuple(map(_specialization, args)) + tuple(kwargs)
            + tuple(_specialization(v) if isinstance(v, tensor) else v for v in kwargs.values()) + (device,))


def programs_per_sm_of(registers: int, shared_bytes: int, num_warps: int, regs_per_sm: int = 65536,
                       shared_per_sm: int = 233472, threads_per_sm: int = 2048, partitions: int = 4) -> int:
    """Programs of ``num_warps`` warps that fit on one SM at once, given the compiled kernel's
    ``registers`` per thread and ``shared_bytes`` of shared memory (plus the 1 KiB the driver
    reserves per block); at most 32 (the SM's block limit). Registers are allocated per warp in
    units of 256 from the register file of the SM partition (of ``partitions``) the warp runs on, so
    215 registers per thread allow 2 warps per partition, 8 per SM, not 65536 // 6912 = 9 (H100,
    ``results/sweep_splits_h100.json``: one-warp KIVI-2 programs at 1056 per launch run 1.78x fp16
    SDPA, at 1152 to 1280 1.26-1.32x: a second wave). Defaults: an H100's (sm_90) SM."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = partitions * (regs_per_sm // partitions // per_warp) // num_warps
    by_shared = shared_per_sm // (shared_bytes + 1024)
    by_threads = threads_per_sm // (32 * num_warps)
    return max(1, min(by_registers, by_shared, by_threads, 32))


def _transposed_residency(query, k_op, v_op, mask, offset, scale, gqa, block_n, cfg) -> int | None:
    """Programs per SM the compiled ``_split_kernel_t`` for these operands can hold (compiled once per
    launch signature, without running); None under the interpreter or if Triton's compiled-kernel
    attributes are missing."""
    if _interpreting() or query.device.type != "cuda":
        return None
    scratch = torch.empty(1, device=query.device, dtype=torch.float32)
    args, kwargs = _split_t_arguments(query, k_op, v_op, mask, offset, 2, 0, 2, scratch, scratch, scratch,
                                      scale, gqa, block_n, cfg)
    key = _resident_key(args, kwargs, query.device)
    if key not in _RESIDENT:
        try:
            compiled = _split_kernel_t.warmup(*args, grid=(1, 1), **kwargs)
            compiled._init_handles()
            props = torch.cuda.get_device_properties(query.device)
            _RESIDENT[key] = programs_per_sm_of(
                compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps,
                getattr(props, "regs_per_multiprocessor", 65536),
                getattr(props, "shared_memory_per_multiprocessor", 233472),
                getattr(props, "max_threads_per_multi_processor", 2048))
        except (AttributeError, TypeError):  # another Triton's compiled-kernel API: the measured policy alone
            _RESIDENT[key] = None
    return _RESIDENT[key]


# ----- Triton kernels ----------------------------------------------------------------------------------------
if triton is not None:
    from kvpolar.kernels.polar_pairs import UNIT_PAIR_BITS as _POLAR_UNIT_BITS
    from kvpolar.kernels.polar_pairs import load_unit_words
    from kvpolar.kernels.polar_pairs import pair_channels as _pair_channels
    from kvpolar.kernels.polar_pairs import query_pairs_t as _polar_query_t
    from kvpolar.kernels.polar_pairs import scores_t as _polar_key_scores_t
    from kvpolar.kernels.polar_pairs import split4 as _split4
    from kvpolar.kernels.polar_pairs import unit_words as _unit_words
    from kvpolar.kernels import polar_recursive_parts as _pr
    from kvpolar.kernels import turbo_parts as _tq

    @triton.jit
    def _unpack(row_ptrs, row_ok, scale, minimum, BITS: tl.constexpr, UB: tl.constexpr, U: tl.constexpr,
                NCODES: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr, AFFINE: tl.constexpr,
                RAW: tl.constexpr, OFFSET: tl.constexpr):
        """Codes of ``BITS`` bits, densely packed from ``row_ptrs`` (uint8 ``[BN, 1]``), as
        ``[BN, NCODES]`` in their natural order. Units of ``UB`` bytes hold ``U`` codes each.

        RAW: int32 codes. Else ``DT`` values: ``(code - offset) * scale + minimum`` with AFFINE
        (``scale``/``minimum`` ``[BN, NCODES // U]``, one per unit, applied before interleaving),
        or ``code + OFFSET`` without (``OFFSET = _code_offset(...)``; the caller corrects for it).
        """
        word = _load_units(row_ptrs, row_ok, NCODES // U, UB)
        CMASK: tl.constexpr = (1 << BITS) - 1
        codes = (word[:, :, None] >> (tl.arange(0, U) * BITS)[None, None, :]) & CMASK  # [BN, NU, U]
        if RAW:
            out = codes
        else:
            out = _codes_to(codes, DT, BITS, NATIVE)
            if AFFINE:
                out = ((out - OFFSET) * scale[:, :, None] + minimum[:, :, None]).to(DT)
        return tl.reshape(out, [out.shape[0], NCODES])  # merge (unit, code in unit): natural order

    @triton.jit
    def _codes_to(codes, DT: tl.constexpr, BITS: tl.constexpr, NATIVE: tl.constexpr):
        """int32 codes -> ``DT`` values ``code + offset`` (``_code_offset``) without the slow int->float converter:
        the code is OR-ed into the mantissa of 1024 (float16) or 128 (bfloat16, codes < 128)."""
        if DT == tl.float16:
            out = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        elif DT == tl.bfloat16 and BITS <= 7 and NATIVE:  # (the interpreter lacks bf16 bitcasts)
            out = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            out = codes.to(tl.float32).to(DT)
        return out

    @triton.jit
    def _load_units(row_ptrs, row_ok, NU: tl.constexpr, UB: tl.constexpr):
        """``[BN, NU]`` int32 words, one per packed unit of ``UB`` bytes (little-endian)."""
        cols = tl.arange(0, NU)[None, :] * UB
        word = tl.load(row_ptrs + cols, mask=row_ok, other=0).to(tl.int32)
        if UB == 3:
            word = word | (tl.load(row_ptrs + cols + 1, mask=row_ok, other=0).to(tl.int32) << 8)
            word = word | (tl.load(row_ptrs + cols + 2, mask=row_ok, other=0).to(tl.int32) << 16)
        return word

    @triton.jit
    def _kivi_key_part(s, bias, q_rows, row_ok, word, meta_ptr0, meta_ptr1, K: tl.constexpr, U: tl.constexpr,
                       BITS: tl.constexpr, NU: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr,
                       OFFSET: tl.constexpr, PREC: tl.constexpr):
        """Scores of code ``K`` of every unit (channels ``u * U + K``): no interleaving needed."""
        ch = tl.arange(0, NU) * U + K
        qk = tl.load(q_rows[:, None] + ch[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        k_scale = tl.load(meta_ptr0 + ch).to(tl.float32)
        k_min = tl.load(meta_ptr1 + ch).to(tl.float32)
        q_scaled = (qk * k_scale[None, :]).to(DT)
        codes = _codes_to((word >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
        s = tl.dot(q_scaled, tl.trans(codes), s, input_precision=PREC)
        bias += tl.sum(qk * k_min[None, :] - OFFSET * q_scaled.to(tl.float32), axis=1)
        return s, bias

    @triton.jit
    def _kivi_value_part(acc, p, word, v_scale, v_min, alpha, K: tl.constexpr, BITS: tl.constexpr,
                         DT: tl.constexpr, NATIVE: tl.constexpr, OFFSET: tl.constexpr, PREC: tl.constexpr):
        """``acc_K = acc_K * alpha + p @ v_K`` for code ``K`` of every unit (channels ``u * U + K``)."""
        v = _codes_to((word >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
        v = ((v - OFFSET) * v_scale + v_min).to(DT)
        return tl.dot(p, v, acc * alpha[:, None], input_precision=PREC)

    @triton.jit
    def _split_kernel(
        q_ptr, sq_b, sq_h, sq_t,
        k_ptr, sk_b, sk_h, sk_t, km0, km1, km2, km3, skm_b, skm_h, skm_g,
        v_ptr, sv_b, sv_h, sv_t, vm0, vm1, svm_b, svm_h, svm_t, svm_g,
        mask_ptr, smk_b, smk_h, smk_t, smk_n,
        part_max, part_sum, part_acc,
        n_tokens, mask_offset, blocks_per_split, split_base, total_splits, n_kv_heads,
        qk_scale,
        D: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCKS_CONST: tl.constexpr,
        KEY_FMT: tl.constexpr, KEY_BITS: tl.constexpr, KEY_UB: tl.constexpr, KEY_U: tl.constexpr,
        KEY_GROUP: tl.constexpr, ANGLE_BITS: tl.constexpr, PAIR_HALF: tl.constexpr,
        VAL_FMT: tl.constexpr, VAL_BITS: tl.constexpr, VAL_UB: tl.constexpr, VAL_U: tl.constexpr,
        VAL_GROUP: tl.constexpr,
        HAS_MASK: tl.constexpr, NATIVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        KEY_OFFSET: tl.constexpr, VAL_OFFSET: tl.constexpr, PARTS: tl.constexpr, FP8_CONVERT: tl.constexpr,
        ktab0, ktab1, ktab2, k_book_stride, vtab0, vtab1, vtab2, v_book_stride,
        KEY_NB: tl.constexpr, KEY_LEVELS: tl.constexpr,
        VAL_NB: tl.constexpr, VAL_LEVELS: tl.constexpr,
    ):
        """The split step (see the module docstring); ``ktab*`` / ``vtab*``, ``*_book_stride``,
        ``*_NB``, ``*_LEVELS``: the formats of ``decode_formats`` (``kernel_args``); ``FP8_CONVERT``:
        e4m3 by the GPU's conversion (``_fp8_conversion``)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // n_kv_heads
        hkv = pid % n_kv_heads
        start = split * blocks_per_split * BLOCK_N  # a short last split masks its surplus blocks
        DT: tl.constexpr = DOT_DTYPE  # operand dtype of the tensor-core products (the query's)
        PREC: tl.constexpr = "ieee" if DT == tl.float32 else "tf32"
        HALF: tl.constexpr = D // 2

        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < GQA * TQ
        head = hkv * GQA + rows // TQ
        tok = rows % TQ
        q_rows = q_ptr + b.to(tl.int64) * sq_b + head * sq_h + tok * sq_t
        dcol = tl.arange(0, D)
        if KEY_FMT == 2:  # polar-rope: the query split into the x and y channel of every pair
            ix, iy = _pair_channels(tl.arange(0, HALF), HALF, PAIR_HALF)
            qx = tl.load(q_rows[:, None] + ix[None, :], mask=row_ok[:, None], other=0.0).to(DT)
            qy = tl.load(q_rows[:, None] + iy[None, :], mask=row_ok[:, None], other=0.0).to(DT)
        else:
            qf = tl.load(q_rows[:, None] + dcol[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
            q = qf.to(DT)

        k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
        km_base = b.to(tl.int64) * skm_b + hkv.to(tl.int64) * skm_h
        vm_base = b.to(tl.int64) * svm_b + hkv.to(tl.int64) * svm_h
        if HAS_MASK:
            mask_rows = mask_ptr + b.to(tl.int64) * smk_b + head * smk_h + tok * smk_t

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # KIVI values by parts: accumulator K holds channels u * VAL_U + K (no interleaving)
        VAL_PARTS: tl.constexpr = VAL_FMT == 1 and VAL_U <= 4 and PARTS
        NUV: tl.constexpr = D // VAL_U
        acc0 = tl.zeros([BLOCK_M, NUV], tl.float32)
        acc1 = tl.zeros([BLOCK_M, NUV], tl.float32)
        acc2 = tl.zeros([BLOCK_M, NUV], tl.float32)
        acc3 = tl.zeros([BLOCK_M, NUV], tl.float32)
        # (the interpreter needs a compile-time loop count; compiled kernels take it at run time)
        for i in range(BLOCKS_CONST if BLOCKS_CONST > 0 else blocks_per_split):
            n0 = start + i * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_tokens
            # ---- scores [BLOCK_M, BLOCK_N] from the stored keys
            if KEY_FMT == 0:
                k = tl.load(k_base + offs_n[:, None] * sk_t + dcol[None, :], mask=n_ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k.to(DT)), input_precision=PREC)
            elif KEY_FMT == 1 and BLOCK_N <= KEY_GROUP and KEY_U <= 4 and PARTS:  # KIVI, by parts:
                NUK: tl.constexpr = D // KEY_U  # per code position K of the packed units,
                word = _load_units(k_base + offs_n[:, None] * sk_t, n_ok[:, None], NUK, KEY_UB)
                meta = km_base + (n0 // KEY_GROUP) * skm_g  # (q * scale_g) . codes + q . min_g
                s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                bias = tl.zeros([BLOCK_M], tl.float32)
                s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, 0, KEY_U,
                                         KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
                if KEY_U >= 2:
                    s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, 1, KEY_U,
                                             KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
                if KEY_U >= 4:
                    s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, 2, KEY_U,
                                             KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
                    s, bias = _kivi_key_part(s, bias, q_rows, row_ok, word, km0 + meta, km1 + meta, 3, KEY_U,
                                             KEY_BITS, NUK, DT, NATIVE, KEY_OFFSET, PREC)
                s += bias[:, None]
            elif KEY_FMT == 1 and BLOCK_N <= KEY_GROUP:  # KIVI, one token group per block:
                meta = km_base + (n0 // KEY_GROUP) * skm_g + dcol  # (q * scale_g) . codes + q . min_g
                k_scale = tl.load(km0 + meta).to(tl.float32)
                k_min = tl.load(km1 + meta).to(tl.float32)
                codes = _unpack(k_base + offs_n[:, None] * sk_t, n_ok[:, None], 0, 0, KEY_BITS, KEY_UB, KEY_U,
                                D, DT, NATIVE, False, False, KEY_OFFSET)  # code + offset
                q_scaled = (qf * k_scale[None, :]).to(DT)
                s = tl.dot(q_scaled, tl.trans(codes), input_precision=PREC)
                bias = qf * k_min[None, :] - KEY_OFFSET * q_scaled.to(tl.float32)
                s += tl.sum(bias, axis=1)[:, None]
            elif KEY_FMT == 1:  # KIVI, several token groups per block: dequantize in registers
                NGK: tl.constexpr = BLOCK_N // KEY_GROUP
                groups = n0 // KEY_GROUP + tl.arange(0, NGK)
                meta = km_base + groups[:, None] * skm_g + dcol[None, :]
                g_ok = (groups * KEY_GROUP < n_tokens)[:, None]
                k_scale = tl.load(km0 + meta, mask=g_ok, other=0.0).to(DT)
                k_min = tl.load(km1 + meta, mask=g_ok, other=0.0).to(DT)
                k_scale = tl.reshape(tl.broadcast_to(k_scale[:, None, :], [NGK, KEY_GROUP, D]), [BLOCK_N, D])
                k_min = tl.reshape(tl.broadcast_to(k_min[:, None, :], [NGK, KEY_GROUP, D]), [BLOCK_N, D])
                codes = _unpack(k_base + offs_n[:, None] * sk_t, n_ok[:, None], 0, 0, KEY_BITS, KEY_UB, KEY_U,
                                D, DT, NATIVE, False, False, KEY_OFFSET)
                k = ((codes - KEY_OFFSET) * k_scale + k_min).to(DT)
                s = tl.dot(q, tl.trans(k), input_precision=PREC)
            elif KEY_FMT >= 3:  # turbo / fp8 / polar-recursive: a tile, the per-token factor on the scores
                k, k_tok = formats.format_tile(
                    k_base + offs_n * sk_t, n_ok, km0 + km_base + offs_n * skm_g, ktab0, ktab1, ktab2,
                    (b * n_kv_heads + hkv) * k_book_stride, KEY_FMT, KEY_BITS, KEY_NB, KEY_LEVELS,
                    D, BLOCK_N, FP8_CONVERT)
                s = tl.dot(q, tl.trans(k.to(DT)), input_precision=PREC) * k_tok[None, :]
            else:  # polar-rope: (x, y) = r (cos, sin) theta per pair, then q_x . x + q_y . y
                meta = km_base + (n0 // KEY_GROUP) * skm_g + tl.arange(0, HALF)
                r_scale = tl.load(km0 + meta).to(tl.float32)
                r_min = tl.load(km1 + meta).to(tl.float32)
                a_scale = tl.load(km2 + meta).to(tl.float32)
                a_min = tl.load(km3 + meta).to(tl.float32)
                codes = _unpack(k_base + offs_n[:, None] * sk_t, n_ok[:, None], 0, 0, KEY_BITS, KEY_UB, KEY_U,
                                HALF, DT, NATIVE, False, True, 0.0)
                radius = r_min[None, :] + (codes >> ANGLE_BITS).to(tl.float32) * r_scale[None, :]
                angle = a_min[None, :] + (codes & ((1 << ANGLE_BITS) - 1)).to(tl.float32) * a_scale[None, :]
                if NATIVE:
                    cos = libdevice.fast_cosf(angle)
                    sin = libdevice.fast_sinf(angle)
                else:
                    cos = tl.cos(angle)
                    sin = tl.sin(angle)
                s = tl.dot(qx, tl.trans((radius * cos).to(DT)), input_precision=PREC)
                s = tl.dot(qy, tl.trans((radius * sin).to(DT)), s, input_precision=PREC)
            # ---- online softmax (base 2); masked entries are -inf, fully masked rows stay at 0
            s = s * qk_scale
            keep = n_ok[None, :] & row_ok[:, None]
            if HAS_MASK:
                allowed = tl.load(mask_rows[:, None] + (offs_n + mask_offset)[None, :] * smk_n,
                                  mask=keep, other=0)
                keep = keep & (allowed != 0)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
            # ---- p @ values
            if VAL_PARTS:
                word = _load_units(v_base + offs_n[:, None] * sv_t, n_ok[:, None], NUV, VAL_UB)
                meta = vm_base + offs_n[:, None] * svm_t + ((tl.arange(0, NUV) * VAL_U) // VAL_GROUP)[None, :] * svm_g
                v_scale = tl.load(vm0 + meta, mask=n_ok[:, None], other=0.0).to(DT)
                v_min = tl.load(vm1 + meta, mask=n_ok[:, None], other=0.0).to(DT)
                p16 = p.to(DT)
                acc0 = _kivi_value_part(acc0, p16, word, v_scale, v_min, alpha, 0, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
                if VAL_U >= 2:
                    acc1 = _kivi_value_part(acc1, p16, word, v_scale, v_min, alpha, 1, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
                if VAL_U >= 4:
                    acc2 = _kivi_value_part(acc2, p16, word, v_scale, v_min, alpha, 2, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
                    acc3 = _kivi_value_part(acc3, p16, word, v_scale, v_min, alpha, 3, VAL_BITS, DT, NATIVE, VAL_OFFSET, PREC)
            else:
                if VAL_FMT == 0:
                    v = tl.load(v_base + offs_n[:, None] * sv_t + dcol[None, :], mask=n_ok[:, None], other=0.0)
                    v = v.to(DT)
                elif VAL_FMT == 1:  # KIVI per-token: codes * scale + min, per packed unit (one channel group)
                    NUV2: tl.constexpr = D // VAL_U
                    meta = (vm_base + offs_n[:, None] * svm_t
                            + ((tl.arange(0, NUV2) * VAL_U) // VAL_GROUP)[None, :] * svm_g)
                    v_scale = tl.load(vm0 + meta, mask=n_ok[:, None], other=0.0).to(DT)
                    v_min = tl.load(vm1 + meta, mask=n_ok[:, None], other=0.0).to(DT)
                    v = _unpack(v_base + offs_n[:, None] * sv_t, n_ok[:, None], v_scale, v_min, VAL_BITS, VAL_UB,
                                VAL_U, D, DT, NATIVE, True, False, VAL_OFFSET)
                elif VAL_FMT >= 3:  # turbo / fp8 / polar-recursive: the tile, and a per-token factor
                    v, v_tok = formats.format_tile(
                        v_base + offs_n * sv_t, n_ok, vm0 + vm_base + offs_n * svm_t, vtab0, vtab1, vtab2,
                        (b * n_kv_heads + hkv) * v_book_stride, VAL_FMT, VAL_BITS, VAL_NB, VAL_LEVELS,
                        D, BLOCK_N, FP8_CONVERT)
                    v = v.to(DT)
                if VAL_FMT >= 3 and VAL_FMT != 6:  # the factor on the probabilities: [BM, BN], not [BN, D]
                    acc = tl.dot((p * v_tok[None, :]).to(DT), v, acc * alpha[:, None], input_precision=PREC)
                else:
                    acc = tl.dot(p.to(DT), v, acc * alpha[:, None], input_precision=PREC)

        slot = ((b * (n_kv_heads * GQA) + head) * TQ + tok) * total_splits + split_base + split
        tl.store(part_max + slot, m_i, mask=row_ok)
        tl.store(part_sum + slot, l_i, mask=row_ok)
        acc_rows = part_acc + slot.to(tl.int64)[:, None] * D
        if VAL_PARTS:
            ch = tl.arange(0, NUV)[None, :] * VAL_U
            tl.store(acc_rows + ch, acc0, mask=row_ok[:, None])
            if VAL_U >= 2:
                tl.store(acc_rows + ch + 1, acc1, mask=row_ok[:, None])
            if VAL_U >= 4:
                tl.store(acc_rows + ch + 2, acc2, mask=row_ok[:, None])
                tl.store(acc_rows + ch + 3, acc3, mask=row_ok[:, None])
        else:
            tl.store(acc_rows + dcol[None, :], acc, mask=row_ok[:, None])

    @triton.jit
    def _combine_kernel(part_max, part_sum, part_acc, out_ptr, n_splits,
                        D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Merge the splits of one (sequence, query head, query token) row; empty rows give 0."""
        row = tl.program_id(0).to(tl.int64)
        sp = tl.arange(0, BLOCK_S)
        ok = sp < n_splits
        m = tl.load(part_max + row * n_splits + sp, mask=ok, other=float("-inf"))
        l = tl.load(part_sum + row * n_splits + sp, mask=ok, other=0.0)
        m_max = tl.max(m, axis=0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe)
        total = tl.sum(w * l, axis=0)
        dcol = tl.arange(0, D)
        acc = tl.load(part_acc + (row * n_splits + sp)[:, None] * D + dcol[None, :], mask=ok[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * D + dcol, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _byte_codes(word8, K: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr):
        """Code ``K`` of every packed byte of ``word8`` (uint8) as ``DT`` ``code + offset``
        (``_code_offset``). Compiled fp16 / bf16 (codes < 128): four bytes per inline-PTX call,
        shift + mask + two byte permutes that OR each code into the mantissa of 1024 (0x64..)
        or 128 (0x43..): about one instruction per code, two codes per register."""
        if NATIVE and (DT == tl.float16 or (DT == tl.bfloat16 and BITS <= 4)):
            if DT == tl.float16 and BITS == 2 and K == 0:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.float16 and BITS == 2 and K == 1:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.float16 and BITS == 2 and K == 2:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.float16 and BITS == 2 and K == 3:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 6; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.float16 and BITS == 4 and K == 0:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.float16 and BITS == 4 and K == 1:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.float16 and BITS == 8 and K == 0:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; prmt.b32 $0, t, 0x64646464, 0x4140; prmt.b32 $1, t, 0x64646464, 0x4342; }", "=r,=r,r", [word8], dtype=tl.float16, is_pure=True, pack=4)
            elif DT == tl.bfloat16 and BITS == 2 and K == 0:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
            elif DT == tl.bfloat16 and BITS == 2 and K == 1:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 2; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
            elif DT == tl.bfloat16 and BITS == 2 and K == 2:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
            elif DT == tl.bfloat16 and BITS == 2 and K == 3:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 6; and.b32 t, t, 0x03030303; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
            elif DT == tl.bfloat16 and BITS == 4 and K == 0:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; mov.b32 t, $2; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
            elif DT == tl.bfloat16 and BITS == 4 and K == 1:
                out = tl.inline_asm_elementwise("{ .reg .b32 t; shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; }", "=r,=r,r", [word8], dtype=tl.bfloat16, is_pure=True, pack=4)
            else:
                out = _codes_to((word8.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
        else:
            out = _codes_to((word8.to(tl.int32) >> (K * BITS)) & ((1 << BITS) - 1), DT, BITS, NATIVE)
        return out

    @triton.constexpr_function
    def _half_code_place(k, bits, dt):
        """(shift, bit) of code ``k`` of a 16-bit unit (codes of ``bits`` bits, code ``k`` at bit
        ``k * bits``) in ``_half_codes``: the unit shifted right by ``shift``, the code then lies at
        ``bit``, inside the mantissa of ``dt`` (10 bits float16, 7 bfloat16). The codes of one
        window of the mantissa's width share a shift (2-bit codes in float16: codes 0-4 unshifted,
        5-7 shifted by 10)."""
        per = (10 if dt == tl.float16 else 7) // bits
        return (k // per) * per * bits, (k % per) * bits

    @triton.constexpr_function
    def _half_code_asm(k, bits, dt):
        """The PTX of code ``k`` in ``_half_codes`` (two 16-bit units per register): the unit word,
        shifted where the code lies beyond the mantissa's first window, ORed with the exponent bits
        of ``_code_offset`` (once per window: the compiler shares it among the window's codes), then
        one AND keeping the code and the exponent, its one constant the instruction's immediate.
        The exponent comes from a register the compiler cannot prove constant (the dynamic shared
        memory size shifted out, zero): with it constant, the compiler folded the OR into the AND
        and, short of registers for the second constant, reloaded it before every code."""
        shift, at = _half_code_place(k, bits, dt)
        exponent = 0x6400 if dt == tl.float16 else 0x4300
        keep = ((((1 << bits) - 1) << at) | exponent) * 0x10001
        word = f"shr.u32 t, $1, {shift}; or.b32 t, t, e;" if shift else "or.b32 t, $1, e;"
        return ("{ .reg .b32 t, e; mov.u32 e, %dynamic_smem_size; shr.u32 e, e, 31; "
                + f"or.b32 e, e, {exponent * 0x10001:#x}; {word} and.b32 $0, t, {keep:#x}; }}")

    @triton.constexpr_function
    def _unit_code_step(k, bits, unit_bytes, dt):
        """What one step of code ``k`` of a unit weighs in ``_unit_codes``' result: 1 for byte
        units, the power of two at the code's bit in its mantissa window for 16-bit units (``_half_codes``)."""
        return float(1 << _half_code_place(k, bits, dt)[1]) if unit_bytes == 2 else 1.0

    @triton.jit
    def _half_codes(units, K: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr,
                    OFFSET: tl.constexpr):
        """Code ``K`` of every 16-bit unit of ``units`` (int16, any shape; code ``K`` at bit ``K * BITS``)
        as ``DT`` ``OFFSET + code * step`` (``OFFSET``: ``_code_offset``; ``step``: ``_unit_code_step``).
        Compiled fp16 / bf16 (``_half_code_asm``): two units per register, the code kept in place in
        the mantissa of ``OFFSET`` (1024 / 128: a mantissa unit of 1), so step = 2**bit: one AND per
        two codes, plus an OR (and a shift beyond the first) per window of the mantissa's width, shared
        by that window's codes; bytes (``_byte_codes``) take about one instruction per code, spreading
        them to 16-bit lanes.  The interpreter computes the same values with integer arithmetic.
        (Tried and dropped: the exponent as a broadcast kernel argument, one register for every code:
        Triton then gave the codes a layout of their own and moved them to the products through
        shared memory.)"""
        STEP: tl.constexpr = _unit_code_step(K, BITS, 2, DT)
        if NATIVE and (DT == tl.float16 or DT == tl.bfloat16):
            if DT == tl.float16:  # (one call per dtype: the compiler rejects ``dtype=DT`` here)
                out = tl.inline_asm_elementwise(_half_code_asm(K, BITS, DT), "=r,r", [units],
                                                dtype=tl.float16, is_pure=True, pack=2)
            else:
                out = tl.inline_asm_elementwise(_half_code_asm(K, BITS, DT), "=r,r", [units],
                                                dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            code = ((units.to(tl.int32) & 0xFFFF) >> (K * BITS)) & ((1 << BITS) - 1)
            out = (code.to(tl.float32) * STEP + OFFSET).to(DT)
        return out

    @triton.jit
    def _unit_parts(x, U: tl.constexpr):
        """Columns of ``x`` ``[NU, U]`` (U in 1, 2, 4, 8) as eight ``[NU]`` tensors (repeated where
        U < 8): the code positions of a packed unit, from one contiguous load of a row of metadata."""
        if U == 8:
            even, odd = tl.split(tl.reshape(x, [x.shape[0], 4, 2]))  # columns 0, 2, 4, 6 and 1, 3, 5, 7
            x0, x2, x4, x6 = _split4(even)
            x1, x3, x5, x7 = _split4(odd)
        elif U == 4:
            x0, x1, x2, x3 = _split4(x)
        elif U == 2:
            x0, x1 = tl.split(x)
            x2 = x0
            x3 = x1
        else:
            x0 = tl.reshape(x, [x.shape[0]])
            x1 = x0
            x2 = x0
            x3 = x0
        if U < 8:
            x4 = x0
            x5 = x1
            x6 = x2
            x7 = x3
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _unit_codes(word, K: tl.constexpr, BITS: tl.constexpr, UB: tl.constexpr, DT: tl.constexpr,
                    NATIVE: tl.constexpr, OFFSET: tl.constexpr):
        """Code ``K`` of every packed unit of ``word`` as ``DT`` ``OFFSET + code * _unit_code_step(K, ..)``:
        int16 units of 16 bits (``_half_codes``), uint8 bytes or 3-byte units in int32 (``_byte_codes``)."""
        if UB == 2:
            out = _half_codes(word, K, BITS, DT, NATIVE, OFFSET)
        else:
            out = _byte_codes(word, K, BITS, DT, NATIVE)
        return out

    @triton.jit
    def _key_group_part(k_bias, q_t, k_scale, k_min, K: tl.constexpr, BITS: tl.constexpr, UB: tl.constexpr,
                        BN: tl.constexpr, DT: tl.constexpr, OFFSET: tl.constexpr, PREC: tl.constexpr):
        """One key group's terms for code position ``K`` of every packed unit (channels ``u * U + K``):
        the query part scaled by the group's scale, ``(q_K * scale) [NU, BM]`` in ``DT`` (the B operand
        of ``codes_K [BN, NU] @ (q_K * scale)``, the codes being ``code + OFFSET``), and ``k_bias``
        ``[BN, BM]`` float32 plus the part's score bias ``q_K . min - OFFSET * sum(q_K * scale)``,
        the same in every token row, on the tensor cores: the minimum repeated over the block's rows
        times the query, and a constant ``-OFFSET`` tile times the scaled query (every product exact,
        float32 sums; computed elementwise in float32 and reduced across threads, the bias took about
        twice the instructions). ``k_scale`` / ``k_min``: ``[NU]``. Where a code step weighs more than 1
        in the codes (``_unit_code_step``: 16-bit units), the scaled query carries its inverse, a power of two."""
        STEP: tl.constexpr = _unit_code_step(K, BITS, UB, DT)
        q_scaled = q_t * k_scale.to(DT)[:, None]  # (DT x DT: the exact product rounded once, as via float32)
        if STEP != 1:
            q_scaled = q_scaled * (1.0 / STEP)
        nu: tl.constexpr = q_t.shape[0]
        k_bias = tl.dot(tl.broadcast_to(k_min.to(DT)[None, :], [BN, nu]), q_t, k_bias, input_precision=PREC)
        if OFFSET != 0:
            k_bias = tl.dot(tl.full([BN, nu], -OFFSET, DT), q_scaled, k_bias, input_precision=PREC)
        return q_scaled, k_bias

    @triton.jit
    def _kivi_scores_t(k_bias, word, qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7, U: tl.constexpr, BITS: tl.constexpr,
                       UB: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr, OFFSET: tl.constexpr,
                       PREC: tl.constexpr):
        """KIVI keys' transposed scores ``[BN, BM]`` float32 of one block: ``k_bias`` (the group's score
        bias, the first product's accumulator) plus code ``K`` of every unit of ``word`` times the
        group-scaled query part ``qs_K``, for the ``U`` code positions of a unit (``_unit_codes``)."""
        s_t = tl.dot(_unit_codes(word, 0, BITS, UB, DT, NATIVE, OFFSET), qs0, k_bias, input_precision=PREC)
        if U >= 2:
            s_t = tl.dot(_unit_codes(word, 1, BITS, UB, DT, NATIVE, OFFSET), qs1, s_t, input_precision=PREC)
        if U >= 4:
            s_t = tl.dot(_unit_codes(word, 2, BITS, UB, DT, NATIVE, OFFSET), qs2, s_t, input_precision=PREC)
            s_t = tl.dot(_unit_codes(word, 3, BITS, UB, DT, NATIVE, OFFSET), qs3, s_t, input_precision=PREC)
        if U >= 8:
            s_t = tl.dot(_unit_codes(word, 4, BITS, UB, DT, NATIVE, OFFSET), qs4, s_t, input_precision=PREC)
            s_t = tl.dot(_unit_codes(word, 5, BITS, UB, DT, NATIVE, OFFSET), qs5, s_t, input_precision=PREC)
            s_t = tl.dot(_unit_codes(word, 6, BITS, UB, DT, NATIVE, OFFSET), qs6, s_t, input_precision=PREC)
            s_t = tl.dot(_unit_codes(word, 7, BITS, UB, DT, NATIVE, OFFSET), qs7, s_t, input_precision=PREC)
        return s_t

    @triton.jit
    def _word_halves(words, shift, DT: tl.constexpr):
        """The 16-bit values of ``DT`` (float16 / bfloat16) at bit ``shift`` (0 or 16) of int32 ``words``."""
        return ((words >> shift) & 0xFFFF).to(tl.int16).to(DT, bitcast=True)

    @triton.jit
    def _group_units(meta, NU: tl.constexpr):
        """Per-(group, token) metadata ``[NG, BN]`` as ``[NU, BN]`` per packed unit: the units of a
        group are consecutive (unit ``u`` of ``NU`` is in group ``u // (NU / NG)``)."""
        ng: tl.constexpr = meta.shape[0]
        bn: tl.constexpr = meta.shape[1]
        return tl.reshape(tl.broadcast_to(meta[:, None, :], [ng, NU // ng, bn]), [NU, bn])

    @triton.jit
    def _value_part_t(acc_t, p_t, word_t, v_scale_t, v_min_t, alpha, K: tl.constexpr, BITS: tl.constexpr,
                      UB: tl.constexpr, DT: tl.constexpr, NATIVE: tl.constexpr, OFFSET: tl.constexpr,
                      PREC: tl.constexpr):
        """``acc_K^T [NU, BM] = acc_K^T * alpha + v_K^T [NU, BN] @ p^T [BN, BM]`` (values as the A operand;
        codes read by ``_unit_codes``)."""
        v = _unit_codes(word_t, K, BITS, UB, DT, NATIVE, OFFSET)
        STEP: tl.constexpr = _unit_code_step(K, BITS, UB, DT)
        if STEP != 1:  # (v - OFFSET) / STEP, exactly: one multiply-add by powers of two
            v = (v * (1.0 / STEP) - OFFSET / STEP) * v_scale_t + v_min_t
        else:
            v = (v - OFFSET) * v_scale_t + v_min_t
        v = v.to(DT)
        return tl.dot(v, p_t, acc_t * alpha[None, :], input_precision=PREC)

    @triton.jit(do_not_specialize=["blocks_per_split", "total_splits"])  # (``_transposed_residency``)
    def _split_kernel_t(
        q_ptr, sq_b, sq_h, sq_t,
        k_ptr, sk_b, sk_h, sk_t, sk_c, km0, km1, km2, km3, skm_b, skm_h, skm_g, skm_c,
        v_ptr, sv_b, sv_h, sv_t, sv_c, vm0, vm1, svm_b, svm_h, svm_t, svm_g,
        mask_ptr, smk_b, smk_h, smk_t, smk_n,
        part_max, part_sum, part_acc,
        n_tokens, mask_offset, blocks_per_split, split_base, total_splits, n_kv_heads,
        qk_scale,
        D: tl.constexpr, GQA: tl.constexpr, TQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCKS_CONST: tl.constexpr,
        KEY_FMT: tl.constexpr, KEY_BITS: tl.constexpr, KEY_UB: tl.constexpr, KEY_U: tl.constexpr,
        KEY_NU: tl.constexpr, KEY_WORDS: tl.constexpr,
        KEY_GROUP: tl.constexpr, ANGLE_BITS: tl.constexpr, PAIR_HALF: tl.constexpr,
        VAL_BITS: tl.constexpr, VAL_U: tl.constexpr, VAL_GROUP: tl.constexpr,
        HAS_MASK: tl.constexpr, NATIVE: tl.constexpr, DOT_DTYPE: tl.constexpr,
        KEY_OFFSET: tl.constexpr, VAL_OFFSET: tl.constexpr,
        VAL_FMT: tl.constexpr, kcos, ksin, vcos, vsin, PR_KEY_JOIN: tl.constexpr, PR_VALUE_JOIN: tl.constexpr,
        VAL_UB: tl.constexpr, VAL_WORDS: tl.constexpr, kbook, klut, vbook, vlut, VAL_META: tl.constexpr,
        KEY_LOOKUP: tl.constexpr, VAL_LOOKUP: tl.constexpr, LAZY_RESCALE: tl.constexpr,
    ):
        """The split step with every product transposed (one key group per block): ``s^T = K q^T`` and
        ``o^T = V^T p^T``, so the large dequantized tiles are the register operand of the tensor-core
        products and only the small query / probability tiles (``BLOCK_M`` = GQA group x query
        tokens, padded to 8) go through shared memory.

        Keys: KIVI in whole bytes (code ``K`` of every byte, channels ``u * U + K``, times the
        group-scaled query plus ``q . min``), or polar-rope with four pairs per unit of ``KEY_UB``
        bytes (part ``K`` = pairs ``4 u + K``: ``(x, y)`` decoded in registers, times the query at
        those pairs' x and y channels), or polar-recursive by parts (``polar_recursive_parts``; the
        query rotated), or turbo by parts (``turbo_parts``: code ``K`` of every unit looked up in the
        codebook, times the rotated query at channels ``u * U + K``, times each token's factor). Values:
        KIVI per token in whole bytes or 3-byte units (3-bit codes), or polar-recursive by parts (one
        accumulator per part; ``kcos`` / ``ksin`` / ``vcos`` / ``vsin``: cos / sin tables of the shared
        analytic codebooks), or turbo by parts (one accumulator per code position; ``kbook`` /
        ``vbook``: the codebooks, ``klut`` / ``vlut``: them as ``turbo_parts.lut_words``)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // n_kv_heads
        hkv = pid % n_kv_heads
        start = split * blocks_per_split * BLOCK_N
        DT: tl.constexpr = DOT_DTYPE
        PREC: tl.constexpr = "ieee" if DT == tl.float32 else "tf32"
        NUK: tl.constexpr = KEY_NU
        NUV: tl.constexpr = D // VAL_U
        NJ: tl.constexpr = D // 16  # polar-recursive subtrees
        NACC: tl.constexpr = 2 * NJ if VAL_FMT == 6 else NUV  # rows of one value accumulator

        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < GQA * TQ
        head = hkv * GQA + rows // TQ
        tok = rows % TQ
        q_rows = q_ptr + b.to(tl.int64) * sq_b + head * sq_h + tok * sq_t
        uk = tl.arange(0, NUK)
        uv = tl.arange(0, NUV)
        if KEY_FMT == 2:  # the query at the x / y channels of the pairs of each part: [NUK, BM] each
            qx0, qy0 = _polar_query_t(q_rows, row_ok, uk, 0, D, PAIR_HALF, DT)
            qx1, qy1 = _polar_query_t(q_rows, row_ok, uk, 1, D, PAIR_HALF, DT)
            qx2, qy2 = _polar_query_t(q_rows, row_ok, uk, 2, D, PAIR_HALF, DT)
            qx3, qy3 = _polar_query_t(q_rows, row_ok, uk, 3, D, PAIR_HALF, DT)
        elif KEY_FMT == 6:  # polar-recursive: the rotated query at each part's coordinates, [2 NJ, BM] each
            qp0 = _pr.query_part_t(q_rows, row_ok, 0, NJ, DT)
            qp1 = _pr.query_part_t(q_rows, row_ok, 1, NJ, DT)
            qp2 = _pr.query_part_t(q_rows, row_ok, 2, NJ, DT)
            qp3 = _pr.query_part_t(q_rows, row_ok, 3, NJ, DT)
            qp4 = _pr.query_part_t(q_rows, row_ok, 4, NJ, DT)
            qp5 = _pr.query_part_t(q_rows, row_ok, 5, NJ, DT)
            qp6 = _pr.query_part_t(q_rows, row_ok, 6, NJ, DT)
            qp7 = _pr.query_part_t(q_rows, row_ok, 7, NJ, DT)
        elif KEY_FMT == 3:  # turbo: the rotated query at channels u * U + K, [NUK, BM] each, in DT
            q0 = _tq.query_part_t(q_rows, row_ok, uk, 0, KEY_U, DT)
            q1 = _tq.query_part_t(q_rows, row_ok, uk, 1, KEY_U, DT)
            q2 = _tq.query_part_t(q_rows, row_ok, uk, 2, KEY_U, DT)
            q3 = _tq.query_part_t(q_rows, row_ok, uk, 3, KEY_U, DT)
            q4 = _tq.query_part_t(q_rows, row_ok, uk, 4, KEY_U, DT)
            q5 = _tq.query_part_t(q_rows, row_ok, uk, 5, KEY_U, DT)
            q6 = _tq.query_part_t(q_rows, row_ok, uk, 6, KEY_U, DT)
            q7 = _tq.query_part_t(q_rows, row_ok, uk, 7, KEY_U, DT)
            k_lut = _tq.load_lut(klut)
        else:  # the query, transposed and split by code position K of the packed bytes: [NUK, BM] each
            q0 = tl.load(q_rows[None, :] + (uk * KEY_U)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            q1 = q0
            q2 = q0
            q3 = q0
            if KEY_U >= 2:
                q1 = tl.load(q_rows[None, :] + (uk * KEY_U + 1)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            if KEY_U >= 4:
                q2 = tl.load(q_rows[None, :] + (uk * KEY_U + 2)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
                q3 = tl.load(q_rows[None, :] + (uk * KEY_U + 3)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            q4 = q0
            q5 = q1
            q6 = q2
            q7 = q3
            if KEY_U >= 8:  # (2-bit codes in 16-bit units)
                q4 = tl.load(q_rows[None, :] + (uk * KEY_U + 4)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
                q5 = tl.load(q_rows[None, :] + (uk * KEY_U + 5)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
                q6 = tl.load(q_rows[None, :] + (uk * KEY_U + 6)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
                q7 = tl.load(q_rows[None, :] + (uk * KEY_U + 7)[:, None], mask=row_ok[None, :], other=0.0).to(DT)
            # The key group's scaled query parts and score bias, carried from block to block and
            # recomputed only where a group starts (once per KEY_GROUP // BLOCK_N blocks).
            qs0 = q0
            qs1 = q1
            qs2 = q2
            qs3 = q3
            qs4 = q4
            qs5 = q5
            qs6 = q6
            qs7 = q7
            k_bias = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)

        k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
        v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
        km_base = b.to(tl.int64) * skm_b + hkv.to(tl.int64) * skm_h
        vm_base = b.to(tl.int64) * svm_b + hkv.to(tl.int64) * svm_h
        if HAS_MASK:
            mask_rows = mask_ptr + b.to(tl.int64) * smk_b + head * smk_h + tok * smk_t

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc0 = tl.zeros([NACC, BLOCK_M], tl.float32)
        acc1 = tl.zeros([NACC, BLOCK_M], tl.float32)
        acc2 = tl.zeros([NACC, BLOCK_M], tl.float32)
        acc3 = tl.zeros([NACC, BLOCK_M], tl.float32)
        acc4 = tl.zeros([NACC, BLOCK_M], tl.float32)  # (polar-recursive values: eight parts)
        acc5 = tl.zeros([NACC, BLOCK_M], tl.float32)
        acc6 = tl.zeros([NACC, BLOCK_M], tl.float32)
        acc7 = tl.zeros([NACC, BLOCK_M], tl.float32)
        if KEY_FMT == 6:  # cos / sin of the 2-bit levels' codebooks (the tables are shared: analytic)
            klv2 = _pr.level_values(kcos, ksin, _pr.ENTRY_L2)
            klv3 = _pr.level_values(kcos, ksin, _pr.ENTRY_L3)
            klv4 = _pr.level_values(kcos, ksin, _pr.ENTRY_L4)
        if VAL_FMT == 3:
            v_lut = _tq.load_lut(vlut)
        if VAL_FMT == 6:
            vlv2 = _pr.level_values(vcos, vsin, _pr.ENTRY_L2)
            vlv3 = _pr.level_values(vcos, vsin, _pr.ENTRY_L3)
            vlv4 = _pr.level_values(vcos, vsin, _pr.ENTRY_L4)
        # Per-token metadata: loads that do not feed a product, or gather 16-bit values, are left in the
        # loop by Triton's pipeliner, their latency waited for in every block. Turbo factors are read
        # one block ahead into registers; KIVI value scale / min (VAL_META, ``_value_metadata``) as
        # 16-bit [groups, BN] tiles read where used, which the pipeliner copies ahead (3: one vector
        # per group where the tokens are adjacent in memory, already in the token pairs of the
        # products' operand), as int32 words of two groups that the pipeliner copies ahead (2), as
        # 16-bit [groups, BN] tiles read one block ahead (1), these three broadcast to the units of
        # each group in registers, or gathered per unit where used (0: the fewest registers).
        KIVI_VALUES: tl.constexpr = VAL_FMT != 3 and VAL_FMT != 6
        NGV: tl.constexpr = D // VAL_GROUP if KIVI_VALUES else 1  # value groups per token
        first = start + tl.arange(0, BLOCK_N)
        if KEY_FMT == 3:
            k_factor_next = tl.load(km0 + km_base + first * skm_g, mask=first < n_tokens, other=0.0)
        if VAL_FMT == 3:
            v_factor_next = tl.load(vm0 + vm_base + first * svm_t, mask=first < n_tokens, other=0.0)
        if KIVI_VALUES and VAL_META == 2:  # int32 words of two groups: copied asynchronously by the pipeliner
            v_groups = vm_base + (tl.arange(0, NGV) // 2)[:, None]
            v_half = ((tl.arange(0, NGV) % 2) * 16)[:, None]
        elif KIVI_VALUES and VAL_META == 0:  # gathered per unit where used (fewest registers, latency exposed)
            v_groups = vm_base + ((uv * VAL_U) // VAL_GROUP)[:, None] * svm_g
        elif KIVI_VALUES:  # [groups, BN] tiles: read where used (3, copied ahead by the pipeliner) or a block ahead (1)
            v_groups = vm_base + tl.arange(0, NGV)[:, None] * svm_g
            if VAL_META == 1:
                v_scale_next = tl.load(vm0 + v_groups + first[None, :] * svm_t, mask=(first < n_tokens)[None, :],
                                       other=0.0)
                v_min_next = tl.load(vm1 + v_groups + first[None, :] * svm_t, mask=(first < n_tokens)[None, :],
                                     other=0.0)
        for i in range(BLOCKS_CONST if BLOCKS_CONST > 0 else blocks_per_split):
            n0 = start + i * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_tokens
            ahead = offs_n + BLOCK_N  # the next block's tokens (the next split's first, at the end: still valid)
            if KEY_FMT == 3:
                k_factor = k_factor_next.to(tl.float32)
                k_factor_next = tl.load(km0 + km_base + ahead * skm_g, mask=ahead < n_tokens, other=0.0)
            if VAL_FMT == 3:
                v_factor = v_factor_next.to(tl.float32)
                v_factor_next = tl.load(vm0 + vm_base + ahead * svm_t, mask=ahead < n_tokens, other=0.0)
            if KIVI_VALUES and VAL_META == 0:
                v_scale = tl.load(vm0 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :], other=0.0).to(DT)
                v_min = tl.load(vm1 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :], other=0.0).to(DT)
            elif KIVI_VALUES and VAL_META == 3:
                v_scale = _group_units(tl.load(vm0 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :],
                                               other=0.0).to(DT), NUV)
                v_min = _group_units(tl.load(vm1 + v_groups + offs_n[None, :] * svm_t, mask=n_ok[None, :],
                                             other=0.0).to(DT), NUV)
            elif KIVI_VALUES and VAL_META == 2:
                v_scale = _group_units(_word_halves(tl.load(vm0 + v_groups + offs_n[None, :] * svm_t,
                                                            mask=n_ok[None, :], other=0), v_half, DT), NUV)
                v_min = _group_units(_word_halves(tl.load(vm1 + v_groups + offs_n[None, :] * svm_t,
                                                          mask=n_ok[None, :], other=0), v_half, DT), NUV)
            elif KIVI_VALUES:
                v_scale = _group_units(v_scale_next.to(DT), NUV)
                v_min = _group_units(v_min_next.to(DT), NUV)
                v_scale_next = tl.load(vm0 + v_groups + ahead[None, :] * svm_t, mask=(ahead < n_tokens)[None, :],
                                       other=0.0)
                v_min_next = tl.load(vm1 + v_groups + ahead[None, :] * svm_t, mask=(ahead < n_tokens)[None, :],
                                     other=0.0)
            # ---- transposed scores [BN, BM]
            s_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            if KEY_FMT == 2:  # polar-rope: four parts of NUK pairs, each decoded into (x, y) in registers
                word = load_unit_words(k_base + offs_n[:, None] * sk_t, n_ok[:, None], NUK, KEY_UB, KEY_WORDS)
                mo = km_base + (n0 // KEY_GROUP) * skm_g
                meta_ok = (uk * 0 + n0) < n_tokens  # (surplus blocks of a short last split read no metadata)
                s_t = _polar_key_scores_t(s_t, word, qx0, qy0, qx1, qy1, qx2, qy2, qx3, qy3, km0 + mo, km1 + mo,
                                          km2 + mo, km3 + mo, meta_ok, uk, KEY_BITS, ANGLE_BITS, DT, NATIVE, PREC)
                s_t = s_t * qk_scale
            elif KEY_FMT == 6:  # polar-recursive: eight parts rebuilt level by level from the radii
                if PR_KEY_JOIN == 2:  # [BN, NJ, 1] subtree tiles, leaves [BN, NJ, 2] reshaped
                    ok_k = n_ok[:, None, None]
                    k_rows = k_base + offs_n[:, None, None] * sk_t
                    r_rows = km0 + km_base + offs_n[:, None, None] * skm_g
                    jk = tl.arange(0, NJ)[None, :, None]
                    odd_k = tl.arange(0, 2).to(tl.float32)[None, None, :]
                else:
                    ok_k = n_ok[:, None]
                    k_rows = k_base + offs_n[:, None] * sk_t
                    r_rows = km0 + km_base + offs_n[:, None] * skm_g
                    if PR_KEY_JOIN:  # [BN, NJ] subtree tiles, each part's cos / sin halves joined (wrong on sm_90)
                        jk = tl.arange(0, NJ)[None, :]
                        odd_k = 0.0
                    else:  # [BN, 2 NJ] tiles: column k = 2 j + b1 (each subtree read twice)
                        jk = (tl.arange(0, 2 * NJ) // 2)[None, :]
                        odd_k = (tl.arange(0, 2 * NJ) % 2).to(tl.float32)[None, :]
                radius = tl.load(r_rows + jk * skm_c, mask=ok_k, other=0.0).to(tl.float32)
                w1, b2, b3, c4 = _pr.subtree_codes(k_rows, ok_k, jk, D, sk_c)
                s_t = _pr.key_scores_t(s_t, radius, w1, b2, b3, c4, odd_k, qp0, qp1, qp2, qp3, qp4, qp5, qp6, qp7,
                                       klv2, klv3, klv4, BLOCK_N, NJ, DT, PREC, NATIVE, PR_KEY_JOIN)
                s_t = s_t * qk_scale
            elif KEY_FMT == 3:  # turbo: one product per code position, then each token's factor
                word = _tq.load_units(k_base + offs_n[:, None] * sk_t, n_ok[:, None], uk[None, :], KEY_UB, KEY_WORDS)
                s_t = _tq.key_scores_t(s_t, word, q0, q1, q2, q3, q4, q5, q6, q7, KEY_U, KEY_BITS, k_lut, kbook,
                                       DT, KEY_LOOKUP, PREC)
                s_t = s_t * (k_factor * qk_scale)[:, None]
            else:  # KIVI: code K of every byte times the group-scaled query, plus q . min
                word = tl.load(k_base + offs_n[:, None] * sk_t + uk[None, :], mask=n_ok[:, None], other=0)
                meta = km_base + (n0 // KEY_GROUP) * skm_g + (uk * KEY_U)[:, None] + tl.arange(0, KEY_U)[None, :]
                meta_ok = ((uk * 0 + n0) < n_tokens)[:, None]  # (surplus blocks of a short last split read none)
                k_scale_row = tl.load(km0 + meta, mask=meta_ok, other=0.0)  # (one contiguous row each)
                k_min_row = tl.load(km1 + meta, mask=meta_ok, other=0.0)
                if (i == 0) | (n0 % KEY_GROUP == 0):  # a new key group (or the split's first block)
                    sc0, sc1, sc2, sc3, sc4, sc5, sc6, sc7 = _unit_parts(k_scale_row, KEY_U)
                    mn0, mn1, mn2, mn3, mn4, mn5, mn6, mn7 = _unit_parts(k_min_row, KEY_U)
                    k_bias = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
                    qs0, k_bias = _key_group_part(k_bias, q0, sc0, mn0, 0, KEY_BITS, KEY_UB, BLOCK_N,
                                                  DT, KEY_OFFSET, PREC)
                    if KEY_U >= 2:
                        qs1, k_bias = _key_group_part(k_bias, q1, sc1, mn1, 1, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                    if KEY_U >= 4:
                        qs2, k_bias = _key_group_part(k_bias, q2, sc2, mn2, 2, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                        qs3, k_bias = _key_group_part(k_bias, q3, sc3, mn3, 3, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                    if KEY_U >= 8:
                        qs4, k_bias = _key_group_part(k_bias, q4, sc4, mn4, 4, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                        qs5, k_bias = _key_group_part(k_bias, q5, sc5, mn5, 5, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                        qs6, k_bias = _key_group_part(k_bias, q6, sc6, mn6, 6, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                        qs7, k_bias = _key_group_part(k_bias, q7, sc7, mn7, 7, KEY_BITS, KEY_UB, BLOCK_N,
                                                      DT, KEY_OFFSET, PREC)
                s_t = _kivi_scores_t(k_bias, word, qs0, qs1, qs2, qs3, qs4, qs5, qs6, qs7, KEY_U, KEY_BITS, KEY_UB, DT,
                                     NATIVE, KEY_OFFSET, PREC)
                s_t = s_t * qk_scale
            # ---- online softmax over axis 0 (tokens)
            keep = n_ok[:, None] & row_ok[None, :]
            if HAS_MASK:
                allowed = tl.load(mask_rows[None, :] + (offs_n + mask_offset)[:, None] * smk_n, mask=keep, other=0)
                keep = keep & (allowed != 0)
            s_t = tl.where(keep, s_t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s_t, axis=0))
            if LAZY_RESCALE:  # the running sums rescaled only in blocks where some row's maximum grew
                if tl.max((m_new > m_i).to(tl.int32), axis=0) > 0:
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_safe)
                    l_t = l_t * alpha[None, :]
                    acc0 = acc0 * alpha[None, :]
                    acc1 = acc1 * alpha[None, :]
                    acc2 = acc2 * alpha[None, :]
                    acc3 = acc3 * alpha[None, :]
                    acc4 = acc4 * alpha[None, :]
                    acc5 = acc5 * alpha[None, :]
                    acc6 = acc6 * alpha[None, :]
                    acc7 = acc7 * alpha[None, :]
                    m_i = m_new
                alpha = tl.full([BLOCK_M], 1.0, tl.float32)  # (the products' rescaling folds away)
                m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
                p = tl.exp2(s_t - m_safe[None, :])
                l_t = l_t + p
            else:
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_safe)
                p = tl.exp2(s_t - m_safe[None, :])
                l_t = l_t * alpha[None, :] + p  # summed over tokens once, after the loop
                m_i = m_new
            p_t = p.to(DT)
            if VAL_FMT == 6:  # ---- values, polar-recursive: [NJ, BN] subtree tiles, eight parts
                ok_v = n_ok[None, :]
                if PR_VALUE_JOIN:  # [NJ, BN] subtree tiles, each part's cos / sin halves joined
                    jv = tl.arange(0, NJ)[:, None]
                    odd_v = 0.0
                else:
                    jv = (tl.arange(0, 2 * NJ) // 2)[:, None]
                    odd_v = (tl.arange(0, 2 * NJ) % 2).to(tl.float32)[:, None]
                radius_v = tl.load(vm0 + vm_base + offs_n[None, :] * svm_t + jv * svm_g, mask=ok_v,
                                   other=0.0).to(tl.float32)
                vw1, vb2, vb3, vc4 = _pr.subtree_codes(v_base + offs_n[None, :] * sv_t, ok_v, jv, D, sv_c)
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _pr.value_parts_t(
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, radius_v, vw1, vb2, vb3, vc4, odd_v, p_t, alpha,
                    vlv2, vlv3, vlv4, BLOCK_N, NJ, DT, PREC, NATIVE, PR_VALUE_JOIN)
            elif VAL_FMT == 3:  # ---- values, turbo: [NUV, BN] units, each token's factor on its probabilities
                word_t = _tq.load_units(v_base + offs_n[None, :] * sv_t, n_ok[None, :], uv[:, None], VAL_UB, VAL_WORDS)
                p_v = (p * v_factor[:, None]).to(DT)
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _tq.value_parts_t(
                    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, word_t, p_v, alpha, VAL_U, VAL_BITS, v_lut, vbook,
                    DT, VAL_LOOKUP, PREC)
            else:  # ---- values, KIVI transposed: [NUV, BN] packed units and per-(unit, token) scale / min
                word_t = _tq.load_units(v_base + offs_n[None, :] * sv_t, n_ok[None, :], uv[:, None], VAL_UB, VAL_WORDS)
                acc0 = _value_part_t(acc0, p_t, word_t, v_scale, v_min, alpha, 0, VAL_BITS, VAL_UB, DT, NATIVE,
                                     VAL_OFFSET, PREC)
                if VAL_U >= 2:
                    acc1 = _value_part_t(acc1, p_t, word_t, v_scale, v_min, alpha, 1, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)
                if VAL_U >= 4:
                    acc2 = _value_part_t(acc2, p_t, word_t, v_scale, v_min, alpha, 2, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)
                    acc3 = _value_part_t(acc3, p_t, word_t, v_scale, v_min, alpha, 3, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)
                if VAL_U >= 8:  # (3-bit codes: eight per 3-byte unit)
                    acc4 = _value_part_t(acc4, p_t, word_t, v_scale, v_min, alpha, 4, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)
                    acc5 = _value_part_t(acc5, p_t, word_t, v_scale, v_min, alpha, 5, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)
                    acc6 = _value_part_t(acc6, p_t, word_t, v_scale, v_min, alpha, 6, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)
                    acc7 = _value_part_t(acc7, p_t, word_t, v_scale, v_min, alpha, 7, VAL_BITS, VAL_UB, DT, NATIVE,
                                         VAL_OFFSET, PREC)

        slot = ((b * (n_kv_heads * GQA) + head) * TQ + tok) * total_splits + split_base + split
        tl.store(part_max + slot, m_i, mask=row_ok)
        tl.store(part_sum + slot, tl.sum(l_t, axis=0), mask=row_ok)
        acc_cols = part_acc + slot.to(tl.int64)[None, :] * D  # [1, BM]
        if VAL_FMT == 6:  # part P holds coordinates 16 j + 2 P + b1
            tl.store(acc_cols + _pr.part_channels(0, NJ)[:, None], acc0, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(1, NJ)[:, None], acc1, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(2, NJ)[:, None], acc2, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(3, NJ)[:, None], acc3, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(4, NJ)[:, None], acc4, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(5, NJ)[:, None], acc5, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(6, NJ)[:, None], acc6, mask=row_ok[None, :])
            tl.store(acc_cols + _pr.part_channels(7, NJ)[:, None], acc7, mask=row_ok[None, :])
        else:
            ch = (uv * VAL_U)[:, None]
            tl.store(acc_cols + ch, acc0, mask=row_ok[None, :])
            if VAL_U >= 2:
                tl.store(acc_cols + ch + 1, acc1, mask=row_ok[None, :])
            if VAL_U >= 4:
                tl.store(acc_cols + ch + 2, acc2, mask=row_ok[None, :])
                tl.store(acc_cols + ch + 3, acc3, mask=row_ok[None, :])
            if VAL_U >= 8:  # (eight codes per unit: turbo 1- and 3-bit, KIVI 3-bit)
                tl.store(acc_cols + ch + 4, acc4, mask=row_ok[None, :])
                tl.store(acc_cols + ch + 5, acc5, mask=row_ok[None, :])
                tl.store(acc_cols + ch + 6, acc6, mask=row_ok[None, :])
                tl.store(acc_cols + ch + 7, acc7, mask=row_ok[None, :])
