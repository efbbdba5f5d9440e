"""Cost of SQuat key quantization for one layer of a long prompt, next to KIVI and prefill.

Llama-3.1-8B shapes by default: batch 1, 32 query heads on 8 KV heads, head dim 128, a 32k-token
prompt, one layer. Timed (median of CUDA-event timings after warm-up):

* ``squat prepare (svd|power)``: the per-prompt subspace (SVD or block power iteration over the
  ``4 x 32k`` stacked queries of each KV head) and the block matrices ``M_b``;
* ``squat quantize (given subspace)``: the block-sequential quantization of the layer's keys;
* ``squat one-shot (svd|power)``: ``quantize(keys, queries=queries)``, both together;
* ``kivi quantize``: KIVI's per-channel key quantization of the same keys;
* ``fp16 SDPA prefill``: causal ``scaled_dot_product_attention`` of the layer (GQA without expanding
  K/V, and with K/V expanded beforehand; the faster one is the reference);
* ``layer GEMMs``: the layer's q/k/v/o and MLP projections on the prompt (Llama-3.1-8B sizes), so the
  attention is not the only yardstick.

Every input is far larger than the L2 cache (keys 64 MiB, queries 256 MiB), so repeated calls do not
run from cache. Checks run first: SQuat with ``lam=0`` equals KIVI bit for bit on the GPU, and the
default SQuat lowers the score error of low-rank queries against the keys.

    PYTHONPATH=src python benchmarks/bench_squat_cost.py --out benchmarks/results/squat_cost_h100.json
    python benchmarks/bench_squat_cost.py --render benchmarks/results/squat_cost_h100.json

The second form rewrites the "SQuat quantization cost" section of benchmarks/README.md (between its
markers) from a results file, without running anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import kvpolar
from kvpolar import synthetic


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    shape = (args.batch, args.kv_heads, args.tokens, args.head_dim)
    keys = synthetic.rope_keys(*shape, seed=0, dtype=dtype).to(device)
    qshape = (args.batch, args.q_heads, args.tokens, args.head_dim)
    low = synthetic.low_rank_queries(qshape, tokens=args.tokens, rank=32, seed=1, dtype=torch.float32)
    queries = (low + 0.1 * torch.randn(qshape, generator=torch.Generator().manual_seed(2))).to(dtype)
    values = synthetic.gaussian(shape, seed=3, dtype=dtype).to(device)
    return keys, queries.to(device), values


def checks(keys: torch.Tensor, queries: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    kivi = kvpolar.quantizer("kivi", bits=args.bits, group_size=args.group_size)
    ref = kivi.quantize(keys)
    zero = kvpolar.quantizer("squat", bits=args.bits, group_size=args.group_size, lam=0.0)
    same = zero.quantize(keys, queries=queries)
    lam0_equal = all(torch.equal(getattr(ref, n), getattr(same, n)) for n in ("codes", "scale", "minimum"))
    if not lam0_equal:
        raise SystemExit("check failed: squat(lam=0) differs from kivi on this device")
    out = {"lam0_equals_kivi": True}
    probe = queries[..., -64:, :]  # the last 64 prompt queries of every head
    exact = probe.float() @ keys.float().repeat_interleave(args.q_heads // args.kv_heads, 1).transpose(-1, -2)
    for method in ("svd", "power"):
        sq = kvpolar.quantizer("squat", bits=args.bits, group_size=args.group_size, subspace=method)
        p = sq.quantize(keys, queries=queries)
        out[f"score_rel_error_squat_{method}"] = float((sq.scores(probe, p) - exact).norm() / exact.norm())
    out["score_rel_error_kivi"] = float((kivi.scores(probe, ref) - exact).norm() / exact.norm())
    return out


def layer_gemm_ms(tokens: int, device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """q/k/v/o and gate/up/down projections of one Llama-3.1-8B layer over ``tokens`` tokens."""
    hidden, inter, kv = 4096, 14336, 1024
    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    w_qkv = torch.randn(hidden, hidden + 2 * kv, device=device, dtype=dtype) * 0.01
    w_o = torch.randn(hidden, hidden, device=device, dtype=dtype) * 0.01
    w_gu = torch.randn(hidden, 2 * inter, device=device, dtype=dtype) * 0.01
    w_d = torch.randn(inter, hidden, device=device, dtype=dtype) * 0.01

    def run() -> None:
        qkv = x @ w_qkv
        h = qkv[:, :hidden] @ w_o
        gu = h @ w_gu
        (F.silu(gu[:, :inter]) * gu[:, inter:]) @ w_d

    return median_ms(run, reps)


README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- squat_cost:begin -->", "<!-- squat_cost:end -->"


def markdown(result: dict) -> str:
    """The README section for one results file."""
    rows = result["median_ms"]
    prefill = min(v for k, v in rows.items() if k.startswith("fp16 SDPA prefill"))
    gemm = rows.get("layer GEMMs (Llama-3.1-8B, fp16)")
    sh = result["shapes"]
    lines = [
        "## SQuat quantization cost (table)",
        "",
        f"{result['device']}, torch {result['torch']}, `{result['command']}`. One layer of "
        f"Llama-3.1-8B shapes: batch {sh['batch']}, {sh['q_heads']} query / {sh['kv_heads']} KV heads, "
        f"{sh['tokens']} prompt tokens, head dim {sh['head_dim']}, {sh['dtype']}; SQuat "
        + ", ".join(f"{k}={v}" for k, v in result["squat"].items())
        + f". {result['timing']}.",
        "",
        "| step | median ms | / fp16 SDPA prefill | / layer GEMMs |",
        "|---|---:|---:|---:|",
    ]
    for name, ms in rows.items():
        ratio_g = f"{ms / gemm:.3f}" if gemm else "-"
        lines.append(f"| {name} | {ms:.3f} | {ms / prefill:.3f} | {ratio_g} |")
    c = result["checks"]
    lines += [
        "",
        f"Checks in the same run: SQuat with lam=0 equals KIVI bit for bit: {c['lam0_equals_kivi']}; "
        f"score relative error of the last 64 prompt queries: KIVI {c['score_rel_error_kivi']:.4f}, "
        f"SQuat svd {c['score_rel_error_squat_svd']:.4f}, power {c['score_rel_error_squat_power']:.4f}.",
        "",
    ]
    return "\n".join(lines)


def update_readme(section: str, path: Path = README) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--render", default=None, help="only rewrite the README section from this JSON")
    args = parser.parse_args(argv)
    if args.render:
        update_readme(markdown(json.loads(Path(args.render).read_text())))
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16
    keys, queries, values = make_inputs(args, device, dtype)
    check = checks(keys, queries, args)

    rows: dict[str, float] = {}
    base = {"bits": args.bits, "group_size": args.group_size}
    kivi = kvpolar.quantizer("kivi", **base)
    rows["kivi quantize"] = median_ms(lambda: kivi.quantize(keys), args.reps)
    for method in ("svd", "power"):
        sq = kvpolar.quantizer("squat", subspace=method, **base)
        rows[f"squat prepare ({method})"] = median_ms(lambda: sq.prepare(queries, kv_heads=args.kv_heads), args.reps)
        prepared = sq.prepare(queries, kv_heads=args.kv_heads)
        rows[f"squat quantize given subspace ({method})"] = median_ms(
            lambda: sq.quantize(keys, subspace=prepared), args.reps
        )
        rows[f"squat one-shot ({method})"] = median_ms(lambda: sq.quantize(keys, queries=queries), args.reps)
    stacked = queries.reshape(args.batch, args.kv_heads, -1, args.head_dim)
    rows["torch.linalg.svd alone"] = median_ms(
        lambda: torch.linalg.svd(stacked.float(), full_matrices=False), args.reps
    )
    # Alternatives not in the library, for the record: R of a QR then a D x D SVD; Gram + eigh.
    rows["alt: qr(mode=r) + svd(R)"] = median_ms(
        lambda: torch.linalg.svd(torch.linalg.qr(stacked.float(), mode="r").R), args.reps
    )
    rows["alt: eigh(Q^T Q)"] = median_ms(
        lambda: torch.linalg.eigh(stacked.float().transpose(-1, -2) @ stacked.float()), args.reps
    )
    kx, vx = (t.repeat_interleave(args.q_heads // args.kv_heads, 1) for t in (keys, values))
    gqa = median_ms(lambda: F.scaled_dot_product_attention(queries, keys, values, is_causal=True, enable_gqa=True), args.reps)
    expanded = median_ms(lambda: F.scaled_dot_product_attention(queries, kx, vx, is_causal=True), args.reps)
    rows["fp16 SDPA prefill (enable_gqa)"] = gqa
    rows["fp16 SDPA prefill (K/V pre-expanded)"] = expanded
    del kx, vx
    if device.type == "cuda":  # fp16 GEMMs of this size take minutes on a CPU
        rows["layer GEMMs (Llama-3.1-8B, fp16)"] = layer_gemm_ms(args.tokens, device, dtype, args.reps)

    prefill = min(gqa, expanded)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "shapes": {"batch": args.batch, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
                   "tokens": args.tokens, "head_dim": args.head_dim, "dtype": str(dtype)},
        "squat": {"bits": args.bits, "group_size": args.group_size, "block_size": 64, "subspace_dim": 20,
                  "lam": 1e-3},
        "timing": f"median of {args.reps} CUDA-event timings after 2 warm-up calls, ms",
        "median_ms": rows,
        "checks": check,
    }
    lines = [f"{gpu}, {args.tokens} tokens, {args.q_heads}/{args.kv_heads} heads, D={args.head_dim}",
             "| step | median ms | x fp16 SDPA prefill |", "|---|---:|---:|"]
    for name, ms in rows.items():
        lines.append(f"| {name} | {ms:.3f} | {ms / prefill:.3f} |")
    print(json.dumps(check))
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
