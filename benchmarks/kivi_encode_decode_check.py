"""GPU check: a model's prompt and decode steps quantized by the KIVI encoder kernel hold, bit for bit, what
the PyTorch quantizer's path holds.

On CUDA ``Kivi.quantize`` takes ``kvpolar.kernels.kivi_encode`` (``kivi.encodes_on_device``): for a prompt's
complete chunks, and for every chunk that leaves the residual window while decoding. This script runs a
small random Llama (head dim 128, 8/2 heads, 3 layers) through a left-padded prompt and decode steps twice
per preset and dtype, once as the library runs it and once with ``encodes_on_device`` returning False, and
compares every layer's packed keys and values (codes, scale, minimum) and the logits of every step: all must
be equal. Every tensor the encoder quantized is also quantized again by the PyTorch path on the CPU: the
stored bytes must not depend on the device either. Presets whose keys or values are KIVI's (kivi-2,
kivi-4, squat-2's values, polar-rope-3's values).

Usage: ``PYTHONPATH=src python benchmarks/kivi_encode_decode_check.py [--out DIR] [--presets kivi-2 ...]``.
Prints a table; writes ``kivi_encode_decode_check.json`` under ``--out``. Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import transformers

import kvpolar
from kvpolar.cache.cache import QuantizedKVCache
from kvpolar.quantizers import kivi

VOCAB = 512


def small_llama(dtype: torch.dtype, device: str) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                      max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device, dtype).eval()
    model.set_attn_implementation("kvpolar")
    return model


def decode(model, preset: str, ids: torch.Tensor, mask: torch.Tensor, steps: int, residual: int):
    """(cache, logits ``[steps + 1, B, vocab]``) of the prompt, then ``steps`` greedy tokens one at a time."""
    cfg = dataclasses.replace(kvpolar.KVCacheConfig.preset(preset), residual_length=residual)
    cache = QuantizedKVCache(model.config, cfg)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kvpolar.cache_kwargs(model, cache))
        for _ in range(steps):
            logits.append(out.logits[:, -1].float())
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **kvpolar.cache_kwargs(model, cache))
        logits.append(out.logits[:, -1].float())
    return cache, torch.stack(logits)


def storage_differences(cache, plain) -> list[str]:
    """Names of the packed tensors (layer, role, field) that differ between two caches."""
    bad = []
    for i, (layer, ref) in enumerate(zip(cache.layers, plain.layers)):
        for role in ("packed_keys", "packed_values"):
            got, want = getattr(layer, role), getattr(ref, role)
            if type(got) is not type(want) or got.shape != want.shape:
                bad.append(f"layer {i} {role}: {type(got).__name__} {tuple(got.shape)} vs {tuple(want.shape)}")
                continue
            for name, tensor in want.stored_tensors().items():
                mine = getattr(got, name)
                if mine.shape != tensor.shape or not torch.equal(mine, tensor):
                    bad.append(f"layer {i} {role}.{name}")
    return bad


def check(preset: str, dtype: torch.dtype, device: str, steps: int, residual: int) -> dict:
    model = small_llama(dtype, device)
    gen = torch.Generator().manual_seed(1)
    lengths = [201, 150, 97]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(lengths):
        ids[row, -t:] = torch.randint(1, VOCAB, (t,), generator=gen)
        mask[row, -t:] = 1
    ids, mask = ids.to(device), mask.to(device)
    encoded = []
    real = kivi.encodes_on_device

    inputs = []

    def recording(x, config):
        took = real(x, config)
        encoded.append((config.axis, took))
        if took:
            inputs.append((config, x.detach().clone()))
        return took

    kivi.encodes_on_device = recording
    try:
        cache, logits = decode(model, preset, ids, mask, steps, residual)
    finally:
        kivi.encodes_on_device = real
    kivi.encodes_on_device = lambda x, config: False
    try:
        plain_cache, plain_logits = decode(model, preset, ids, mask, steps, residual)
    finally:
        kivi.encodes_on_device = real
    bad = storage_differences(cache, plain_cache)
    on_cpu_apart = 0  # encoder calls whose stored tensors differ from the CPU quantizer's
    for config, x in inputs:
        quantizer = kivi.Kivi(bits=config.bits, group_size=config.group_size, axis=config.axis)
        gpu, cpu = quantizer.quantize(x), quantizer.quantize(x.cpu())
        on_cpu_apart += any(not torch.equal(getattr(gpu, name).cpu(), t) for name, t in cpu.stored_tensors().items())
    axes = sorted({axis for axis, took in encoded if took})
    return {
        "preset": preset, "dtype": str(dtype).replace("torch.", ""), "steps": steps, "residual_length": residual,
        "encoder_calls": sum(took for _, took in encoded), "encoder_axes": axes,
        "packed_tokens": cache.layers[0].packed_keys.num_tokens if cache.layers[0].packed_keys is not None else 0,
        "storage_differences": bad, "encoder_calls_apart_from_cpu": on_cpu_apart,
        "logits_equal": bool(torch.equal(logits, plain_logits)),
        "logits_max_abs_difference": float((logits - plain_logits).abs().max()),
        "ok": not bad and not on_cpu_apart and bool(torch.equal(logits, plain_logits)) and bool(inputs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder for kivi_encode_decode_check.json")
    ap.add_argument("--presets", nargs="+", default=["kivi-2", "kivi-4", "squat-2", "polar-rope-3"])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--steps", type=int, default=80, help="decode steps after the prompt")
    ap.add_argument("--residual-length", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the encoder runs on CUDA only (its CPU check is tests/test_kernels_kivi_encode.py)")
        return 1
    rows = []
    for preset in args.presets:
        for name in args.dtypes:
            row = check(preset, getattr(torch, name), "cuda", args.steps, args.residual_length)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "ok": all(r["ok"] for r in rows)}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kivi_encode_decode_check.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"\n{'preset':<14}{'dtype':<10}{'encoder calls':>14}{'axes':>18}{'packed':>8}{'storage':>9}{'logits':>8}"
          f"{'apart from CPU':>16}")
    for r in rows:
        print(f"{r['preset']:<14}{r['dtype']:<10}{r['encoder_calls']:>14}{','.join(r['encoder_axes']):>18}"
              f"{r['packed_tokens']:>8}{'equal' if not r['storage_differences'] else 'DIFFER':>9}"
              f"{'equal' if r['logits_equal'] else 'DIFFER':>8}{r['encoder_calls_apart_from_cpu']:>16}")
    print("all equal" if result["ok"] else "FAILED")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
