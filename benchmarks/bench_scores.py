"""Decode-time query-key scores: fp16 baselines vs KIVI vs polar-rope's Triton kernel, on one GPU.

    PYTHONPATH=src python benchmarks/bench_scores.py --out benchmarks/results/scores_h100.json

One run: correctness checks of both polar-rope kernels against their PyTorch references, a small
launch-config sweep per bit setting, then every method at B in {1, 8}, 32 query heads on 8 KV heads,
head dim 128, one query token, T in {4k, 32k, 128k}; then the GPU encoder at 32k. Times are medians of
``triton.testing.do_bench`` (CUDA events; it flushes L2 before every repetition, so inputs are read
from device memory). Bandwidth: bytes the method must read (keys or packed codes + metadata + queries)
over time, next to a device-to-device copy measured in the same run. Prints a table last; writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv  # tiny sizes on the CPU under the Triton interpreter: checks the script only
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import kvpolar  # noqa: E402
from kvpolar import synthetic  # noqa: E402
from kvpolar.kernels.polar_rope_encode import polar_rope_encode  # noqa: E402
from kvpolar.kernels.polar_rope_scores import MODES, ScoresConfig, polar_rope_scores  # noqa: E402
from kvpolar.quantizers.polar_rope import dequantize_polar, quantize_polar, unpack_codes  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bandwidth import copy_bandwidth  # noqa: E402

BITS = [(2, 4), (3, 3), (4, 4)]
DEV = "cpu" if SMOKE else "cuda"
S = 128 if SMOKE else 1  # shrink factor of token counts in smoke mode
HQ, HKV, D, GROUP = (8, 2, 32, 16) if SMOKE else (32, 8, 128, 128)


def median_ms(fn, rep: int = 100) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return float(do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's repeat_kv: [B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]."""
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ----- correctness ---------------------------------------------------------------------------------
def check_scores() -> list[dict]:
    rows = []
    cases = [(2, 4, 1, 4096 // S, torch.float16), (2, 1, 3, 1000 // S, torch.bfloat16), (1, 4, 1, 1, torch.float16)]
    for b, gqa, tq, t, dtype in cases:
        for rb, ab in BITS if t > 1000 // S else BITS[:1]:
            keys = synthetic.rope_keys(b, 2, t, D, seed=t + rb, dtype=dtype).to(DEV)
            p = quantize_polar(keys, rb, ab, GROUP, "half", "shortest-arc")
            q = torch.randn(b, 2 * gqa, tq, D, device=DEV).to(dtype)
            exact = q.double() @ dequantize_polar(p, torch.float64).repeat_interleave(gqa, 1).transpose(-1, -2)
            work = q.float() @ dequantize_polar(p).to(dtype).float().repeat_interleave(gqa, 1).transpose(-1, -2)
            ref_err = (work.double() - exact).abs().max().item()
            for mode in MODES:
                for dot in (False, True) if mode != "transposed" else (None,):
                    cfg = ScoresConfig(block_t=64 if not SMOKE else 16, mode=mode, dot=dot)
                    try:
                        got = polar_rope_scores(q, p, cfg)
                    except Exception as e:  # noqa: BLE001
                        rows.append(dict(check="scores", config=dataclasses.asdict(cfg), ok=False, error=repr(e)[:300]))
                        continue
                    err = (got.double() - exact).abs().max().item()
                    ok = bool(err <= 2 * ref_err + 1e-6 * exact.abs().max().item()) and bool(torch.isfinite(got).all())
                    rows.append(dict(check="scores", B=b, gqa=gqa, Tq=tq, T=t, dtype=str(dtype), bits=f"r{rb}a{ab}",
                                     config=dataclasses.asdict(cfg), max_err=err, ref_max_err=ref_err, ok=ok))
    # Quantizer.scores on CUDA goes through the kernel
    qz = kvpolar.quantizer("polar-rope", group_size=GROUP)
    keys = synthetic.rope_keys(1, 8, 300, D, seed=3).to(DEV)
    p = qz.quantize(keys)
    q = torch.randn(1, 32, 1, D, device=DEV, dtype=torch.float16)
    rows.append(dict(check="Quantizer.scores uses the kernel", ok=bool(torch.equal(qz.scores(q, p), polar_rope_scores(q, p)))))
    return rows


def check_encode() -> list[dict]:
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        keys = synthetic.rope_keys(2, 4, 4096 // S + 37, D, seed=11, dtype=dtype).to(DEV)
        for rb, ab in BITS:
            for angle_range in ("minmax", "shortest-arc"):
                ref = quantize_polar(keys, rb, ab, GROUP, "half", angle_range)
                got = polar_rope_encode(keys, rb, ab, GROUP, "half", angle_range)
                (r1, a1), (r2, a2) = unpack_codes(ref), unpack_codes(got)
                same_codes = ((r1 == r2) & (a1 == a2)).float().mean().item()
                meta_same = min(
                    (getattr(got, f) == getattr(ref, f)).float().mean().item()
                    for f in ("radius_scale", "radius_min", "angle_scale", "angle_min")
                )
                err_ref = ((dequantize_polar(ref) - keys.float()).norm() / keys.float().norm()).item()
                err_got = ((dequantize_polar(got) - keys.float()).norm() / keys.float().norm()).item()
                ok = same_codes > 0.99 and meta_same > 0.99 and abs(err_got - err_ref) <= 0.01 * err_ref
                rows.append(dict(check="encode", dtype=str(dtype), bits=f"r{rb}a{ab}", angle_range=angle_range,
                                 same_codes=same_codes, same_metadata=meta_same, key_rel_err_ref=err_ref,
                                 key_rel_err_kernel=err_got, ok=bool(ok)))
    return rows


# ----- timing ------------------------------------------------------------------------------------
def tune(b: int, t: int) -> dict[str, dict]:
    """Median time of each launch config per bit setting at one shape; the fastest is used after."""
    q = torch.randn(b, HQ, 1, D, device=DEV, dtype=torch.float16)
    keys = torch.randn(b, HKV, t, D, device=DEV, dtype=torch.float16)
    best, shortlist = {}, None
    for rb, ab in BITS:  # the sweep for the first setting, its three fastest configs for the others
        p = polar_rope_encode(keys, rb, ab, GROUP, "half", "shortest-arc")
        if shortlist is None:  # the earlier sweep's best CUDA-core / tensor-core configs, then the transposed mode
            configs = [ScoresConfig(block_t=128, mode="direct", dot=False), ScoresConfig(block_t=128, mode="direct", dot=True),
                       ScoresConfig(block_t=128, mode="angle_table", dot=True)]
            configs = [ScoresConfig(block_t=16, mode=c.mode, dot=c.dot) for c in configs] if SMOKE else configs
            configs += [ScoresConfig(block_t=bt, blocks=nb, transposed_warps=w, mode="transposed")
                        for bt, nb, w in ((32, 4, 1), (32, 8, 1), (64, 4, 2), (64, 8, 2))]
        else:
            configs = shortlist
        trials = []
        for cfg in configs:
            try:
                ms = median_ms(lambda: polar_rope_scores(q, p, cfg), rep=40)
            except Exception as e:  # a config that does not compile is recorded, not fatal
                trials.append(dict(config=dataclasses.asdict(cfg), error=repr(e)[:200]))
                continue
            trials.append(dict(config=dataclasses.asdict(cfg), ms=ms))
        ok = sorted((x for x in trials if "ms" in x), key=lambda x: x["ms"])
        shortlist = shortlist or [ScoresConfig(**x["config"]) for x in ok[:3]]
        best[f"r{rb}a{ab}"] = dict(best=ok[0], trials=trials)
        print(f"tune r{rb}a{ab} B={b} T={t}: best {ok[0]}", flush=True)
    return best


def time_shape(b: int, t: int, configs: dict[str, ScoresConfig], copy_bw: float) -> list[dict]:
    torch.manual_seed(b * 7 + t)
    q = torch.randn(b, HQ, 1, D, device=DEV, dtype=torch.float16)
    keys = torch.randn(b, HKV, t, D, device=DEV, dtype=torch.float16)
    qg = q.view(b, HKV, HQ // HKV, D)
    out_fp16 = b * HQ * t * 2
    rows = []

    def add(method, ms, read, written, note=""):
        rows.append(dict(B=b, T=t, method=method, ms=ms, bytes_read=read, bytes_written=written,
                         read_GBps=read / (ms * 1e-3) / 1e9,
                         moved_frac_of_copy_bw=(read + written) / (ms * 1e-3) / copy_bw, note=note))

    add("fp16 repeat_kv + matmul", median_ms(lambda: q @ repeat_kv(keys, HQ // HKV).transpose(-1, -2)),
        nbytes(q, keys), out_fp16, "as users write it: expands keys to 32 heads each call")
    add("fp16 GQA matmul", median_ms(lambda: qg @ keys.transpose(-1, -2)), nbytes(q, keys), out_fp16,
        "query heads grouped per KV head; keys read once")
    kivi = kvpolar.quantizer("kivi", bits=2, group_size=32, axis="channel")
    pk = kivi.quantize(keys)
    add("kivi 2-bit G32 dequantize + GQA matmul", median_ms(lambda: qg @ kivi.dequantize(pk).transpose(-1, -2), rep=50),
        pk.nbytes + nbytes(q), out_fp16, f"{pk.bits_per_element:.2f} bits/elem; PyTorch path, not a fused kernel")
    del pk
    for rb, ab in BITS:
        p = polar_rope_encode(keys, rb, ab, GROUP, "half", "shortest-arc")
        cfg = configs[f"r{rb}a{ab}"]
        ms = median_ms(lambda: polar_rope_scores(q, p, cfg))
        add(f"polar-rope r{rb}a{ab} (Triton)", ms, p.nbytes + nbytes(q), b * HQ * t * 4,
            f"{p.bits_per_element:.2f} bits/elem; {cfg}")
        del p
    fp16 = {r["method"]: r["ms"] for r in rows if r["method"].startswith("fp16")}
    for r in rows:
        r["speedup_vs_fp16_repeat_kv"] = fp16["fp16 repeat_kv + matmul"] / r["ms"]
        r["speedup_vs_fp16_gqa"] = fp16["fp16 GQA matmul"] / r["ms"]
    del keys
    torch.cuda.empty_cache()
    return rows


def time_encode(copy_bw: float) -> list[dict]:
    rows = []
    for b in (1, 8):
        keys = torch.randn(b, HKV, 32768 // S, D, device=DEV, dtype=torch.float16)
        copy_ms = median_ms(lambda: keys.clone())
        for angle_range in ("minmax", "shortest-arc"):
            kernel_ms = median_ms(lambda: polar_rope_encode(keys, 2, 4, GROUP, "half", angle_range), rep=50)
            torch_ms = median_ms(lambda: quantize_polar(keys, 2, 4, GROUP, "half", angle_range), rep=50)
            rows.append(dict(B=b, T=32768, angle_range=angle_range, bits="r2a4", kernel_ms=kernel_ms,
                             pytorch_ms=torch_ms, fp16_clone_ms=copy_ms,
                             read_GBps=nbytes(keys) / (kernel_ms * 1e-3) / 1e9))
    return rows


def environment(command: str) -> dict:
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        driver = "unknown"
    return dict(gpu=torch.cuda.get_device_name() if not SMOKE else "cpu (smoke)", driver=driver, torch=torch.__version__,
                cuda=torch.version.cuda, triton=triton.__version__, python=platform.python_version(),
                kvpolar=kvpolar.__version__, command=command,
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/scores_h100.json")
    parser.add_argument("--lengths", default="4096,32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET")
    parser.add_argument("--no-encode", action="store_true", help="skip the encode checks and timings")
    args = parser.parse_args()
    command = "PYTHONPATH=src python " + " ".join(sys.argv)
    result = dict(environment=environment(command))
    print(result["environment"], flush=True)

    result["checks"] = check_scores() + ([] if args.no_encode else check_encode())
    failed = [c for c in result["checks"] if not c["ok"]]
    print(f"checks: {len(result['checks']) - len(failed)} passed, {len(failed)} failed", flush=True)
    for c in failed:
        print("FAILED", c, flush=True)

    copy_bw = copy_bandwidth(DEV, 1 << (12 if SMOKE else 30)) * 1e9  # bytes per second
    result["copy_bandwidth_GBps"] = copy_bw / 1e9
    result["tuning"] = tune(1 if SMOKE else 8, 32768 // S)
    configs = {k: ScoresConfig(**v["best"]["config"]) for k, v in result["tuning"].items()}
    rows = []
    for b in map(int, args.batches.split(",")):
        for t in (int(x) // S for x in args.lengths.split(",")):
            rows += time_shape(b, t, configs, copy_bw)
            print(f"timed B={b} T={t}", flush=True)
    result["scores"] = rows
    result["encode"] = [] if args.no_encode else time_encode(copy_bw)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\nGPU: {result['environment']['gpu']}; device-to-device copy {copy_bw / 1e9:.0f} GB/s (read+write)")
    print("| B | T | method | time (us) | x fp16 repeat_kv | x fp16 GQA | read GB/s | moved / copy bw |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['B']} | {r['T'] // 1024}k | {r['method']} | {r['ms'] * 1e3:.1f} | "
              f"{r['speedup_vs_fp16_repeat_kv']:.2f} | {r['speedup_vs_fp16_gqa']:.2f} | {r['read_GBps']:.0f} | "
              f"{r['moved_frac_of_copy_bw']:.2f} |")
    print("\n| B | T | encode r2a4 | Triton (us) | PyTorch (us) | fp16 clone (us) |")
    print("|---|---|---|---:|---:|---:|")
    for r in result["encode"]:
        print(f"| {r['B']} | 32k | {r['angle_range']} | {r['kernel_ms'] * 1e3:.1f} | {r['pytorch_ms'] * 1e3:.1f} | "
              f"{r['fp16_clone_ms'] * 1e3:.1f} |")
    print(f"\nchecks: {len(result['checks']) - len(failed)} passed, {len(failed)} failed")


if __name__ == "__main__":
    main()
