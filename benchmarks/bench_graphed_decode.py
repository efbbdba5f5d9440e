"""Decode steps replayed from CUDA graphs (``kvpolar.cache.graphed``) against eager ones, end to end on the
8B-shaped model (random weights, ``bench_end_to_end.build_model``).

First a check on a ``--check-layers``-layer model: ``generate_with_graphs`` with graphs gives the tokens
of the same steps run eagerly (``graphs=False``) and of ``model.generate`` with the same preset, over a
1024-token prompt and enough new tokens for several moves into the packed part; with ``--padded`` also
over left-padded prompts (the second row's first ``PADDING`` tokens padding, its mask passed to both).

Then, per preset and batch, the cache filled to ``--context`` tokens per sequence
(``bench_end_to_end.fill_cache``) and ``--steps`` decode steps timed by wall clock, the device
synchronized before and after:

* ``eager``: the library's ordinary steps (one model forward per token, as ``generate`` runs them),
  ms per step as the total over the steps (moves into the packed part included);
* ``graphed``: ``decode_with_graphs`` over the same number of steps (per stretch between two moves:
  one eager step, one recorded, the rest replayed), total wall time per step, recordings included;

and the 16-bit references: ``fp16-flash`` eager (``DynamicCache``, SDPA's flash backend) and
``fp16-static`` graphed (``StaticCache``, the model's step recorded once, the cache position in a device
tensor, replayed; the attention reads the whole preallocated buffer under a mask), where it records.

    PYTHONPATH=src:benchmarks python benchmarks/bench_graphed_decode.py [--presets kivi-2 polar-rope-3]
        [--batches 1 4] [--context 32768] [--steps 256] [--layers 32] [--min-chunk N] [--out FILE.json] [--smoke]
        [--check-only] [--padded]

``--smoke``: the small model on the CPU, eager only (graphs need CUDA), to check the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_end_to_end as e2e  # noqa: E402

import kvpolar  # noqa: E402
from kvpolar.cache.graphed import generate_with_graphs  # noqa: E402


def _check_model(layers: int) -> tuple:
    """The checks' ``layers``-layer model and their prompts: two random 1024-token sequences."""
    model = e2e.build_model(layers)
    gen = torch.Generator(device="cpu").manual_seed(5)
    return model, torch.randint(0, model.config.vocab_size, (2, 1024), generator=gen).to(e2e.DEVICE)


def _check_tokens_count(model, preset: str) -> int:
    """New tokens for two moves into the packed part and some (the quantized layers' chunk; 16-bit
    layers have none)."""
    return 2 * max(layer.chunk for layer in kvpolar.QuantizedKVCache(model.config, preset).layers) + 20


#: padding tokens before the second prompt in ``check_tokens(padded=True)`` (a 128-token chunk and some)
PADDING = 300


@torch.no_grad()
def check_tokens(layers: int, presets: list[str], graphs: bool, padded: bool = False) -> list[dict]:
    """Greedy tokens three ways on a small model: ``generate``, the stretches eagerly, the stretches
    replayed (with ``graphs``); one row per preset. ``padded``: the second prompt's first ``PADDING``
    tokens are padding (id 0, mask 0), the mask given to all three."""
    model, ids = _check_model(layers)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :PADDING] = 0
        ids = ids.masked_fill(mask == 0, 0)
    masked = {"attention_mask": mask} if padded else {}
    rows = []
    for preset in presets:
        new = _check_tokens_count(model, preset)
        cache = kvpolar.enable(model, preset)
        model.generation_config.eos_token_id = None  # (plain greedy: no token stops or is suppressed)
        want = model.generate(ids, max_new_tokens=new, do_sample=False, attention_mask=mask,
                              pad_token_id=0, **kvpolar.cache_kwargs(model, cache))
        try:
            eager = generate_with_graphs(model, ids, kvpolar.enable(model, preset), new, graphs=False, **masked)
        except ValueError as err:  # (a preset replayed decoding refuses, e.g. one with 16-bit layers)
            rows.append({"preset": preset, "new_tokens": new, "padded": padded, "refused": str(err)})
            continue
        replayed = generate_with_graphs(model, ids, kvpolar.enable(model, preset), new, **masked) if graphs else None
        rows.append({"preset": preset, "new_tokens": new, "padded": padded,
                     "eager_equals_generate": bool(torch.equal(eager, want)),
                     "graphed_equals_generate": None if replayed is None else bool(torch.equal(replayed, want))})

    del model
    return rows


SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}


@torch.no_grad()
def check_sampling(layers: int, presets: list[str], graphs: bool, seed: int = 11) -> list[dict]:
    """Sampled tokens three ways under one seed (``SAMPLING``'s warpers): ``generate(do_sample=True)``,
    the stretches eagerly, the stretches replayed (with ``graphs``; a recorded draw advances the
    generator as the eager draw does, so all three must agree token for token). Then ``top_k=1``
    (replayed with ``graphs``) against ``generate``'s greedy tokens, ties allowed: where the two first
    differ, the greedy step's two largest logits must be equal (top-k keeps every tied token, the argmax
    the first)."""
    model, ids = _check_model(layers)
    rows = []
    for preset in presets:
        new = _check_tokens_count(model, preset)
        model.generation_config.eos_token_id = None
        cache = kvpolar.enable(model, preset)
        torch.manual_seed(seed)
        want = model.generate(ids, max_new_tokens=new, do_sample=True, attention_mask=torch.ones_like(ids),
                              pad_token_id=0, **SAMPLING, **kvpolar.cache_kwargs(model, cache))
        torch.manual_seed(seed)
        try:
            eager = generate_with_graphs(model, ids, kvpolar.enable(model, preset), new, do_sample=True,
                                         graphs=False, **SAMPLING)
        except ValueError as err:  # (a preset replayed decoding refuses, e.g. one with 16-bit layers only)
            rows.append({"preset": preset, "new_tokens": new, "refused": str(err)})
            continue
        row = {"preset": preset, "new_tokens": new, "sampling": SAMPLING,
               "sampled_eager_equals_generate": bool(torch.equal(eager, want))}
        if graphs:
            torch.manual_seed(seed)
            replayed = generate_with_graphs(model, ids, kvpolar.enable(model, preset), new, do_sample=True,
                                            **SAMPLING)
            row["sampled_graphed_equals_generate"] = bool(torch.equal(replayed, want))
            row["sampled_graphed_equals_eager"] = bool(torch.equal(replayed, eager))
        cache = kvpolar.enable(model, preset)
        greedy = model.generate(ids, max_new_tokens=new, do_sample=False, attention_mask=torch.ones_like(ids),
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                                **kvpolar.cache_kwargs(model, cache))
        top1 = generate_with_graphs(model, ids, kvpolar.enable(model, preset), new, do_sample=True, top_k=1,
                                    graphs=graphs)
        row.update(_ties_explain(top1[:, ids.shape[1]:], greedy.sequences[:, ids.shape[1]:], greedy.logits))
        rows.append(row)
        print(f"sampling check: {row}", flush=True)
    del model
    return rows


def _ties_explain(got: torch.Tensor, greedy: torch.Tensor, logits: tuple) -> dict:
    """Per sequence, the first step where ``got`` (top-1 draws) leaves ``greedy`` and whether the greedy
    logits there had both tokens at the maximum; and how many greedy steps had a tied maximum at all."""
    firsts, explained = [], []
    for b in range(got.shape[0]):
        differ = (got[b] != greedy[b]).nonzero()
        if differ.numel() == 0:
            firsts.append(None)
            continue
        i = int(differ[0])
        step = logits[i][b].float()
        top = step.max()
        firsts.append(i)
        explained.append(bool(step[got[b, i]] == top and step[greedy[b, i]] == top))
    tied_steps = sum(int((step.float() == step.float().max(-1, keepdim=True).values).sum(-1).gt(1).sum())
                     for step in logits)
    return {"top1_first_difference": firsts, "top1_differences_are_ties": all(explained),
            "greedy_steps_with_tied_maximum": tied_steps,
            "top1_ok": all(explained)}


