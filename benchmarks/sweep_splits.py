"""Fused decode attention against its number of splits (GPU): how many programs per (sequence, KV
head) the packed tokens should be cut into, measured next to fp16 SDPA in one run.

For each case ``PRESET@BxT`` the default launch (``describe_launch``: splits, programs per SM of the
one-wave target) is timed, then ``LaunchConfig(num_splits=S)`` for each ``S`` of ``--splits`` (scaled
by 32 / B, so the same counts of programs are tried at every batch). CUDA-graph medians with inputs
rotated beyond L2 (``bench_attention.graph_ms``). Writes JSON to ``--out`` and prints a table last.

``--absolute``: the ``--splits`` counts as given at every batch (batches that fill a wave badly, e.g. 72
sequences x 8 KV heads = 576 programs per split against 1584 slots, need counts of their own).

``--min-split-tokens M ...``: instead of fixed counts, the automatic count under
``LaunchConfig(min_split_tokens=M)`` for each ``M`` (the policy's least tokens per split, which
decides the splits of small caches; each row records the splits that launch took).

Usage: ``PYTHONPATH=src python benchmarks/sweep_splits.py --out $OUT [--cases kivi-2@8x32768 turbo-4@32x32768]
[--splits 2 3 4 5 6 8 12 16] [--absolute] [--min-split-tokens 256 128 64]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402
from kvpolar.kernels.decode_attention import LaunchConfig, describe_launch  # noqa: E402

CASES = ["kivi-2@8x32768", "kivi-2@32x32768", "turbo-4@32x32768", "turbo-3@32x32768", "polar-rope-4@32x32768",
         "kivi-4@32x32768", "polar-recursive@32x32768"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--splits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8, 12, 16],
                    help="splits at batch 32 (times 32 / B at batch B, unless --absolute)")
    ap.add_argument("--absolute", action="store_true", help="the --splits counts at every batch, unscaled")
    ap.add_argument("--min-split-tokens", type=int, nargs="+", default=None,
                    help="time the automatic split count under each of these least tokens per split instead")
    ap.add_argument("--name", default="sweep_splits_h100.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows, t0 = [], time.time()
    sdpa = {}
    for case in args.cases:
        name, shape = case.split("@")
        b, t = (int(x) for x in shape.split("x"))
        if (b, t) not in sdpa:
            sdpa[b, t] = ba.graph_ms(ba.sdpa_maker(b, t, dev), 2 * b * ba.HKV * t * ba.D * 2)
        pk, pv = ba.make_preset(name, b, t - ba.RESIDUAL, torch.float16, dev)
        q = torch.randn(b, ba.HQ, 1, ba.D, device=dev, dtype=torch.float16)
        if args.min_split_tokens:
            configs = [(f"min={m}", LaunchConfig(min_split_tokens=m)) for m in args.min_split_tokens]
        else:
            counts = args.splits if args.absolute else [max(1, s * 32 // b) for s in args.splits]
            configs = [(f"splits={s}", LaunchConfig(num_splits=s)) for s in counts]
        configs = [("default", LaunchConfig())] + configs
        launches = {label: describe_launch(q, pk, pv, cfg) for label, cfg in configs}
        default = launches["default"]
        del pk, pv
        for label, cfg in configs:
            ms = ba.preset_graph_ms(name, b, t, dev, cfg)
            splits = launches[label]["splits"]
            rows.append({"preset": name, "batch": b, "tokens": t, "config": label, "splits": splits,
                         "programs": b * ba.HKV * splits, "median_ms": ms, "sdpa_ms": sdpa[b, t],
                         "speedup_vs_sdpa_fp16": sdpa[b, t] / ms, "default_launch": default})
            print(f"  {case:24s} {label:10s} {ms:8.4f} ms {sdpa[b, t] / ms:5.2f}x", flush=True)
    props = torch.cuda.get_device_properties(dev)
    meta = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv), "elapsed_s": time.time() - t0}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"\n{props.name}: speed-up over fp16 SDPA by splits (default: describe_launch)")
    print(f"{'case':24s} {'config':10s} {'splits':>6} {'programs':>8} {'ms':>8} {'x sdpa':>6}")
    for r in rows:
        print(f"{r['preset'] + '@' + str(r['batch']) + 'x' + str(r['tokens']):24s} {r['config']:10s} {r['splits']:6d} "
              f"{r['programs']:8d} {r['median_ms']:8.4f} {r['speedup_vs_sdpa_fp16']:6.2f}"
              + (f"  (pps {r['default_launch']['programs_per_sm']})" if r["config"] == "default" else ""))


if __name__ == "__main__":
    main()
