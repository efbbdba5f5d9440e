"""Quantizing keys and values on the GPU (the prefill's cost): the Triton encoders against PyTorch.

Per preset and role this script quantizes random normal ``[B, 8, T, 128]`` tensors with the preset's
quantizer twice, through its Triton encoder (``kvpolar.kernels.kivi_encode``,
``kvpolar.kernels.polar_rope_encode``) and through its PyTorch path (the quantizer's module told
that Triton is missing), checks the two stored forms against each other (KIVI bit for bit;
polar-rope: the share of codes apart below 1e-4, its encoder's documented rounding), and times both
(CUDA events, median of ``--repeats``). ``--prefill`` then times a batch-1 prefill of ``--context``
tokens through a Llama-3.1-8B-shaped model (``bench_end_to_end.build_model``, ``--layers`` layers)
per preset, with the encoders and without them (median of ``--prefill-repeats``), beside fp16.

    PYTHONPATH=src python benchmarks/bench_encode.py --prefill --out $OUT/encode_h100.json   # on a GPU
    PYTHONPATH=src python benchmarks/bench_encode.py --smoke          # CPU interpreter, KIVI presets
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

PRESETS = ("kivi-2", "kivi-4", "polar-rope-3")
#: the quantizer modules whose ``_quantize`` takes a Triton encoder on CUDA
ENCODER_MODULES = ("kvpolar.quantizers.kivi", "kvpolar.quantizers.polar_rope")


@contextlib.contextmanager
def pytorch_path():
    """The quantizers' PyTorch path on CUDA: their modules see no Triton."""
    import importlib

    modules = [importlib.import_module(name) for name in ENCODER_MODULES]
    saved = [m.triton_available for m in modules]
    for m in modules:
        m.triton_available = lambda: False
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.triton_available = f


def _median_ms(fn, repeats: int, device: str) -> float:
    import bench_dequantize

    return bench_dequantize._median_ms(fn, repeats, device)


def compare(kernel, torch_path) -> dict:
    """How the two stored forms differ: every stored tensor equal, or the share of codes apart."""
    equal = all(torch.equal(getattr(kernel, name), tensor) for name, tensor in torch_path.stored_tensors().items())
    out = {"bit_exact": equal}
    if not equal and type(kernel).__name__ == "PolarRopeTensor":
        from kvpolar.quantizers.polar_rope import unpack_codes

        (rk, ak), (rt, at) = unpack_codes(kernel), unpack_codes(torch_path)
        apart = ((rk.int() - rt.int()).abs() + (ak.int() - at.int()).abs()).float()
        out["codes_apart_share"] = (apart > 0).float().mean().item()
        out["max_levels_apart"] = apart.max().item()
    return out


def measure(preset: str, role: str, batch: int, tokens: int, device: str, repeats: int, dtype) -> dict:
    import bench_dequantize

    _, quantizer = bench_dequantize.role_quantizer(preset, role)
    x = bench_dequantize.random_heads(batch, tokens, device, dtype, seed=batch * 5 + tokens)
    kernel = quantizer.quantize(x)
    with pytorch_path():
        reference = quantizer.quantize(x)
        pytorch_ms = _median_ms(lambda: quantizer.quantize(x), repeats, device)
    row = {"preset": preset, "role": role, "format": type(kernel).__name__, "batch": batch, "tokens": tokens,
           "dtype": str(dtype).removeprefix("torch."), **compare(kernel, reference),
           "kernel_ms": _median_ms(lambda: quantizer.quantize(x), repeats, device), "pytorch_ms": pytorch_ms}
    # polar-rope: a code at a level boundary, or a group whose shortest arc starts at the other of two
    # angles tied to float rounding (all its angle codes shifted): rare (polar_rope_encode's docstring)
    row["ok"] = row["bit_exact"] or row.get("codes_apart_share", 1.0) < 1e-4
    return row


def prefill_rows(presets: list[str], layers: int, context: int, repeats: int) -> list[dict]:
    import bench_end_to_end as e2e

    model = e2e.build_model(layers)
    rows = []
    for preset in ["fp16", *presets]:
        for path in (("kernel", "pytorch") if preset != "fp16" else ("-",)):
            with pytorch_path() if path == "pytorch" else contextlib.nullcontext():
                seconds = [e2e.prefill_seconds(model, preset, context) for _ in range(repeats)]
            rows.append({"preset": preset, "encoder": path, "layers": layers, "context": context,
                         "seconds": statistics.median(seconds), "runs": seconds})
            print(f"prefill {preset:>14} {path:>8}: {rows[-1]['seconds']:.3f} s", flush=True)
    return rows


def main() -> None:
    import bench_dequantize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_dequantize.add_shared_arguments(parser, PRESETS, repeats=10, out="encode.json")
    parser.add_argument("--prefill", action="store_true", help="also time batch-1 prefills through a model")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    args = parser.parse_args()
    device = bench_dequantize.device_of(args)
    if device == "cpu":
        args.prefill = False

    result = {**bench_dequantize.run_header(device), "rows": [], "prefill": []}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    start = time.time()
    if device == "cpu":  # the KIVI encoder under the interpreter, as Kivi.quantize takes it on CUDA
        from kvpolar.quantizers import kivi

        kivi.encodes_on_device = lambda x, config: kivi.triton_available()
        args.presets = [p for p in args.presets if p.startswith("kivi")]
    for preset in args.presets:
        for role in ("keys", "values"):
            for batch in args.batches:
                for dtype in args.dtypes:
                    result["rows"].append(measure(preset, role, batch, args.tokens, device, args.repeats,
                                                  getattr(torch, dtype)))
                    save()
                    if device == "cuda":
                        torch.cuda.empty_cache()
    if args.prefill:
        result["prefill"] = prefill_rows(args.presets, args.layers, args.context, args.prefill_repeats)
        save()
    print(f"\n{result['gpu']}: quantize [B, 8, {args.tokens}, 128] ({time.time() - start:.0f} s)")
    print("| preset | role | dtype | B | encoder ms | PyTorch ms | speed-up | check |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in result["rows"]:
        check = "exact" if r["bit_exact"] else (f"{100 * r.get('codes_apart_share', 1):.4f}% of codes apart "
                                                  f"(at most {r.get('max_levels_apart', float('nan')):.0f} levels)")
        print(f"| {r['preset']} | {r['role']} | {r['dtype']} | {r['batch']} | {r['kernel_ms']:.3f} | "
              f"{r['pytorch_ms']:.3f} | {r['pytorch_ms'] / r['kernel_ms']:.1f}x | {check}{'' if r['ok'] else ' FAILED'} |")
    for r in result["prefill"]:
        print(f"prefill {r['preset']} ({r['encoder']}): {r['seconds']:.3f} s")
    print("checks ok:", all(r["ok"] for r in result["rows"]), f"({len(result['rows'])})")


if __name__ == "__main__":
    main()
