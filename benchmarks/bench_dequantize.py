"""Dequantizing a layer's packed keys and values into 16 bits: the Triton kernels against PyTorch.

A step too long for the fused decode kernel (``kvpolar.cache.attention``) rebuilds the layer's 16-bit
keys and values (``QuantizedLayer.dequantized``) and attends through SDPA. Per preset and role
(keys, values) this script quantizes random normal ``[B, 8, T, 128]`` tensors (float16, or
``--dtypes``) with the preset's quantizer, checks ``kvpolar.kernels.dequantize`` against the
quantizer's ``dequantize`` (KIVI and fp8 bit for bit; polar-rope, turbo and polar-recursive within one
rounding of the 16-bit type; under the CPU interpreter bfloat16 ties round the other way), then
times both (CUDA events, median of ``--repeats``): the quantizer's ``dequantize_into`` (the kernel
where one reads the format, the PyTorch path else) and the PyTorch ``dequantize``, with the effective
bandwidth (packed bytes read + 16-bit bytes written) against a device-to-device copy measured in the
same run.

    PYTHONPATH=src python benchmarks/bench_dequantize.py --out $OUT/dequantize_h100.json   # on a GPU
    PYTHONPATH=src python benchmarks/bench_dequantize.py --smoke                           # CPU interpreter
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bandwidth import copy_bandwidth  # noqa: E402

PRESETS = ("kivi-2", "kivi-4", "kivi-8", "polar-rope-3", "polar-rope-4", "turbo-3", "fp8", "polar-recursive")


def _median_ms(fn, repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter on the CPU."""
    import time

    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def role_quantizer(preset: str, role: str):
    """(method name, quantizer) of ``preset``'s ``role`` ("keys" or "values")."""
    import kvpolar

    config = kvpolar.KVCacheConfig.preset(preset)
    name, params = ((config.key_quantizer, config.key_params) if role == "keys"
                    else (config.value_quantizer, config.value_params))
    return name, kvpolar.quantizer(name, **dict(params))


def random_heads(batch: int, tokens: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random normal keys or values ``[batch, 8, tokens, 128]`` in ``dtype`` from a generator seeded ``seed``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(batch, 8, tokens, 128, generator=gen, device=device, dtype=dtype)


def measure(preset: str, role: str, batch: int, tokens: int, device: str, repeats: int,
            dtype: torch.dtype = torch.float16) -> dict:
    from kvpolar.kernels import dequantize as kernels

    name, quantizer = role_quantizer(preset, role)
    x = random_heads(batch, tokens, device, dtype, seed=batch * 7 + tokens)
    packed = quantizer.quantize(x)
    del x
    row = {"preset": preset, "role": role, "format": type(packed).__name__, "batch": batch, "tokens": tokens,
           "dtype": str(dtype).removeprefix("torch."), "packed_bytes": packed.nbytes, "out_bytes": 2 * packed.numel,
           "kernel": kernels.supports(packed)}
    out = torch.empty(tuple(packed.shape), dtype=dtype, device=device)
    if row["kernel"]:
        kernels.dequantize_into(packed, out)
        reference = quantizer.dequantize(packed)
        diff = (out.float() - reference.float()).abs()
        row["max_abs_diff"] = diff.max().item()
        row["bit_exact"] = bool(torch.equal(out, reference))
        # one float16 rounding of each entry, plus float32's error on the largest (sums in another order)
        ulp = torch.finfo(dtype).eps * reference.float().abs() + 2.0**-20 * reference.float().abs().max()
        row["ok"] = row["bit_exact"] if name in ("kivi", "squat", "fp8") else bool((diff <= ulp).all())
        del reference
    row["dequantize_into_ms"] = _median_ms(lambda: quantizer.dequantize_into(packed, out), repeats, device)
    row["pytorch_ms"] = _median_ms(lambda: quantizer.dequantize(packed), repeats, device)
    moved = row["packed_bytes"] + row["out_bytes"]
    row["dequantize_into_gbps"] = moved / row["dequantize_into_ms"] / 1e6
    row["pytorch_gbps"] = moved / row["pytorch_ms"] / 1e6
    return row


def add_shared_arguments(parser: argparse.ArgumentParser, presets, repeats: int, out: str) -> None:
    """The options this script and ``bench_encode.py`` share (presets, sizes, repeats, dtypes, output,
    ``--smoke``)."""
    parser.add_argument("--presets", nargs="+", default=list(presets))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--dtypes", nargs="+", default=["float16"], choices=("float16", "bfloat16"))
    parser.add_argument("--out", default=out)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter)")


def device_of(args: argparse.Namespace) -> str:
    """"cuda", or (``--smoke`` or no GPU) "cpu" under Triton's interpreter with the sizes cut to one
    sequence of 40 tokens and two repeats."""
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.batches, args.tokens, args.repeats = [1], 40, 2
    return device


def run_header(device: str) -> dict:
    """The command, the GPU and the versions a result file starts with."""
    import kvpolar

    return {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "versions": {"torch": torch.__version__, "kvpolar": kvpolar.__version__,
                         "python": platform.python_version()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_shared_arguments(parser, PRESETS, repeats=20, out="dequantize.json")
    parser.add_argument("--polar-recursive-launch", default=None, metavar="TOKENSxWARPS",
                        help="polar-recursive's block and warps in the kernel instead of "
                             "dequantize.POLAR_RECURSIVE_LAUNCH, e.g. 64x4 (checked as any run)")
    args = parser.parse_args()
    device = device_of(args)
    if args.polar_recursive_launch:
        from kvpolar.kernels import dequantize

        block, warps = (int(n) for n in args.polar_recursive_launch.split("x"))
        dequantize.POLAR_RECURSIVE_LAUNCH = (block, warps)

    result = {**run_header(device), "polar_recursive_launch": args.polar_recursive_launch,
              "copy_gbps": copy_bandwidth(device, (1 << 30) if device == "cuda" else (1 << 20)), "rows": []}
    for preset in args.presets:
        for role in ("keys", "values"):
            for batch, dtype in itertools.product(args.batches, args.dtypes):
                row = measure(preset, role, batch, args.tokens, device, args.repeats, getattr(torch, dtype))
                result["rows"].append(row)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
                if device == "cuda":
                    torch.cuda.empty_cache()
    copy = result["copy_gbps"]
    print(f"\n{result['gpu']}: dequantize [B, 8, {args.tokens}, 128] into 16 bits; copy {copy:.0f} GB/s")
    print("| preset | role | format | dtype | B | kernel | dequantize_into ms (% copy BW) | PyTorch ms | speed-up | check |")
    print("|---|---|---|---|---:|---|---:|---:|---:|---|")
    for r in result["rows"]:
        check = ("exact" if r.get("bit_exact") else f"max diff {r['max_abs_diff']:.1e}") if r["kernel"] else ""
        if r["kernel"] and not r["ok"]:
            check += " FAILED"
        print(f"| {r['preset']} | {r['role']} | {r['format']} | {r['dtype']} | {r['batch']} | {'yes' if r['kernel'] else 'no'} | "
              f"{r['dequantize_into_ms']:.3f} ({100 * r['dequantize_into_gbps'] / copy:.0f}%) | {r['pytorch_ms']:.3f} | "
              f"{r['pytorch_ms'] / r['dequantize_into_ms']:.1f}x | {check} |")
    checked = [r for r in result["rows"] if r["kernel"]]
    print("checks ok:", all(r["ok"] for r in checked), f"({len(checked)})")


if __name__ == "__main__":
    main()
