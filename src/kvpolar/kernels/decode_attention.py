"""Fused split-K decode attention over the packed KV cache (flash-decoding over quantized codes).

Reference: :func:`kvpolar.decode_attention.reference_decode_attention` (same signature, same result
up to rounding). ``fused_decode_attention`` is what the transformers cache calls on CUDA;
``supports(keys, values)`` says which stored formats it handles.

How it runs (Triton kernels in :mod:`kvpolar.kernels.decode_classic` and
:mod:`kvpolar.kernels.decode_transposed`, launched from here; ``LaunchConfig`` in
:mod:`kvpolar.kernels.launch_config`):

1. ``_split_kernel`` (or ``_split_kernel_t``, the transposed form: ``_use_transposed``), grid ``(batch * kv_heads, splits)``: each program takes one KV head of one
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

   It writes a partial ``(max, sum, unnormalised output)`` per split.
2. ``_window_combine_kernel`` (:mod:`kvpolar.kernels.decode_combine`), one program per ``(batch,
   query head, query token)``: attends the row over the full-precision residual window, then merges
   that with the splits into the output; at large batches ``_kv_head_window_combine_kernel`` does
   it with one program per ``(batch, KV head)``, reading the window once for the GQA group
   (``WINDOW_BY_KV_HEAD``). Windows longer than ``MAX_FOLDED_WINDOW`` tokens, and calls of more than
   ``MAX_FOLDED_ROWS`` query rows that the per-KV-head form does not take, get one more launch of the
   split kernel (``none`` format) writing the last split(s), and ``_combine_kernel`` merges.

The number of splits grows until ``batch * kv_heads * splits`` fills one wave of the programs an SM
holds at once (``choose_splits``; for the transposed kernel, counted from its compiled registers and
shared memory, ``programs_per_sm_of``), so batch 1 at 128k tokens fills every SM and no launch ends
in a partly filled second wave; where that one wave would be mostly empty (72 sequences x 8 KV heads
with 2 splits: 73% of the slots), the fewest more splits whose waves are at least
``LaunchConfig.wave_fill`` full (H100: 1.19x for kivi-2 and 1.59x for polar-rope-3 at 72 x 32k).
``describe_launch`` reports the launch a cache gets. Formats that live in a rotated domain (turbo,
polar-recursive; ``decode_formats.rotation_matrix``) never un-rotate a token: rotated keys get the
query rotated once (the residual window keeps the plain query); rotated values accumulate in the
rotated domain. In calls of at most ``MAX_FOLDED_ROWS`` rows the combine kernel un-rotates the packed
splits' merged sum once per row before adding the window's (``ROTATE_IN_COMBINE``); in larger calls the
window's partial outputs are rotated into that domain (one row per query, not per token) and the
combined output is un-rotated once.

Launches: a decode step of an eager ``transformers`` model is bound by host time at small batches,
and Triton's dispatcher binds, specializes and hashes each split kernel's ~90 arguments at every
launch. The packed tokens' launch is bound to the layer's plan, the window's to its shape, the
combine kernels' to their compile-time arguments (``kvpolar.kernels.bound_launch``); from the second
step on they relaunch the compiled kernel with only the per-call arguments replaced (``PER_CALL`` /
``PER_WINDOW``; ``BOUND_LAUNCHES = False`` turns this off). On the H100 binding the split kernels
took a batch-1 call from 219 to 122 us of host time (``benchmarks/launch_cost.py``). Attending the
window in the combine kernel saves one launch per call (two in all for the steady decode state). On
Hopper GPUs the combine kernel is a programmatic dependent launch (``LaunchConfig.dependent_launch``,
:mod:`kvpolar.kernels.dependent_launch`): the split programs let it start at once, so its programs
attend the window while the splits run and wait for the split kernel only to read its partials; at
small batches only (``dependent_launch_policy``: at batch 12 and more, with the window attended per KV
head, it made calls slower).

Stored formats read (any key format with any value format; ``supports`` checks the parameters):
keys: full precision, KIVI per-channel, polar-rope, turbo, fp8, polar-recursive; values: full
precision, KIVI per-token, turbo, fp8, polar-recursive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import torch

from kvpolar.decode_attention import MAX_FUSED_QUERY_ROWS, query_rows_per_kv_head
from kvpolar.kernels import cuda_capability, interpreting
from kvpolar.kernels import decode_formats as formats
from kvpolar.kernels.bound_launch import BoundLaunch, specialization
from kvpolar.kernels.decode_operands import (  # noqa: F401  (KEY_FORMATS .. supports: this module's API too)
    FMT_FULL, FMT_KIVI, FMT_POLAR, KEY_FORMATS, POLAR_PAIR_BITS, VALUE_FORMATS, Operand, byte_stride,
    column_stride, full_operand, key_operand, metadata_strides, packed_unit, refuse_unsupported, row_major,
    supports, tokens_adjacent, unsupported_reason, value_operand,
)
from kvpolar.kernels.launch_config import LaunchConfig
from kvpolar.quantized import QuantizedTensor

try:  # Triton is optional: the PyTorch reference works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

_LOG2E = 1.4426950408889634


# ----- helpers ----------------------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (>= 1): ``triton.next_power_of_2`` without its call
    overhead (several microseconds in Triton 3.9, four calls per decode attention)."""
    return 1 << max(0, n - 1).bit_length()


#: The defaults, made once (a decode step would otherwise build and compare a new one per layer).
_DEFAULT_CONFIG = LaunchConfig()


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fp8_conversion(device: torch.device) -> bool:
    """Whether the compiled classic kernel on ``device`` converts float8 e4m3 in hardware (compute
    capability 8.9 or newer: Ada, Hopper); older GPUs and the interpreter move the bits instead
    (``decode_formats.fp8_to_f16``)."""
    if _interpreting() or device.type != "cuda":
        return False
    return cuda_capability(device) >= (8, 9)


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # interpreter runs: a few splits, so tests exercise the combine step


#: The least tokens per split of the automatic split count (``LaunchConfig.min_split_tokens`` None) where
#: no format asks for fewer (``min_split_tokens_of``).
DEFAULT_MIN_SPLIT_TOKENS = 256


def min_split_tokens_of(cfg: LaunchConfig, key_fmt: int, value_fmt: int) -> int:
    """The least tokens per split of the automatic split count for these key / value format ids: the
    config's ``min_split_tokens`` where given; else one token (so one block: splits are whole blocks)
    where either is polar-recursive, whose 32-token block keeps a warp several times as long as a KIVI
    block's (its loop: about 3600 instructions against 720), so that a small cache at batch 1 is cut
    into as many one-block splits as the wave holds rather than 256-token splits of 8 blocks each
    read in turn (H100, thirty-fourth session, ``benchmarks/results/sweep_splits_small_h100.json``: B=1,
    4k tokens 81.7 -> 49.0 us a call, 124 splits instead of 16; 16k 89.5 -> 73.3 us, 127 instead of
    64); else ``DEFAULT_MIN_SPLIT_TOKENS``, which the launch plan shortens for small launches
    (:func:`least_split_tokens`)."""
    if cfg.min_split_tokens is not None:
        return cfg.min_split_tokens
    return 1 if formats.FMT_POLAR_RECURSIVE in (key_fmt, value_fmt) else DEFAULT_MIN_SPLIT_TOKENS


#: The least tokens per split of launches that splits of the formats' least would leave with fewer than
#: ``FEW_PROGRAMS_PER_SM`` programs per SM (``least_split_tokens``).
SHORT_SPLIT_TOKENS = 128
FEW_PROGRAMS_PER_SM = 2


