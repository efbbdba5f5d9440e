"""What polar-rope keys' cos / sin cost the fused decode kernel: the same launch timed with the two
special-function-unit ops per key pair (the library's code), with one, and with none.

A diagnostic, not a kernel option: ``--trig one`` / ``--trig none`` replace
``kvpolar.kernels.polar_pairs.cos_sin`` before anything is compiled (``one``: ``cos.approx`` and
``sin = cos / 2``; ``none``: ``cos = theta``, ``sin = theta / 2``), so their results are wrong and only
their times mean anything. Each mode runs in its own process (Triton compiles a kernel's callees once
per process); the driver (no ``--trig``) runs every mode and prints one table. GPU time per call as
``bench_attention.graph_ms`` (CUDA-graph medians over input copies beyond L2).

    PYTHONPATH=src:benchmarks python benchmarks/polar_trig_cost.py [--presets polar-rope-3 polar-rope-4]
        [--shapes 32x32768 1x131072] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import triton
import triton.language as tl

MODES = ("sfu", "one", "none")


def _patch(mode: str) -> None:
    from kvpolar.kernels import polar_pairs

    if mode == "one":
        @triton.jit
        def cos_sin(theta, FAST: tl.constexpr):
            c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [theta], dtype=tl.float32,
                                          is_pure=True, pack=1)
            return c, c * 0.5
    else:
        @triton.jit
        def cos_sin(theta, FAST: tl.constexpr):
            return theta, theta * 0.5
    polar_pairs.cos_sin = cos_sin


def _time(mode: str, presets: list[str], shapes: list[str]) -> list[dict]:
    if mode != "sfu":
        _patch(mode)
    import bench_attention as ba
    import torch

    from kvpolar.kernels.decode_attention import describe_launch

    dev = torch.device("cuda")
    rows = []
    for shape in shapes:
        b, t = (int(x) for x in shape.split("x"))
        tk = t - ba.RESIDUAL
        for name in presets:
            pk, pv = ba.make_preset(name, b, tk, torch.float16, dev)
            nbytes = pk.nbytes + pv.nbytes
            q = torch.zeros(b, ba.HQ, 1, ba.D, device=dev, dtype=torch.float16)
            plan = describe_launch(q, pk, pv, residual_tokens=ba.RESIDUAL)
            del pk, pv
            ms = ba.graph_ms(ba.fused_maker(name, b, tk, dev, None), nbytes)
            rows.append({"mode": mode, "preset": name, "batch": b, "tokens": t, "ms": ms, "launch": plan})
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trig", choices=MODES, help="(one process's mode; the driver runs every mode)")
    ap.add_argument("--presets", nargs="+", default=["polar-rope-3", "polar-rope-4"])
    ap.add_argument("--shapes", nargs="+", default=["32x32768", "1x131072"])
    ap.add_argument("--out", default=None, help="directory for polar_trig_cost.json")
    args = ap.parse_args()
    if args.trig:
        print(json.dumps(_time(args.trig, args.presets, args.shapes)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--trig", mode, "--presets", *args.presets, "--shapes", *args.shapes]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"--trig {mode} failed (rc {done.returncode})")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "polar_trig_cost.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"{meta['gpu']}: ms per call (2 SFU ops per key pair / 1 / 0; the last two give wrong results)")
    for preset in args.presets:
        for shape in args.shapes:
            b, t = (int(x) for x in shape.split("x"))
            ms = {r["mode"]: r["ms"] for r in rows if r["preset"] == preset and r["batch"] == b and r["tokens"] == t}
            print(f"  {preset:13s} B={b:<3d} T={t:<7d} " + "  ".join(f"{m} {ms[m]:.4f}" for m in MODES)
                  + f"   none/sfu {ms['none'] / ms['sfu']:.2f}")


if __name__ == "__main__":
    main()
