"""Where a kernel's warps wait: the warp-stall samples of an Nsight Compute source-page export, summed
over the kernel and listed for its most-sampled SASS instructions.

The export: ``ncu --section SourceCounters --section WarpStateStats -k regex:_split_kernel_t -c 1
--page source --print-source sass --csv python benchmarks/profile_attention.py kivi-2 32 32768 32 > FILE.csv``
(on the GPU; gzip it to keep it).

    python benchmarks/ncu_stalls.py benchmarks/results/profile/ncu_h200_kivi-2_sass_sixteenth.csv.gz [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip


def read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    """(header, one row per SASS instruction) of the export (``.csv`` or ``.csv.gz``)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    return header, [r for r in rows[start + 1:] if len(r) == len(header)]


def number(x: str) -> float:
    try:
        return float(x or 0)
    except ValueError:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    header, rows = read_rows(args.csv)
    reasons = {h: i for i, h in enumerate(header) if h.startswith("stall_") and "Not Issued" not in h}
    totals = collections.Counter()
    for r in rows:
        for h, i in reasons.items():
            totals[h] += number(r[i])
    n = sum(totals.values())
    print(f"{int(n)} warp-state samples over {len(rows)} instructions")
    for reason, count in totals.most_common():
        if count:
            print(f"  {reason:26s} {100 * count / n:5.1f}%")
    col = header.index("Warp Stall Sampling (All Samples)")
    print("\nmost-sampled instructions (samples, instruction, main reason):")
    for r in sorted(rows, key=lambda r: -number(r[col]))[:args.top]:
        by = {h: number(r[i]) for h, i in reasons.items()}
        main_reason = max(by, key=by.get)
        print(f"  {int(number(r[col])):6d}  {r[1].strip()[:48]:48s} {main_reason} ({int(by[main_reason])})")


if __name__ == "__main__":
    main()
