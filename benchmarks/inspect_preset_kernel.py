"""Compile the decode-attention kernel exactly as ``fused_decode_attention`` would launch it on an H100
for a cache preset (the transposed kernel, or the classic one where the plan takes it: small caches),
on a machine without a GPU, and report what limits its main loop.

Costs no device time. The packed cache is built on the CPU (``bench_attention.make_preset``), the
launch plan and arguments come from the library's own code (``_packed_plan``, ``_split_t_arguments``)
with the GPU's view of the world (132 SMs, compiled kernels, no interpreter), and Triton's own
argument binder decides the specialization (16-byte alignment, integers equal to 1 or divisible by
16), so the compiled kernel is the one the GPU would run. Reported per preset:

- registers, spills, shared memory (``cuobjdump``);
- the main loop's SASS instruction count and mix;
- the loads inside the loop: how many Triton's software pipeliner turned into asynchronous copies
  (issued stages ahead, their latency hidden), how many the kernel reads one block ahead itself,
  and how many are plain loads used where they are issued (each one's global-memory latency is
  waited for in every iteration).

Usage: ``PYTHONPATH=src python benchmarks/inspect_preset_kernel.py kivi-2 polar-rope-3 turbo-3
[--batch 32] [--tokens 32768] [--max-registers N] [--stages N] [--dtype bfloat16] [--value-metadata MODE]
[--three-byte-units halfwords] [--kivi-code-units bytes] [--lazy-rescale] [--kivi-key-bias first] [--value-layout groups] [--pr-rows] [--polar-recursive-keys subtrees] [--dependent-launch-signal after-loop] [--lines] [--combine] [--out DIR]`` (``--lines``: the main loop's
instructions by source line; ``--combine``: also the kernels that merge the splits, plain and with the window
folded in, for values in the plain and a rotated domain: registers and stack; ``--value-layout groups``: KIVI value scale / min laid out with the groups
adjacent, as stored before the ninth session, instead of the quantizer's tokens-adjacent layout).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from bench_attention import HQ, D, groups_adjacent, make_preset, rows_per_token
from inspect_attention_sass import loop_lines, report
from kvpolar.kernels import decode_attention as mod

H100 = GPUTarget("cuda", 90, 32)
H100_SMS = 132


def loop_loads(ttgir: str) -> tuple[int, int, int]:
    """(asynchronous copies, plain loads read one iteration ahead, plain loads used in the iteration
    that issues them) inside the main ``scf.for`` loop of ``ttgir``. A load "read ahead" is one whose
    result is carried to the next iteration (``scf.yield``): its latency is hidden behind a block."""
    body = ttgir[ttgir.index("scf.for"):]
    plain = re.findall(r"(%[\w.]+) = tt\.load ", body)
    yields = " ".join(re.findall(r"scf\.yield ([^:]*)", body))
    ahead = sum(re.search(re.escape(name) + r"\b", yields) is not None for name in plain)
    return body.count("ttg.async_copy_global_to_local"), ahead, len(plain) - ahead


def compile_preset(name: str, batch: int, tokens: int, cfg: mod.LaunchConfig | None = None,
                   dtype: torch.dtype = torch.float16, layout=None, query_tokens: int = 1):
    """(compiled kernel, launch plan) of the packed part of preset ``name`` at ``batch`` x ``tokens``
    (32 query heads, 8 KV heads, head dim 128, ``dtype``, ``query_tokens`` query tokens: more than one
    for a speculative / assisted decoding verify step), as on an H100: the
    transposed kernel, or the classic one where the plan takes it (small caches, ``plan.transposed``
    False) (``layout``: a function applied to the packed keys and values first, e.g. ``groups_adjacent``)."""
    keys, values = make_preset(name, batch, tokens, dtype, "cpu")
    if layout is not None:
        keys, values = layout(keys), layout(values)
    query = torch.randn(batch, HQ, query_tokens, D, dtype=dtype)
    scale = D ** -0.5
    with mock.patch.object(mod, "_interpreting", lambda: False), \
            mock.patch.object(mod, "_device_sms", lambda device: H100_SMS), \
            mock.patch.object(mod, "_fp8_conversion", lambda device: True), \
            mock.patch.object(mod, "_transposed_residency", lambda *a, **k: None), \
            mock.patch.object(mod._dependent_launch, "available", lambda device: True):
        q = mod._packed_query(query, mod.formats.rotation_matrix(keys))
        cfg = mod._with_dependent_launch(cfg or mod.LaunchConfig(), batch, keys.shape[1], H100_SMS)
        plan = mod._packed_plan(q, keys, values, None, scale, cfg)
        scratch = torch.empty(1, dtype=torch.float32)
        gqa = HQ // keys.shape[1]
        if plan.transposed:
            args, kwargs = mod._split_t_arguments(q, plan.k_op, plan.v_op, None, 0, plan.per_split // plan.block_n,
                                                  0, plan.splits, scratch, scratch, scratch, scale, gqa,
                                                  plan.block_n, plan.config)
        else:  # the classic kernel: its launch's arguments, caught instead of launched
            caught = {}

            class _Catch:
                def __getitem__(self, grid):
                    return lambda *a, **k: caught.update(args=a, kwargs=k)

            with mock.patch.object(mod, "_split_kernel", _Catch()):
                mod._launch_split(q, plan.k_op, plan.v_op, None, 0, plan.splits, plan.per_split, 0, plan.splits,
                                  scratch, scratch, scratch, scale, gqa, max(16, mod._next_pow2(gqa * query_tokens)),
                                  plan.block_n,
                                  plan.config)
            args, kwargs = caught["args"], dict(caught["kwargs"])
    return compile_for_h100(mod._split_kernel_t if plan.transposed else mod._split_kernel, args, kwargs), plan


def compile_for_h100(kernel, args: tuple, kwargs: dict):
    """``kernel`` (a ``triton.jit`` function) compiled for sm_90 as a launch with ``args`` / ``kwargs``
    would compile it on an H100: Triton's own binder decides the runtime arguments' specialization."""
    backend = make_backend(H100)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=H100, options=options.__dict__)


#: how ``fused_decode_attention`` launches the kernel that merges the splits after a split kernel on an H100
DEPENDENT = dict(WAIT_PRIMARY=True, launch_pdl=True)


def grid_dependency(compiled) -> str:
    """The kernel's grid dependency control (``kvpolar.kernels.dependent_launch``) as its PTX holds it:
    "signals at start" / "signals after the loop" (``griddepcontrol.launch_dependents`` before the
    kernel's first branch / after its last one: ``LaunchConfig.dependent_launch_signal``; "signals"
    elsewhere), "waits" (``griddepcontrol.wait``), both, or "none"."""
    ptx = compiled.asm["ptx"]
    found = []
    at = ptx.find("griddepcontrol.launch_dependents")
    if at >= 0:
        branches = [m.start() for m in re.finditer(r"\bbra(\.uni)?\s", ptx)]
        found.append("signals at start" if all(at < x for x in branches) else
                     "signals after the loop" if branches and all(x < at for x in branches) else "signals")
    if "griddepcontrol.wait" in ptx:
        found.append("waits")
    return " and ".join(found) or "none"


def compile_combine_kernels(head_dim: int = D):
    """``{tag: compiled}``: the kernels that merge the splits (``decode_combine``: plain and with the
    window folded in, its length an argument or read from memory, ``WINDOW_IN_MEMORY``; values in the
    plain or a rotated domain, ``ROTATED``; 8 and 256 splits' worth of partials, ``BLOCK_S``) compiled for sm_90 with float16 outputs, as ``fused_decode_attention``
    launches them after a split kernel (dependent launches that wait for it, ``WAIT_PRIMARY``)."""
    from kvpolar.kernels import decode_combine

    parts = torch.empty(64, dtype=torch.float32)
    out = torch.empty(64, dtype=torch.float16)
    rot = torch.empty(head_dim * head_dim, dtype=torch.float32)
    length = torch.empty(1, dtype=torch.int32)
    window = (out, 4 * head_dim, head_dim, head_dim)  # query / window keys / window values: pointer, 3 strides
    compiled = {}
    for rotated in (False, True):
        for block_s in (8, 256):
            head = (parts, parts, parts, out, block_s - 1, rot, block_s // 2)
            compiled[f"combine-rotated{int(rotated)}-s{block_s}"] = compile_for_h100(
                decode_combine._combine_kernel, head, dict(D=head_dim, BLOCK_S=block_s, ROTATED=rotated, **DEPENDENT, num_warps=4))
            for in_memory in (False, True):  # the window's length an argument, or read from memory
                args = (*head, *window, *window, *window, out, 0, 0, 0, 0, 70, length if in_memory else out, 3, 0,
                        HQ, 4, 1, 0.1)
                tag = f"rotated{int(rotated)}-s{block_s}" + ("-length-in-memory" if in_memory else "")
                compiled[f"window-combine-{tag}"] = compile_for_h100(
                    decode_combine._window_combine_kernel, args,
                    dict(D=head_dim, BLOCK_S=block_s, BLOCK_N=mod.WINDOW_BLOCK_N, BLOCKS_CONST=0, HAS_MASK=False,
                         ROTATED=rotated, WINDOW_IN_MEMORY=in_memory, **DEPENDENT, num_warps=mod.WINDOW_WARPS))
                compiled[f"kv-head-window-combine-{tag}"] = compile_for_h100(
                    decode_combine._kv_head_window_combine_kernel, args,
                    dict(D=head_dim, BLOCK_S=block_s, BLOCK_N=mod.KV_HEAD_WINDOW_BLOCK_N, BLOCK_M=16,
                         DOT_DTYPE=triton.language.float16, BLOCKS_CONST=0, ROWS_CONST=0, HAS_MASK=False,
                         ROTATED=rotated, WINDOW_IN_MEMORY=in_memory, **DEPENDENT, num_warps=4))
    return compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="*")
    ap.add_argument("--combine", action="store_true",
                    help="also the kernels that merge the splits (plain, window folded; rotated values or not)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--max-registers", type=int, default=None, help="LaunchConfig.max_registers (default: the policy)")
    ap.add_argument("--stages", type=int, default=None, help="LaunchConfig.transposed_stages (default: the library's)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--value-metadata", default=None, choices=("tiles", "words", "ahead", "gather"),
                    help="LaunchConfig.value_metadata (default: the policy)")
    ap.add_argument("--three-byte-units", default="words", choices=("halfwords", "words"),
                    help="LaunchConfig.three_byte_units (codes packed in 3-byte units)")
    ap.add_argument("--kivi-code-units", default=mod.LaunchConfig.kivi_code_units, choices=("bytes", "halfwords"),
                    help="LaunchConfig.kivi_code_units (2- and 4-bit KIVI codes)")
    ap.add_argument("--lazy-rescale", action="store_true", help="LaunchConfig.lazy_rescale")
    ap.add_argument("--kivi-key-bias", default=mod.LaunchConfig.kivi_key_bias, choices=("first", "last"),
                    help="LaunchConfig.kivi_key_bias")
    ap.add_argument("--kivi-value-min", default=mod.LaunchConfig.kivi_value_min, choices=("elementwise", "product"),
                    help="LaunchConfig.kivi_value_min")
    ap.add_argument("--value-layout", default="tokens", choices=("tokens", "groups"),
                    help="KIVI value scale / min with the tokens (as stored) or the groups adjacent in memory")
    ap.add_argument("--polar-recursive-keys", default="subtrees", choices=("columns", "subtrees"),
                    help="LaunchConfig.polar_recursive_keys")
    ap.add_argument("--pr-rows", action="store_true",
                    help="polar-recursive codes and radii one row per token (as stored before the fourteenth "
                         "session) instead of the quantizer's tokens-adjacent layout")
    ap.add_argument("--query-tokens", type=int, default=1,
                    help="query tokens per sequence (a draft verify step: e.g. 21 for 20 draft tokens)")
    ap.add_argument("--dependent-launch-signal", default=mod.LaunchConfig.dependent_launch_signal,
                    choices=("start", "after-loop"), help="LaunchConfig.dependent_launch_signal")
    ap.add_argument("--lines", action="store_true", help="also the main loop's instructions by source line")
    ap.add_argument("--out", default=None, help="where to keep cubin/SASS/TTGIR (default: a temporary folder)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="kvpolar-preset-sass-")
    os.makedirs(out, exist_ok=True)
    cfg = mod.LaunchConfig(max_registers=args.max_registers, value_metadata=args.value_metadata,
                           three_byte_units=args.three_byte_units, kivi_code_units=args.kivi_code_units,
                           lazy_rescale=args.lazy_rescale, polar_recursive_keys=args.polar_recursive_keys,
                           kivi_key_bias=args.kivi_key_bias, kivi_value_min=args.kivi_value_min,
                           dependent_launch_signal=args.dependent_launch_signal)
    if args.stages is not None:
        cfg = mod.dataclasses.replace(cfg, transposed_stages=args.stages)
    layouts = [f for f, on in ((groups_adjacent, args.value_layout == "groups"), (rows_per_token, args.pr_rows)) if on]

    def layout(p):
        for f in layouts:
            p = f(p)
        return p

    for name in args.presets:
        compiled, plan = compile_preset(name, args.batch, args.tokens, cfg, getattr(torch, args.dtype),
                                        layout if layouts else None, args.query_tokens)
        with open(os.path.join(out, f"{name}.ttgir"), "w") as f:
            f.write(compiled.asm["ttgir"])
        copies, ahead, plain = loop_loads(compiled.asm["ttgir"])
        cap = plan.config.max_registers
        print(report(compiled, name, out))
        if args.lines:
            print(loop_lines(os.path.join(out, f"{name}.cubin")))
        print(f"  {'transposed' if plan.transposed else 'classic'} kernel, block_n {plan.block_n}, register cap {cap}, loop loads: {copies} asynchronous copies, "
              f"{ahead} read one block ahead, {plain} waited for in their block; grid dependency: {grid_dependency(compiled)}")
    if args.combine:
        for tag, compiled in compile_combine_kernels().items():
            print(f"{report(compiled, tag, out).splitlines()[0]}; grid dependency: {grid_dependency(compiled)}"
                  f"{', dependent launch' if compiled.metadata.launch_pdl else ''}")
    print(f"(cubin, SASS and TTGIR in {out})")


if __name__ == "__main__":
    main()
