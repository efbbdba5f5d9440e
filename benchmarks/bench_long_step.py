"""Long steps after the first over a filled cache: a prefill in chunks, the next turn of a conversation.

A step of more than ``kvpolar.decode_attention.MAX_FUSED_QUERY_ROWS`` query rows per KV head (GQA
group x new tokens) attends over the layer dequantized, through SDPA (``kvpolar.cache.attention``).
This script, on a Llama-3.1-8B-shaped model with ``--layers`` layers (random weights):

1. checks that path against the PyTorch reference on CUDA (a ``--check-context``-token cache, one
   step of ``--check-tokens`` tokens; the logits of both must agree);
2. times one step of S new tokens over a ``--context``-token cache per preset (fp16 ``DynamicCache``
   and kvpolar presets; the step is cropped away between repeats, median of ``--repeats``);
   ``--steps-only`` with an older source tree on ``PYTHONPATH`` times what it did for the same steps
   (a step that fails is recorded and ends that preset's sizes);
3. prefills ``--context`` tokens in ``--chunk``-token chunks per preset and ``max_rollback_tokens``
   (None, 0): time, peak memory, and the 16-bit bytes the cache holds after the prefill.

    PYTHONPATH=src python benchmarks/bench_long_step.py --out $OUT/long_step.json      # on a GPU
    PYTHONPATH=src python benchmarks/bench_long_step.py --smoke                        # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import bench_end_to_end as e2e


def _ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # one untimed: Triton compiles, SDPA picks its kernel
        e2e._sync()
        start = time.perf_counter()
        fn()
        e2e._sync()
        times.append(1000 * (time.perf_counter() - start))
    times = sorted(times[1:])
    return times[len(times) // 2]


def _step(model, cache, tokens: int, context: int) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=e2e.DEVICE,
                        generator=torch.Generator(device=e2e.DEVICE).manual_seed(tokens))
    pos = torch.arange(context, context + tokens, device=e2e.DEVICE)[None]
    out = model(input_ids=ids, position_ids=pos, use_cache=True, **e2e.cache_kwargs(model, cache))
    return out.logits.float()


@torch.no_grad()
def check_against_reference(model, preset: str, context: int, tokens: int) -> dict:
    """Logits of one ``tokens``-token step through the SDPA path and through the reference."""
    from kvpolar.cache import attention

    caches = []
    for _ in range(2):  # the same fill twice (seeded): the step moves older window tokens into the packed part
        caches.append(e2e.make_cache(model, preset))
        e2e.fill_cache(model, caches[-1], preset, 1, context)
    fast = _step(model, caches[0], tokens, context)
    saved = attention.MAX_FUSED_QUERY_ROWS, attention.fused_kernel
    attention.MAX_FUSED_QUERY_ROWS, attention.fused_kernel = 1 << 30, lambda query: None
    try:
        reference = _step(model, caches[1], tokens, context)
    finally:
        attention.MAX_FUSED_QUERY_ROWS, attention.fused_kernel = saved
    err = ((fast - reference).abs().max() / reference.abs().max()).item()
    return {"preset": preset, "context": context, "tokens": tokens, "max_rel_err": err, "ok": err < 2e-2}


@torch.no_grad()
def time_steps(model, preset: str, context: int, sizes: list[int], repeats: int) -> list[dict]:
    e2e._reset_memory()
    cache = e2e.make_cache(model, preset)
    e2e.fill_cache(model, cache, preset, 1, context)
    rows = []
    for tokens in sizes:
        def step():
            _step(model, cache, tokens, context)
            cache.crop(-tokens)
        try:
            row = {"preset": preset, "tokens": tokens, "ms": _ms(step, repeats), "status": "ok"}
        except Exception as err:  # e.g. an older tree's kernel with a tile too large to compile or launch
            row = {"preset": preset, "tokens": tokens, "ms": float("nan"), "status": f"{type(err).__name__}: {str(err)[:160]}"}
            rows.append(row)
            print(f"{preset:>14} step of {tokens:>5} tokens over {context}: {row['status']}; larger steps skipped "
                  "(the failed step left the cache's layers part-updated)", flush=True)
            break
        rows.append(row)
        print(f"{row['preset']:>14} step of {tokens:>5} tokens over {context}: {row['ms']:9.2f} ms {row['status']}",
              flush=True)
    return rows


@torch.no_grad()
def chunked_prefill(model, preset: str, context: int, chunk: int, cap: int | None) -> dict:
    import kvpolar

    e2e._reset_memory()
    if preset in e2e.FP16_BASELINES:
        cache = e2e.make_cache(model, preset)
    else:
        cache = kvpolar.enable(model, preset, max_rollback_tokens=cap)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=e2e.DEVICE,
                        generator=torch.Generator(device=e2e.DEVICE).manual_seed(0))
    kw = e2e.cache_kwargs(model, cache)
    e2e._sync()
    start = time.perf_counter()
    for at in range(0, context, chunk):
        pos = torch.arange(at, min(at + chunk, context), device=e2e.DEVICE)[None]
        model(input_ids=ids[:, at:at + chunk], position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
    e2e._sync()
    seconds = time.perf_counter() - start
    sixteen_bit = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if l.keys is not None)
    peak = torch.cuda.max_memory_allocated() if e2e.DEVICE == "cuda" else 0
    row = {"preset": preset, "max_rollback_tokens": cap, "context": context, "chunk": chunk, "seconds": seconds,
           "peak_gib": peak / 2**30, "sixteen_bit_gib": sixteen_bit / 2**30}
    print(f"{preset:>14} cap={cap!s:>4} prefill {context} in {chunk}-token chunks: {seconds:6.3f} s, "
          f"peak {row['peak_gib']:6.2f} GiB, 16-bit tokens held {row['sixteen_bit_gib']:6.3f} GiB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="kivi-2,polar-rope-3")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--sizes", default="1,16,64,512,4096", help="new tokens per timed step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-context", type=int, default=4096)
    parser.add_argument("--check-tokens", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--steps-only", action="store_true",
                        help="only the timed steps (what an older tree on PYTHONPATH supports)")
    parser.add_argument("--out", default="long_step.json")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        e2e.DEVICE = "cpu"
        args.context, args.check_context, args.check_tokens, args.chunk = 512, 256, 100, 128
        args.sizes, args.repeats = "1,100", 1

    import transformers

    import kvpolar

    model = e2e.build_model(args.layers)
    presets = args.presets.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {"command": " ".join(sys.argv), "gpu": e2e._device_name(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "kvpolar": kvpolar.__version__, "python": platform.python_version()},
              "layers": args.layers, "checks": [], "steps": [], "chunked_prefill": []}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    for preset in [] if args.steps_only else presets:
        check = check_against_reference(model, preset, args.check_context, args.check_tokens)
        result["checks"].append(check)
        print(f"check {preset}: {args.check_tokens}-token step over {args.check_context}: max rel err "
              f"{check['max_rel_err']:.2e} {'ok' if check['ok'] else 'FAILED'}", flush=True)
        save()
    for preset in [] if args.steps_only else presets:
        result["chunked_prefill"] += [chunked_prefill(model, preset, args.context, args.chunk, cap) for cap in (None, 0)]
        save()
    if not args.steps_only:
        result["chunked_prefill"].append(chunked_prefill(model, "fp16", args.context, args.chunk, None))
    for preset in ["fp16", *presets]:
        result["steps"] += time_steps(model, preset, args.context, sizes, args.repeats)
        save()
    print(f"\n{result['gpu']}, {args.layers} layers, context {args.context}: ms per step of S new tokens")
    by = {}
    for row in result["steps"]:
        by.setdefault(row["preset"], {})[row["tokens"]] = row["ms"]
    print("| preset | " + " | ".join(f"S={s}" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for name, cells in by.items():
        print(f"| {name} | " + " | ".join(f"{cells[s]:.2f}" if s in cells else "" for s in sizes) + " |")
    if result["checks"]:
        print("checks ok:", all(c["ok"] for c in result["checks"]))


if __name__ == "__main__":
    main()
