"""What a table lookup of polar-rope angles costs in a Triton kernel, against decoding them, in an sm_90
compile on a machine without a GPU (no device time).

The PolarQuant-RoPE paper scores keys by table lookups (``tl.gather`` in its reference kernel): with
the angle quantized to 16 levels per (group, pair), the 16 (cos, sin) of each pair could be computed
once per group and looked up per token instead of two special-function operations per token and pair.
This compiles one part of the transposed kernel's key step both ways, a ``[32 tokens, 16 pairs]`` tile
per iteration with the same radius decode and the same two tensor-core products:

* ``lookup``: (cos, sin) as float16 halves of one int32 looked up by ``tl.gather`` in a ``[16 levels,
  16 pairs]`` table (built once, before the loop);
* ``decode``: ``theta = min + code * scale``, ``cos.approx`` / ``sin.approx`` (``polar_pairs.cos_sin``),

and prints the main loop's SASS instructions per iteration, per (token, pair), and their mix.

    PYTHONPATH=src python benchmarks/inspect_gather_lookup.py
"""

from __future__ import annotations

import os
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from inspect_attention_sass import loop_opcodes, sass_of
from kvpolar.kernels.polar_pairs import cos_sin

BN, NP, BM, ITERS = 32, 16, 8, 64


@triton.jit
def _part_kernel(tab_ptr, code_ptr, q_ptr, out_ptr, a_scale, a_min, r_scale, r_min, n_iters,
                 BN: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr, LOOKUP: tl.constexpr):
    """``n_iters`` tiles of ``[BN, NP]`` 6-bit pair codes (angle in bits 0-3, radius in 4-5): the key
    pairs' x / y rebuilt by ``LOOKUP`` (table) or by decoding, times the query's x / y rows."""
    rows = tl.arange(0, BN)[:, None]
    pairs = tl.arange(0, NP)[None, :]
    qx = tl.load(q_ptr + tl.arange(0, NP)[:, None] * BM + tl.arange(0, BM)[None, :]).to(tl.float16)
    qy = tl.load(q_ptr + NP * BM + tl.arange(0, NP)[:, None] * BM + tl.arange(0, BM)[None, :]).to(tl.float16)
    if LOOKUP:  # the group's (cos, sin) of every level and pair: float16 halves of one int32
        table = tl.load(tab_ptr + tl.arange(0, 16)[:, None] * NP + pairs)
    acc = tl.zeros([BN, BM], tl.float32)
    for i in range(n_iters):
        code = tl.load(code_ptr + i * BN * NP + rows * NP + pairs)
        r = ((code >> 4) & 3).to(tl.float32) * r_scale + r_min
        if LOOKUP:
            cs = tl.gather(table, code & 15, 0)
            c = (cs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            s = ((cs >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
            x = r.to(tl.float16) * c
            y = r.to(tl.float16) * s
        else:
            c, s = cos_sin((code & 15).to(tl.float32) * a_scale + a_min, True)
            x = (r * c).to(tl.float16)
            y = (r * s).to(tl.float16)
        acc = tl.dot(x, qx, acc)
        acc = tl.dot(y, qy, acc)
    tl.store(out_ptr + rows * BM + tl.arange(0, BM)[None, :], acc)


def compile_form(lookup: bool):
    signature = {"tab_ptr": "*i32", "code_ptr": "*i32", "q_ptr": "*fp16", "out_ptr": "*fp32", "a_scale": "fp32",
                 "a_min": "fp32", "r_scale": "fp32", "r_min": "fp32", "n_iters": "i32", "BN": "constexpr",
                 "NP": "constexpr", "BM": "constexpr", "LOOKUP": "constexpr"}
    src = ASTSource(fn=_part_kernel, signature=signature, constexprs={"BN": BN, "NP": NP, "BM": BM, "LOOKUP": lookup})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, "num_stages": 3})


def main() -> None:
    out = tempfile.mkdtemp(prefix="kvpolar-gather-")
    print(f"sm_90 compile (Triton {triton.__version__}), one warp, [{BN} tokens, {NP} pairs] per iteration:")
    for lookup in (True, False):
        tag = "lookup" if lookup else "decode"
        ops = loop_opcodes(sass_of(compile_form(lookup), os.path.join(out, f"{tag}.cubin")))
        total = sum(ops.values())
        mix = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(f"  {tag}: {total} warp instructions per iteration, {total * 32 / (BN * NP):.1f} thread "
              f"instructions per (token, pair) ({mix})")


if __name__ == "__main__":
    main()
