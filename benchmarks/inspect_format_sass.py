"""Compile the classic split kernel for sm_90 with the turbo / fp8 / polar-recursive formats
(kernels/decode_formats.py) on a machine without a GPU; report registers, spills and shared memory.

Costs no device time (Triton's bundled ``ptxas`` / ``cuobjdump``); proves the compiled paths build
(bit casts, codebook gathers, the polar-recursive rebuild) and chose ``POLAR_RECURSIVE_BLOCK_N``.

Usage: ``PYTHONPATH=src python benchmarks/inspect_format_sass.py [--block-n 64 32 16] [--warps 4]
[--dtype fp16 bf16]`` (D = 128, GQA 4, Tq 1; polar-recursive at its default 4 levels).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(__file__))
from inspect_attention_sass import _RUNTIME_INTS, report  # noqa: E402

from kvpolar.kernels import decode_attention as mod  # noqa: E402
from kvpolar.kernels import decode_formats as fm  # noqa: E402

D = 128
# tag -> (format id, bits); KIVI (1) for the mixed pairs the presets use
FORMATS = {"turbo3": (fm.FMT_TURBO, 3), "turbo4": (fm.FMT_TURBO, 4), "fp8e4m3": (fm.FMT_FP8_E4M3, 8),
           "fp8e5m2": (fm.FMT_FP8_E5M2, 8), "polar": (fm.FMT_POLAR_RECURSIVE, 8), "kivi2": (1, 2),
           "kivi3": (1, 3), "kivi4": (1, 4)}
PAIRS = [("turbo3", "kivi3"), ("turbo4", "kivi4"), ("turbo4", "turbo4"), ("fp8e4m3", "fp8e4m3"),
         ("fp8e5m2", "fp8e5m2"), ("polar", "polar"), ("kivi2", "polar"), ("polar", "kivi2")]


def _unit(bits: int) -> tuple[int, int]:
    return (1, 8 // bits) if 8 % bits == 0 else (3, 24 // bits)


def _row_bytes(fmt: int, bits: int) -> int:
    if fmt == fm.FMT_POLAR_RECURSIVE:  # default levels 4, bits (4, 2, 2, 2)
        return (D // 2 * 4 + D // 4 * 2 + D // 8 * 2 + D // 16 * 2) // 8
    return D * bits // 8


def compile_pair(key: str, value: str, dtype, block_n: int, warps: int):
    (kf, kb), (vf, vb) = FORMATS[key], FORMATS[value]
    kernel = mod._split_kernel
    names = list(kernel.arg_names)
    q_t = {tl.float16: "*fp16", tl.bfloat16: "*bf16"}[dtype]
    meta_t = {fm.FMT_FP8_E4M3: "*fp32", fm.FMT_FP8_E5M2: "*fp32"}
    ptrs = {"q_ptr": q_t, "k_ptr": "*u8", "v_ptr": "*u8", "km0": meta_t.get(kf, "*fp16"), "km1": "*fp16",
            "km2": "*fp16", "km3": "*fp16", "vm0": meta_t.get(vf, "*fp16"), "vm1": "*fp16", "mask_ptr": "*u8",
            "part_max": "*fp32", "part_sum": "*fp32", "part_acc": "*fp32", "ktab0": "*fp32", "ktab1": "*fp32",
            "ktab2": "*i32", "vtab0": "*fp32", "vtab1": "*fp32", "vtab2": "*i32"}
    offset = 1024.0 if dtype == tl.float16 else 128.0
    cons = dict(D=D, GQA=4, TQ=1, BLOCK_M=16, BLOCK_N=block_n, BLOCKS_CONST=0, KEY_FMT=kf, KEY_BITS=kb,
                KEY_UB=_unit(kb)[0], KEY_U=_unit(kb)[1], KEY_GROUP=32 if kf == 1 else 1, ANGLE_BITS=0,
                PAIR_HALF=True, VAL_FMT=vf, VAL_BITS=vb, VAL_UB=_unit(vb)[0], VAL_U=_unit(vb)[1],
                VAL_GROUP=32 if vf == 1 else 1, HAS_MASK=False, NATIVE=True, DOT_DTYPE=dtype,
                KEY_OFFSET=offset, VAL_OFFSET=offset, PARTS=True, FP8_CONVERT=True,
                KEY_NB=_row_bytes(kf, kb), KEY_LEVELS=4 if kf == fm.FMT_POLAR_RECURSIVE else 0,
                VAL_NB=_row_bytes(vf, vb), VAL_LEVELS=4 if vf == fm.FMT_POLAR_RECURSIVE else 0)
    sig = {n: "constexpr" if n in cons else ptrs.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] not in ("constexpr", "fp32") and n not in _RUNTIME_INTS}
    src = ASTSource(fn=kernel, signature=sig, constexprs=cons, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 2})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--warps", type=int, nargs="+", default=[4])
    ap.add_argument("--dtype", nargs="+", default=["fp16"], choices=("fp16", "bf16"))
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="kvpolar-sass-")
    for name in args.dtype:
        dtype = {"fp16": tl.float16, "bf16": tl.bfloat16}[name]
        for key, value in PAIRS:
            for block_n in args.block_n:
                for warps in args.warps:
                    tag = f"{key}-{value}-{name}-n{block_n}-w{warps}"
                    print(report(compile_pair(key, value, dtype, block_n, warps), tag, out).split("\n")[0], flush=True)
    print(f"(cubin and SASS in {out})")


if __name__ == "__main__":
    main()