@torch.no_grad()
def eager_ms(model, preset: str, batch: int, context: int, steps: int, min_chunk: int | None = None) -> float:
    """ms per step of ``steps`` ordinary decode steps after two untimed ones (total wall time / steps)."""
    cache = e2e.make_cache(model, preset, context + steps + 4, min_chunk=min_chunk)
    e2e.fill_cache(model, cache, preset, batch, context)
    kw = e2e.cache_kwargs(model, cache)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=e2e.DEVICE)
    pos = torch.full((batch, 1), context, device=e2e.DEVICE, dtype=torch.long)
    for i in range(steps + 2):
        if i == 2:
            e2e._sync()
            start = time.perf_counter()
        with e2e.attention_backends(preset):
            logits = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw).logits
        ids = logits[:, -1:].argmax(-1)
        pos = pos + 1
    e2e._sync()
    ms = 1000 * (time.perf_counter() - start) / steps
    del cache
    return ms


@torch.no_grad()
def graphed_ms(model, preset: str, batch: int, context: int, steps: int, graphs: bool,
               min_chunk: int | None = None) -> tuple[float, dict]:
    """ms per step of ``decode_with_graphs`` over ``steps`` steps (total wall time / steps), after two
    untimed graphed steps (the fused kernels' compiles), and how the steps ran."""
    cache = e2e.make_cache(model, preset, min_chunk=min_chunk)
    e2e.fill_cache(model, cache, preset, batch, context)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=e2e.DEVICE)
    ms, _, run = e2e.replayed_ms(model, cache, ids, context, steps, 2, graphs=graphs)
    how = {"eager_steps": run.eager_steps, "replayed_steps": run.replayed_steps, "recordings": run.recordings}
    del cache
    return ms, how


