"""Rounding of the KIVI key group's scaled query part in float16, before and after the sixteenth
session's change (``kivi_parts.key_group_part``): ``(q * scale) / step`` (scale first) against
``(q / step) * scale`` (step first, which the compiler hoists out of the block loop). Both round to
float16; they differ only where ``q / step`` is below float16's normal range.

    python benchmarks/query_step_rounding.py          # CPU, seconds
"""

from __future__ import annotations

import numpy as np


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def main(n: int = 200_000, step: int = 256) -> None:
    rng = np.random.default_rng(0)
    print(f"step {step}, {n} products, key scales uniform in [0.01, 5]")
    print(f"{'|q| ~':>8} {'rms exact':>11} {'rms err, scale first':>21} {'rms err, step first':>20} {'ratio':>6}")
    for q_size in (1.0, 0.1, 0.01, 0.001):
        q = (rng.standard_normal(n) * q_size).astype(np.float16)
        scale = rng.uniform(0.01, 5, n).astype(np.float16)
        exact = q.astype(np.float64) * scale.astype(np.float64) / step
        scale_first = (q * scale).astype(np.float16) * np.float16(1 / step)
        step_first = (q * np.float16(1 / step)).astype(np.float16) * scale
        e_old = rms(scale_first.astype(np.float64) - exact)
        e_new = rms(step_first.astype(np.float64) - exact)
        print(f"{q_size:8g} {rms(exact):11.3g} {e_old:21.3g} {e_new:20.3g} {e_new / e_old:6.2f}")


if __name__ == "__main__":
    main()
