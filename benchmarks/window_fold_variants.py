"""The residual window's share of a fused decode-attention call at small batches (GPU): the folded
window's loop step and warps, against the window's own launch.

Each case ``PRESET@BxT`` is checked against the reference and timed (``bench_attention.graph_ms``)
under each variant: ``fold-Nx W`` (the window folded into the merge, one program per query row taking
``WINDOW_BLOCK_N`` = N tokens a step with ``WINDOW_WARPS`` = W warps; the per-KV-head form, batch >= 9 at
8 KV heads, keeps its own step, ``KV_HEAD_WINDOW_BLOCK_N``, and 4 warps: in the thirty-second session's
run, before that constant, ``WINDOW_BLOCK_N`` set its step too) and ``own-launch``
(``MAX_FOLDED_WINDOW`` = 0: the split kernel over the window, then the plain merge). Writes JSON to
``--out`` and prints a table last.

Usage: ``PYTHONPATH=src python benchmarks/window_fold_variants.py --out $OUT [--cases kivi-2@1x32768]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402
from kvpolar.kernels import decode_attention as da  # noqa: E402

CASES = ["kivi-2@1x4096", "kivi-2@1x32768", "kivi-2@1x131072", "polar-rope-3@1x32768", "kivi-2@8x32768",
         "kivi-2@32x32768"]
VARIANTS = {"fold-32x4": (32, 4, 512), "fold-64x4": (64, 4, 512), "fold-64x8": (64, 8, 512),
            "fold-128x8": (128, 8, 512), "own-launch": (32, 4, 0)}


def set_variant(name: str) -> None:
    da.WINDOW_BLOCK_N, da.WINDOW_WARPS, da.MAX_FOLDED_WINDOW = VARIANTS[name]


def check(name: str, b: int, t: int, dev) -> float:
    """Relative L2 error against the reference over the whole batch (no mask; one copy)."""
    pk, pv = ba.make_preset(name, b, t - ba.RESIDUAL, torch.float16, dev)
    q, rk, rv, _ = ba.check_inputs(b, 1, t - ba.RESIDUAL, torch.float16, dev)
    out = da.fused_decode_attention(q, pk, pv, None, None, rk, rv, ba.D**-0.5, None, da.LaunchConfig()).float()
    want = ba.reference(name, q, pk, pv, rk, rv, ba.D**-0.5, None)
    return ((out - want).norm() / want.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", nargs="+", default=CASES)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--name", default="window_fold_variants_h100.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    saved = (da.WINDOW_BLOCK_N, da.WINDOW_WARPS, da.MAX_FOLDED_WINDOW)
    rows = []
    for case in args.cases:
        name, shape = case.split("@")
        b, t = (int(x) for x in shape.split("x"))
        pk, pv = ba.make_preset(name, b, t - ba.RESIDUAL, torch.float16, dev)
        nbytes = pk.nbytes + pv.nbytes + 2 * b * ba.HKV * ba.RESIDUAL * ba.D * 2
        del pk, pv
        for vname in args.variants:
            set_variant(vname)
            rel = check(name, b, t, dev)
            ms = ba.graph_ms(ba.fused_maker(name, b, t - ba.RESIDUAL, dev, da.LaunchConfig()), nbytes)
            rows.append({"case": case, "variant": vname, "median_ms": ms, "rel_l2_error": rel, "ok": rel < 5e-3})
            print(f"{case:24s} {vname:12s} {ms * 1e3:8.1f} us  rel {rel:.1e}", flush=True)
            torch.cuda.empty_cache()
        da.WINDOW_BLOCK_N, da.WINDOW_WARPS, da.MAX_FOLDED_WINDOW = saved
    os.makedirs(args.out, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(dev), "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "variants": VARIANTS}
    with open(os.path.join(args.out, args.name), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"\n{meta['gpu']}, us per call (all checks ok: {all(r['ok'] for r in rows)})")
    print(f"{'case':24s} " + " ".join(f"{v:>11s}" for v in args.variants))
    for case in args.cases:
        cells = {r["variant"]: r["median_ms"] * 1e3 for r in rows if r["case"] == case}
        print(f"{case:24s} " + " ".join(f"{cells[v]:11.1f}" for v in args.variants))


if __name__ == "__main__":
    main()