def least_split_tokens(cfg: LaunchConfig, key_fmt: int, value_fmt: int, tokens: int, programs: int,
                       sms: int) -> int:
    """The least tokens per split the launch plan gives ``choose_splits`` for ``tokens`` packed tokens of
    ``programs`` (sequence, KV head) pairs on ``sms`` SMs: ``min_split_tokens_of``, shortened to
    ``SHORT_SPLIT_TOKENS`` where the config leaves it to the policy and splits of the formats' least
    would launch fewer than ``FEW_PROGRAMS_PER_SM`` programs per SM (``programs * ceil(tokens / least) <
    2 * sms``: batch 1 up to 8k tokens, batch 2 at 4k on the H100). H100, thirty-fifth session
    (``benchmarks/results/sweep_min_split_*_35th.json``), 256 -> 128 tokens: B=1 / 4k kivi-2 20.0 -> 17.2
    us a call, polar-rope-3 23.1 -> 19.2, turbo-3 38.7 -> 33.2; B=1 / 8k 22.9 -> 22.1, 27.2 -> 25.8, 41.9
    -> 37.4; B=2 / 4k 22.9 -> 21.6, 27.3 -> 25.3, 41.9 -> 37.3. Where 256-token splits already launch
    two programs per SM (B=1 / 16k, B=2 / 8k: 512 programs) 128-token ones were 0-3% slower; a 64-token
    least was nowhere faster than 128."""
    least = min_split_tokens_of(cfg, key_fmt, value_fmt)
    if (cfg.min_split_tokens is None and least > SHORT_SPLIT_TOKENS
            and programs * math.ceil(tokens / least) < FEW_PROGRAMS_PER_SM * sms):
        return SHORT_SPLIT_TOKENS
    return least


