"""Fused decode attention over the turbo / fp8 / polar-recursive presets vs fp16 SDPA (and kivi-2).

32 query heads, 8 KV heads, D = 128, one query token; ``T - 128`` packed tokens quantized by the
presets' real quantizers (appended in chunks of 4096 tokens, as a growing cache does: fp8 gets one
scale per chunk) plus a 128-token fp16 residual window. First a correctness check per preset against
``reference_decode_attention`` (max error relative to the output's largest magnitude), then medians
of ``triton.testing.do_bench`` (L2 flushed between runs; eager calls, Python overhead included) for
the fused kernel and for ``scaled_dot_product_attention(..., enable_gqa=True)`` over an fp16 cache.
Bytes read = packed keys + values (every stored tensor) + residual window + query.

Usage: ``PYTHONPATH=src python benchmarks/bench_decode_formats.py --out benchmarks/results``
(``--batches 1 8 --tokens 4096 32768``; ``--smoke``: CPU-sized checks only, no timing, runs under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

import kvpolar  # noqa: E402
from kvpolar.cache.config import PRESETS  # noqa: E402
from kvpolar.decode_attention import reference_decode_attention  # noqa: E402
from kvpolar.kernels.decode_attention import fused_decode_attention, supports  # noqa: E402

HQ, HKV, D, RESIDUAL, CHUNK = 32, 8, 128, 128, 4096
NAMES = ["kivi-2", "turbo-3", "turbo-4", "turbo-k3v4", "fp8", "polar-recursive"]


def build(name, keys, values):
    """(key quantizer, value quantizer, packed keys, packed values) of a preset, in 4096-token chunks."""
    cfg = PRESETS[name]
    kq = kvpolar.quantizer(cfg.key_quantizer, **cfg.key_params)
    vq = kvpolar.quantizer(cfg.value_quantizer, **cfg.value_params)
    t = keys.shape[-2]
    pk = kvpolar.cat([kq.quantize(keys[..., i : i + CHUNK, :]) for i in range(0, t, CHUNK)])
    pv = kvpolar.cat([vq.quantize(values[..., i : i + CHUNK, :]) for i in range(0, t, CHUNK)])
    return kq, vq, pk, pv


def inputs(b, t, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(b, HKV, t, D, device=dev, generator=g).to(dtype)
    v = torch.randn(b, HKV, t, D, device=dev, generator=g).to(dtype)
    q = torch.randn(b, HQ, 1, D, device=dev, generator=g).to(dtype)
    return q, k, v


def check(name, b, t, dtype, dev):
    q, k, v = inputs(b, t, dtype, dev, seed=1)
    tk = t - RESIDUAL
    kq, vq, pk, pv = build(name, k[..., :tk, :], v[..., :tk, :])
    rk, rv = k[..., tk:, :], v[..., tk:, :]
    lengths = torch.tensor([t - 37 * i for i in range(b)], device=dev)
    mask = (torch.arange(t, device=dev)[None, :] >= t - lengths[:, None])[:, None, None, :]
    want = reference_decode_attention(q, pk, pv, kq, vq, rk, rv, D**-0.5, mask).float()
    out = fused_decode_attention(q, pk, pv, kq, vq, rk, rv, D**-0.5, mask).float()
    rel = ((out - want).abs().max() / want.abs().max()).item()
    ok = supports(pk, pv) and bool(torch.isfinite(out).all()) and rel < (1e-2 if dtype == torch.float16 else 4e-2)
    print(f"check {name:16s} B={b} N={t} {str(dtype):14s} rel err {rel:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return {"preset": name, "batch": b, "tokens": t, "dtype": str(dtype), "max_rel_error": rel, "ok": ok}


def median_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def time_shape(b, t, dev, names):
    q, k, v = inputs(b, t, torch.float16, dev)
    tk = t - RESIDUAL
    rk, rv = k[..., tk:, :], v[..., tk:, :]
    sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=True))
    fp16_bytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * 2
    rows = [{"batch": b, "tokens": t, "method": "sdpa-fp16", "median_ms": sdpa_ms, "bytes": fp16_bytes}]
    for name in names:
        kq, vq, pk, pv = build(name, k[..., :tk, :], v[..., :tk, :])
        nbytes = pk.nbytes + pv.nbytes + 2 * rk.numel() * 2 + 2 * q.numel() * 2
        ms = median_ms(lambda: fused_decode_attention(q, pk, pv, kq, vq, rk, rv, D**-0.5))
        rows.append({"batch": b, "tokens": t, "method": name, "median_ms": ms, "bytes": nbytes,
                     "speedup_vs_sdpa_fp16": sdpa_ms / ms})
    for r in rows:
        r["gb_per_s"] = r["bytes"] / r["median_ms"] / 1e6
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--presets", nargs="+", default=NAMES)
    ap.add_argument("--smoke", action="store_true", help="small correctness checks only (CPU interpreter)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        checks = [check(n, 2, 200, dt, dev) for n in args.presets for dt in (torch.float16, torch.bfloat16)]
        sys.exit(0 if all(c["ok"] for c in checks) else "correctness check FAILED")
    props = torch.cuda.get_device_properties(dev)
    meta = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    checks = [check(n, 2, 3000, dt, dev) for n in args.presets for dt in (torch.float16, torch.bfloat16)]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode_formats_h100.json")
    rows = []
    for b in args.batches:
        for t in args.tokens:
            rows += time_shape(b, t, dev, args.presets)
            with open(path, "w") as f:  # after every shape: a cut-off run keeps what it measured
                json.dump({"meta": meta, "checks": checks, "results": rows}, f, indent=1)
    print(f"\n{props.name}; wrote {path}")
    print(f"{'B':>3} {'T':>7} {'method':18s} {'ms':>9} {'x sdpa':>7} {'GB/s':>7}")
    for r in rows:
        print(f"{r['batch']:>3} {r['tokens']:>7} {r['method']:18s} {r['median_ms']:9.4f} "
              f"{r.get('speedup_vs_sdpa_fp16', 1.0):7.2f} {r['gb_per_s']:7.0f}")
    if not all(c["ok"] for c in checks):
        sys.exit("correctness check FAILED (see above)")


if __name__ == "__main__":
    main()
