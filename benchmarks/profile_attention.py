"""Run the fused decode-attention kernel a few times at one shape, for ``ncu`` (Nsight Compute).

Usage: ``ncu -k regex:_split_kernel -c 1 python benchmarks/profile_attention.py kivi-2 32 32768``
"""

import sys

import torch

from bench_attention import HKV, HQ, D, RESIDUAL, make_preset
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention

name, b, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block_n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
dev = torch.device("cuda")
pk, pv = make_preset(name, b, t - RESIDUAL, torch.float16, dev)
q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=torch.float16)
for _ in range(3):
    fused_decode_attention(q, pk, pv, None, None, rk, rk, D**-0.5, None, LaunchConfig(block_n=block_n))
torch.cuda.synchronize()