def choose_splits(tokens: int, programs: int, sms: int, block_n: int, cfg: LaunchConfig) -> tuple[int, int]:
    """(splits, tokens per split) for ``tokens`` tokens and ``programs`` (sequence, KV head) pairs.

    As many splits as fit ONE wave of ``programs_per_sm`` programs per SM (``programs * splits <=
    programs_per_sm * sms``: a second, partly filled wave would cost a whole split's time for a few
    programs), none shorter than ``min_split_tokens`` (None: ``DEFAULT_MIN_SPLIT_TOKENS``; the launch plan
    passes the policy's value, ``least_split_tokens``), so batch 1 at 128k fills the GPU. Where that
    wave is less than ``cfg.wave_fill`` full, the fewest more splits whose waves are that full and
    whose splits keep ``min_wave_split_tokens`` (:func:`fuller_waves`). Under the interpreter tokens per
    split are ``block_n`` times a power of two (its loop count is a compile-time constant: few distinct
    values as caches grow); compiled, any multiple of ``block_n``.
    """
    if tokens <= 0:
        return 0, block_n
    if cfg.num_splits is not None:
        wanted = cfg.num_splits
    else:
        slots = cfg.programs_per_sm * sms
        least = DEFAULT_MIN_SPLIT_TOKENS if cfg.min_split_tokens is None else cfg.min_split_tokens
        wanted = min(max(1, slots // programs), math.ceil(tokens / least))
        wanted = fuller_waves(wanted, programs, slots, tokens // cfg.min_wave_split_tokens, cfg.wave_fill)
    blocks = math.ceil(tokens / block_n)
    per_split_blocks = math.ceil(blocks / max(1, wanted))
    if _interpreting():
        per_split_blocks = _next_pow2(per_split_blocks)
    per_split = per_split_blocks * block_n
    return math.ceil(tokens / per_split), per_split


def wave_fill_of(splits: int, programs: int, slots: int) -> float:
    """How full the waves of ``programs * splits`` programs are on ``slots`` resident programs (1.0:
    every wave full; one wave of half the slots: 0.5; 1.1 waves: 0.55)."""
    launched = programs * splits
    return launched / (math.ceil(launched / slots) * slots)


def fuller_waves(splits: int, programs: int, slots: int, most: int, fill: float) -> int:
    """``splits`` where its waves are at least ``fill`` full (:func:`wave_fill_of`), else the fewest
    more splits, up to ``most``, whose waves are; ``splits`` where none is."""
    if fill <= 0 or wave_fill_of(splits, programs, slots) >= fill:
        return splits
    for more in range(splits + 1, most + 1):
        if wave_fill_of(more, programs, slots) >= fill:
            return more
    return splits


_interpreting = interpreting  # (the module's name for it: benchmarks and tests patch it here)


def _code_offset(dtype: torch.dtype, bits: int) -> float:
    """The constant the kernel's int->float bit trick (``kivi_parts.codes_to``) leaves on every code."""
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
    *,
    residual_length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of ``query`` over packed keys/values plus the residual window, fused.

    Same arguments and result as :func:`kvpolar.decode_attention.reference_decode_attention`
    (the quantizers are accepted for that symmetry; the stored tensors carry what the kernel needs):

    Args:
        query: ``[B, Hq, Tq, D]`` float16/bfloat16/float32 (Tq small: decoding, speculative steps;
            at most ``MAX_FUSED_QUERY_ROWS`` = 256 rows ``Hq / Hkv * Tq`` per KV head).
        keys, values: packed ``[B, Hkv, Tk, D]`` (both or neither); formats: see ``supports``.
        residual_keys, residual_values: ``[B, Hkv, R, D]`` full precision, or None.
        scale: softmax scale.
        attention_mask: bool broadcastable to ``[B, Hq, Tq, Tk + R]``, True = attend; fully
            masked rows give zeros.
        config: launch tuning (block size, warps, stages, splits); None = defaults.
        residual_length: int32 ``[1]`` on the query's device: only the first ``residual_length``
            tokens of ``residual_keys`` / ``residual_values`` (buffers of a fixed size) are attended,
            the count read by the kernel, not the host, so that a CUDA graph can replay the call as
            the window grows (``kvpolar.cache.graphed``). Its value must lie in ``[0, R]`` (not
            checked: reading it would wait for the GPU). Needs the window attended in the kernel that
            merges the splits (``describe_launch``'s ``window`` not "own launch"). A mask then
            covers the buffers' ``R`` columns after the packed ones (those past the length unread).

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
    if query.dim() != 4 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be [B, Hq, Tq, D] float16/bfloat16/float32; got {tuple(query.shape)} {query.dtype}")
    query = formats.last_contiguous(query)  # (the kernels read a query row as D adjacent elements)
    bsz, hq, tq, d = query.shape
    hkv = keys.shape[1] if keys is not None else residual_keys.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hkv}")
    sms = _device_sms(query.device)
    cfg = _with_dependent_launch(config or _DEFAULT_CONFIG, bsz, hkv, sms)
    gqa = hq // hkv
    if query_rows_per_kv_head(query, hkv) > MAX_FUSED_QUERY_ROWS:
        raise ValueError(
            f"query rows per KV head (GQA group {gqa} x {tq} query tokens) = {gqa * tq}; allowed: at "
            f"most {MAX_FUSED_QUERY_ROWS} (one tile). For longer steps dequantize and call SDPA, "
            "as the cache's attention does"
        )
    tk = keys.num_tokens if keys is not None else 0
    r = residual_keys.shape[-2] if residual_keys is not None else 0
    if keys is not None and (tuple(keys.shape[:2]) != (bsz, hkv) or keys.head_dim != d or values.num_tokens != tk):
        raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} do not match query {tuple(query.shape)}")
    if residual_keys is not None and (residual_keys.shape != (bsz, hkv, r, d) or residual_values.shape != (bsz, hkv, r, d)):
        raise ValueError(f"residual keys {tuple(residual_keys.shape)} / values {tuple(residual_values.shape)} "
                         f"must be [B={bsz}, Hkv={hkv}, R, D={d}]")
    n_total = tk + r
    if residual_length is not None:
        _check_residual_length(residual_length, residual_keys, query)
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise ValueError(f"attention_mask must be bool (True = attend); got {attention_mask.dtype}")
        mask = attention_mask.expand(bsz, hq, tq, n_total).view(torch.uint8)

    block_m = max(16, _next_pow2(gqa * tq))
    k_rot, v_rot = formats.rotation_matrix(keys), formats.rotation_matrix(values)  # rotated-domain formats
    # (key operand, value operand, token offset, splits, tokens per split, block_n, query, config, transposed)
    parts = []
    if tk:
        q_packed = _packed_query(query, k_rot)
        plan = _remembered_plan(q_packed, keys, values, mask, scale, cfg)
        parts.append((plan.k_op, plan.v_op, 0, plan.splits, plan.per_split, plan.block_n, q_packed, plan.config,
                      plan.transposed, plan.launch))
    fold_window, by_kv_head, rotate_in_combine = _window_plan(bsz, hq, hkv, tq, r, values, v_rot, sms)
    if residual_length is not None and not fold_window:
        raise ValueError(
            f"residual_length needs the {r}-token window attended in the kernel that merges the splits; this "
            f"call gives it its own launch (windows of at most MAX_FOLDED_WINDOW={MAX_FOLDED_WINDOW} tokens, "
            f"calls of at most MAX_FOLDED_ROWS={MAX_FOLDED_ROWS} query rows or that the per-KV-head form "
            "takes, rotated values of ROTATE_IN_COMBINE's formats)")
    if r and not fold_window:
        block_n = min(cfg.block_n, max(16, _next_pow2(r)))
        splits, per_split = choose_splits(r, bsz * hkv, sms, block_n, _residual_config(cfg))
        parts.append((full_operand(residual_keys), full_operand(residual_values), tk, splits, per_split, block_n,
                      query, cfg, False, _window_launch(query, residual_keys, mask, gqa, block_n, cfg)))
    total_splits = sum(p[3] for p in parts)

    dev = query.device
    # Partial (output, max, sum) per split, ``[B, Hq, Tq, splits(, D)]`` float32 as the kernels index
    # them: one allocation, three flat views, each starting 256 bytes aligned as a separate allocation
    # would (Triton specializes pointers on 16-byte alignment).
    rows = bsz * hq * tq * total_splits
    at_max = -(-rows * d // 64) * 64
    at_sum = at_max + -(-rows // 64) * 64
    part_acc, part_max, part_sum = torch.empty(at_sum + rows, device=dev, dtype=torch.float32).split_with_sizes(
        [at_max, at_sum - at_max, rows])
    base = 0
    for k_op, v_op, offset, splits, per_split, block_n, q_part, part_cfg, transposed, bound in parts:
        bound = bound if BOUND_LAUNCHES else None
        if bound is not None and bound.bound and bound.relaunch(
                (bsz * hkv, splits), _per_call_values(q_part, k_op, v_op, mask, offset, per_split // block_n, base,
                                                      total_splits, part_max, part_sum, part_acc, scale)):
            pass  # the compiled kernel of an earlier call, its per-call arguments replaced
        elif transposed:
            _launch_split_t(q_part, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                            part_max, part_sum, part_acc, scale, gqa, block_n, part_cfg, bound)
        else:
            _launch_split(q_part, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                          part_max, part_sum, part_acc, scale, gqa, block_m, block_n, part_cfg, bound)
        base += splits
    n_packed = parts[0][3] if tk else 0  # splits of the packed tokens (the first ones)
    if v_rot is not None and r and not rotate_in_combine:  # the window's partials into the values' domain
        acc = part_acc[: rows * d].view(bsz, hq, tq, total_splits, d)
        acc[..., n_packed:, :] = acc[..., n_packed:, :] @ v_rot.T
    out_dtype = torch.float32 if v_rot is not None and not rotate_in_combine else query.dtype
    out = torch.empty(bsz, hq, tq, d, device=dev, dtype=out_dtype)
    block_s = _next_pow2(total_splits)
    # (R and the rotated splits' count; the kernel reads neither unless ROTATED)
    rot_args = (v_rot, n_packed) if rotate_in_combine else (part_max, 0)
    combine_grid = (bsz * hq * tq,)
    if fold_window:
        window_block_n = KV_HEAD_WINDOW_BLOCK_N if by_kv_head else WINDOW_BLOCK_N
        window_blocks = -(-r // window_block_n)
        kernel, names = ((_kv_head_window_combine_kernel, _KV_HEAD_WINDOW_COMBINE_ARGUMENTS) if by_kv_head
                         else (_window_combine_kernel, _WINDOW_COMBINE_ARGUMENTS))
        combine_args = _window_combine_arguments(query, residual_keys, residual_values, mask, tk, gqa, scale,
                                                 part_max, part_sum, part_acc, out, total_splits, rot_args,
                                                 window_blocks, hkv if by_kv_head else hq, residual_length)
        kwargs = dict(D=d, BLOCK_S=block_s, BLOCK_N=window_block_n, HAS_MASK=mask is not None,
                      BLOCKS_CONST=window_blocks if _interpreting() else 0, ROTATED=rotate_in_combine,
                      WINDOW_IN_MEMORY=residual_length is not None, num_warps=4 if by_kv_head else WINDOW_WARPS)
        if by_kv_head:
            kwargs.update(BLOCK_M=block_m, DOT_DTYPE=_dot_dtype(query.dtype),
                          ROWS_CONST=gqa * tq if _interpreting() else 0)
            combine_grid = (bsz * hkv,)
    else:
        kernel, names = _combine_kernel, _COMBINE_ARGUMENTS
        combine_args = (part_max, part_sum, part_acc, out, total_splits, *rot_args)
        kwargs = dict(D=d, BLOCK_S=block_s, ROTATED=rotate_in_combine, num_warps=4)
    if parts and _merge_is_dependent(query, cfg, v_rot, r, rotate_in_combine):
        kwargs.update(WAIT_PRIMARY=True, launch_pdl=True)  # (its primary: a split kernel, which lets it start)
    combine = _shared_launch(_COMBINE_LAUNCHES, (dev, kernel, *kwargs.values()), kernel, names) if BOUND_LAUNCHES else None
    if combine is None or not combine.relaunch(combine_grid, combine_args):
        if combine is None:
            kernel[combine_grid](*combine_args, **kwargs)
        else:
            combine.launch(combine_grid, combine_args, kwargs)
    if v_rot is not None and not rotate_in_combine:
        out = (out @ v_rot).to(query.dtype)  # R^T o, once
    return out


#: The policy of ``LaunchConfig.dependent_launch=None``: the merge of the splits is a dependent launch in
#: calls whose (sequence, KV head) pairs number less than ``1 / DEPENDENT_LAUNCH_SM_SHARE`` of the SMs
#: (batches up to 8 with 8 KV heads on an H100's 132 SMs), a plain one in larger calls, where the window
#: is attended by one program per KV head (``WINDOW_BY_KV_HEAD_SM_SHARE``). Measured on the H100
#: (thirty-eighth session, ``benchmarks/results/dependent_launch_policy_h100.json``, one run), us per
#: call, plain -> dependent, kivi-2 / polar-rope-3: batch 1, 4k tokens, 18.0 -> 12.2 / 19.9 -> 14.0; batch
#: 8, 4k: 32.4 -> 29.4 / 38.7 -> 35.5; batch 8, 32k: 109.0 -> 106.3 / 171.0 -> 168.8; but batch 12, 4k:
#: 37.0 -> 53.0 / 47.0 -> 62.4; batch 16, 4k: 42.8 -> 57.4 / 54.5 -> 65.9; batch 16, 32k: 197.9 -> 209.3 /
#: 321.5 -> 331.5; batch 32, 4k: 65.9 -> 72.7 / 95.4 -> 101.1; batch 32, 32k: within 1.2%. With the window
#: attended per query row at those batches (``WINDOW_BY_KV_HEAD`` off, ``dependent_launch_by_row_h100.json``)
#: the dependent launch was the faster one (batch 16, 4k: kivi-2 53.6 -> 49.9), but slower than the
#: per-KV-head window launched plainly.
DEPENDENT_LAUNCH_SM_SHARE = 2


def dependent_launch_policy(batch: int, kv_heads: int, sms: int) -> bool:
    """Whether a call of ``batch`` sequences on ``kv_heads`` KV heads, on a GPU of ``sms`` SMs, merges its
    splits by a dependent launch under ``LaunchConfig(dependent_launch=None)`` (``DEPENDENT_LAUNCH_SM_SHARE``)."""
    return batch * kv_heads * DEPENDENT_LAUNCH_SM_SHARE < sms


@functools.lru_cache(maxsize=64)
def _with_dependent_launch(cfg: LaunchConfig, batch: int, kv_heads: int, sms: int) -> LaunchConfig:
    """``cfg`` with ``dependent_launch`` decided (``dependent_launch_policy`` where it is None)."""
    if cfg.dependent_launch is not None:
        return cfg
    return dataclasses.replace(cfg, dependent_launch=dependent_launch_policy(batch, kv_heads, sms))


def _launching_dependents(query: torch.Tensor, cfg: LaunchConfig) -> dict:
    """The split kernels' keyword that lets a dependent launch of the combine kernel start
    (``LaunchConfig.dependent_launch``, decided by ``_with_dependent_launch``, where
    ``dependent_launch.available``): ``LAUNCH_DEPENDENTS`` = where the split programs signal
    (``LaunchConfig.dependent_launch_signal``); or none."""
    if cfg.dependent_launch is None:  # (an internal caller that skipped _with_dependent_launch)
        raise RuntimeError("the launch's dependent_launch is undecided; pass the config through _with_dependent_launch")
    if not (cfg.dependent_launch and _dependent_launch.available(query.device)):
        return {}
    return {"LAUNCH_DEPENDENTS": _dependent_launch.SIGNAL_AT[cfg.dependent_launch_signal]}


def _merge_is_dependent(query: torch.Tensor, cfg: LaunchConfig, v_rot, r: int, rotate_in_combine: bool) -> bool:
    """Whether the kernel that merges a call's splits is a dependent launch of the split kernel before
    it: where the splits let it start (``_launching_dependents``), unless the host rotates the
    ``r``-token window's partials into the values' domain (``v_rot``) between the two."""
    return bool(_launching_dependents(query, cfg)) and not (v_rot is not None and r and not rotate_in_combine)


def _check_residual_length(residual_length, residual_keys, query) -> None:
    """``fused_decode_attention``'s ``residual_length``: an int32 ``[1]`` tensor on the query's device, with
    a window."""
    if not isinstance(residual_length, torch.Tensor) or residual_length.dtype != torch.int32 \
            or residual_length.numel() != 1 or residual_length.device != query.device:
        got = (f"{residual_length.dtype} {tuple(residual_length.shape)} on {residual_length.device}"
               if isinstance(residual_length, torch.Tensor) else repr(residual_length))
        raise ValueError(f"residual_length must be an int32 tensor of one element on {query.device}; got {got}")
    if residual_keys is None:
        raise ValueError("residual_length was given without a residual window (residual_keys is None)")


def _window_plan(bsz: int, hq: int, hkv: int, tq: int, r: int, values, v_rot, sms: int) -> tuple[bool, bool, bool]:
    """How a call attends its ``r``-token residual window: (folded into the kernel that merges the splits,
    there by one program per KV head rather than per query row, the packed values' partials un-rotated
    there); ``values``: the packed values (None: none), ``v_rot`` their rotation matrix (None: not
    rotated). The limits: ``MAX_FOLDED_WINDOW``, ``MAX_FOLDED_ROWS``, ``WINDOW_BY_KV_HEAD``,
    ``ROTATE_IN_COMBINE``."""
    few_rows = bsz * hq * tq <= MAX_FOLDED_ROWS
    by_kv_head = (WINDOW_BY_KV_HEAD and hq // hkv * tq <= MAX_WINDOW_GROUP_ROWS
                  and bsz * hkv * WINDOW_BY_KV_HEAD_SM_SHARE >= sms)
    rotate_in_combine = v_rot is not None and few_rows and type(values).__name__ in ROTATE_IN_COMBINE
    fold = 0 < r <= MAX_FOLDED_WINDOW and (few_rows or by_kv_head) and (v_rot is None or rotate_in_combine)
    return fold, fold and by_kv_head, rotate_in_combine


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

    k_op: Operand
    v_op: Operand
    transposed: bool
    block_n: int
    splits: int
    per_split: int
    config: LaunchConfig  # with the programs per SM and register cap that were used
    launch: "BoundLaunch | None" = None  # the packed kernel's launch, bound for the steps that reuse the plan


def _packed_plan(query, keys, values, mask, scale, cfg: LaunchConfig) -> _PackedPlan:
    """The launch of the packed tokens (``query``: as the kernel reads it, rotated for rotated formats)."""
    bsz, hq = query.shape[:2]
    hkv = keys.shape[1]
    k_op, v_op = key_operand(keys), value_operand(values)
    query_rows = query_rows_per_kv_head(query, hkv)
    transposed = _use_transposed(k_op, v_op, cfg, query_rows)
    block_n = cfg.block_n
    grouped = k_op.fmt in (FMT_POLAR, FMT_KIVI)
    fixed = formats.fixed_block_n(k_op.fmt, v_op.fmt)  # (polar-recursive: 32 tokens, whatever was asked)
    if fixed is not None and grouped and k_op.group % fixed:
        transposed = False  # (KIVI keys in 16-token groups: the transposed kernel's blocks hold one group)
    if grouped and (k_op.fmt == FMT_POLAR or block_n % k_op.group or transposed):
        block_n = math.gcd(block_n, k_op.group)  # blocks hold one or whole key groups
    if fixed is not None:  # (decode_operands.pair_reason refuses key groups that cannot fill it)
        block_n = fixed
    if k_op.fmt == FMT_POLAR and transposed:
        block_n = min(block_n, _POLAR_T_BLOCK_N)
    if formats.FMT_TURBO in (k_op.fmt, v_op.fmt) and transposed:
        block_n = min(block_n, _TURBO_T_BLOCK_N)
    split_cfg, sms = cfg, _device_sms(query.device)
    if cfg.min_split_tokens is None:
        least = least_split_tokens(cfg, k_op.fmt, v_op.fmt, k_op.tokens, bsz * hkv, sms)
        split_cfg = dataclasses.replace(cfg, min_split_tokens=least)
    if transposed:
        pps, max_registers = transposed_tuning(k_op, v_op, bsz * hkv, split_cfg, sms, query_rows)
        split_cfg = dataclasses.replace(split_cfg, max_registers=max_registers,
                                        value_metadata=value_metadata_policy(k_op, v_op, cfg))
        if cfg.transposed_programs_per_sm is None:  # no more than fit at once: the splits fill one wave
            resident = _transposed_residency(query, k_op, v_op, mask, 0, scale, hq // hkv, block_n, split_cfg)
            pps = min(pps, resident or pps)
        split_cfg = dataclasses.replace(split_cfg, programs_per_sm=pps)
    splits, per_split = choose_splits(k_op.tokens, bsz * hkv, sms, block_n, split_cfg)
    # (the classic kernel's bound arguments keep what ``row_major`` gave: for polar-recursive tensors in
    # the transposed layout a row-major copy, made once per plan instead of once per call)
    kernel = _split_kernel_t if transposed else _split_kernel
    return _PackedPlan(k_op, v_op, transposed, block_n, splits, per_split, split_cfg, BoundLaunch(kernel, PER_CALL))


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
    signature = (tuple(query.shape), query.dtype, query.device, tuple(map(specialization, query.stride())),
                 specialization(query), None if mask is None else
                 (specialization(mask), tuple(map(specialization, mask.stride()))), type(scale), cfg)
    entry = _PLANS.get(keys)
    if entry is not None and entry[0]() is values and entry[1] == signature:
        return entry[2]
    refuse_unsupported(keys, values)  # (once per packed pair: a remembered plan's pair was checked)
    plan = _packed_plan(query, keys, values, mask, scale, cfg)
    _PLANS[keys] = (weakref.ref(values), signature, plan)
    return plan


def describe_launch(query: torch.Tensor, keys: QuantizedTensor, values: QuantizedTensor,
                    config: LaunchConfig | None = None, residual_tokens: int = 0) -> dict:
    """How ``fused_decode_attention`` launches the packed part of this cache (no attention is run;
    on CUDA the kernel may be compiled): ``kernel`` ("transposed" or "classic"), ``block_n``,
    ``splits``, ``tokens_per_split``, ``programs`` (``batch * kv_heads * splits``),
    ``programs_per_sm`` (the one-wave target: the measured policy, capped by how many compiled
    programs fit on an SM), ``max_registers``, ``value_metadata`` and ``kivi_code_units`` (how the
    transposed kernel reads KIVI value metadata and 2- / 4-bit KIVI codes: "halfwords" or "bytes",
    as taken for these tensors; None where neither operand has such codes); and ``window``, how a
    16-bit residual window of ``residual_tokens`` tokens is attended: "by KV head" or "by query row"
    (in the kernel that merges the splits), "own launch" (a split launch of its own), None (no
    window); ``dependent_launch``, whether that merging kernel is a dependent launch that starts
    while the splits run (``LaunchConfig.dependent_launch``). ``query``: ``[B, Hq, Tq, D]``."""
    if keys is None or values is None:
        raise ValueError("describe_launch needs packed keys and values (the residual window alone is not launched this way)")
    if type(residual_tokens) is not int or residual_tokens < 0:
        raise ValueError(f"residual_tokens must be an int >= 0 (tokens in the 16-bit window); got {residual_tokens!r}")
    refuse_unsupported(keys, values)
    if query.dim() != 4 or query.shape[1] % keys.shape[1]:
        raise ValueError(f"query must be [B, Hq, Tq, D] with Hq a multiple of the {keys.shape[1]} KV heads; "
                         f"got {tuple(query.shape)}")
    sms = _device_sms(query.device)
    cfg = _with_dependent_launch(config or _DEFAULT_CONFIG, query.shape[0], keys.shape[1], sms)
    plan = _packed_plan(_packed_query(query, formats.rotation_matrix(keys)), keys, values, None,
                        query.shape[-1] ** -0.5, cfg)
    bsz, hq, tq, _ = query.shape
    v_rot = formats.rotation_matrix(values)
    fold, by_kv_head, rotate_in_combine = _window_plan(bsz, hq, keys.shape[1], tq, residual_tokens, values, v_rot,
                                                       sms)
    window = None if not residual_tokens else "own launch" if not fold else "by KV head" if by_kv_head else "by query row"
    return {"kernel": "transposed" if plan.transposed else "classic", "block_n": plan.block_n,
            "splits": plan.splits, "tokens_per_split": plan.per_split,
            "programs": keys.shape[0] * keys.shape[1] * plan.splits,
            "programs_per_sm": plan.config.programs_per_sm, "max_registers": plan.config.max_registers,
            "value_metadata": plan.config.value_metadata if plan.transposed else None,
            "kivi_code_units": _kivi_reading(plan) if plan.transposed else None, "window": window,
            "dependent_launch": _merge_is_dependent(query, cfg, v_rot, residual_tokens, rotate_in_combine)}


def _kivi_reading(plan: _PackedPlan) -> str | None:
    """How the transposed kernel reads the plan's 2- / 4-bit KIVI codes ("halfwords" where either
    operand is read as 16-bit units), None where it has none."""
    units = [_kivi_code_units(op, plan.config)[1] for op in (plan.k_op, plan.v_op)
             if op.fmt == FMT_KIVI and op.bits in (2, 4)]
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


def transposed_tuning(k_op: Operand, v_op: Operand, programs: int, cfg: LaunchConfig,
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
      ``results/attention_h100_sixth_session.json``, so it keeps 12; both measured before one-wave splits).

    The caps were measured with one query token (GQA 4: row tiles of ``cfg.transposed_rows`` = 8);
    more ``query_rows`` (GQA group x query tokens: speculative decoding) take none. In the sm_90
    compile kivi-2 at 16 rows spills 528 bytes per thread under the 168 cap, 136 without it.
    """
    batched = programs >= _BATCH_PROGRAMS
    kivi_pair = k_op.fmt == FMT_KIVI and v_op.fmt == FMT_KIVI
    bytes_4bit = k_op.bits == 4 and v_op.bits <= 4 and cfg.kivi_code_units == "bytes"
    capped_kivi = kivi_pair and (bytes_4bit or k_op.bits == v_op.bits == 2)
    capped_format = capped_kivi or formats.FMT_TURBO in (k_op.fmt, v_op.fmt)
    fills_wave = k_op.tokens >= min_split_tokens_of(cfg, k_op.fmt, v_op.fmt) * math.ceil(12 * sms / programs)
    pps = 16 if batched and k_op.fmt == FMT_POLAR and v_op.bits == 2 else 12
    if cfg.transposed_programs_per_sm is not None:
        pps = cfg.transposed_programs_per_sm
    max_registers = cfg.max_registers
    if max_registers is None and capped_format and fills_wave and query_rows <= cfg.transposed_rows:
        max_registers = _REGISTER_CAP
    return pps, max_registers


def value_metadata_policy(k_op: Operand, v_op: Operand, cfg: LaunchConfig) -> str:
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
    1.34 / 1.30 / 1.34x). KIVI values of 3-bit codes (3-byte units, the turbo-3 preset's) are gathered
    per unit where used: the group broadcast of the other readings pins their layout to the metadata
    tiles, and each part's values then go to the tensor cores through shared memory (sm_90: 1747 ->
    1470 instructions per block; H100, turbo-3, x fp16 SDPA, tiles -> gather: B=32/32k 1.46 -> 1.91x,
    B=1/128k 1.20 -> 1.47x, ``results/turbo3_value_metadata_h100.json``; gathered one block ahead
    instead, a variant tried once: 1.65x / 1.33x)."""
    if cfg.value_metadata is not None:
        return cfg.value_metadata
    if v_op.fmt == FMT_KIVI and v_op.bits == 3:
        return "gather"
    if v_op.fmt == FMT_KIVI and v_op.meta and tokens_adjacent(v_op.meta[0]):
        return "tiles"
    return "ahead" if k_op.fmt == formats.FMT_TURBO else "words"


def _use_transposed(k_op: Operand, v_op: Operand, cfg: LaunchConfig, query_rows: int = 1) -> bool:
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
    KIVI-2 keys with turbo-4 values 0.043 vs 0.036; at 8k turbo-3 0.103 vs 0.060). So do polar-recursive
    keys or values read by parts (``parts``), whose classic kernel gathers cos / sin tables per element
    and needs row copies of the tokens-adjacent codes: in one H100 grid (``results/attention_h100_b1.json``,
    fifteenth session) the classic kernel took 0.162 ms at B=1 / 4k tokens, the transposed one 0.110 ms
    at 16k and 0.134 ms at 32k. Timed directly on the H200 (sixteenth session,
    ``results/pr_small_h200.json``, transposed vs classic, ms): B=1 / 4k 0.088 vs 0.157, B=1 / 8k
    0.095 vs 0.268, B=2 / 4k 0.097 vs 0.269."""
    kivi_values = v_op.fmt == FMT_KIVI and (8 % v_op.bits == 0 or _kivi3_parts(v_op))
    parts_values = v_op.fmt == formats.FMT_POLAR_RECURSIVE and v_op.parts
    if not (cfg.transposed and cfg.by_parts and (kivi_values or parts_values or _turbo_parts(v_op))):
        return False
    if query_rows > cfg.transposed_max_rows:  # (``query_rows``: GQA group x query tokens)
        return False
    rows = math.prod(k_op.data.shape[:-1])
    table_gathers = formats.FMT_TURBO in (k_op.fmt, v_op.fmt) or any(
        op.fmt == formats.FMT_POLAR_RECURSIVE and op.parts for op in (k_op, v_op))
    if rows < cfg.transposed_min_rows and not table_gathers:
        return False
    if k_op.fmt == formats.FMT_POLAR_RECURSIVE:
        return k_op.parts
    if k_op.fmt == formats.FMT_TURBO:
        return _turbo_parts(k_op)
    if k_op.fmt == FMT_KIVI:
        return 8 % k_op.bits == 0
    if k_op.fmt == FMT_POLAR and k_op.bits in _POLAR_UNIT_BITS:
        head_dim = k_op.data.shape[-1] * 16 // k_op.bits
        return head_dim >= 128 or _interpreting()
    return False


def _turbo_parts(op: Operand) -> bool:
    """Turbo codes the transposed kernel reads by parts: at least 16 units per head vector."""
    if op.fmt != formats.FMT_TURBO:
        return False
    head_dim = op.data.shape[-1] * 8 // op.bits
    return head_dim // _tq.UNITS[op.bits][1] >= 16


def _kivi3_parts(op: Operand) -> bool:
    """3-bit KIVI values the transposed kernel reads by parts (units of 3 bytes, 8 codes): at least 16
    units per head vector."""
    head_dim = op.data.shape[-1] * 8 // 3
    return op.bits == 3 and head_dim // 8 >= 16


def _code_units(op: Operand, cfg: LaunchConfig) -> tuple[torch.Tensor, int, int, bool]:
    """(code pointer tensor, bytes per unit, codes per unit, int16 words) of turbo codes, and of
    KIVI codes in the transposed kernel (16-bit units or whole bytes, ``_kivi_code_units``; 3-byte
    units of 3-bit codes)."""
    if op.fmt == FMT_KIVI and 8 % op.bits == 0:
        return (*_kivi_code_units(op, cfg), False)
    ub, u = _tq.UNITS[op.bits] if op.fmt == formats.FMT_TURBO else packed_unit(op.bits)
    if ub == 3:
        data, _ = _unit_words(op.data, 6)  # 24-bit units, as polar-rope's 6-bit pairs
        return data, ub, u, data is not op.data
    return op.data, ub, u, False


def _kivi_code_units(op: Operand, cfg: LaunchConfig) -> tuple[torch.Tensor, int, int]:
    """(code tensor, bytes per unit, codes per unit) of KIVI codes in whole bytes in the transposed
    kernel: 16-bit units (the bytes viewed as int16) for 2- and 4-bit codes with
    ``kivi_code_units="halfwords"`` where the rows are whole halfwords, at least 16 of them (each
    code position's units fill the tensor-core dimension of 16: head dim >= 128 for 2-bit codes,
    >= 64 for 4-bit), else bytes."""
    ub, u = packed_unit(op.bits)
    if cfg.kivi_code_units == "halfwords" and op.bits in (2, 4) and op.data.shape[-1] >= 32:
        try:
            return op.data.view(torch.int16), 2, 16 // op.bits
        except RuntimeError:  # an odd number of bytes per row, or an odd offset / stride
            pass
    return op.data, ub, u


def _value_metadata(op: Operand, query: torch.Tensor, cfg: "LaunchConfig") -> tuple[tuple[torch.Tensor, ...], int]:
    """(metadata tensors, ``VAL_META`` mode) of KIVI values in the transposed kernel
    (``LaunchConfig.value_metadata``): "tiles" (3): 16-bit [groups, block] tiles read in the block
    that uses them (Triton's pipeliner copies them ahead); "words" (2) views them as int32 words of
    two 16-bit per-(token, group) values, which the pipeliner copies asynchronously, stages ahead,
    where the layout allows (groups adjacent in memory, an even number of them per token, 16-bit
    metadata of the query's dtype, float16 under the interpreter, which has no bfloat16 bitcasts),
    else "tiles" for metadata with its tokens adjacent and "ahead" (1) for any other: 16-bit tiles
    read one block ahead into registers; "gather" (0) gathers them per packed unit where used."""
    mode = cfg.value_metadata or "words"  # (``_packed_plan`` resolves None by ``value_metadata_policy``)
    if op.fmt != FMT_KIVI or mode == "gather":
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


def _turbo_tables(op: Operand, query: torch.Tensor) -> tuple[torch.Tensor, str, int]:
    """(float32 codebook, the lookup programs of ``turbo_parts.lookup_programs``, lookup mode) of turbo
    codes; for other formats any tensor (a pointer slot the kernel does not read) and "". The mode
    (``turbo_parts.part_values``' ``LOOKUP``): 0 under the interpreter (no programs: the kernel gathers
    the codebook from memory), 2 for 4-bit codes of an antisymmetric codebook, else 1."""
    if op.fmt != formats.FMT_TURBO:
        return query, "", 0
    book = op.tables[0]
    if _interpreting():
        return book, "", 0
    mode = 2 if op.bits == 4 and _tq.antisymmetric(book, query.dtype) else 1
    return book, _tq.lookup_programs(book, query.dtype, op.bits, mode), mode


def _launch_split(query, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                  part_max, part_sum, part_acc, scale, gqa, block_m, block_n, cfg, bound=None):
    """Launch ``_split_kernel`` (the classic form) over one packed range of tokens, or the residual
    window, through Triton's dispatcher (``bound``: a ``BoundLaunch`` of it to bind the arguments to)."""
    k_op, v_op = row_major(k_op), row_major(v_op)
    bsz, hq, tq, d = query.shape
    hkv = hq // gqa
    km = k_op.meta + (query,) * (4 - len(k_op.meta))  # unused pointer slots get any tensor
    vm = v_op.meta + (query,) * (2 - len(v_op.meta))
    km_strides = k_op.meta[0].stride()[:3] if k_op.meta else (0, 0, 0)
    vm_strides = metadata_strides(v_op.meta[0]) if v_op.meta else (0, 0, 0, 0)
    k_unit = packed_unit(k_op.bits) if k_op.fmt != FMT_FULL else (1, 1)
    v_unit = packed_unit(v_op.bits) if v_op.fmt != FMT_FULL else (1, 1)
    args = (
        query, *query.stride()[:3],
        k_op.data, *k_op.data.stride()[:3], *km, *km_strides,
        v_op.data, *v_op.data.stride()[:3], *vm, *vm_strides,
        *_mask_arguments(mask, query),
        part_max, part_sum, part_acc,
        k_op.tokens, offset, per_split // block_n, base, total_splits, hkv,
        scale * _LOG2E,
    )
    kwargs = dict(
        D=d, GQA=gqa, TQ=tq, BLOCK_M=block_m, BLOCK_N=block_n, BLOCKS_CONST=per_split // block_n if _interpreting() else 0,
        KEY_FMT=k_op.fmt, KEY_BITS=k_op.bits, KEY_UB=k_unit[0], KEY_U=k_unit[1], KEY_GROUP=k_op.group,
        ANGLE_BITS=k_op.angle_bits, PAIR_HALF=k_op.pair_half,
        VAL_FMT=v_op.fmt, VAL_BITS=v_op.bits, VAL_UB=v_unit[0], VAL_U=v_unit[1], VAL_GROUP=v_op.group,
        HAS_MASK=mask is not None, NATIVE=not _interpreting(),
        DOT_DTYPE=_dot_dtype(query.dtype),
        KEY_OFFSET=_code_offset(query.dtype, k_op.bits), VAL_OFFSET=_code_offset(query.dtype, v_op.bits),
        PARTS=cfg.by_parts, FP8_CONVERT=_fp8_conversion(query.device),
        **{"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **formats.launch_overrides(k_op.fmt, v_op.fmt)},
        **formats.kernel_args(k_op, v_op, query), **_launching_dependents(query, cfg),
    )
    if bound is None:
        _split_kernel[(bsz * hkv, splits)](*args, **kwargs)
    else:
        bound.launch((bsz * hkv, splits), args, kwargs)


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
    if k_op.fmt == FMT_POLAR:  # four pairs per unit of bits/2 bytes, read as one word where possible
        k_data, k_ub = _unit_words(k_op.data, k_op.bits)
        k_u, k_nu, k_words = 4, d // 8, k_data is not k_op.data
        k_data, k_words = _three_byte_reading(k_op.data, k_data, k_ub, k_words, cfg)
    elif k_op.fmt in (formats.FMT_TURBO, FMT_KIVI):
        k_data, k_ub, k_u, k_words = _code_units(k_op, cfg)
        k_nu = d // k_u
        k_data, k_words = _three_byte_reading(k_op.data, k_data, k_ub, k_words, cfg)
    else:  # polar-recursive by parts: bytes
        k_data, (k_ub, k_u) = k_op.data, packed_unit(k_op.bits)
        k_nu, k_words = d // k_u, False
    if v_op.fmt in (formats.FMT_TURBO, FMT_KIVI):
        v_data, v_ub, v_u, v_words = _code_units(v_op, cfg)
        v_data, v_words = _three_byte_reading(v_op.data, v_data, v_ub, v_words, cfg)
    else:
        v_data, (v_ub, v_u), v_words = v_op.data, packed_unit(v_op.bits), False
    k_book, k_programs, k_lookup = _turbo_tables(k_op, query)
    v_book, v_programs, v_lookup = _turbo_tables(v_op, query)
    km = k_op.meta + (query,) * (4 - len(k_op.meta))
    v_meta, v_meta_mode = _value_metadata(v_op, query, cfg)
    vm = v_meta + (query,) * (2 - len(v_meta))
    k_tab = k_op.tables[:2] if k_op.fmt == formats.FMT_POLAR_RECURSIVE else (query, query)
    v_tab = v_op.tables[:2] if v_op.fmt == formats.FMT_POLAR_RECURSIVE else (query, query)
    extra = {}
    if cfg.max_registers is not None and not _interpreting():
        extra["maxnreg"] = cfg.max_registers
    args = (
        query, *query.stride()[:3],
        k_data, *k_data.stride()[:3], byte_stride(k_op), *km, *k_op.meta[0].stride()[:3], column_stride(k_op),
        v_data, *v_data.stride()[:3], byte_stride(v_op), *vm, *metadata_strides(v_meta[0]),
        *_mask_arguments(mask, query),
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
        VAL_FMT=v_op.fmt, kcos=k_tab[0], ksin=k_tab[1], vcos=v_tab[0], vsin=v_tab[1], PR_KEY_JOIN=_pr.KEY_SUBTREES.value if cfg.polar_recursive_keys == "subtrees" else _pr.KEY_JOIN,
        PR_VALUE_JOIN=_pr.VALUE_JOIN,
        VAL_UB=v_ub, VAL_WORDS=v_words, kbook=k_book, KEY_PROGRAMS=k_programs, vbook=v_book,
        VAL_PROGRAMS=v_programs,
        KEY_LOOKUP=k_lookup, VAL_LOOKUP=v_lookup, LAZY_RESCALE=cfg.lazy_rescale,
        KIVI_BIAS_LAST=cfg.kivi_key_bias == "last",
        VAL_MIN_PRODUCT=cfg.kivi_value_min == "product" and v_op.fmt == FMT_KIVI and v_op.bits <= 4,
        num_warps=cfg.transposed_warps, num_stages=cfg.transposed_stages, **extra, **_launching_dependents(query, cfg),
    )
    return args, kwargs


def _launch_split_t(query, k_op, v_op, mask, offset, splits, per_split, base, total_splits,
                    part_max, part_sum, part_acc, scale, gqa, block_n, cfg, bound=None):
    """Launch ``_split_kernel_t`` (see ``_use_transposed``) over one packed range of tokens through
    Triton's dispatcher (``bound``: a ``BoundLaunch`` of it to bind the arguments to)."""
    args, kwargs = _split_t_arguments(query, k_op, v_op, mask, offset, per_split // block_n, base, total_splits,
                                      part_max, part_sum, part_acc, scale, gqa, block_n, cfg)
    grid = (query.shape[0] * (query.shape[1] // gqa), splits)
    if bound is None:
        _split_kernel_t[grid](*args, **kwargs)
    else:
        bound.launch(grid, args, kwargs)


#: Whether decode launches skip Triton's dispatcher where they can (``kvpolar.kernels.bound_launch``):
#: a layer's packed-token kernel with the arguments of its previous step, the window's kernel with
#: those of an earlier step of the same shape, the combine kernels with those of an earlier call of the
#: same compile-time arguments, only the per-call values changed (``PER_CALL`` / ``PER_WINDOW``;
#: every runtime argument of the combine kernels). False: every launch through ``kernel[grid](...)``.
BOUND_LAUNCHES = True
#: The split kernels' arguments that change from one call to the next over the same packed tensors:
#: the query, the mask, the partial outputs, the splits' place among all, the scale.
PER_CALL = ("q_ptr", "sq_b", "sq_h", "sq_t", "mask_ptr", "smk_b", "smk_h", "smk_t", "smk_n",
            "part_max", "part_sum", "part_acc", "mask_offset", "blocks_per_split", "split_base", "total_splits",
            "qk_scale")
#: ... and over a new residual window of the same shape: its tensors, token count and position too.
PER_WINDOW = PER_CALL + ("k_ptr", "sk_b", "sk_h", "sk_t", "v_ptr", "sv_b", "sv_h", "sv_t", "n_tokens")
#: Bound launches of the residual window's kernel, by what its other arguments depend on (``_window_launch``).
_WINDOW_LAUNCHES: dict[tuple, BoundLaunch] = {}


def _window_launch(query, residual_keys, mask, gqa, block_n, cfg) -> "BoundLaunch":
    """The bound launch of the residual window's classic kernel for this query shape and dtype, window
    dtype, mask presence, block and config (the window itself, its length and position vary)."""
    key = (query.device, query.dtype, query.shape[1:], residual_keys.dtype, mask is None, gqa, block_n, cfg)
    return _shared_launch(_WINDOW_LAUNCHES, key, _split_kernel, PER_WINDOW)


#: Bound launches of the combine kernels (``_combine_kernel``, ``_window_combine_kernel``), by device
#: and compile-time arguments (every runtime argument varies).
_COMBINE_LAUNCHES: dict[tuple, BoundLaunch] = {}
_COMBINE_ARGUMENTS = ("part_max", "part_sum", "part_acc", "out_ptr", "n_splits", "rot_ptr", "n_rotated")
_WINDOW_COMBINE_ARGUMENTS = _COMBINE_ARGUMENTS + (
    "q_ptr", "sq_b", "sq_h", "sq_t", "k_ptr", "sk_b", "sk_h", "sk_t", "v_ptr", "sv_b", "sv_h", "sv_t",
    "mask_ptr", "smk_b", "smk_h", "smk_t", "smk_n",
    "n_window", "n_window_ptr", "window_blocks", "mask_offset", "n_heads", "gqa", "n_query", "qk_scale")
#: Residual windows of at most ``MAX_FOLDED_WINDOW`` tokens, in calls of at most ``MAX_FOLDED_ROWS``
#: query rows (batch x query heads x query tokens) or in calls the per-KV-head form takes
#: (``WINDOW_BY_KV_HEAD``: it reads each KV head's window once, as the window's own launch does), are
#: attended in the combine kernel's programs (``decode_combine._window_combine_kernel`` or
#: ``_kv_head_window_combine_kernel``: one launch fewer per call). In calls of at most
#: ``MAX_FOLDED_ROWS`` rows, values stored
#: in a rotated domain (polar-recursive, turbo) have their packed partials un-rotated by the combine
#: kernel itself (``ROTATE_IN_COMBINE``, ``ROTATED``: two matrix products fewer on the host side); beyond
#: ``MAX_FOLDED_ROWS`` rows, where the GPU's time counts, two small matrix products do it (each row
#: program would read all of ``R``) and the window of such values gets its own launch.
#: Other windows get their own split launch, which reads each KV head's
#: window once rather than once per query head and splits long windows (>= 1024 tokens a split,
#: ``_residual_config``). Measured (benchmarks/README.md, twenty-fourth session), 32k tokens, 70-token
#: window: folding saved 27 us of host time per call (H100) and made 32-layer decode steps of the
#: 8B-shaped model 1.06-1.09x faster at batch 1 and 4 (H100) and 1.06x at 16 and 32 (H200), where the
#: step is bound by host time; by query row it added GPU time per call, 3-4 us at batch 1 and 12-16 us
#: (3-4%) at batch 32, which the per-KV-head form removes at batch 32 (``WINDOW_BY_KV_HEAD``).
MAX_FOLDED_WINDOW = 512
MAX_FOLDED_ROWS = 1024
#: Stored value formats (class names) whose rotated-domain partials the combine kernel un-rotates in
#: calls of at most ``MAX_FOLDED_ROWS`` rows, their window folded too; values of a format not named here
#: take two matrix products on the host side and the window's own launch (an empty set: as before the
#: twenty-sixth session, for A/B runs). Measured end to end on the H100 (twenty-sixth session,
#: ``benchmarks/bound_launch_steps.py --switch rotate``, 32 layers, 32k tokens, alternated blocks):
#: polar-recursive 1.13-1.15x tokens/s at batch 1 and 1.26x at 4. Turbo values take the same path (the
#: turbo presets store KIVI values, so their rows of that run, 0.94-1.00x, timed one path twice: the
#: run's noise).
ROTATE_IN_COMBINE: frozenset[str] = frozenset({"PolarRecursiveTensor", "TurboTensor"})
_KV_HEAD_WINDOW_COMBINE_ARGUMENTS = tuple("n_kv_heads" if name == "n_heads" else name
                                          for name in _WINDOW_COMBINE_ARGUMENTS)
#: A folded window is attended by one program per KV head for all its ``gqa * Tq`` query rows
#: (``_kv_head_window_combine_kernel``: the window read once per KV head, tile products) where those
#: rows are at most ``MAX_WINDOW_GROUP_ROWS`` and the programs (batch x KV heads) number at least
#: ``1 / WINDOW_BY_KV_HEAD_SM_SHARE`` of the SMs; by one program per query row otherwise, or with
#: ``WINDOW_BY_KV_HEAD`` off. Measured on the H100 (twenty-seventh session, 32 / 8 heads, 128-token
#: window, ``benchmarks/results/window_*_h100.json``): at batch 32, 32k tokens, kivi-2 0.390 ms by KV head
#: against 0.409 by query row (0.388 with the window's own launch); at batch 8 the two within 1%; at
#: batch 1 (8 programs, each merging four rows' splits in turn) by KV head 0.079 ms against 0.072 at 128k.
WINDOW_BY_KV_HEAD = True
WINDOW_BY_KV_HEAD_SM_SHARE = 2
MAX_WINDOW_GROUP_ROWS = 64
#: Window tokens per step of ``_window_combine_kernel``'s loop and warps of its programs (one query
#: row each): a 128-token window in one step, since at small batches each program's step waits for its
#: loads. Measured on the H100 (thirty-second session, ``benchmarks/window_fold_variants.py``,
#: ``benchmarks/results/window_fold_variants_h100.json``), kivi-2, us per call, 32 tokens x 4 warps ->
#: 128 x 8: B=1 / 4k 22.4 -> 20.5, B=1 / 32k 31.8 -> 30.2, B=8 / 32k 109.8 -> 110.5.
WINDOW_BLOCK_N = 128
WINDOW_WARPS = 8
#: Window tokens per step of ``_kv_head_window_combine_kernel``'s loop (4 warps): 128 there took 136 KB
#: of shared memory (37 KB at 32; sm_90 compile) for a time within noise at B=32 / 32k (374.0 -> 369.7 us).
KV_HEAD_WINDOW_BLOCK_N = 32


def _mask_arguments(mask: torch.Tensor | None, stand_in: torch.Tensor) -> tuple:
    """The kernels' mask arguments: the uint8 mask ``[B, Hq, Tq, N]`` and its four strides, or (no
    mask) ``stand_in`` in the pointer slot, which the kernel does not read, and strides of 0."""
    return (stand_in, 0, 0, 0, 0) if mask is None else (mask, *mask.stride())


def _window_combine_arguments(query, residual_keys, residual_values, mask, mask_offset, gqa, scale, part_max,
                              part_sum, part_acc, out, n_splits, rot_args, window_blocks, heads,
                              residual_length=None) -> tuple:
    """The runtime arguments of ``_window_combine_kernel`` (``_WINDOW_COMBINE_ARGUMENTS``, in order;
    ``rot_args``: its ``rot_ptr`` and ``n_rotated``; ``heads``: the query heads) or of
    ``_kv_head_window_combine_kernel`` (``_KV_HEAD_WINDOW_COMBINE_ARGUMENTS``; ``heads``: the KV heads);
    ``residual_length``: the window's length in memory (None: all of the buffers' tokens; the query
    stands in the pointer's slot, unread)."""
    tq = query.shape[2]
    rk, rv = formats.last_contiguous(residual_keys), formats.last_contiguous(residual_values)
    sq, sk, sv = query.stride(), rk.stride(), rv.stride()
    return (part_max, part_sum, part_acc, out, n_splits, *rot_args, query, sq[0], sq[1], sq[2], rk, sk[0], sk[1], sk[2],
            rv, sv[0], sv[1], sv[2], *_mask_arguments(mask, query), rk.shape[2],
            query if residual_length is None else residual_length, window_blocks, mask_offset, heads,
            gqa, tq, scale * _LOG2E)


def _shared_launch(launches: dict, key: tuple, kernel, varying: tuple[str, ...]) -> BoundLaunch:
    """The ``BoundLaunch`` of ``launches`` under ``key``, made on first use (at most 256 kept: each holds
    a few small tensors of its first call in argument slots the kernel does not read)."""
    launch = launches.get(key)
    if launch is None:
        if len(launches) >= 256:
            launches.clear()
        launch = launches[key] = BoundLaunch(kernel, varying)
    return launch


def _per_call_values(query, k_op, v_op, mask, offset, blocks, base, total_splits, part_max, part_sum, part_acc,
                     scale) -> tuple:
    """The ``PER_CALL`` values of a split launch, then (for the residual window, ``FMT_FULL`` operands)
    the rest of ``PER_WINDOW``; what ``_split_t_arguments`` / ``_launch_split`` pass for them."""
    sq = query.stride()
    values = (query, sq[0], sq[1], sq[2], *_mask_arguments(mask, query), part_max, part_sum, part_acc, offset,
              blocks, base, total_splits, scale * _LOG2E)
    if k_op.fmt != FMT_FULL:
        return values
    sk, sv = k_op.data.stride(), v_op.data.stride()
    return values + (k_op.data, sk[0], sk[1], sk[2], v_op.data, sv[0], sv[1], sv[2], k_op.tokens)


#: Programs of the compiled transposed kernel resident on one SM, by launch signature (``_resident_key``).
_RESIDENT: dict[tuple, int] = {}


def _resident_key(args: tuple, kwargs: dict, device: torch.device) -> tuple:
    """What selects one compiled ``_split_kernel_t``: how each runtime argument is specialized
    (``bound_launch.specialization``; ``blocks_per_split`` and ``total_splits`` are not) and the compile-time
    arguments themselves. Launches of one preset whose strides differ in divisibility by 16 compile
    to different register counts (H100: polar-rope-4's kernel, first compiled for a 2001-token
    cache, gave its residency to a 32k one and 4 splits instead of 6, 1.31x instead of 1.49x,
    ``results/registers3_h100.json``)."""
    tensor = torch.Tensor
    return (tuple(map(specialization, args)) + tuple(kwargs)
            + tuple(specialization(v) if isinstance(v, tensor) else v for v in kwargs.values()) + (device,))


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


# ----- Triton kernels (decode_classic, decode_transposed) and the format helpers the launches use -------------
if triton is not None:
    from kvpolar.kernels import dependent_launch as _dependent_launch
    from kvpolar.kernels import polar_recursive_parts as _pr
    from kvpolar.kernels import turbo_parts as _tq
    from kvpolar.kernels.decode_classic import _split_kernel
    from kvpolar.kernels.decode_combine import _combine_kernel, _kv_head_window_combine_kernel, _window_combine_kernel
    from kvpolar.kernels.decode_transposed import _split_kernel_t
    from kvpolar.kernels.polar_pairs import UNIT_PAIR_BITS as _POLAR_UNIT_BITS
    from kvpolar.kernels.polar_pairs import unit_words as _unit_words
