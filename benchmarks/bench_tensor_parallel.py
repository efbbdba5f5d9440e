"""Issue 11: tensor-parallel decoding with kvpolar's cache, two GPUs against one.

An 8B-shaped random-weight Llama (``bench_end_to_end.CONFIG_8B``) is saved once, then loaded with
``tp_plan="auto"`` under ``torchrun`` (each rank holds half of the heads, so its cache holds only its
own KV heads) and, for comparison, on one GPU. For fp16 (``DynamicCache`` + SDPA) and each preset:

* logits agreement: a prompt of ``--agree-tokens`` random tokens as one prefill, then
  ``--agree-steps`` tokens teacher-forced one at a time through the cache; the float32 logits of those
  steps are saved (rank 0) and ``compare`` sets the TP run against the one-GPU run (max absolute
  difference relative to the largest logit, and greedy-token agreement);
* decode speed and memory at ``--context`` tokens per sequence for each batch in ``--batches``:
  every layer's cache is filled with random keys/values of the local heads through the cache's own
  path (as ``bench_end_to_end`` does), then the model decodes with the same token ids on every
  rank; wall-clock median ms per step, tokens/s, and each rank's peak GPU memory while decoding.

    python benchmarks/bench_tensor_parallel.py make-model /tmp/llama8b
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_tensor_parallel.py run /tmp/llama8b --out tp2.json
    python benchmarks/bench_tensor_parallel.py run /tmp/llama8b --out tp1.json
    python benchmarks/bench_tensor_parallel.py compare tp1.json tp2.json --out tensor_parallel.json

``--smoke`` (all three commands) uses a tiny model on the CPU with the gloo backend, to check the
script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_end_to_end import CONFIG_8B, SMOKE_CONFIG, build_model, cache_kwargs, fill_cache, make_cache  # noqa: E402

DEFAULT_PRESETS = "fp16,kivi-2,kivi-4,polar-rope-3,turbo-4"


def make_model(path: str, layers: int, smoke: bool) -> None:
    """Save a random-weight Llama (float16 safetensors) to ``path``."""
    model = build_model(layers, "cpu" if smoke else "cuda")
    model.save_pretrained(path)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {path}")


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load(path: str, smoke: bool):
    from transformers import AutoModelForCausalLM

    rank, world = _world()
    dtype = torch.float32 if smoke else torch.float16
    if world > 1:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to("cpu" if smoke else "cuda")
    return model.eval()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def agreement_logits(model, preset: str, prompt: int, steps: int) -> torch.Tensor:
    """float32 logits ``[steps, vocab]`` of ``steps`` teacher-forced tokens after a ``prompt``-token prefill."""
    dev = _device(model)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt + steps), generator=gen).to(dev)
    cache = make_cache(model, preset)
    kw = cache_kwargs(model, cache)
    model(input_ids=ids[:, :prompt], use_cache=True, logits_to_keep=1, **kw)
    rows = []
    for i in range(prompt, prompt + steps):
        out = model(input_ids=ids[:, i:i + 1], use_cache=True, **kw)
        rows.append(out.logits[0, -1].float().cpu())
    return torch.stack(rows)


@torch.no_grad()
def decode_point(model, preset: str, batch: int, context: int, steps: int, local_kv_heads: int) -> dict:
    dev = _device(model)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    cache = make_cache(model, preset)
    fill_cache(model, cache, preset, batch, context, local_kv_heads)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    gen = torch.Generator().manual_seed(2)  # the same ids on every rank
    ids = torch.randint(0, model.config.vocab_size, (steps + 2, batch, 1), generator=gen).to(dev)
    pos = torch.full((batch, 1), context, device=dev, dtype=torch.long)
    kw = cache_kwargs(model, cache)
    times = []
    for step in range(steps + 2):
        _sync(dev)
        start = time.perf_counter()
        model(input_ids=ids[step], position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
        _sync(dev)
        if step >= 2:
            times.append(1000 * (time.perf_counter() - start))
        pos = pos + 1
    times.sort()
    ms = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    if preset == "fp16":
        cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    else:
        cache_bytes = cache.memory_report().total
    del cache
    return {"preset": preset, "batch": batch, "context": context, "ms_per_step": ms,
            "tokens_per_second": batch * 1000.0 / ms, "peak_gib": peak / 2**30, "local_cache_gib": cache_bytes / 2**30,
            "status": "ok"}


def run(args) -> None:
    import transformers

    import kvpolar

    rank, world = _world()
    model = load(args.model, args.smoke)
    cfg = model.config
    if cfg.num_key_value_heads % world:
        sys.exit(f"{cfg.num_key_value_heads} KV heads do not split over {world} ranks")
    local = cfg.num_key_value_heads // world
    presets = args.presets.split(",")
    logits, points = {}, []
    for preset in presets:
        logits[preset] = agreement_logits(model, preset, args.agree_tokens, args.agree_steps)
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                point = decode_point(model, preset, batch, args.context, args.steps, local)
            except torch.OutOfMemoryError:
                point = {"preset": preset, "batch": batch, "context": args.context, "status": "out of memory"}
            per_rank = [point]
            if world > 1:  # every rank sees every rank's result, so all stop growing the batch together
                import torch.distributed as dist

                per_rank = [None] * world
                dist.all_gather_object(per_rank, point)
            failed = any(p["status"] != "ok" for p in per_rank)
            if rank == 0:
                row = {k: v for k, v in per_rank[0].items() if k not in ("peak_gib", "local_cache_gib")}
                row["status"] = "out of memory" if failed else "ok"
                row["peak_gib_per_gpu"] = [p.get("peak_gib") for p in per_rank]
                row["cache_gib_per_gpu"] = [p.get("local_cache_gib") for p in per_rank]
                points.append(row)
                print(f"TP={world} {preset:>13} B={batch:<3} {row.get('ms_per_step', float('nan')):8.2f} ms/step "
                      f"{row.get('tokens_per_second', 0):8.1f} tok/s peak/GPU {row['peak_gib_per_gpu']} {row['status']}",
                      flush=True)
            if failed:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                break
    if rank == 0:
        dev = _device(model)
        result = {
            "command": " ".join(sys.argv), "world_size": world,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke test)",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "kvpolar": kvpolar.__version__, "python": platform.python_version()},
            "model": {**(SMOKE_CONFIG if args.smoke else CONFIG_8B), "num_hidden_layers": cfg.num_hidden_layers,
                      "weights": "random, float16"},
            "agreement": {"prompt_tokens": args.agree_tokens, "steps": args.agree_steps},
            "points": points,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        torch.save(logits, args.out + ".logits.pt")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def compare(args) -> None:
    one, tp = (json.load(open(p)) for p in (args.single, args.tp))
    lo, lt = (torch.load(p + ".logits.pt") for p in (args.single, args.tp))
    agreement = {}
    for preset in lo:
        if preset not in lt:
            continue
        diff = (lo[preset] - lt[preset]).abs().max().item() / lo[preset].abs().max().item()
        greedy = (lo[preset].argmax(-1) == lt[preset].argmax(-1)).float().mean().item()
        agreement[preset] = {"max_abs_diff_over_max_logit": diff, "greedy_token_agreement": greedy}
    result = {"single_gpu": one, "tensor_parallel": tp, "logits_tp_vs_single": agreement}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{tp['gpu']}: TP={tp['world_size']} vs one GPU, context {tp['points'][0]['context'] if tp['points'] else '?'}")
    print("| preset | batch | one GPU tok/s | TP tok/s | one GPU peak GiB | TP peak GiB per GPU | logits diff | greedy agreement |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    single = {(p["preset"], p["batch"]): p for p in one["points"]}
    for p in tp["points"]:
        s = single.get((p["preset"], p["batch"]), {})
        a = agreement.get(p["preset"], {})
        fmt = lambda x, f: format(x, f) if isinstance(x, (int, float)) else "-"  # noqa: E731
        print(f"| {p['preset']} | {p['batch']} | {fmt(s.get('tokens_per_second'), '.1f')} | "
              f"{fmt(p.get('tokens_per_second'), '.1f')} | {fmt((s.get('peak_gib_per_gpu') or [None])[0], '.1f')} | "
              f"{', '.join(fmt(x, '.1f') for x in p['peak_gib_per_gpu'])} | "
              f"{fmt(a.get('max_abs_diff_over_max_logit'), '.1e')} | {fmt(a.get('greedy_token_agreement'), '.2f')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="save the random-weight model")
    m.add_argument("path")
    m.add_argument("--layers", type=int, default=0, help="override the layer count (0: the config's)")
    m.add_argument("--smoke", action="store_true")
    r = sub.add_parser("run", help="one GPU, or every rank under torchrun")
    r.add_argument("model")
    r.add_argument("--out", required=True)
    r.add_argument("--presets", default=DEFAULT_PRESETS)
    r.add_argument("--context", type=int, default=32768)
    r.add_argument("--batches", default="1,8,16")
    r.add_argument("--steps", type=int, default=6)
    r.add_argument("--agree-tokens", type=int, default=1024)
    r.add_argument("--agree-steps", type=int, default=16)
    r.add_argument("--smoke", action="store_true")
    c = sub.add_parser("compare", help="TP run against the one-GPU run")
    c.add_argument("single")
    c.add_argument("tp")
    c.add_argument("--out")
    args = ap.parse_args()
    if args.cmd == "make-model":
        make_model(args.path, args.layers, args.smoke)
    elif args.cmd == "run":
        run(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
