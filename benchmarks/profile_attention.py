"""Run the fused decode-attention kernel a few times at one shape, for ``ncu`` (Nsight Compute).

Usage: ``ncu -k regex:_split_kernel -c 1 python benchmarks/profile_attention.py kivi-2 32 32768 [BLOCK_N]
[--levels selects]`` (``--levels selects``: polar-recursive's 2-bit angle levels looked up by two
selects, the form the cubics replaced, as ``inspect_level_polynomials.py --form selects`` compiles it).
"""

import argparse

import torch

from bench_attention import HKV, HQ, D, RESIDUAL, make_preset
from kvpolar.kernels.decode_attention import LaunchConfig, fused_decode_attention

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("preset")
ap.add_argument("batch", type=int)
ap.add_argument("tokens", type=int)
ap.add_argument("block_n", type=int, nargs="?", default=64)
ap.add_argument("--levels", choices=("cubic", "selects"), default="cubic")
args = ap.parse_args()
if args.levels == "selects":
    from inspect_level_polynomials import use_form

    use_form("selects")
name, b, t = args.preset, args.batch, args.tokens
dev = torch.device("cuda")
pk, pv = make_preset(name, b, t - RESIDUAL, torch.float16, dev)
q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.float16)
rk = torch.randn(b, HKV, RESIDUAL, D, device=dev, dtype=torch.float16)
for _ in range(3):
    fused_decode_attention(q, pk, pv, None, None, rk, rk, D**-0.5, None, LaunchConfig(block_n=args.block_n))
torch.cuda.synchronize()
