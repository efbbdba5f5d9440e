"""Key and score error of polar-rope per angle range, at equal bits, on synthetic RoPE keys (CPU).

    PYTHONPATH=src python benchmarks/angle_range_error.py

Keys: ``kvpolar.synthetic.rope_keys`` (1 x 4 heads x 1024 tokens x 128, 4 outlier pairs), seeds 0-2;
queries: ``low_rank_queries`` (16 tokens). Errors are ||approx - exact|| / ||exact||, mean over seeds.
KIVI per-channel keys at 3.25 and 3.0 bits/element for reference.
"""

from __future__ import annotations

import kvpolar
from kvpolar import synthetic
from kvpolar.demo import relative_error

SEEDS = (0, 1, 2)


def errors(name: str, **params) -> tuple[float, float, float]:
    keys_err, score_err = [], []
    q = kvpolar.quantizer(name, **params)
    for seed in SEEDS:
        k = synthetic.rope_keys(1, 4, 1024, 128, seed=seed)
        queries = synthetic.low_rank_queries(tuple(k.shape), tokens=16, seed=seed + 10)
        p = q.quantize(k)
        keys_err.append(relative_error(q.dequantize(p), k))
        score_err.append(relative_error(q.scores(queries, p), queries.float() @ k.float().transpose(-1, -2)))
    return p.bits_per_element, sum(keys_err) / len(SEEDS), sum(score_err) / len(SEEDS)


def main() -> None:
    print("| method | bits/elem | key rel. error | score rel. error |")
    print("|---|---:|---:|---:|")
    for rb, ab in [(2, 4), (3, 3), (4, 4)]:
        for angle_range in ("minmax", "shortest-arc"):
            bits, ke, se = errors("polar-rope", radius_bits=rb, angle_bits=ab, angle_range=angle_range)
            print(f"| polar-rope r{rb}a{ab} {angle_range} | {bits:.2f} | {ke:.4f} | {se:.4f} |")
    for bits, group in [(3, 128), (2, 32)]:
        b, ke, se = errors("kivi", bits=bits, group_size=group)
        print(f"| kivi {bits}-bit G{group} (per-channel keys) | {b:.2f} | {ke:.4f} | {se:.4f} |")


if __name__ == "__main__":
    main()
