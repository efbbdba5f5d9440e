"""turbo by parts in the transposed decode kernel on the GPU: correctness of every code width, and
times against the classic kernel and fp16 SDPA.

Checks: ``fused_decode_attention`` (transposed kernel forced) against ``reference_decode_attention``
for turbo keys and values of 1-4 bits and the mixed pairs (turbo keys with KIVI-2 values, KIVI-2 keys
with turbo values), fp16 and bf16, B=2, 32/8 heads, D=128, 2110 packed + 128 residual tokens, ragged
mask. Times: B=8 and 32 at 32k tokens, CUDA graphs (``bench_attention.graph_ms``): fp16 SDPA,
kivi-2, and each turbo pair on the transposed kernel (3 and 2 pipeline stages) and the classic
kernel; with ``--small``, B=1 at 4k and 8k tokens (caches under ``transposed_min_rows``) on the
classic kernel and the transposed kernel forced. Writes ``turbo_parts_check.json`` (or
``turbo_parts_small.json``).

    PYTHONPATH=src python benchmarks/turbo_parts_check.py OUT_DIR [--small]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention

sys.path.insert(0, os.path.dirname(__file__))
import bench_attention as ba  # noqa: E402

dev = "cuda"
B, HQ, HKV, D, TK, R = 2, 32, 8, 128, 2110, 128
KIVI_K = ("kivi", {"bits": 2, "group_size": 32, "axis": "channel"})
KIVI_V = ("kivi", {"bits": 2, "group_size": 32, "axis": "token"})
PAIRS = {f"turbo-{b}": (("turbo", {"bits": b}), ("turbo", {"bits": b})) for b in (1, 2, 3, 4)}
PAIRS.update({"turbo-k3v4": (("turbo", {"bits": 3}), ("turbo", {"bits": 4})),
              "turbo3-kivi2": (("turbo", {"bits": 3}), KIVI_V), "kivi2-turbo4": (KIVI_K, ("turbo", {"bits": 4}))})
LAUNCHES = {"transposed": LaunchConfig(), "transposed-s2": LaunchConfig(transposed_stages=2),
            "classic": LaunchConfig(transposed=False)}
SMALL_LAUNCHES = {"default": LaunchConfig(), "transposed-forced": LaunchConfig(transposed_min_rows=0),
                  "classic": LaunchConfig(transposed=False)}


def check():
    rows = []
    cfg = LaunchConfig(transposed_min_rows=0)
    for name, (kspec, vspec) in PAIRS.items():
        for dtype in (torch.float16, torch.bfloat16):
            kq, vq = kvpolar.quantizer(kspec[0], **kspec[1]), kvpolar.quantizer(vspec[0], **vspec[1])
            args = ba.ragged_case(kq, vq, dtype, dev, B, TK, R)
            want = reference_decode_attention(*args).float()
            got = fused_decode_attention(*args, config=cfg).float()
            rel = ((got - want).abs().max() / want.abs().max()).item()
            ok = bool(torch.isfinite(got).all()) and rel < (1e-2 if dtype == torch.float16 else 4e-2)
            rows.append({"pair": name, "dtype": str(dtype), "max_rel_error": rel, "ok": ok})
            print(f"check {name:13s} {str(dtype):14s} rel err {rel:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return rows


def built(kspec, vspec, b, t):
    """Stored keys / values of one quantized sequence repeated over the batch (as ``bench_attention``)."""
    gen = torch.Generator(device=dev).manual_seed(t)
    k = torch.randn(1, HKV, t, D, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(1, HKV, t, D, device=dev, dtype=torch.float16, generator=gen)
    pk = kvpolar.quantizer(kspec[0], **kspec[1]).quantize(k)
    pv = kvpolar.quantizer(vspec[0], **vspec[1]).quantize(v)
    return ba._repeat_batch(pk, b), ba._repeat_batch(pv, b)


def time_all(b, t, launch_set=LAUNCHES):
    rows = []
    tk = t - ba.RESIDUAL
    q = [torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16) for _ in range(2)]
    rk = torch.randn(b, HKV, ba.RESIDUAL, D, device=dev, dtype=torch.float16)
    rv = torch.randn_like(rk)
    kf = torch.randn(b, HKV, t, D, device=dev, dtype=torch.float16)
    vf = torch.randn_like(kf)
    sdpa_bytes = 2 * kf.numel() * 2
    sdpa = ba.graph_ms(lambda i: lambda: F.scaled_dot_product_attention(q[i % 2], kf, vf, enable_gqa=True), sdpa_bytes)
    rows.append({"batch": b, "tokens": t, "method": "sdpa-fp16", "launch": "-", "ms": sdpa, "speedup": 1.0})
    print(f"B={b} T={t} sdpa-fp16 {sdpa:.4f} ms", flush=True)
    for name in ("kivi-2", "turbo-2", "turbo-3", "turbo-4", "turbo-k3v4", "turbo3-kivi2", "kivi2-turbo4"):
        if name == "kivi-2":
            pk, pv = ba.make_preset("kivi-2", b, tk, torch.float16, dev)
            launches = {"default": launch_set.get("default", LAUNCHES["transposed"])}
        else:
            pk, pv = built(*PAIRS[name], b, tk)
            launches = launch_set
        nbytes = pk.nbytes + pv.nbytes
        for launch, cfg in launches.items():
            def call(i, cfg=cfg):
                return lambda: fused_decode_attention(q[i % 2], pk, pv, None, None, rk, rv, D**-0.5, None, cfg)
            ms = ba.graph_ms(call, nbytes)
            rows.append({"batch": b, "tokens": t, "method": name, "launch": launch, "ms": ms, "speedup": sdpa / ms,
                         "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6})
            print(f"B={b} T={t} {name:13s} {launch:13s} {ms:.4f} ms  {sdpa / ms:.2f}x fp16  "
                  f"{nbytes / ms / 1e6:.0f} GB/s", flush=True)
    return rows


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    small = "--small" in sys.argv
    if small:
        checks = []
        times = time_all(1, 4096, SMALL_LAUNCHES) + time_all(1, 8192, SMALL_LAUNCHES)
    else:
        checks = check()
        times = time_all(32, 32768) + time_all(8, 32768)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": "PYTHONPATH=src python benchmarks/turbo_parts_check.py OUT" + (" --small" if small else "")}
    with open(os.path.join(out, "turbo_parts_small.json" if small else "turbo_parts_check.json"), "w") as f:
        json.dump({"meta": meta, "checks": checks, "times": times}, f, indent=1)
    print("\n| batch | method | launch | ms | x fp16 SDPA |\n|---|---|---|---:|---:|")
    for r in times:
        print(f"| {r['batch']} | {r['method']} | {r['launch']} | {r['ms']:.3f} | {r['speedup']:.2f} |")


if __name__ == "__main__":
    main()