@torch.no_grad()
def static_graphed_ms(model, batch: int, context: int, steps: int) -> float:
    """fp16 ``StaticCache``: the decode step recorded once and replayed ``steps`` times (ms per step)."""
    import transformers

    model.set_attn_implementation("sdpa")
    cache = transformers.StaticCache(config=model.config, max_cache_len=context + steps + 8)
    e2e.fill_cache(model, cache, "fp16-static", batch, context)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=e2e.DEVICE)
    pos = torch.full((batch, 1), context, device=e2e.DEVICE, dtype=torch.long)
    cache_position = torch.full((1,), context, device=e2e.DEVICE, dtype=torch.long)
    kw = e2e.cache_kwargs(model, cache)

    def step():
        logits = model(input_ids=ids, position_ids=pos, cache_position=cache_position, use_cache=True,
                       logits_to_keep=1, **kw).logits
        ids.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)
        cache_position.add_(1)

    step()  # (warm-up: cuBLAS handles, the mask's kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    e2e._sync()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    e2e._sync()
    ms = 1000 * (time.perf_counter() - start) / steps
    del graph, cache
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "polar-rope-3"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--check-layers", type=int, default=4)
    ap.add_argument("--min-chunk", type=int, default=None,
                    help="KVCacheConfig.min_chunk for the kvpolar presets (steps a recording serves); default: the preset's")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="small model on the CPU, eager only")
    ap.add_argument("--check-only", action="store_true", help="the token checks alone")
    ap.add_argument("--sampling", action="store_true", help="also check sampled decoding (check_sampling)")
    ap.add_argument("--padded", action="store_true", help="also check left-padded prompts (check_tokens)")
    args = ap.parse_args()
    graphs = not args.smoke
    if args.smoke:
        e2e.DEVICE, args.context, args.layers, args.steps, args.check_layers = "cpu", 300, 2, 40, 2
    checks = check_tokens(args.check_layers, args.presets, graphs)
    if args.padded:
        checks += check_tokens(args.check_layers, args.presets, graphs, padded=True)
    sampling = check_sampling(args.check_layers, args.presets, graphs) if args.sampling else []
    rows = []
    model = None if args.check_only else e2e.build_model(args.layers)
    for batch in [] if args.check_only else args.batches:
        e2e._reset_memory()
        try:
            rows.append({"preset": "fp16-flash", "batch": batch, "eager_ms": eager_ms(model, "fp16-flash", batch,
                                                                                      args.context, args.steps)})
        except torch.OutOfMemoryError:
            rows.append({"preset": "fp16-flash", "batch": batch, "eager_ms": None,
                         "graphed_note": "out of GPU memory (16-bit cache)"})
            graphs_fp16 = False
        else:
            graphs_fp16 = graphs
        if graphs_fp16:
            try:
                rows[-1]["graphed_ms"] = static_graphed_ms(model, batch, args.context, args.steps)
                rows[-1]["graphed_note"] = "fp16-static (StaticCache) recorded and replayed"
            except Exception as err:  # (a transformers version whose static step reads back to the host)
                rows[-1]["graphed_note"] = f"fp16-static did not record: {type(err).__name__}: {str(err)[:200]}"
        for preset in args.presets:
            e2e._reset_memory()
            row = {"preset": preset, "batch": batch, "min_chunk": args.min_chunk,
                   "eager_ms": eager_ms(model, preset, batch, args.context, args.steps, args.min_chunk)}
            try:
                row["graphed_ms"], row["how"] = graphed_ms(model, preset, batch, args.context, args.steps, graphs,
                                                           args.min_chunk)
            except ValueError as err:  # (a cache replayed decoding refuses)
                row["graphed_note"] = f"refused: {err}"
            rows.append(row)
    device = e2e._device_name()
    title = (f"{device}, {args.layers} layers, {args.context} tokens per sequence, {args.steps} steps: ms per "
             f"decode step (wall time / steps)")
    print("token checks (1024-token prompt, " + f"{args.check_layers} layers): " + "; ".join(
        f"{c['preset']}{' padded' * c['padded']}: refused ({c['refused']})" if "refused" in c else
        f"{c['preset']}{' padded' * c['padded']} {c['new_tokens']} tokens: eager stretches = generate "
        f"{c['eager_equals_generate']}, "
        f"graphed = generate {c['graphed_equals_generate']}" for c in checks))
    for c in sampling:
        if "refused" in c:
            print(f"sampling check {c['preset']}: refused ({c['refused']})")
            continue
        print(f"sampling check {c['preset']} ({c['new_tokens']} tokens, {c['sampling']}): eager stretches = generate "
              f"{c['sampled_eager_equals_generate']}, replayed = generate {c.get('sampled_graphed_equals_generate')}, "
              f"replayed = eager {c.get('sampled_graphed_equals_eager')}; top_k=1 replayed first leaves greedy at "
              f"{c.get('top1_first_difference')}, all at tied maxima {c.get('top1_differences_are_ties')} (greedy "
              f"steps with a tied maximum: {c.get('greedy_steps_with_tied_maximum')})")
    print(title)
    print("| preset | batch | eager ms | graphed ms | graphed / eager tokens/s | graphed tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        g, e = row.get("graphed_ms"), row["eager_ms"]
        graphed = ("", "", "") if g is None else (f"{g:.2f}", "" if e is None else f"{e / g:.2f}x",
                                                  f"{1000 * row['batch'] / g:.0f}")
        print(f"| {row['preset']} | {row['batch']} | {'' if e is None else f'{e:.2f}'} | " + " | ".join(graphed) + " |")
    for row in rows:
        if "graphed_note" in row:
            print(f"  {row['preset']} B={row['batch']}: {row['graphed_note']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"title": title, "command": " ".join(sys.argv), "torch": torch.__version__, "checks": checks,
                       "sampling_checks": sampling, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
