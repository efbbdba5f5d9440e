"""Where one fused decode-attention call's GPU time goes, kernel by kernel (GPU).

For each case ``PRESET@BxT`` (``sdpa@BxT``: fp16 SDPA, the baseline) the call is timed as
``bench_attention`` times it (CUDA-graph median over input copies beyond L2: ``graph_ms``), then run
eagerly ``--calls`` times under ``torch.profiler`` on the same copies: each kernel's mean duration
per call (the split kernel, the merge of the splits with the folded window, any other launch). What
the graph's time holds beyond the kernels' sum is the gaps between them. Writes JSON to ``--out``
and prints a table last.

Usage: ``PYTHONPATH=src python benchmarks/attention_kernel_times.py --out $OUT [--cases kivi-2@1x32768
sdpa@1x32768] [--calls 50]``
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402
from kvpolar.kernels.decode_attention import LaunchConfig, describe_launch  # noqa: E402

CASES = ["sdpa@1x4096", "kivi-2@1x4096", "sdpa@1x32768", "kivi-2@1x32768", "polar-rope-3@1x32768",
         "sdpa@1x131072", "kivi-2@1x131072", "polar-rope-3@1x131072", "sdpa@8x32768", "kivi-2@8x32768"]


def parse_case(case: str) -> tuple[str, int, int]:
    """``"PRESET@BxT"`` -> (preset, batch, tokens)."""
    try:
        name, shape = case.split("@")
        b, t = (int(x) for x in shape.split("x"))
    except ValueError:
        raise SystemExit(f"--cases: {case!r} is not PRESET@BxT (e.g. kivi-2@1x32768)") from None
    if name != "sdpa" and name not in ba.PRESETS:
        raise SystemExit(f"--cases: preset {name!r} (allowed: sdpa, {', '.join(ba.PRESETS)})")
    return name, b, t


def case_calls(name: str, b: int, t: int, dev) -> tuple[callable, int, str | None]:
    """``(make_call, bytes per call, the launch as describe_launch reports it)`` for
    ``bench_attention.graph_ms`` (SDPA: no launch)."""
    if name == "sdpa":
        return ba.sdpa_maker(b, t, dev), 2 * b * ba.HKV * t * ba.D * 2, None
    pk, pv = ba.make_preset(name, b, t - ba.RESIDUAL, torch.float16, dev)
    nbytes = pk.nbytes + pv.nbytes + 2 * b * ba.HKV * ba.RESIDUAL * ba.D * 2
    q = torch.randn(b, ba.HQ, 1, ba.D, device=dev, dtype=torch.float16)
    launch = str(describe_launch(q, pk, pv))
    del pk, pv
    return ba.fused_maker(name, b, t - ba.RESIDUAL, dev, LaunchConfig()), nbytes, launch


def kernel_us(make_call, copies: int, calls: int) -> dict[str, float]:
    """Mean GPU microseconds per call of each kernel name, from ``calls`` eager calls over ``copies``
    input copies."""
    fns = [make_call(i) for i in range(copies)]
    for f in fns:
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fns[i % copies]()
        torch.cuda.synchronize()
    per_name: dict[str, float] = collections.defaultdict(float)
    for evt in prof.key_averages():
        if getattr(evt, "device_type", DeviceType.CUDA) != DeviceType.CUDA:
            continue  # (host-side events, whose device time repeats their kernels')
        us = getattr(evt, "device_time_total", None)
        if us is None:
            us = evt.cuda_time_total
        if us > 0:
            per_name[evt.key] += us / calls
    return dict(per_name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="+", default=CASES, help="PRESET@BxT (sdpa@BxT: fp16 SDPA)")
    ap.add_argument("--calls", type=int, default=50, help="eager calls profiled per case")
    ap.add_argument("--name", default="attention_kernel_times_h100.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for case in args.cases:
        name, b, t = parse_case(case)
        make_call, nbytes, launch = case_calls(name, b, t, dev)
        graph_ms = ba.graph_ms(make_call, nbytes)
        copies = max(1, min(64, ba.L2_DEFEAT_BYTES // nbytes + 1))
        kernels = kernel_us(make_call, copies, args.calls)
        rows.append({"case": case, "graph_us": graph_ms * 1e3, "kernels_us": kernels,
                     "kernels_sum_us": sum(kernels.values()), "bytes": nbytes, "launch": launch})
        print(case, f"graph {graph_ms * 1e3:.1f} us", {k[:40]: round(v, 1) for k, v in kernels.items()}, launch, flush=True)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(dev), "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    with open(os.path.join(args.out, args.name), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"\n{meta['gpu']}")
    print(f"{'case':24s} {'graph us':>9} {'kernels us':>10}  kernels")
    for r in rows:
        ks = ", ".join(f"{k.split('(')[0][:28]} {v:.1f}" for k, v in sorted(r["kernels_us"].items(), key=lambda kv: -kv[1]))
        print(f"{r['case']:24s} {r['graph_us']:9.1f} {r['kernels_sum_us']:10.1f}  {ks}")


if __name__ == "__main__":
    main()
