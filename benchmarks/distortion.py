"""Distortion per bit: every quantizer on Gaussian vectors and on RoPE keys with outlier channels.

    PYTHONPATH=src python benchmarks/distortion.py          # CPU, well under a minute

For each method and setting: bits/element as reported by the ``QuantizedTensor`` (every code, norm,
scale and stored codebook counted; shared rotations/fixed codebooks excluded), the normalised MSE
``mean ||x_hat - x||^2 / ||x||^2`` (= MSE of unit-norm vectors on Gaussian input) and the relative
score error ``||q K_hat^T - q K^T|| / ||q K^T||``, next to the rate-distortion floor ``4^-b`` at the
same bits. Beyond the polar-recursive paper (issue 4) it searches bit allocations (levels, angle
bits per level, quantized log-radii), predicted from the per-level Lloyd-Max errors, measures the
best ones and reports the measured Pareto front. Writes benchmarks/results/distortion.json,
benchmarks/results/distortion.png and the "Distortion per bit" section of benchmarks/README.md.
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import torch

import kvpolar
from kvpolar import synthetic
from kvpolar.quantizers import codebooks as cb

HERE = Path(__file__).resolve().parent
SHAPE = (1, 8, 512, 128)  # batch, kv heads, tokens, head dim
QUERIES = 32
MAX_BITS_PER_LEVEL = 5


def datasets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    b, h, t, d = SHAPE
    gauss = synthetic.gaussian(SHAPE, seed=0)
    keys = synthetic.rope_keys(b, h, t, d, seed=1)
    return {
        "gaussian": (gauss, synthetic.gaussian((b, h, QUERIES, d), seed=2)),
        "rope-keys": (keys, synthetic.low_rank_queries(tuple(keys.shape), tokens=QUERIES, seed=3)),
    }


def measure(name: str, params: dict, x: torch.Tensor, q: torch.Tensor) -> dict:
    quant = kvpolar.quantizer(name, **params)
    # SQuat takes its subspace from the queries whose scores are measured (the prompt's queries)
    p = quant.quantize(x, **({"queries": q} if "queries" in quant.context_keys else {}))
    xh = quant.dequantize(p).double()
    xd = x.double()
    mse = ((xh - xd).norm(dim=-1) ** 2 / xd.norm(dim=-1).clamp_min(1e-30) ** 2).mean()
    exact = q.double() @ xd.transpose(-1, -2)
    score_err = (quant.scores(q, p).double() - exact).norm() / exact.norm()
    bits = p.bits_per_element
    return {"bits_per_element": bits, "mse": float(mse), "score_rel_error": float(score_err), "floor": 4.0**-bits}


# ----- allocation search for polar-recursive -----------------------------------------------------
def predicted_allocations(head_dim: int) -> list[tuple[float, float, tuple[int, ...]]]:
    """(bits/element, predicted MSE, bits per level) on the predicted Pareto front, 16-bit radii.

    Prediction: a level's angle error e moves the vector by about |r| e, so the normalised MSE is
    about the sum of the levels' Lloyd-Max angle MSEs (first order, Gaussian input). Cost and error
    add over levels, so the front is built level by level, pruning dominated prefixes.
    """
    max_levels = int(math.log2(head_dim))
    level_mse = {
        (level, b): cb.lloyd_max(cb.polar_angle_density(level), b).mse
        for level in range(1, max_levels + 1)
        for b in range(1, MAX_BITS_PER_LEVEL + 1)
    }
    prefixes = [(0, 0.0, ())]
    points = []
    for level in range(1, max_levels + 1):
        prefixes = pareto([
            (cost + (head_dim >> level) * b, mse + level_mse[(level, b)], bits + (b,))
            for cost, mse, bits in prefixes
            for b in range(1, MAX_BITS_PER_LEVEL + 1)
        ])
        for cost, mse, bits in prefixes:
            per_token = math.ceil(cost / 8) * 8 + 16 * (head_dim >> level)
            points.append((per_token / head_dim, mse, bits))
    return pareto(points)


def pareto(points: list) -> list:
    """Points not beaten on both bits (first field) and error (second field), sorted by bits."""
    front, best = [], float("inf")
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def exploration_settings(head_dim: int) -> list[dict]:
    front = predicted_allocations(head_dim)
    chosen = [p for p in front if 1.75 <= p[0] <= 5.0]
    # thin to about ten points spread over the bit range
    step = max(1, len(chosen) // 10)
    settings = []
    for _, _, bits in chosen[::step]:
        settings.append({"levels": len(bits), "bits": bits})
        settings.append({"levels": len(bits), "bits": bits, "preconditioner": "orthogonal"})
        if len(bits) <= 5:  # several radii left: try quantized log-radii too
            settings.append({"levels": len(bits), "bits": bits, "radius_bits": 6})
    for rb in (4, 6, 8):  # the paper's angles with quantized log-radii
        settings.append({"levels": 4, "bits": (4, 2, 2, 2), "radius_bits": rb})
    return settings


# ----- the run -----------------------------------------------------------------------------------
def method_settings() -> list[tuple[str, str, dict]]:
    """(family label, registry name, params) of every compared setting."""
    settings = [("polar-recursive (paper)", "polar-recursive", {}),
                ("polar-recursive online", "polar-recursive", {"codebook": "online"}),
                ("polar-recursive orthogonal", "polar-recursive", {"preconditioner": "orthogonal"})]
    settings += [("kivi", "kivi", {"bits": b, "group_size": 32, "axis": "channel"}) for b in (2, 3, 4)]
    settings += [("turbo", "turbo", {"bits": b}) for b in (1, 2, 3, 4)]
    settings += [("polar-rope", "polar-rope", {"radius_bits": r, "angle_bits": a, "group_size": 128})
                 for r, a in ((2, 2), (2, 4), (3, 3), (4, 4))]
    settings += [("squat", "squat", {"bits": b, "group_size": 32, "block_size": 32}) for b in (2, 3, 4)]
    settings += [("fp8", "fp8", {"format": f, "scale": "head"}) for f in ("e4m3", "e5m2")]
    settings += [("polar-recursive explored", "polar-recursive", s) for s in exploration_settings(SHAPE[-1])]
    return settings


def run() -> dict:
    start = time.perf_counter()
    data = datasets()
    rows = []
    for family, name, params in method_settings():
        for dataset, (x, q) in data.items():
            row = {"family": family, "method": name, "params": _jsonable(params), "dataset": dataset}
            row.update(measure(name, params, x, q))
            rows.append(row)
    for dataset in data:
        explored = [(r["bits_per_element"], r["mse"], r) for r in rows
                    if r["dataset"] == dataset and r["method"] == "polar-recursive"]
        for _, _, r in pareto(explored):
            r["pareto"] = True
    return {
        "command": "PYTHONPATH=src python benchmarks/distortion.py",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": sys.version.split()[0], "torch": torch.__version__, "device": "cpu"},
        "shape": list(SHAPE), "queries": QUERIES, "input_dtype": "float16",
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }


def _jsonable(params: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


def describe(row: dict) -> str:
    p = row["params"]
    if row["method"] == "polar-recursive":
        text = f"L={p.get('levels', 4)} bits={tuple(p.get('bits', (4, 2, 2, 2)))}"
        text += f" r={p['radius_bits']}b" if p.get("radius_bits") else " r=16b"
        text += " orthogonal" if p.get("preconditioner") == "orthogonal" else ""
        return text + (" online" if p.get("codebook") == "online" else "")
    return ", ".join(f"{k}={v}" for k, v in p.items()) or "defaults"


def markdown(result: dict) -> str:
    lines = [
        "## Distortion per bit",
        "",
        f"`{result['command']}` ({result['machine']['processor']}, torch {result['machine']['torch']}, "
        f"{result['seconds']} s). Input: float16 `{tuple(result['shape'])}`; Gaussian vectors, and "
        "`synthetic.rope_keys` (RoPE keys, 4 outlier pairs, per-channel mean/scale) with rank-8 queries. "
        "bits/elem is `QuantizedTensor.bits_per_element` (shared rotations and fixed codebooks excluded: "
        "bytes per layer, not per token). MSE = mean `||x_hat - x||^2 / ||x||^2`; floor = `4^-bits`. "
        "Pareto = on the measured front of all polar-recursive settings for that dataset.",
        "",
        "| family | setting | data | bits/elem | MSE | floor 4^-b | MSE/floor | score rel. err | Pareto |",
        "|---|---|---|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["dataset"], r["family"], r["bits_per_element"])):
        if r["family"] == "polar-recursive explored" and not r.get("pareto"):
            continue
        lines.append(
            f"| {r['family']} | {describe(r)} | {r['dataset']} | {r['bits_per_element']:.3f} | "
            f"{r['mse']:.4f} | {r['floor']:.4f} | {r['mse'] / r['floor']:.1f} | "
            f"{r['score_rel_error']:.4f} | {'yes' if r.get('pareto') else ''} |"
        )
    lines += ["", "Explored settings off the front are in `results/distortion.json`. "
              "Plot: `results/distortion.png`.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), sharey=True)
    styles = {"kivi": "s-", "turbo": "o-", "polar-rope": "D-", "squat": "v-", "fp8": "^",
              "polar-recursive (paper)": "*",
              "polar-recursive online": "P", "polar-recursive orthogonal": "X"}
    for ax, name in zip(axes, names):
        rows = [r for r in result["rows"] if r["dataset"] == name]
        for family, style in styles.items():
            pts = sorted((r["bits_per_element"], r["mse"]) for r in rows if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), style, label=family, markersize=10 if "*" in style else 6)
        front = sorted((r["bits_per_element"], r["mse"]) for r in rows if r.get("pareto"))
        ax.plot(*zip(*front), "k.--", label="polar-recursive Pareto (explored)")
        xs = [1 + i * 0.05 for i in range(90)]
        ax.plot(xs, [4.0**-x for x in xs], ":", color="grey", label="floor 4^-b")
        ax.set_yscale("log")
        ax.set_xlabel("bits per element (all stored bits)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised MSE")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = "<!-- distortion:begin -->", "<!-- distortion:end -->"
    block = f"{begin}\n{section}{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small tensors: threads only contend on a shared machine
    result = run()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "distortion.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, HERE / "results" / "distortion.png")
    section = markdown(result)
    update_readme(section, HERE / "README.md")
    print(section)


if __name__ == "__main__":
    main()
