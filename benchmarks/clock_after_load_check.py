"""Does a decode kernel timed right after a heavy load run slower (clocks, power)? H100 check.

Times kvpolar's fused kivi-4 attention at B=32, 128k tokens (``bench_attention.graph_ms``) after 5 s
of rest, right after 3 s of the emulated dequantize-then-attend path (``hf-dequant``, B=8, the
heaviest row of ``bench_attention.py``), and once more; twice. Prints each time with the SM / memory
clocks, power, temperature and active throttle reasons that ``nvidia-smi`` reports around it.

    PYTHONPATH=src:benchmarks python benchmarks/clock_after_load_check.py
"""
import subprocess
import time

import torch
import torch.nn.functional as F

import bench_attention as ba
from kvpolar.kernels.launch_config import LaunchConfig

B, T, LOAD_BATCH = 32, 131072, 8


def clocks() -> str:
    query = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    dev = torch.device("cuda")
    tk = T - ba.RESIDUAL
    kivi4 = ba.fused_maker("kivi-4", B, tk, dev, LaunchConfig())
    pk, pv = ba.make_preset("kivi-4", B, tk, torch.float16, dev)
    nbytes = pk.nbytes + pv.nbytes
    del pk, pv
    kq, vq = ba.kivi_quantizers("kivi-2")
    pk2, pv2 = ba.make_preset("kivi-2", LOAD_BATCH, tk, torch.float16, dev)
    q = torch.randn(LOAD_BATCH, ba.HQ, 1, ba.D, device=dev, dtype=torch.float16)
    window = torch.randn(LOAD_BATCH, ba.HKV, ba.RESIDUAL, ba.D, device=dev, dtype=torch.float16)

    def load():
        keys = torch.cat([kq.dequantize(pk2), window], -2)
        values = torch.cat([vq.dequantize(pv2), window], -2)
        return F.scaled_dot_product_attention(q, keys, values, scale=ba.D**-0.5, enable_gqa=True)

    rows = []
    for _ in range(2):
        time.sleep(5)
        rows.append(("rested 5 s", ba.graph_ms(kivi4, nbytes), clocks()))
        t0 = time.time()
        while time.time() - t0 < 3:
            load()
        torch.cuda.synchronize()
        sampled = clocks()
        rows.append(("right after 3 s of hf-dequant", ba.graph_ms(kivi4, nbytes), sampled))
        rows.append(("again", ba.graph_ms(kivi4, nbytes), clocks()))
    print(f"{torch.cuda.get_device_name(dev)}: kivi-4 B={B} T={T} fused, ms; clocks (sm, mem, power, temp, "
          "throttle reasons) sampled around it")
    for name, ms, sampled in rows:
        print(f"{name:32s} {ms:8.4f}  {sampled}")


if __name__ == "__main__":
    main()
