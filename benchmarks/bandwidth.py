"""The GPU's device-to-device copy bandwidth, the yardstick of the benchmarks' "% of copy bandwidth"
and read-bound columns (``bench_attention.py``, ``bench_end_to_end.py``)."""

from __future__ import annotations

import torch


def copy_bandwidth(dev) -> float:
    """GB/s of a 1 GiB device-to-device copy on ``dev`` (bytes read + written): the median of
    ``triton.testing.do_bench`` (L2 flushed between runs)."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    del src, dst
    return 2 * (1 << 30) / ms / 1e6  # GB/s, read + write
