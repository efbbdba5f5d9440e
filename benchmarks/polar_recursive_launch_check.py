"""Polar-recursive operands in the fused decode kernel on the GPU: which launch settings (block cap,
warps, stages of ``kernels/decode_formats.py``) give correct results.

For each setting in ``VARIANTS`` (in order) and each pairing (polar-recursive keys and values,
polar-recursive keys with KIVI-2 values, KIVI-2 keys with polar-recursive values), fp16 and bf16:
``fused_decode_attention`` against ``reference_decode_attention`` at B=2, 32/8 heads, D=128, 2110
packed + 128 residual tokens; a setting stops at its first failure. Prints one line per check and
``CHOSEN cap,warps,stages`` (the first setting correct everywhere) or ``CHOSEN none``; writes
``diag.json`` to the folder given (default: here).

    PYTHONPATH=src python benchmarks/polar_recursive_launch_check.py OUT_DIR

On the H100 (results/polar_recursive_launch_h100.json) 16-token blocks on 4 warps were wrong
(relative error 2.0) and 32-token blocks on 8 warps right, now the defaults. On a CPU it runs a tiny
shape under the Triton interpreter (TRITON_INTERPRET=1).
"""
import json
import os
import sys
import time

import torch
import kvpolar
from kvpolar.decode_attention import reference_decode_attention
from kvpolar.kernels import decode_attention as da
from kvpolar.kernels import decode_formats as fm

dev = "cuda" if torch.cuda.is_available() else "cpu"
small = dev == "cpu"
B, HQ, HKV, D = (1, 4, 1, 64) if small else (2, 32, 8, 128)
TK, R = (45, 16) if small else (2110, 128)
VARIANTS = [(16, None, None), (32, 8, None), (16, None, 1), (32, None, 1), (16, 8, None), (64, 8, None), (16, 2, None)]
PAIRS = [("polar-recursive", "polar-recursive"), ("polar-recursive", "kivi"), ("kivi", "polar-recursive")]


def quantizer(name, role):
    if name == "kivi":
        return kvpolar.quantizer("kivi", bits=2, group_size=32 if not small else 16, axis="channel" if role == "k" else "token")
    return kvpolar.quantizer(name)


def check(kname, vname, dtype):
    g = torch.Generator(device=dev).manual_seed(3)
    k = torch.randn(B, HKV, TK, D, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, HKV, TK, D, device=dev, dtype=dtype, generator=g)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=dtype, generator=g)
    rk = torch.randn(B, HKV, R, D, device=dev, dtype=dtype, generator=g)
    rv = torch.randn(B, HKV, R, D, device=dev, dtype=dtype, generator=g)
    kq, vq = quantizer(kname, "k"), quantizer(vname, "v")
    pk, pv = kq.quantize(k), vq.quantize(v)
    want = reference_decode_attention(q, pk, pv, kq, vq, rk, rv, D**-0.5, None).float()
    out = da.fused_decode_attention(q, pk, pv, kq, vq, rk, rv, D**-0.5, None).float()
    return ((out - want).abs().max() / want.abs().max()).item()


rows, chosen = [], None
t0 = time.time()
for cap, warps, stages in VARIANTS:
    fm.POLAR_RECURSIVE_BLOCK_N, fm.POLAR_RECURSIVE_WARPS, fm.POLAR_RECURSIVE_STAGES = cap, warps, stages
    ok_all = True
    for kname, vname in PAIRS:
        for dtype in (torch.float16, torch.bfloat16):
            try:
                rel = check(kname, vname, dtype)
            except Exception as e:  # noqa: BLE001
                print("error", cap, warps, stages, kname, vname, type(e).__name__, str(e)[-200:])
                rel = float("nan")
            ok = rel < (1e-2 if dtype == torch.float16 else 4e-2)
            rows.append({"block_n_cap": cap, "warps": warps, "stages": stages, "keys": kname, "values": vname,
                         "dtype": str(dtype), "rel_err": rel, "ok": ok})
            print(f"cap={cap} warps={warps} stages={stages} {kname}/{vname} {dtype}: rel {rel:.2e} {'ok' if ok else 'FAIL'}", flush=True)
            if not ok:
                ok_all = False
                break
        if not ok_all:
            break
    if ok_all:
        chosen = (cap, warps, stages)
        break
    if time.time() - t0 > 60:
        break
json.dump({"rows": rows, "chosen": chosen, "gpu": torch.cuda.get_device_name() if dev == "cuda" else "cpu"},
          open(os.path.join(sys.argv[1] if len(sys.argv) > 1 else ".", "diag.json"), "w"), indent=1)
print("CHOSEN", "none" if chosen is None else ",".join(str(x) for x in chosen))
