"""``model.generate()`` as a user calls it, with and without ``custom_generate=kvpolar.replayed_decoding``
(decode steps replayed from CUDA graphs), on the 8B-shaped model (random weights,
``bench_end_to_end.build_model``).

Per preset, batch 1 (``--batch``), a random ``--prompt``-token prompt, ``--new`` new tokens, wall clock
around the whole ``generate`` call (prefill included, the device synchronized), greedy and sampled
(temperature 0.8, top-k 50, top-p 0.95, one seed for both calls):

* ``generate``: ``model.generate(ids, max_new_tokens=N, **kvpolar.cache_kwargs(model, cache))``;
* ``replayed``: the same call with ``custom_generate=kvpolar.replayed_decoding``;
* the same two with ``max_new_tokens=1`` (prefill and one token), so that the decode steps' time per
  token is ``(t_N - t_1) / (N - 1)``;

and ``fp16-flash`` (``DynamicCache``, SDPA's flash kernel) through plain ``generate`` for reference.
The tokens of the two calls must be equal (greedy; sampled under one seed), and are reported.

``--stream``: also the replayed call with a ``token_streamer`` that notes when each put arrives: its
wall time, whether the streamed tokens are the output's, and the median and largest gap between two
streamed tokens (tokens reach the host as each replayed step's copy lands, not a stretch at a time).

    PYTHONPATH=src:benchmarks python benchmarks/bench_generate_replayed.py [--presets kivi-2 polar-rope-3]
        [--prompt 32768] [--new 256] [--batch 1] [--layers 32] [--min-chunk 128] [--stream] [--out FILE.json] [--smoke]

``--smoke``: the small model on the CPU (the replayed path then runs its stretches eagerly).
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

SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


class ArrivalRecorder:
    """A streamer noting each put's tokens and the clock when it arrived."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.times: list[float] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True

    def gaps_ms(self) -> list[float]:
        """ms between consecutive token puts (the prompt's put left out)."""
        return [1000 * (b - a) for a, b in zip(self.times[1:], self.times[2:])]


def timed_generate(model, preset: str, ids: torch.Tensor, new: int, replayed: bool, sampling: dict,
                   min_chunk: int | None, seed: int = 7, streamer=None) -> tuple[float, torch.Tensor]:
    """(seconds, output) of one ``generate`` call with a fresh cache of ``preset`` (``streamer``: handed
    to the replayed call as ``token_streamer``)."""
    cache = (e2e.make_cache(model, preset) if preset in e2e.FP16_BASELINES
             else kvpolar.enable(model, preset, **({} if min_chunk is None else {"min_chunk": min_chunk})))
    extra = {"custom_generate": kvpolar.replayed_decoding} if replayed else {}
    if streamer is not None:
        extra["token_streamer"] = streamer
    torch.manual_seed(seed)
    e2e._sync()
    start = time.perf_counter()
    with e2e.attention_backends(preset):
        out = model.generate(ids, max_new_tokens=new, pad_token_id=0, **sampling, **kvpolar.cache_kwargs(model, cache),
                             **extra)
    e2e._sync()
    return time.perf_counter() - start, out


