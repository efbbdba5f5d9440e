"""Compile the decode-attention split kernels for sm_90 on a machine without a GPU and report
registers, spills, shared memory and the SASS instruction mix of the main loop.

Costs no device time: Triton's bundled ``ptxas`` / ``cuobjdump`` do the work. Used to choose the
transposed kernel's tile shapes before timing them (see benchmarks/README.md, "Second version").

Usage: ``PYTHONPATH=src python benchmarks/inspect_attention_sass.py [--bits 2] [--warps 1 2]
[--block-n 32] [--rows 8] [--stages 2] [--max-registers 168] [--polar r2a4] [--classic] [--out DIR]``
(D = 128, GQA 4, Tq 1, fp16, KIVI key group 32 and value group 32).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvpolar.kernels import decode_attention as mod
from kvpolar.kernels import turbo_parts
from kvpolar.quantizers.turbo import sphere_codebook

_RUNTIME_INTS = ("n_tokens", "mask_offset", "blocks_per_split", "split_base", "total_splits", "n_kv_heads",
                 "sq_t", "smk_t", "smk_n", "sq_b")
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_split(kernel, bits: int, block_n: int, warps: int, rows: int, stages: int = 2,
                  max_registers: int | None = None, polar: tuple[int, int] | None = None,
                  recursive: bool = False, turbo: int | None = None):
    """Compiled kernel for KIVI ``bits``-bit keys and values (fp16 query), or polar-rope keys
    ``polar = (radius_bits, angle_bits)`` (group 128) with KIVI ``bits``-bit values, or
    polar-recursive keys and values (``recursive``, the paper setting, read by parts), or turbo keys
    and values of ``turbo`` bits (read by parts), as the launch
    would make it (integer arguments divisible by 16 where the benchmark's are)."""
    names = list(kernel.arg_names)
    ptrs = {"q_ptr": "*fp16", "k_ptr": "*u8", "v_ptr": "*u8", "km0": "*fp16", "km1": "*fp16", "km2": "*fp16",
            "km3": "*fp16", "vm0": "*fp16", "vm1": "*fp16", "mask_ptr": "*fp16", "part_max": "*fp32",
            "part_sum": "*fp32", "part_acc": "*fp32", "kcos": "*fp32", "ksin": "*fp32", "vcos": "*fp32",
            "vsin": "*fp32", "kbook": "*fp32", "vbook": "*fp32"}
    cons = dict(D=128, GQA=4, TQ=1, BLOCK_M=rows, BLOCK_N=block_n, BLOCKS_CONST=0, KEY_FMT=1, KEY_BITS=bits,
                KEY_UB=1, KEY_U=8 // bits, KEY_GROUP=32, ANGLE_BITS=0, PAIR_HALF=True, VAL_FMT=1, VAL_BITS=bits,
                VAL_UB=1, VAL_U=8 // bits, VAL_GROUP=32, HAS_MASK=False, NATIVE=True, DOT_DTYPE=tl.float16,
                KEY_OFFSET=1024.0, VAL_OFFSET=1024.0, PARTS=True, KEY_NU=128 // (8 // bits), KEY_WORDS=False,
                VAL_WORDS=False)
    if polar is not None:
        pb = sum(polar)
        cons.update(KEY_FMT=2, KEY_BITS=pb, KEY_UB=pb // 2, KEY_U=4, KEY_NU=16, KEY_WORDS=pb in (4, 6, 8),
                    KEY_GROUP=128, ANGLE_BITS=polar[1])
        if pb in (4, 6, 8):
            ptrs = dict(ptrs, k_ptr="*i32" if pb == 8 else "*i16")
    if recursive:
        cons.update(KEY_FMT=6, VAL_FMT=6, KEY_BITS=8, VAL_BITS=8, KEY_U=1, VAL_U=1, KEY_NU=128, KEY_GROUP=1,
                    VAL_GROUP=1, PR_KEY_JOIN=False, PR_VALUE_JOIN=True)
    if turbo is not None:
        ub, u = turbo_parts.UNITS[turbo]
        cons.update(KEY_FMT=3, VAL_FMT=3, KEY_BITS=turbo, VAL_BITS=turbo, KEY_UB=ub, VAL_UB=ub, KEY_U=u, VAL_U=u,
                    KEY_NU=128 // u, KEY_GROUP=1, VAL_GROUP=1, KEY_WORDS=ub == 3, VAL_WORDS=ub == 3)
        if ub == 3:
            ptrs = dict(ptrs, k_ptr="*i16", v_ptr="*i16")
        programs = turbo_parts.lookup_programs(sphere_codebook(128, turbo), torch.float16, turbo, 1)
        cons.update(KEY_PROGRAMS=programs, VAL_PROGRAMS=programs)
    # strides between a token's code bytes / metadata columns: 1 (rows), as every format but
    # polar-recursive's tokens-adjacent layout passes them (Triton specializes 1 as a constant)
    cons.update(sk_c=1, skm_c=1, sv_c=1)
    # the launch policy's readings since this script was written (KIVI value metadata as tiles with the
    # tokens adjacent, the quantizer's layout; no lazy rescale; KIVI key bias after the key products;
    # turbo codebooks looked up from immediates: turbo_parts.lookup_programs)
    cons = {"VAL_META": 3, "LAZY_RESCALE": False, "KIVI_BIAS_LAST": True, "KEY_LOOKUP": 1, "VAL_LOOKUP": 1,
            "KEY_PROGRAMS": "", "VAL_PROGRAMS": "", **cons}
    cons = {k: v for k, v in cons.items() if k in names}
    sig = {n: "constexpr" if n in cons else ptrs.get(n, "fp32" if n == "qk_scale" else "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n] not in ("constexpr", "fp32") and n not in _RUNTIME_INTS}
    options = {"num_warps": warps, "num_stages": stages}
    if max_registers:
        options["maxnreg"] = max_registers
    src = ASTSource(fn=kernel, signature=sig, constexprs=cons, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def loop_instructions(sass: str) -> list[str]:
    """The main loop's instructions (text up to the ``;``, predicate included) in ``cuobjdump -sass``
    output: from the target of the last backward branch found to that branch, as ``report`` reads
    it; empty where there is no loop."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    body: list[str] = []
    for addr, txt in ins:
        b = re.search(r"BRA .*?0x([0-9a-f]+)", txt)
        if b and int(b.group(1), 16) < addr:
            body = [t for a, t in ins if int(b.group(1), 16) <= a <= addr]
    return body


def loop_opcodes(sass: str) -> Counter:
    """Opcodes of the main loop (:func:`loop_instructions`), counted; empty where there is no loop."""
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in loop_instructions(sass))


def sass_of(compiled, cubin: str) -> str:
    """``compiled``'s SASS (``cuobjdump -sass``), its cubin written to ``cubin`` first."""
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    return subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout


def report(compiled, tag: str, out_dir: str) -> str:
    cubin = os.path.join(out_dir, f"{tag}.cubin")
    sass = sass_of(compiled, cubin)
    usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", cubin],
                           capture_output=True, text=True).stdout
    with open(os.path.join(out_dir, f"{tag}.sass"), "w") as f:
        f.write(sass)
    ops = loop_opcodes(sass)
    loop = f"loop {sum(ops.values())} instructions: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(14)) if ops else ""
    res = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", usage)
    return f"{tag}: {res.group(0) if res else '?'} (Triton shared {compiled.metadata.shared} B)\n  {loop}"


def loop_lines(cubin: str, top: int = 16) -> str:
    """The main loop's instructions by source line (``nvdisasm -g``: Triton compiles with line
    info), the largest ``top`` first: ``count  file:line  {opcode: count}``. Where an inlined helper's
    line is named, it is the innermost one."""
    text = subprocess.run([os.path.join(_BIN, "nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True).stdout
    lines = text.splitlines()
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:$", ln)}
    span = None
    for i, ln in enumerate(lines):  # the main loop: the backward branch spanning the most lines
        b = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if b and b.group(1) in labels and labels[b.group(1)] < i and (span is None or i - labels[b.group(1)] > span[1] - span[0]):
            span = (labels[b.group(1)], i)
    if span is None:
        return "  (no loop found)"
    where, by_line, ops = "?", Counter(), {}
    for ln in lines[span[0]:span[1] + 1]:
        f = re.search(r'File "([^"]+)", line (\d+)', ln)
        if f:
            where = f"{os.path.basename(f.group(1))}:{f.group(2)}"
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", ln)
        if m:
            by_line[where] += 1
            ops.setdefault(where, Counter())[m.group(1)] += 1
    rows = [f"  {n:5d}  {w:32s} {dict(ops[w].most_common(5))}" for w, n in by_line.most_common(top)]
    return "\n".join([f"  main loop by source line ({sum(by_line.values())} instructions):", *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2, choices=(2, 4, 8))
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--block-n", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--max-registers", type=int, default=None)
    ap.add_argument("--stages", type=int, default=2, help="pipelining stages (the kernel's default is 3)")
    ap.add_argument("--polar", default=None, help="polar-rope keys, e.g. r2a4 (values: --bits)")
    ap.add_argument("--recursive", action="store_true",
                    help="polar-recursive keys and values (4 levels, bits 4/2/2/2) instead of KIVI / polar-rope")
    ap.add_argument("--turbo", type=int, default=None, choices=(1, 2, 3, 4),
                    help="turbo keys and values of these bits (read by parts)")
    ap.add_argument("--classic", action="store_true", help="also the first (classic) kernel, 64-token blocks, 4 warps")
    ap.add_argument("--out", default=None, help="where to keep cubin/SASS (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="kvpolar-sass-")
    os.makedirs(out, exist_ok=True)
    polar = tuple(int(x) for x in args.polar[1:].split("a")) if args.polar else None
    tag = f"{args.polar}-" if polar else ""
    if args.classic:
        c = compile_split(mod._split_kernel, args.bits, 64, 4, 16, polar=polar)
        print(report(c, f"classic-{tag}b{args.bits}", out))
    for w in args.warps:
        c = compile_split(mod._split_kernel_t, args.bits, args.block_n, w, args.rows, stages=args.stages,
                          max_registers=args.max_registers, polar=polar, recursive=args.recursive,
                          turbo=args.turbo)
        tag_w = "recursive-" if args.recursive else f"turbo{args.turbo}-" if args.turbo else f"{tag}b{args.bits}-"
        print(report(c, f"transposed-{tag_w}w{w}-n{args.block_n}", out))
    print(f"(cubin and SASS in {out})")


if __name__ == "__main__":
    main()
