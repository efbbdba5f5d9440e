"""The GPU's device-to-device copy bandwidth, the yardstick of the benchmarks' "% of copy bandwidth"
and read-bound columns (``bench_attention.py``, ``bench_end_to_end.py``, ``bench_dequantize.py``,
``bench_scores.py``)."""

from __future__ import annotations

import time

import torch


def copy_bandwidth(dev, nbytes: int = 1 << 30) -> float:
    """GB/s of an ``nbytes`` (default 1 GiB) copy within ``dev`` (bytes read + written): on a GPU the
    median of ``triton.testing.do_bench`` (L2 flushed between runs); elsewhere (the scripts' CPU smoke
    runs, which check the scripts, not the machine) the median of five timed copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    if torch.device(dev).type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    else:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(1e3 * (time.perf_counter() - start))
        ms = sorted(times)[len(times) // 2]
    return 2 * nbytes / ms / 1e6  # GB/s, read + write
