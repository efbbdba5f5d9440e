"""End-to-end decoding with a Llama-3.1-8B-shaped model (random weights, no download) at long context.

For the 16-bit caches (``fp16``: ``DynamicCache`` + ``sdpa``, what ``generate()`` uses by default;
``fp16-flash``: the same with PyTorch's cuDNN attention backend excluded, see ``attention_backends``;
``fp16-static``: ``StaticCache`` + ``sdpa``, preallocated and written in place) and each kvpolar
preset: decode tokens/s and peak GPU memory at ``--context`` tokens per sequence, for batch sizes up
to the largest that fits, and the prefill time of one sequence including quantization.

The caches are filled layer by layer with random keys/values in chunks (quantized through the same
cache code path decoding uses) instead of running a ``context``-token prefill for every sequence of
every batch, which would cost minutes of GPU time per point and is not what is measured here; the
prefill is timed separately at batch 1. Decode steps run the whole model (all 32 layers, MLPs,
sampling-free argmax) through ``model.forward`` with the cache, one token per sequence per step.

``--decoding replayed``: the kvpolar presets decode through ``kvpolar.cache.graphed.decode_with_graphs``
(each stretch between two moves into the packed part: one eager step, one recorded, the rest replayed
from a CUDA graph), timed as the wall time of all ``--steps`` steps over their number, recordings and
moves included (use a few hundred steps: a recording costs several steps' time); the 16-bit baselines
still run eagerly. Every point also carries ``read_bound_ms``: the weights' and the cache's bytes at
the copy bandwidth measured at the start, the least time any implementation needs to read them once
per step; for the 16-bit baselines, what no 16-bit decoder can beat at that batch.

    python benchmarks/bench_end_to_end.py --out results.json            # on a GPU
    python benchmarks/bench_end_to_end.py --decoding replayed --steps 256 --min-chunk 128 --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch

from bandwidth import copy_bandwidth

CONFIG_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=False,
)


DEVICE = "cuda"
SMOKE_CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096)


def build_model(layers: int, device: str | None = None):
    """Random-weight float16 Llama: ``CONFIG_8B`` on CUDA, ``SMOKE_CONFIG`` on the CPU (seed 0)."""
    import transformers

    device = device or DEVICE
    base = CONFIG_8B if device == "cuda" else SMOKE_CONFIG
    config = transformers.LlamaConfig(**{**base, "num_hidden_layers": layers or base["num_hidden_layers"]})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


#: the 16-bit baselines: ``DynamicCache`` (what ``generate()`` uses by default; it concatenates, i.e.
#: copies, every layer's whole cache at every step), the same without cuDNN attention (``fp16-flash``)
#: and ``StaticCache`` (preallocated to the context plus the decode steps, written in place; attention
#: reads the whole buffer under a mask)
FP16_BASELINES = ("fp16", "fp16-flash", "fp16-static")


def attention_backends(preset: str):
    """The context the decode and prefill steps of ``preset`` run in: for ``fp16-flash``, PyTorch's
    ``scaled_dot_product_attention`` limited to its flash, memory-efficient and math backends; else
    none (PyTorch's own choice). On the H100 (torch 2.11) PyTorch's choice for a one-token decode
    step over a long cache is its cuDNN backend, which builds a cuDNN graph on the host for each new
    key length, once per decode step it seems (every layer's call after the first reusing it): 22-24 ms
    of host time per step at batches 1 and 12 (fp16 against fp16-flash, benchmarks/README.md,
    twenty-second session), which kvpolar's own kernels do not pay."""
    if preset != "fp16-flash":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def make_cache(model, preset: str, max_tokens: int | None = None, min_chunk: int | None = None):
    """The cache of ``preset`` for ``model``: a 16-bit baseline (``FP16_BASELINES``; ``fp16-static``
    needs ``max_tokens``, the tokens per sequence it must hold) or ``kvpolar.enable(model, preset)``
    (``min_chunk``: ``KVCacheConfig.min_chunk``, None: the preset's; the 16-bit caches have none)."""
    import transformers

    import kvpolar

    if preset in FP16_BASELINES:
        model.set_attn_implementation("sdpa")
        if preset in ("fp16", "fp16-flash"):  # (fp16-flash: steps run in ``attention_backends``)
            return transformers.DynamicCache(config=model.config)
        if max_tokens is None:
            raise ValueError("fp16-static needs max_tokens: the context plus the decode steps")
        return transformers.StaticCache(config=model.config, max_cache_len=max_tokens)
    return kvpolar.enable(model, preset, **({} if min_chunk is None else {"min_chunk": min_chunk}))


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` with the keyword this transformers' models take (``kvpolar.cache_kwargs``);
    callers build it once per cache, outside the timed steps."""
    import kvpolar

    return kvpolar.cache_kwargs(model, cache)


def _sync() -> None:
    """Wait for the device: decode steps are timed by wall clock around a full model forward."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke test)"


@dataclasses.dataclass
class Point:
    preset: str
    batch: int
    context: int
    decode_ms_per_step: float
    tokens_per_second: float
    peak_gib: float  # peak while decoding (the filled cache, weights, activations, kernel scratch)
    weights_gib: float
    cache_gib: float
    cache_bits_per_element: float
    status: str = "ok"
    decoding: str = "eager"  # "replayed": decode_with_graphs (kvpolar presets, ``--decoding replayed``)
    read_bound_ms: float = float("nan")  # weights + cache bytes at the measured copy bandwidth
    fill_peak_gib: float = float("nan")  # peak while the cache was filled (chunk temporaries included)
    step_ms: list[float] = dataclasses.field(default_factory=list)  # every step, warm-up included, in order

    @property
    def overhead(self) -> float:
        """Peak GPU memory while decoding, beyond the weights, over the bytes the cache needs
        (1.0 = nothing else)."""
        return (self.peak_gib - self.weights_gib) / self.cache_gib


@torch.no_grad()
def decode_point(model, preset: str, batch: int, context: int, steps: int, weights_bytes: int,
                 warmup: int = 2, decoding: str = "eager", min_chunk: int | None = None,
                 copy_gbps: float = float("nan")) -> Point:
    """Median wall time of ``steps`` decode steps after ``warmup`` untimed ones (Triton compiles
    its kernels in the first steps; per-token formats move ``min_chunk`` tokens into the packed
    part every ``min_chunk`` steps, so a long run's median is the steady state). With ``decoding``
    "replayed" a kvpolar preset runs ``warmup`` then ``steps`` steps through ``decode_with_graphs``
    (two calls; the second's wall time over ``steps``: per-step times are not seen). ``copy_gbps``:
    the copy bandwidth for ``read_bound_ms``."""
    if decoding not in ("eager", "replayed"):
        raise ValueError(f"decoding must be 'eager' or 'replayed'; got {decoding!r}")
    replayed = decoding == "replayed" and preset not in FP16_BASELINES
    _reset_memory()
    cache = make_cache(model, preset, context + warmup + steps, min_chunk=min_chunk)
    fill_cache(model, cache, preset, batch, context)
    fill_peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
    if DEVICE == "cuda":  # decoding's own peak from here on (the fill's chunk temporaries are gone)
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEVICE)
    if replayed:
        ms, every, _ = replayed_ms(model, cache, ids, context, steps, warmup)
    else:
        pos = torch.full((batch, 1), context, device=DEVICE, dtype=torch.long)
        kw = cache_kwargs(model, cache)
        every = []
        for _ in range(steps + warmup):
            step_ms, ids = timed_forward(model, preset, ids, pos, kw)
            every.append(step_ms)
            pos = pos + 1
        times = sorted(every[warmup:])
        ms = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
    if preset in FP16_BASELINES:  # (fp16-static: the whole preallocated buffer)
        cache_bytes = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
        bits = 16.0
    else:
        report = cache.memory_report()
        cache_bytes, bits = report.total, report.bits_per_element
    del cache
    bound = (weights_bytes + cache_bytes) / copy_gbps / 1e6
    return Point(preset, batch, context, ms, batch * 1000.0 / ms, peak / 2**30, weights_bytes / 2**30,
                 cache_bytes / 2**30, bits, decoding="replayed" if replayed else "eager", read_bound_ms=bound,
                 fill_peak_gib=fill_peak / 2**30, step_ms=every)


def replayed_ms(model, cache, ids: torch.Tensor, context: int, steps: int, warmup: int,
                graphs: bool | None = None) -> tuple[float, list[float], Any]:
    """(ms per step, [warm-up ms, timed ms], the timed call's ``GraphedDecoding``) of
    ``decode_with_graphs`` from ``ids`` ``[B, 1]`` at position ``context``: ``warmup`` steps (the
    kernels' compiles, a first recording), then ``steps`` steps timed by wall clock in total, recordings
    and moves into the packed part included. ``graphs`` None: where ``DEVICE`` is CUDA (off CUDA the
    stretches run eagerly)."""
    from kvpolar.cache.graphed import decode_with_graphs

    if graphs is None:
        graphs = DEVICE == "cuda"
    _sync()
    start = time.perf_counter()
    warm = decode_with_graphs(model, cache, ids, context, warmup, graphs=graphs)
    _sync()
    warm_ms = 1000 * (time.perf_counter() - start)
    start = time.perf_counter()
    run = decode_with_graphs(model, cache, warm.tokens[:, -1:], context + warmup, steps, graphs=graphs)
    _sync()
    total = 1000 * (time.perf_counter() - start)
    return total / steps, [warm_ms, total], run


@torch.no_grad()
def timed_forward(model, preset: str, ids: torch.Tensor, pos: torch.Tensor, kw: dict) -> tuple[float, torch.Tensor]:
    """(wall-clock ms, greedy next ids ``[B, 1]``) of one forward of ``ids`` at positions ``pos`` through
    the cache in ``kw`` (last position's logits only) and its argmax, in ``preset``'s attention context,
    the device synchronized before and after."""
    _sync()
    start = time.perf_counter()
    with attention_backends(preset):
        out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
    next_ids = out.logits[:, -1:].argmax(-1)
    _sync()
    return 1000 * (time.perf_counter() - start), next_ids


@torch.no_grad()
def fill_cache(model, cache, preset: str, batch: int, context: int, kv_heads: int | None = None) -> None:
    """Put ``context`` random tokens per sequence into every layer, as a prefill would leave them,
    through the cache's own path (update, then the post-attention compression of whole groups).

    The tokens go in 4096-token chunks and the last one alone: the cache keeps a multi-token step
    after the first (an assisted-decoding verify step) in 16 bits until the next step, so a layer
    filled by chunks only would hold its last chunk in 16 bits, which a one-shot prefill compresses
    (at batch 12 and 32k tokens, 6 GiB over the 32 layers; the seventeenth session's first end-to-end run
    measured it as decode memory and ran out of memory at batch 64). The final one-token step moves
    it into the packed part, as the first decode step would.

    ``kv_heads``: KV heads this process caches (a tensor-parallel rank's local heads); None: all.
    Tensors go to the model's device and dtype.
    """
    from kvpolar.cache.layer import take_pending

    cfg = model.config
    param = next(model.parameters())
    dev, dtype, d = param.device, param.dtype, cfg.head_dim
    hkv = kv_heads or cfg.num_key_value_heads
    hq = hkv * (cfg.num_attention_heads // cfg.num_key_value_heads)
    gen = torch.Generator(device=dev).manual_seed(1)
    chunk = 4096
    steps = [(start, min(chunk, context - 1 - start)) for start in range(0, context - 1, chunk)] + [(context - 1, 1)]
    for layer_idx in range(cfg.num_hidden_layers):
        for start, n in steps:
            k = torch.randn(batch, hkv, n, d, device=dev, dtype=dtype, generator=gen)
            v = torch.randn(batch, hkv, n, d, device=dev, dtype=dtype, generator=gen)
            if preset in FP16_BASELINES:  # (StaticCache versions that take the positions read them here)
                cache.update(k, v, layer_idx, {"cache_position": torch.arange(start, start + n, device=dev)})
                continue
            layer = cache.layers[layer_idx]
            layer.update(k, v)
            take_pending(k)  # (what the attention call would consume: else it keeps the layer alive)
            # a query of n tokens for the layer's bookkeeping; SQuat's subspace comes from its values
            q = torch.randn(batch, hq, 1, d, device=dev, dtype=dtype, generator=gen).expand(batch, hq, n, d)
            if not layer.plan.full_precision:  # (16-bit layers keep everything, as DynamicCache)
                layer.after_attention(None, q)
            del k, v


def best_tokens_per_second(points: Iterable[dict]) -> dict[str, tuple[float, int]]:
    """{preset: (tokens/s, batch)} at each preset's fastest batch that fit, from points as this script's
    JSON holds them (``preset``, ``batch``, ``status``, ``tokens_per_second``), presets in order of appearance."""
    best: dict[str, tuple[float, int]] = {}
    for p in points:
        if p["status"] == "ok" and p["tokens_per_second"] > best.get(p["preset"], (0.0, 0))[0]:
            best[p["preset"]] = (p["tokens_per_second"], p["batch"])
    return best


def read_bound_tokens_per_second(points: Iterable[dict]) -> tuple[float, int] | None:
    """(tokens/s, batch): the most tokens/s a 16-bit decoder could reach at a batch where a 16-bit
    baseline fit (``status`` ok), if each step only read the weights and the cache once at the copy
    bandwidth (``read_bound_ms``); None without such a point."""
    bounds = [(p["batch"] * 1000.0 / p["read_bound_ms"], p["batch"]) for p in points
              if p["preset"] in FP16_BASELINES and p["status"] == "ok" and p.get("read_bound_ms", float("nan")) > 0]
    return max(bounds) if bounds else None


@torch.no_grad()
def prefill_seconds(model, preset: str, context: int) -> float:
    _reset_memory()
    cache = make_cache(model, preset, context)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
    warm = make_cache(model, preset, 128)
    with attention_backends(preset):
        model(input_ids=ids[:, :128], use_cache=True, logits_to_keep=1, **cache_kwargs(model, warm))
    kw = cache_kwargs(model, cache)
    _sync()
    start = time.perf_counter()
    with attention_backends(preset):
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw)
    _sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="fp16,kivi-2,kivi-4,polar-rope-3,polar-rope-4")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="1,8,16,32,48,64,96")
    parser.add_argument("--steps", type=int, default=6, help="timed decode steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prefill", action="store_true", help="also time a batch-1 prefill per preset")
    parser.add_argument("--decoding", default="eager", choices=("eager", "replayed"),
                        help="replayed: kvpolar presets through decode_with_graphs (CUDA graphs); 16-bit baselines eager")
    parser.add_argument("--min-chunk", type=int, default=None,
                        help="KVCacheConfig.min_chunk of the kvpolar presets (default: the preset's)")
    parser.add_argument("--out", default="end_to_end.json")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, context and batches on the CPU: checks the script runs")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:  # (else 32 layers over 32k tokens up to batch 96 on the CPU: over 10 minutes for fp16 alone)
        DEVICE = "cpu"
        args.context, args.batches, args.steps, args.warmup, args.layers = 400, "1,2", 2, 1, 2
        if args.decoding == "replayed":  # (enough steps for a move into the packed part)
            args.steps = 40
    if args.decoding == "replayed" and args.steps < 64 and not args.smoke:
        print(f"note: --steps {args.steps} with --decoding replayed: each stretch's recording costs several "
              "steps' time, so a short run mostly measures recordings", flush=True)

    import transformers

    import kvpolar

    model = build_model(args.layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    copy_gbps = copy_bandwidth(DEVICE) if DEVICE == "cuda" else float("nan")
    points: list[Point] = []
    prefill: dict[str, float] = {}

    def save() -> None:  # after every point: a run cut short still leaves its results
        result = {
            "command": " ".join(sys.argv),
            "gpu": _device_name(),
            "copy_gb_per_second": copy_gbps,
            "decoding": args.decoding,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "kvpolar": kvpolar.__version__, "python": platform.python_version()},
            "model": {**(CONFIG_8B if DEVICE == "cuda" else SMOKE_CONFIG), "num_hidden_layers": args.layers,
                      "weights": "random, float16"},
            "points": [{**dataclasses.asdict(p), "peak_over_cache": p.overhead if DEVICE == "cuda" else None}
                       for p in points],  # (the CPU's peak is not measured)
            "prefill_seconds_batch1": prefill,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                point = decode_point(model, preset, batch, args.context, args.steps, weights, args.warmup,
                                     args.decoding, args.min_chunk, copy_gbps)
            except torch.OutOfMemoryError:
                points.append(Point(preset, batch, args.context, float("nan"), 0.0, float("nan"),
                                    weights / 2**30, float("nan"), float("nan"), "out of memory",
                                    decoding="eager" if preset in FP16_BASELINES else args.decoding))
                print(f"{preset:>14} B={batch:<4} out of memory", flush=True)
                gc.collect()  # (a failed graph recording's references)
                _reset_memory()
                save()
                break
            points.append(point)
            save()
            print(f"{preset:>14} B={batch:<4} {point.decoding:>8} {point.decode_ms_per_step:8.2f} ms/step "
                  f"(read bound {point.read_bound_ms:6.2f}) {point.tokens_per_second:9.1f} tok/s peak {point.peak_gib:6.1f} GiB "
                  f"cache {point.cache_gib:6.2f} GiB ({point.cache_bits_per_element:.2f} b/e)", flush=True)
        if args.prefill:
            try:
                prefill[preset] = prefill_seconds(model, preset, args.context)
            except torch.OutOfMemoryError:
                prefill[preset] = float("nan")
            save()
            print(f"{preset:>14} prefill B=1 {args.context} tokens: {prefill[preset]:.3f} s", flush=True)
    best = best_tokens_per_second(dataclasses.asdict(p) for p in points)
    bases = [name for name in FP16_BASELINES if name in best]
    bound = read_bound_tokens_per_second(dataclasses.asdict(p) for p in points)
    bound_head = [] if bound is None else [f"vs any 16-bit decoder at B={bound[1]} (read bound {bound[0]:.0f} tok/s)"]
    print(f"\n{_device_name()}, context {args.context}, decoding {args.decoding}: best throughput per preset")
    head = ["preset", "best batch", "tokens/s", *(f"vs {name}" for name in bases), *bound_head]
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for name, (tps, b) in best.items():
        ratios = [f"{tps / best[base][0]:.2f}x" for base in bases] + ([] if bound is None else [f"{tps / bound[0]:.2f}x"])
        print("| " + " | ".join([name, str(b), f"{tps:.1f}", *ratios]) + " |")
    if DEVICE != "cuda":
        print("\nPeak memory: measured on CUDA only (torch.cuda.max_memory_allocated)")
        return
    print("\nPeak memory while decoding, beyond the weights, over the cache's bytes, at the largest batch that fit:")
    for name in best:
        ok = [p for p in points if p.preset == name and p.status == "ok"]
        if ok and ok[-1].cache_gib > 0:
            last = ok[-1]
            print(f"  {name:>14} B={last.batch:<4} {last.peak_gib - last.weights_gib:7.2f} GiB / cache "
                  f"{last.cache_gib:7.2f} GiB = {last.overhead:.3f}")


if __name__ == "__main__":
    main()
