"""The built-in demo: quantize synthetic keys and values with every registered method, print a table."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kvpolar import synthetic
from kvpolar.registry import available_quantizers, quantizer

_KIVI_VALUES = ("kivi", {"bits": 2, "group_size": 32, "axis": "token"})

#: Per method: key params, and (method, params) for values. Keys-only methods (SQuat, polar-rope)
#: store values as KIVI 2-bit per token, as their papers and the cache presets do.
DEMO_SETTINGS: dict[str, tuple[dict[str, Any], tuple[str, dict[str, Any]]]] = {
    "none": ({}, ("none", {})),
    "kivi": ({"bits": 2, "group_size": 32, "axis": "channel"}, _KIVI_VALUES),
    "fp8": ({"format": "e4m3", "scale": "head"}, ("fp8", {"format": "e4m3", "scale": "head"})),
    "squat": ({"bits": 2, "group_size": 32, "block_size": 32, "subspace_dim": 20, "lam": 1e-3}, _KIVI_VALUES),
    "turbo": ({"bits": 3}, ("turbo", {"bits": 3})),
    "polar-recursive": ({"levels": 4, "bits": (4, 2, 2, 2)}, ("polar-recursive", {"levels": 4, "bits": (4, 2, 2, 2)})),
    "polar-rope": ({"radius_bits": 2, "angle_bits": 4, "group_size": 128}, _KIVI_VALUES),
}


@dataclasses.dataclass(frozen=True)
class DemoRow:
    method: str
    key_bits_per_element: float
    key_relative_error: float
    score_relative_error: float
    value_bits_per_element: float
    value_relative_error: float


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64."""
    diff = (approx.double() - exact.double()).norm()
    return float(diff / exact.double().norm().clamp_min(1e-30))


def run_demo(batch: int = 1, heads: int = 4, tokens: int = 512, head_dim: int = 128, seed: int = 0) -> list[DemoRow]:
    """Quantize synthetic RoPE keys (with outlier pairs) and Gaussian values with every method."""
    keys = synthetic.rope_keys(batch, heads, tokens, head_dim, seed=seed)
    values = synthetic.gaussian((batch, heads, tokens, head_dim), seed=seed + 1)
    queries = synthetic.low_rank_queries(tuple(keys.shape), tokens=64, seed=seed + 2)
    exact_scores = queries.float() @ keys.float().transpose(-1, -2)
    rows = []
    for name in available_quantizers():
        key_params, (value_method, value_params) = DEMO_SETTINGS.get(name, ({}, (name, {})))
        kq, vq = quantizer(name, **key_params), quantizer(value_method, **value_params)
        context = {"queries": queries} if "queries" in kq.context_keys else {}
        pk = kq.quantize(keys, **context)
        pv = vq.quantize(values, **({"queries": queries} if "queries" in vq.context_keys else {}))
        rows.append(
            DemoRow(
                method=name,
                key_bits_per_element=pk.bits_per_element,
                key_relative_error=relative_error(kq.dequantize(pk), keys),
                score_relative_error=relative_error(kq.scores(queries, pk), exact_scores),
                value_bits_per_element=pv.bits_per_element,
                value_relative_error=relative_error(vq.dequantize(pv), values),
            )
        )
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = "| method | key bits/elem | key rel. error | score rel. error | value bits/elem | value rel. error |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.key_bits_per_element:.3f} | {r.key_relative_error:.4f} | "
            f"{r.score_relative_error:.4f} | {r.value_bits_per_element:.3f} | {r.value_relative_error:.4f} |"
        )
    return "\n".join(lines)
