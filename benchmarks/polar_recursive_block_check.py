"""polar-recursive values with KIVI keys in the fused decode kernel, by key group and launch block:
``fused_decode_attention`` against ``reference_decode_attention`` (both on the GPU, fp16, B=2, one KV
head of GQA 4, 96 packed + 21 window tokens), with the kernel and block the plan took. Then the preset
pair (polar-recursive keys and values) for comparison.

    PYTHONPATH=src python benchmarks/polar_recursive_block_check.py

On the H100 before the twenty-sixth session's guard (results/polar_recursive_block16_h100.txt) every
row whose plan took 16-token blocks was wrong (error about 1 against outputs of order 1), in both
kernels, at head dim 64 and 128: KIVI keys in 16-token groups gave such blocks by default, and a
``LaunchConfig.block_n`` of 16 did. Since then a pair with a polar-recursive tensor always takes
32-token blocks (``decode_formats.POLAR_RECURSIVE_BLOCK_N``), so every row should read 32.
"""

import os
import sys

import torch

import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels import decode_attention as da

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
from kernel_checks import random_inputs  # noqa: E402

CONFIGS = (None, da.LaunchConfig(block_n=16), da.LaunchConfig(block_n=32), da.LaunchConfig(block_n=64),
           da.LaunchConfig(block_n=16, transposed=False), da.LaunchConfig(block_n=32, transposed=False))


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tk, r = 96, 21
    for d in (128, 64):
        for group in (16, 32, 64):
            for cfg in CONFIGS:
                k, v, q = random_inputs(("block-check", d), batch=2, hkv=1, gqa=4, tq=1, n=tk + r, d=d,
                                        dtype=torch.float16)
                k, v, q = k.to(dev), v.to(dev), q.to(dev)
                kq = kvpolar.quantizer("kivi", bits=2, group_size=group, axis="channel")
                vq = kvpolar.quantizer("polar-recursive")
                pk, pv = kq.quantize(k[..., :tk, :]), vq.quantize(v[..., :tk, :])
                rk, rv = k[..., tk:, :], v[..., tk:, :]
                out = da.fused_decode_attention(q, pk, pv, kq, vq, rk, rv, d**-0.5, config=cfg).float()
                want = reference_decode_attention(q.float(), pk, pv, kq, vq, rk.float(), rv.float(), d**-0.5)
                launch = da.describe_launch(q, pk, pv, cfg)
                asked = "default" if cfg is None else f"block_n={cfg.block_n}{'' if cfg.transposed else ' classic'}"
                print(f"D={d} KIVI key group {group:3d} {asked:24s} error {(out - want.float()).abs().max():.2e} "
                      f"({launch['kernel']}, block_n {launch['block_n']})", flush=True)
    for d in (128, 64):
        k, v, q = (x.to(dev) for x in random_inputs(("block-check-pr", d), batch=2, hkv=1, gqa=4, tq=1, n=tk + r,
                                                     d=d, dtype=torch.float16))
        pq = kvpolar.quantizer("polar-recursive")
        pk, pv = pq.quantize(k[..., :tk, :]), pq.quantize(v[..., :tk, :])
        out = da.fused_decode_attention(q, pk, pv, pq, pq, k[..., tk:, :], v[..., tk:, :], d**-0.5).float()
        want = reference_decode_attention(q.float(), pk, pv, pq, pq, k[..., tk:, :].float(), v[..., tk:, :].float(),
                                          d**-0.5)
        print(f"D={d} polar-recursive keys and values: error {(out - want.float()).abs().max():.2e}")


if __name__ == "__main__":
    main()