def measure(model, preset: str, ids: torch.Tensor, new: int, sampled: bool, min_chunk: int | None,
            stream: bool = False) -> dict:
    """One row: both ways (or plain ``generate`` alone for the 16-bit reference), ``new`` and 1 tokens;
    ``stream``: the replayed call once more with an :class:`ArrivalRecorder` as its ``token_streamer``."""
    sampling = SAMPLING if sampled else {"do_sample": False}
    row = {"preset": preset, "sampled": sampled}
    ways = (False,) if preset in e2e.FP16_BASELINES else (False, True)
    outs = {}
    for replayed in ways:
        name = "replayed" if replayed else "generate"
        timed_generate(model, preset, ids, 2, replayed, sampling, min_chunk)  # (warm: compiles, allocator)
        t_one, _ = timed_generate(model, preset, ids, 1, replayed, sampling, min_chunk)
        t_all, outs[name] = timed_generate(model, preset, ids, new, replayed, sampling, min_chunk)
        row[f"{name}_s"] = t_all
        row[f"{name}_prefill_s"] = t_one
        row[f"{name}_ms_per_token"] = 1000 * (t_all - t_one) / max(outs[name].shape[1] - ids.shape[1] - 1, 1)
        row[f"{name}_new_tokens"] = outs[name].shape[1] - ids.shape[1]
    if len(outs) == 2:
        row["tokens_equal"] = bool(torch.equal(outs["generate"], outs["replayed"]))
    if stream and "replayed" in outs:
        recorder = ArrivalRecorder()
        row["streamed_s"], streamed = timed_generate(model, preset, ids, new, True, sampling, min_chunk,
                                                     streamer=recorder)
        tokens = torch.stack(recorder.puts[1:], dim=1) if len(recorder.puts) > 1 else None
        row["streamed_tokens_equal"] = bool(recorder.ended and tokens is not None
                                            and torch.equal(recorder.puts[0], ids.cpu())
                                            and torch.equal(tokens, streamed[:, ids.shape[1]:].cpu())
                                            and torch.equal(streamed, outs["replayed"]))
        gaps = sorted(recorder.gaps_ms())
        row["stream_gap_ms_median"] = gaps[len(gaps) // 2] if gaps else None
        row["stream_gap_ms_max"] = gaps[-1] if gaps else None
    return row


def model_and_prompts(layers: int, batch: int, prompt: int) -> tuple:
    """The 8B-shaped model (``layers`` layers; no end-of-sequence id, so every call makes all its new
    tokens) and ``batch`` random ``prompt``-token prompts on its device (seed 3; no id 0, the pad id
    these scripts pass, which ``generate`` would read as padding)."""
    model = e2e.build_model(layers)
    model.generation_config.eos_token_id = None
    gen = torch.Generator(device="cpu").manual_seed(3)
    return model, torch.randint(1, model.config.vocab_size, (batch, prompt), generator=gen).to(e2e.DEVICE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "polar-rope-3"])
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--min-chunk", type=int, default=128)
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16-flash reference")
    ap.add_argument("--stream", action="store_true", help="also the replayed call with a token_streamer (gaps timed)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="small model on the CPU")
    args = ap.parse_args()
    if args.smoke:
        e2e.DEVICE, args.prompt, args.new, args.layers = "cpu", 200, 40, 2
    model, ids = model_and_prompts(args.layers, args.batch, args.prompt)
    rows = []
    for preset in ([] if args.no_fp16 else ["fp16-flash"]) + args.presets:
        for sampled in (False, True):
            rows.append(measure(model, preset, ids, args.new, sampled, args.min_chunk, args.stream))
            print(rows[-1], flush=True)
    device = e2e._device_name()
    title = (f"{device}, {args.layers} layers, batch {args.batch}, {args.prompt}-token prompt, {args.new} new "
             f"tokens, min_chunk {args.min_chunk}: model.generate wall time")
    print(title)
    print("| preset | decoding | generate s | replayed s | generate ms/token | replayed ms/token | x | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        rep = r.get("replayed_ms_per_token")
        ratio = "" if rep is None else f"{r['generate_ms_per_token'] / rep:.2f}x"
        rep_s = "" if rep is None else f"{r['replayed_s']:.2f}"
        rep_ms = "" if rep is None else f"{rep:.2f}"
        print(f"| {r['preset']} | {'sampled' if r['sampled'] else 'greedy'} | {r['generate_s']:.2f} | {rep_s} | "
              f"{r['generate_ms_per_token']:.2f} | {rep_ms} | {ratio} | {r.get('tokens_equal', '')} |")
    streamed = [r for r in rows if "streamed_s" in r]
    if streamed:
        print("\nreplayed with a token_streamer (the whole call; gaps between two streamed tokens):")
        print("| preset | decoding | replayed s | streamed s | streamed = output | median gap ms | largest gap ms |")
        print("|---|---|---:|---:|:---:|---:|---:|")
        for r in streamed:
            gap = "" if r["stream_gap_ms_median"] is None else f"{r['stream_gap_ms_median']:.2f} | {r['stream_gap_ms_max']:.2f}"
            print(f"| {r['preset']} | {'sampled' if r['sampled'] else 'greedy'} | {r['replayed_s']:.2f} | "
                  f"{r['streamed_s']:.2f} | {r['streamed_tokens_equal']} | {gap} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"title": title, "command": " ".join(sys.argv), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
