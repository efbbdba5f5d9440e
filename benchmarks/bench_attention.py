"""Issue 6, benchmark 1: fused decode attention over the packed cache vs what users run today.

For B in {1, 8, 32}, 32 query heads, 8 KV heads, D = 128, T in {4k, 16k, 32k, 128k}, one query token:

* ``sdpa-fp16``: ``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`` over an
  fp16 cache (what a user has without kvpolar);
* ``hf-dequant-<kivi preset>``: Hugging Face's quantized-cache path (dequantize the whole cache, then
  attend), emulated with kvpolar's KIVI ``dequantize`` + the fp16 residual + the same SDPA call;
* ``<preset>``: kvpolar's fused kernel on the packed cache, ``T - 128`` packed tokens plus a
  128-token fp16 residual window, for kivi-2, kivi-4, polar-rope-3 (r2a4 keys, KIVI 2-bit values) and
  polar-rope-4 (r4a4 keys, KIVI 4-bit values); group sizes as the presets (KIVI 32, polar-rope 128);
  and the other cache presets (``BUILT_PRESETS``: kivi-8, squat-2, polar-recursive, the turbo presets,
  fp8), quantized by their own quantizers.

Packed inputs of the first four are random codes and metadata in the stored formats (timing does not
depend on the values); correctness is checked first, at a few shapes, against ``reference_decode_attention``.
Times are medians of ``triton.testing.do_bench`` (which flushes L2 between runs). Bytes read =
packed codes + metadata + residual window + query; effective bandwidth is set against a
device-to-device copy measured in the same run (bytes read + written).

The CUDA caching allocator runs with ``expandable_segments:True`` unless ``PYTORCH_CUDA_ALLOC_CONF``
is set: with the default segments, a kernel's time could depend on what the run had allocated before
it (H100, twenty-seventh session: kivi-4 at B=32, 128k tokens, 1.80 ms timed alone or after
polar-rope-3, 2.14 ms after kivi-2 and its dequantize-then-attend row, which allocate and free tens of
GB; 1.80 ms there too with expandable segments; fp16 SDPA the same either way). Scripts that
import this module before using CUDA inherit the setting.

Usage: ``PYTHONPATH=src python benchmarks/bench_attention.py --out results/`` (``--quick`` for a smoke
run; ``--tune`` adds a launch-parameter sweep).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time

# (before torch's CUDA allocator starts: see the module docstring)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import kvpolar  # noqa: E402
from bandwidth import copy_bandwidth  # noqa: E402,F401  (``ba.copy_bandwidth``: tune_attention_t)
from kvpolar.decode_attention import reference_decode_attention  # noqa: E402
from kvpolar.kernels.decode_attention import LaunchConfig, describe_launch, fused_decode_attention, supports  # noqa: E402
from kvpolar.kernels import decode_attention  # noqa: E402
from kvpolar.quantized import laid_out_tokens_contiguous, tokens_contiguous  # noqa: E402
from kvpolar.quantizers.kivi import KiviChannelTensor, KiviTokenTensor  # noqa: E402
from kvpolar.quantizers.polar_rope import PolarRopeTensor  # noqa: E402

HQ, HKV, D, RESIDUAL = 32, 8, 128, 128
PRESETS = {  # name: (key format, key params, value bits); KIVI group 32, polar-rope group 128
    "kivi-2": ("kivi", 2, 2),
    "kivi-4": ("kivi", 4, 4),
    "polar-rope-3": ("polar", (2, 4), 2),
    "polar-rope-4": ("polar", (4, 4), 4),
}
KIVI_GROUP, POLAR_GROUP = 32, 128


# ----- packed inputs in the stored formats --------------------------------------------------------------------
def kivi_keys(b, t, bits, dtype, dev):
    ng = math.ceil(t / KIVI_GROUP)
    levels = (1 << bits) - 1
    return KiviChannelTensor(
        shape=torch.Size((b, HKV, t, D)), dtype=dtype,
        codes=torch.randint(0, 256, (b, HKV, t, D * bits // 8), dtype=torch.uint8, device=dev),
        scale=((0.5 + torch.rand(b, HKV, ng, D, device=dev)) * 2 / levels).to(dtype),
        minimum=(torch.randn(b, HKV, ng, D, device=dev) * 0.3 - 1).to(dtype),
        bits=bits, group_size=KIVI_GROUP,
    )


def kivi_values(b, t, bits, dtype, dev):
    """Random KIVI values, scale / min laid out as the quantizer stores them (tokens adjacent)."""
    levels = (1 << bits) - 1
    return KiviTokenTensor(
        shape=torch.Size((b, HKV, t, D)), dtype=dtype,
        codes=torch.randint(0, 256, (b, HKV, t, D * bits // 8), dtype=torch.uint8, device=dev),
        scale=tokens_contiguous(((0.5 + torch.rand(b, HKV, t, D // KIVI_GROUP, device=dev)) * 2 / levels).to(dtype)),
        minimum=tokens_contiguous((torch.randn(b, HKV, t, D // KIVI_GROUP, device=dev) * 0.3 - 1).to(dtype)),
        bits=bits, group_size=KIVI_GROUP,
    )


def groups_adjacent(values):
    """``values`` with KIVI scale / min laid out with the groups adjacent (``[..., T, G]``
    contiguous, as stored before the ninth session), for timing the two layouts side by side; any
    other values as they are."""
    if not isinstance(values, KiviTokenTensor):
        return values
    return dataclasses.replace(values, scale=values.scale.contiguous(), minimum=values.minimum.contiguous())


def rows_per_token(p):
    """``p`` with polar-recursive codes and radii laid out one row per token (as stored before the
    fourteenth session; the quantizer now lays the kernel's setting out with the tokens adjacent),
    for timing the two layouts side by side; any other tensor as it is."""
    if type(p).__name__ != "PolarRecursiveTensor":
        return p
    return dataclasses.replace(p, codes=p.codes.contiguous(), radii=p.radii.contiguous())


def polar_keys(b, t, rb, ab, dtype, dev):
    ng = math.ceil(t / POLAR_GROUP)
    shape = (b, HKV, ng, D // 2)
    return PolarRopeTensor(
        shape=torch.Size((b, HKV, t, D)), dtype=dtype,
        codes=torch.randint(0, 256, (b, HKV, t, (D // 2) * (rb + ab) // 8), dtype=torch.uint8, device=dev),
        radius_scale=((0.5 + torch.rand(shape, device=dev)) / (1 << rb)).to(dtype),
        radius_min=(0.2 * torch.rand(shape, device=dev)).to(dtype),
        angle_scale=(torch.full(shape, 2 * math.pi / (1 << ab), device=dev) * (0.2 + torch.rand(shape, device=dev))).to(dtype),
        angle_min=(2 * math.pi * torch.rand(shape, device=dev) - math.pi).to(dtype),
        radius_bits=rb, angle_bits=ab, group_size=POLAR_GROUP, pairing="half",
    )


#: presets whose packed inputs come from their own quantizers (``kvpolar.cache.config.PRESETS``):
#: the formats the random builders above do not cover.
BUILT_PRESETS = ("kivi-8", "squat-2", "polar-recursive", "turbo-3", "turbo-4", "turbo-k3v4", "fp8")
_BUILT_ROWS: dict = {}


def preset_quantizers(name):
    """(key quantizer, value quantizer) of a cache preset, as ``QuantizedKVCache`` builds them."""
    from kvpolar.cache.config import KVCacheConfig

    c = KVCacheConfig.preset(name)
    return kvpolar.quantizer(c.key_quantizer, **c.key_params), kvpolar.quantizer(c.value_quantizer, **c.value_params)


def built_preset(name, b, t, dtype, dev):
    """Keys/values ``[b, HKV, t, D]`` quantized by the preset's own quantizers: one sequence is
    quantized (random normal keys/values; SQuat gets random prompt queries) and its stored tensors
    are repeated over the batch, so every sequence still has bytes of its own to read."""
    key = (name, t, dtype, str(dev))
    if key not in _BUILT_ROWS:
        _BUILT_ROWS.clear()  # one preset's row at a time: the largest are hundreds of MB
        kq, vq = preset_quantizers(name)
        gen = torch.Generator(device=dev).manual_seed(t)
        k = torch.randn(1, HKV, t, D, device=dev, dtype=dtype, generator=gen)
        v = torch.randn(1, HKV, t, D, device=dev, dtype=dtype, generator=gen)
        context = {}
        if "queries" in kq.context_keys:
            context["queries"] = torch.randn(1, HQ, 64, D, device=dev, dtype=dtype, generator=gen)
        _BUILT_ROWS[key] = (kq.quantize(k, **context), vq.quantize(v))
        del k, v
    return tuple(_repeat_batch(p, b) for p in _BUILT_ROWS[key])


def _repeat_batch(p, b):
    """``p`` (batch 1) with every stored tensor that has the batch axis repeated ``b`` times."""
    fields = {}
    for fname, tensor in p.stored_tensors().items():
        if tensor.dim() >= 3 and tensor.shape[0] == 1:
            repeated = tensor.repeat(b, *([1] * (tensor.dim() - 1)))
            fields[fname] = tokens_contiguous(repeated) if laid_out_tokens_contiguous(tensor) else repeated  # (as stored)
    return dataclasses.replace(p, shape=torch.Size((b, *p.shape[1:])), **fields)


def make_preset(name, b, t, dtype, dev):
    if name not in PRESETS:
        return built_preset(name, b, t, dtype, dev)
    kind, kp, vbits = PRESETS[name]
    keys = kivi_keys(b, t, kp, dtype, dev) if kind == "kivi" else polar_keys(b, t, *kp, dtype, dev)
    return keys, kivi_values(b, t, vbits, dtype, dev)


def kivi_quantizers(name):
    """(key quantizer or None for polar-rope keys, value quantizer) of a preset."""
    kind, kbits, vbits = PRESETS[name]
    keys = kvpolar.quantizer("kivi", bits=kbits, group_size=KIVI_GROUP, axis="channel") if kind == "kivi" else None
    return keys, kvpolar.quantizer("kivi", bits=vbits, group_size=KIVI_GROUP, axis="token")


def polar_dense_keys(p):
    """Polar-rope keys -> float32 [.., T, D] per the documented format (reference for the check)."""
    from kvpolar.packing import unpack_bits

    ab, t = p.angle_bits, p.num_tokens
    codes = unpack_bits(p.codes, p.radius_bits + ab, p.head_dim // 2).int()
    tok = lambda m: m.float().repeat_interleave(p.group_size, -2)[..., :t, :]  # noqa: E731
    r = tok(p.radius_min) + (codes >> ab).float() * tok(p.radius_scale)
    th = tok(p.angle_min) + (codes & ((1 << ab) - 1)).float() * tok(p.angle_scale)
    return torch.cat([r * th.cos(), r * th.sin()], -1)  # pairing "half": (j, j + D/2)


# ----- correctness on the GPU ---------------------------------------------------------------------------------
def reference(name, q, pk, pv, rk, rv, scale, mask):
    if name not in PRESETS:
        kq, vq = preset_quantizers(name)
        return reference_decode_attention(q, pk, pv, kq, vq, rk, rv, scale, mask).float()
    kq, vq = kivi_quantizers(name)
    if PRESETS[name][0] == "kivi":
        return reference_decode_attention(q, pk, pv, kq, vq, rk, rv, scale, mask).float()
    # polar keys: the same reference with dense float32 keys (exact dequantization of the format)
    none = kvpolar.quantizer("none")
    dense = none.quantize(polar_dense_keys(pk))
    return reference_decode_attention(q.float(), dense, pv, none, vq, rk.float(), rv.float(), scale, mask).float()


def ragged_case(kq, vq, dtype, dev, b=2, tk=2110, r=128):
    """Arguments of ``reference_decode_attention`` / ``fused_decode_attention`` for one check: random
    keys / values quantized by ``kq`` / ``vq`` (``tk`` packed tokens) plus ``r`` residual tokens, a
    1-token query, and a ragged left-padding mask (every sequence after the first holds ``tk // 2``
    tokens). Seeded."""
    torch.manual_seed(0)
    k = torch.randn(b, HKV, tk + r, D, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(b, HQ, 1, D, device=dev, dtype=dtype)
    pk, pv = kq.quantize(k[..., :tk, :]), vq.quantize(v[..., :tk, :])
    n = tk + r
    lengths = torch.tensor([n] + [tk // 2] * (b - 1), device=dev)
    mask = (torch.arange(n, device=dev)[None, :] >= n - lengths[:, None])[:, None, None, :]
    return q, pk, pv, kq, vq, k[..., tk:, :], v[..., tk:, :], D**-0.5, mask


def ragged_lengths(b: int, n: int) -> list[int]:
    """Tokens held by each of ``b`` sequences of a ragged check over ``n`` positions (the first all)."""
    return [n - 7 * i * (n // 20) for i in range(b)]


def check_inputs(b, tq, tk, dtype, dev, lengths=None):
    """``(query [b, HQ, tq, D], window keys, window values [b, HKV, RESIDUAL, D], mask)`` of one
    correctness check over ``tk`` packed tokens: random normal in ``dtype``, and with ``lengths`` (tokens
    held of ``tk + RESIDUAL``, per sequence) a left-padding bool mask ``[b, 1, 1, tk + RESIDUAL]``, else None."""
    q = torch.randn(b, HQ, tq, D, device=dev, dtype=dtype)
    rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=dtype)
    rv = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=dtype)
    mask = None
    if lengths is not None:
        n = tk + RESIDUAL
        held = torch.tensor(lengths, device=dev)
        mask = (torch.arange(n, device=dev)[None, :] >= n - held[:, None])[:, None, None, :]
    return q, rk, rv, mask


def check_correctness(dev):
    rows = []
    # These small caches take the classic kernel by default (``LaunchConfig.transposed_min_rows``): the
    # transposed kernel is checked with the threshold lifted, with the policy's register cap, and at a
    # size where the default launch policy itself picks the cap (B=8, 32k tokens).
    transposed = LaunchConfig(transposed_min_rows=0)
    capped = LaunchConfig(transposed_min_rows=0, max_registers=168)
    cases = [  # (preset, batch, tq, packed tokens, dtype, ragged mask, launch config)
        ("kivi-2", 2, 1, 3001, torch.float16, False, None), ("kivi-4", 2, 3, 777, torch.float16, True, None),
        ("polar-rope-3", 2, 1, 3001, torch.float16, True, None), ("polar-rope-4", 1, 3, 1000, torch.float16, False, None),
        ("kivi-2", 3, 1, 2000, torch.bfloat16, True, None), ("polar-rope-3", 1, 1, 4500, torch.bfloat16, False, None),
        ("kivi-2", 2, 1, 3001, torch.float16, False, transposed), ("kivi-4", 2, 3, 777, torch.float16, True, transposed),
        ("polar-rope-3", 2, 1, 3001, torch.float16, True, transposed),
        ("polar-rope-4", 1, 3, 1000, torch.bfloat16, False, transposed),
        ("kivi-2", 3, 1, 2000, torch.bfloat16, True, capped), ("kivi-2", 2, 3, 1500, torch.float16, True, capped),
        ("kivi-2", 8, 1, 32768, torch.float16, True, None),
        ("polar-recursive", 2, 1, 3001, torch.float16, True, transposed),
        ("polar-recursive", 1, 3, 1000, torch.bfloat16, False, transposed),
        ("polar-recursive", 8, 1, 32768, torch.float16, True, None),
        ("turbo-3", 2, 1, 3001, torch.float16, True, transposed), ("turbo-4", 1, 3, 1000, torch.bfloat16, False, transposed),
        ("turbo-k3v4", 2, 1, 2000, torch.bfloat16, True, transposed), ("turbo-3", 8, 1, 32768, torch.float16, True, None),
    ] + [(name, 2, 1 + 2 * (i % 2), 1000 + 555 * i, (torch.float16, torch.bfloat16)[i % 2], i % 3 == 0, None)
         for i, name in enumerate(BUILT_PRESETS)]
    for name, b, tq, tk, dtype, ragged, cfg in cases:
        row = check_case(name, b, tq, tk, dtype, ragged, cfg, dev)
        if row is not None:
            rows.append(row)
    return rows


def check_case(name, b, tq, tk, dtype, ragged, cfg, dev) -> dict | None:
    """One check of ``fused_decode_attention`` (launch config ``cfg``) against ``reference``: preset
    ``name`` over ``tk`` packed tokens plus the window (:func:`check_inputs`; with ``ragged`` a left-padding
    mask), ``tq`` query tokens. Prints a line and returns its row (``ok``: finite, relative error under
    1e-2 in float16, 4e-2 in bfloat16), or None where the fused kernel does not read the formats."""
    pk, pv = make_preset(name, b, tk, dtype, dev)
    if not supports(pk, pv):
        print(f"check {name:13s} skipped: the fused kernel does not read these formats")
        return None
    n = tk + RESIDUAL
    q, rk, rv, mask = check_inputs(b, tq, tk, dtype, dev, ragged_lengths(b, n) if ragged else None)
    want = reference(name, q, pk, pv, rk, rv, D**-0.5, mask)
    try:
        out = fused_decode_attention(q, pk, pv, None, None, rk, rv, D**-0.5, mask, cfg).float()
    except Exception as e:  # report and go on: the sweep may still find configurations that work
        print(f"check {name}: {type(e).__name__}: {str(e)[-300:]}")
        out = torch.full_like(want, float("nan"))
    rel = ((out - want).abs().max() / want.abs().max()).item()
    ok = bool(torch.isfinite(out).all()) and rel < (1e-2 if dtype == torch.float16 else 4e-2)
    launch = "default" if cfg is None else ("capped" if cfg.max_registers else "transposed")
    print(f"check {name:13s} B={b} Tq={tq} N={n} {str(dtype):14s} mask={ragged!s:5s} {launch:10s} "
          f"rel err {rel:.2e} {'ok' if ok else 'FAIL'}")
    return {"preset": name, "batch": b, "tq": tq, "tokens": n, "dtype": str(dtype), "ragged_mask": ragged,
            "launch": launch, "max_rel_error": rel, "ok": ok}


# ----- timing ------------------------------------------------------------------------------------------------------------
L2_DEFEAT_BYTES = 256 << 20  # several times the L2 of an H100 (50 MB) or H200 (60 MB)


def gpu_tag(device_name: str) -> str:
    """Short lower-case model of a GPU for file names: ``'NVIDIA H100 80GB HBM3'`` -> ``'h100'``,
    ``'NVIDIA H200'`` -> ``'h200'``; ``'gpu'`` when the name holds no model number."""
    found = re.search(r"\b([A-Za-z]{1,2}\d{2,4})\b", device_name)
    return found.group(1).lower() if found else "gpu"


def median_ms(fn):
    """Eager time: median of do_bench (L2 flushed between runs; includes Python launch overhead)."""
    return do_bench(fn, warmup=10, rep=100, return_mode="median")


def graph_ms(make_call, bytes_per_call):
    """GPU time per call: one CUDA graph replays the call over enough input copies that together
    exceed L2 (so no copy is re-read from cache), timed with do_bench; launch overhead excluded."""
    copies = max(1, min(512, math.ceil(L2_DEFEAT_BYTES / bytes_per_call)))
    calls = [make_call(i) for i in range(copies)]
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = do_bench(graph.replay, warmup=10, rep=120, return_mode="median") / copies
    del graph, calls
    return ms


def sdpa_maker(b, t, dev):
    """``make_call`` for ``graph_ms``: fp16 SDPA of one decode query over its own random ``[b, HKV,
    t, D]`` cache per copy (what a user has without kvpolar)."""
    def make_call(i):
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
        k = torch.randn(b, HKV, t, D, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=True)

    return make_call


def fused_maker(name, b, tk, dev, cfg, layout=None):
    """``make_call`` for ``graph_ms``: ``fused_decode_attention`` of one decode query over its own
    ``tk`` packed tokens of preset ``name`` plus a ``RESIDUAL``-token fp16 window per copy
    (``layout``: a function applied to the packed keys and values first, e.g. ``groups_adjacent``)."""
    def make_call(i):
        pk, pv = make_preset(name, b, tk, torch.float16, dev)
        if layout is not None:
            pk, pv = layout(pk), layout(pv)
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
        rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=torch.float16)
        rv = torch.randn_like(rk)  # (made here: drawn inside the call, it was timed with it, 3-5 us a call)
        return lambda: fused_decode_attention(q, pk, pv, None, None, rk, rv, D**-0.5, None, cfg)

    return make_call


def preset_graph_ms(name, b, t, dev, cfg) -> float:
    """``graph_ms`` of ``fused_decode_attention`` (launch config ``cfg``) for preset ``name`` at batch ``b``,
    ``t`` tokens (``t - RESIDUAL`` packed plus the window), the packed bytes as the bytes per call."""
    pk, pv = make_preset(name, b, t - RESIDUAL, torch.float16, dev)
    nbytes = pk.nbytes + pv.nbytes
    del pk, pv
    return graph_ms(fused_maker(name, b, t - RESIDUAL, dev, cfg), nbytes)


def time_shape(b, t, dev, copy_gbs, presets, configs, with_hf=True):
    rows = []
    scale = D**-0.5
    tk = t - RESIDUAL
    q_bytes = 2 * b * HQ * D * 2  # query in, output out
    res_bytes = 2 * b * HKV * RESIDUAL * D * 2

    def record(method, ms, nbytes, eager=None, note="", launch=None):
        row = {"batch": b, "tokens": t, "method": method, "median_ms": ms, "eager_median_ms": eager,
               "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6 if ms else None, "note": note, "launch": launch}
        row["copy_bw_fraction"] = row["gb_per_s"] / copy_gbs if ms else None
        rows.append(row)
        print(f"  {b:3d} {t:7d} {method:22s} {ms if ms else float('nan'):9.4f} ms  eager {eager or float('nan'):9.4f} ms", flush=True)

    def q_and_residual():
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
        rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=torch.float16)
        return q, rk, torch.randn_like(rk)

    sdpa_call = sdpa_maker(b, t, dev)
    nbytes = 2 * b * HKV * t * D * 2 + q_bytes
    try:
        record("sdpa-fp16", graph_ms(sdpa_call, nbytes), nbytes, median_ms(sdpa_call(0)))
    except torch.cuda.OutOfMemoryError:
        record("sdpa-fp16", None, None, note="out of memory")
    torch.cuda.empty_cache()
    for name in presets:
        fused_call = fused_maker(name, b, tk, dev, configs[name])
        pk, pv = make_preset(name, b, tk, torch.float16, dev)
        nbytes = pk.nbytes + pv.nbytes + res_bytes + q_bytes
        readable = supports(pk, pv)
        launch = describe_launch(q_and_residual()[0], pk, pv, configs[name], RESIDUAL) if readable else None
        del pk, pv
        if not readable:
            record(name, None, nbytes, note="not read by the fused kernel (the cache falls back to the reference)")
            continue
        record(name, graph_ms(fused_call, nbytes), nbytes, median_ms(fused_call(0)), launch=launch)
        torch.cuda.empty_cache()
        if with_hf and name in PRESETS and PRESETS[name][0] == "kivi":
            kq, vq = kivi_quantizers(name)

            def hf_call(i):
                pk, pv = make_preset(name, b, tk, torch.float16, dev)
                q, rk, rv = q_and_residual()

                def hf():
                    keys = torch.cat([kq.dequantize(pk), rk], -2)
                    values = torch.cat([vq.dequantize(pv), rv], -2)
                    return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)

                return hf

            note = "emulated: kvpolar KIVI dequantize + cat residual + SDPA"
            try:
                record(f"hf-dequant-{name}", graph_ms(hf_call, nbytes), nbytes, median_ms(hf_call(0)), note)
            except torch.cuda.OutOfMemoryError:
                record(f"hf-dequant-{name}", None, None, note="out of memory")
            torch.cuda.empty_cache()
    base = next((r["median_ms"] for r in rows if r["method"] == "sdpa-fp16"), None)
    for r in rows:
        r["speedup_vs_sdpa_fp16"] = base / r["median_ms"] if base and r["median_ms"] else None
    return rows


def _compiled_registers() -> dict:
    """{cache key: (registers, spills)} of the compiled split kernels (best effort, for the notes)."""
    from kvpolar.kernels import decode_attention as mod

    out = {}
    try:
        for fn in (mod._split_kernel, mod._split_kernel_t):
            for cache in fn.device_caches.values():
                for key, kernel in cache[0].items():
                    out[(fn.__name__, key)] = (kernel.n_regs, kernel.n_spills)
    except Exception:  # the cache layout is Triton-internal
        pass
    return out


#: launch parameters swept per preset by --tune: every preset runs the transposed kernel by default
#: (polar-rope keys in 32-token blocks), the classic kernel kept as a comparison row with the best
#: parameters of its own earlier sweep (polar-rope: 64 tokens for r2a4, 32 for r4a4; 4 warps, 2 stages).
TUNE_GRID = {
    "kivi": [LaunchConfig(block_n=64, num_warps=4, num_stages=2, transposed=False),
             LaunchConfig(),  # transposed defaults: 1 warp, 12 programs per SM, 3 stages
             LaunchConfig(max_registers=168, transposed_programs_per_sm=16),  # 12 programs per SM
             LaunchConfig(block_n=16, transposed_programs_per_sm=16)],
    "polar-rope-3": [LaunchConfig(block_n=64, num_warps=4, num_stages=2, transposed=False), LaunchConfig()],
    "polar-rope-4": [LaunchConfig(block_n=32, num_warps=4, num_stages=2, transposed=False), LaunchConfig()],
}


def tune(dev, copy_gbs):
    """A small sweep of launch parameters at B=32, T=32k (``TUNE_GRID``); returns rows."""
    rows = []
    for b, t in [(32, 32768)]:
        for name in PRESETS:
            pk, pv = make_preset(name, b, t - RESIDUAL, torch.float16, dev)
            q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
            rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=torch.float16)
            nbytes = pk.nbytes + pv.nbytes + 2 * rk.numel() * 2 + 2 * q.numel() * 2
            for cfg in TUNE_GRID.get(name, TUNE_GRID["kivi"]):
                before = _compiled_registers()
                try:
                    call = lambda i: lambda: fused_decode_attention(q, pk, pv, None, None, rk, rk, D**-0.5, None, cfg)  # noqa: E731
                    ms = graph_ms(call, L2_DEFEAT_BYTES)  # inputs of these shapes already exceed L2
                except Exception as e:  # a config that does not compile (e.g. out of shared memory)
                    print(f"tune {name} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                    continue
                new = [v for k, v in _compiled_registers().items() if k not in before]
                rows.append({"batch": b, "tokens": t, "preset": name, **dataclasses.asdict(cfg), "median_ms": ms,
                             "copy_bw_fraction": nbytes / ms / 1e6 / copy_gbs, "registers_spills": new})
            del pk, pv
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None,
                    help="JSON file name under --out (default attention_<gpu>.json, e.g. attention_h200.json)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    ap.add_argument("--presets", nargs="+", default=[*PRESETS, *BUILT_PRESETS])
    ap.add_argument("--quick", action="store_true", help="checks plus one small shape")
    ap.add_argument("--no-checks", action="store_true",
                    help="time only (the JSON records no checks): for a rerun of shapes on code already checked there")
    ap.add_argument("--tune", action="store_true", help="sweep launch parameters first")
    ap.add_argument("--tune-only", action="store_true", help="checks and the sweep, no timing table")
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--programs-per-sm", type=int, default=None)
    ap.add_argument("--max-folded-window", type=int, default=None,
                    help="decode_attention.MAX_FOLDED_WINDOW (0: the 128-token window gets its own launch)")
    ap.add_argument("--max-folded-rows", type=int, default=None,
                    help="decode_attention.MAX_FOLDED_ROWS (query rows up to which the window is folded)")
    ap.add_argument("--window-by-kv-head", choices=("on", "off"), default=None,
                    help="decode_attention.WINDOW_BY_KV_HEAD (off: a folded window is attended by one program "
                         "per query row)")
    ap.add_argument("--window-block-n", type=int, default=None,
                    help="decode_attention.WINDOW_BLOCK_N (window tokens per step of the folded window's loop)")
    args = ap.parse_args()
    if args.max_folded_window is not None:
        decode_attention.MAX_FOLDED_WINDOW = args.max_folded_window
    if args.max_folded_rows is not None:
        decode_attention.MAX_FOLDED_ROWS = args.max_folded_rows
    if args.window_by_kv_head is not None:
        decode_attention.WINDOW_BY_KV_HEAD = args.window_by_kv_head == "on"
    if args.window_block_n is not None:
        decode_attention.WINDOW_BLOCK_N = args.window_block_n
    dev = torch.device("cuda")
    torch.manual_seed(0)
    overrides = {k: v for k, v in {"block_n": args.block_n, "num_warps": args.num_warps, "num_stages": args.num_stages,
                                     "programs_per_sm": args.programs_per_sm}.items() if v is not None}
    config = LaunchConfig(**overrides)
    props = torch.cuda.get_device_properties(dev)
    meta = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
            "launch_config": dataclasses.asdict(config), "max_folded_window": decode_attention.MAX_FOLDED_WINDOW,
            "max_folded_rows": decode_attention.MAX_FOLDED_ROWS,
            "window_block_n": decode_attention.WINDOW_BLOCK_N,
            "window_by_kv_head": decode_attention.WINDOW_BY_KV_HEAD,
            "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t0 = time.time()
    checks = [] if args.no_checks else check_correctness(dev)
    copy_gbs = copy_bandwidth(dev)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    tuning = tune(dev, copy_gbs) if args.tune or args.tune_only else []
    for r in sorted(tuning, key=lambda r: (r["batch"], r["preset"], r["median_ms"]))[:]:
        print(f"tune B={r['batch']} {r['preset']:13s} bn={r['block_n']:3d} w={r['num_warps']}/{r['transposed_warps']} "
              f"st={r['num_stages']} t={r['transposed']:d} pps={r['transposed_programs_per_sm']} "
              f"minsplit={r['min_split_tokens']} maxreg={r['max_registers']} {r['median_ms'] * 1e3:8.1f} us {100 * r['copy_bw_fraction']:5.1f}% "
              f"regs/spills {r['registers_spills']}")
    configs = {name: config for name in args.presets}
    for name in args.presets:  # the sweep's fastest launch parameters per preset, unless given
        cands = [r for r in tuning if r["preset"] == name]
        if cands and not overrides:
            best = min(cands, key=lambda r: r["median_ms"])
            configs[name] = LaunchConfig(**{f.name: best[f.name] for f in dataclasses.fields(LaunchConfig)})
    meta["launch_config_per_preset"] = {k: dataclasses.asdict(v) for k, v in configs.items()}
    print("launch configs:", {k: dataclasses.asdict(v) for k, v in configs.items()})
    shapes = [] if args.tune_only else [(1, 4096)] if args.quick else [(b, t) for b in args.batches for t in args.tokens]

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, args.name or f"attention_{gpu_tag(props.name)}.json")
    rows = []
    for b, t in [(None, None)] + shapes:  # (written after every shape: a cut-off run keeps what it measured)
        if b is not None:
            rows += time_shape(b, t, dev, copy_gbs, args.presets, configs)
        result = {"meta": meta, "copy_gb_per_s": copy_gbs, "checks": checks, "tuning": tuning, "results": rows,
                  "elapsed_s": time.time() - t0}
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(f"\n{props.name}, copy {copy_gbs:.0f} GB/s; wrote {path}")
    print(f"{'B':>3} {'T':>7} {'method':22s} {'ms':>9} {'x sdpa':>7} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        if r["median_ms"] is None:
            print(f"{r['batch']:>3} {r['tokens']:>7} {r['method']:22s} {r['note']}")
            continue
        launch = r.get("launch") or {}
        where = f" {launch['kernel'][0]} splits {launch['splits']} pps {launch['programs_per_sm']}" if launch else ""
        print(f"{r['batch']:>3} {r['tokens']:>7} {r['method']:22s} {r['median_ms']:9.4f} "
              f"{r['speedup_vs_sdpa_fp16'] or 0:7.2f} {r['gb_per_s']:7.0f} {100 * r['copy_bw_fraction']:6.1f}{where}")
    if not all(c["ok"] for c in checks):
        sys.exit("correctness check FAILED (see above)")


if __name__ == "__main__":
    main()
