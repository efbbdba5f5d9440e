"""``LaunchConfig``: how the fused decode attention launches its kernels (blocks, warps, splits, the
transposed kernel's tuning and readings). The policy that fills in what a config leaves open, and
the launches themselves: :mod:`kvpolar.kernels.decode_attention`."""

from __future__ import annotations

import dataclasses

from kvpolar.quantizers.rotations import is_power_of_two


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Tuning knobs (defaults tuned on an H100; see benchmarks/bench_attention.py).

    block_n: tokens per inner step (capped by the key group size, which it must divide).
    num_splits: splits of the packed tokens per (sequence, KV head); None = from the SM count.
    programs_per_sm: target of the automatic split count.
    min_split_tokens: no split gets fewer tokens than this (automatic split count); None = the
        policy (``decode_attention.least_split_tokens``): 256, or one block where a polar-recursive
        tensor is read, whose 32-token block keeps a warp several times as long as a KIVI block's;
        128 where 256-token splits would launch fewer than 2 programs per SM (small caches at
        batch 1 and 2).
    wave_fill: the automatic split count fills one wave of ``programs_per_sm`` programs per SM; where
        that wave would be less than ``wave_fill`` full (72 sequences x 8 KV heads = 576 programs per
        split against 12 x 132 = 1584 slots: 2 splits fill 73%), it takes the fewest more splits whose
        waves are at least that full (5 splits: 2880 programs in 2 waves, 91%), if their splits keep
        ``min_wave_split_tokens``; 0 = always one wave.
    min_wave_split_tokens: the least tokens per split of a launch of more than one wave (short splits
        cost their programs' start and the merge more than a fuller wave saves).
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
        tokens; see ``_use_transposed``). Turbo keys or values and polar-recursive ones read by parts take
        the transposed kernel at every size (the classic kernel reads their codebooks per element).
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
    kivi_key_bias: where the transposed kernel adds a KIVI key group's score bias (``q . min`` and the
        codes' offset, two chained products per code position, 16 for 2-bit codes, each waiting for the scaled query's trip
        through shared memory): "last" (added after the key products, the two chains side by side;
        sm_90 compile, kivi-2: 721 instructions per block) or "first" (the first key product's
        accumulator, so the 8 key products wait for the whole bias chain; 709). Measured on the H200
        (sixteenth session, ``benchmarks/results/kivi_step_h200_r*.json``, three runs), first -> last at
        B=32 / 32k tokens: kivi-2 0.391-0.396 -> 0.382-0.387 ms, squat-2 0.393-0.394 -> 0.383-0.384,
        kivi-4 0.439-0.442 -> 0.435; B=8 / 32k: kivi-2 0.115 -> 0.112; kivi-8 unchanged (0.634 /
        0.636); hence the default.
    kivi_value_min: how the transposed kernel applies KIVI values' per-token minimum (values of at
        most 4 bits; 8-bit values always take "elementwise"): "elementwise" (each code pair
        dequantized as ``(code - offset) * scale + min`` by two half-precision operations before its
        product) or "product" (the minimum as one more tensor-core product per block, ``min [units,
        block] @ p``, into its own accumulator; each code pair then takes one fused multiply-add,
        ``fma(offset + code * step, F * scale, -offset * F * scale)`` = ``code * step * F * scale``
        rounded once, and each code position's sums are multiplied by ``1 / (step * F)`` after the
        loop; ``kivi_parts.value_fma_factor``). sm_90 compile at B=32 / 32k, instructions per block:
        kivi-2 721 -> 683, kivi-4 818 -> 798, polar-rope-3 (2-bit KIVI values) 1599 -> 1550. In
        float16, ``F`` = ``2**-5``: a group whose scale exceeds 2047 (a 2-bit group spanning more
        than 6141) overflows to inf, and below a scale of ``2**-9`` each value is off by at most
        ``code * 2**-20``. Timed on the H100 (eighteenth session, two runs,
        ``benchmarks/results/kivi_value_min_h100_r*.json``), elementwise -> product at B=32 / 32k:
        kivi-2 0.388 / 0.382 -> 0.384 / 0.384 ms, squat-2 0.390 / 0.391 -> 0.385 / 0.386, kivi-4
        unchanged (0.512), polar-rope-3 0.644 / 0.640 -> 0.624 / 0.630; B=1 / 128k: 1% faster.
        At most 3% for the float16 range and small-value precision it gives up, hence not the default.
    polar_recursive_keys: how the transposed kernel builds polar-recursive key parts (the paper's
        setting, ``polar_recursive_parts``): "subtrees" (``[block, D/16, 1]`` tiles for the levels
        above the leaves, once per subtree, the leaves ``[block, D/16, 2]`` reshaped into the part:
        sm_90 compile 4448 -> 3695 instructions per block, B=32 / 32k) or "columns" (``[block,
        2 D/16]`` tiles, column ``2 j + b1``: the levels above the leaves computed once per column,
        so twice per subtree). Both checked on the H100 (fifteenth session,
        ``benchmarks/results/pr_layout_h100.json``: fp16, bf16 ragged, 3 query tokens), where
        "subtrees" took 2.49 ms against 2.91 ms for "columns" at B=32 / 32k (0.56x / 0.48x fp16
        SDPA), hence the default.
    transposed_rows: at least this many query rows (GQA group x query tokens, padded to a power of
        two) in the transposed kernel's products (the MMA's N dimension is 8).
    transposed_max_rows: at most this many query rows per KV head (GQA group x query tokens) take the
        transposed kernel; more (a draft verification step of speculative or assisted decoding)
        take the classic kernel, whose warps share the rows. The transposed kernel's single warp
        holds every row's running output: in the sm_90 compile (``benchmarks/inspect_preset_kernel.py
        --query-tokens``, GQA 4) 16 rows spill at most 0.2 KB per thread, 20 rows up to 0.9 KB and 84
        rows (20 draft tokens) 4-11 KB, against at most 0.2 KB for the classic kernel at 84 rows
        (turbo-3: 1 KB). Timed on the H200 (sixteenth session, ``benchmarks/bench_verify_step.py``,
        ``benchmarks/results/verify_step_h200.json``, B=8, 32k tokens, us, transposed vs classic):
        4 query tokens (16 rows) kivi-2 222 vs 293, polar-rope-3 248 vs 481; 8 tokens (32 rows) 690 vs
        654 and 908 vs 818; 21 tokens (84 rows) 16182 vs 781 and 23107 vs 986. Hence 16.
    dependent_launch: on GPUs of compute capability 9.0 or later (Hopper), whether the kernel that
        merges the splits (and attends a folded window) is a programmatic dependent launch: the split
        programs let it start at once, its programs attend the window as SM slots free up and wait
        for the split kernel only before reading its partials (``kvpolar.kernels.dependent_launch``).
        True: always; False: the plain launch after the split kernel has ended; None: the measured
        policy of ``decode_attention.dependent_launch_policy`` (dependent at small batches, where it
        made calls up to 1.48x as fast on the H100, plain at large ones, where it made them up to 1.43x
        slower).
        Ignored elsewhere and under Triton's interpreter.
    dependent_launch_signal: where the split programs of a dependent launch signal that the merge may
        launch: "start" (at their start: the merge's programs take SM slots as they free up and attend
        the window while the splits run) or "after-loop" (after their block loop, before they write their
        partials: the merge launches once every split program has read its blocks, and its programs
        find most SMs free). Measured on the H100 (thirty-eighth session,
        ``benchmarks/results/dependent_launch_signal_h100.json``, us per call, plain launch / dependent
        signalled at the start / after the loop): kivi-2 at batch 1, 4k tokens 17.3 / 12.3 / 17.7; batch 8,
        4k 31.8 / 29.4 / 31.2; batch 16, 4k 43.2 / 58.0 / 42.9; batch 32, 4k 66.0 / 73.0 / 65.6; batch 16,
        32k 199.9 / 211.4 / 198.7. After the loop the large batches' loss is gone, but so is the small
        batches' gain, and over the plain launch it gained within the run's noise (two identical
        configurations differed by 1.8%); hence "start", with ``dependent_launch_policy`` keeping large
        batches plain.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None
    programs_per_sm: int = 4
    min_split_tokens: int | None = None
    wave_fill: float = 0.9
    min_wave_split_tokens: int = 2048
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
    kivi_key_bias: str = "last"
    kivi_value_min: str = "elementwise"
    polar_recursive_keys: str = "subtrees"
    dependent_launch: bool | None = None
    dependent_launch_signal: str = "start"

    def __post_init__(self) -> None:
        if not (is_power_of_two(self.block_n) and self.block_n >= 16):
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
        if not (self.dependent_launch is None or isinstance(self.dependent_launch, bool)):
            raise ValueError(f"dependent_launch={self.dependent_launch!r} (allowed: None, True, False)")
        if self.dependent_launch_signal not in ("start", "after-loop"):
            raise ValueError(f"dependent_launch_signal={self.dependent_launch_signal!r} (allowed: 'start', 'after-loop')")
        if self.value_metadata not in (None, "tiles", "words", "ahead", "gather"):
            raise ValueError(f"value_metadata={self.value_metadata!r} "
                             "(allowed: None, 'tiles', 'words', 'ahead', 'gather')")
        if self.three_byte_units not in ("halfwords", "words"):
            raise ValueError(f"three_byte_units={self.three_byte_units!r} (allowed: 'halfwords', 'words')")
        if self.kivi_code_units not in ("bytes", "halfwords"):
            raise ValueError(f"kivi_code_units={self.kivi_code_units!r} (allowed: 'bytes', 'halfwords')")
        if self.kivi_key_bias not in ("first", "last"):
            raise ValueError(f"kivi_key_bias={self.kivi_key_bias!r} (allowed: 'first', 'last')")
        if self.kivi_value_min not in ("elementwise", "product"):
            raise ValueError(f"kivi_value_min={self.kivi_value_min!r} (allowed: 'elementwise', 'product')")
        if self.polar_recursive_keys not in ("columns", "subtrees"):
            raise ValueError(f"polar_recursive_keys={self.polar_recursive_keys!r} (allowed: 'columns', 'subtrees')")
        if not 0.0 <= self.wave_fill <= 1.0:
            raise ValueError(f"wave_fill={self.wave_fill} (allowed: 0 to 1)")
        if self.min_split_tokens is not None and self.min_split_tokens < 1:
            raise ValueError(f"min_split_tokens={self.min_split_tokens} (allowed: None or >= 1)")
        if self.min_wave_split_tokens < 1:
            raise ValueError(f"min_wave_split_tokens={self.min_wave_split_tokens} (allowed: >= 1)")
        if self.transposed_min_rows < 0:
            raise ValueError(f"transposed_min_rows={self.transposed_min_rows} (allowed: >= 0)")
        if self.transposed_max_rows < 1:
            raise ValueError(f"transposed_max_rows={self.transposed_max_rows} (allowed: >= 1)")
