"""Worker for tests/test_tensor_parallel.py, launched by ``torchrun --nproc_per_node 2`` (gloo, CPU).

Loads a saved tiny Llama with ``tp_plan="auto"`` (each rank holds half of the attention heads, so its
cache holds only its own KV heads), runs the same teacher-forced decoding as the single-process run
for each preset, and rank 0 saves logits and memory reports.

Usage: tp_worker.py MODEL_DIR INPUTS_PT OUTPUT_PT PRESET [PRESET ...]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import kvpolar
from cache_helpers import teacher_forced

RESIDUAL = 16


def main() -> None:
    model_dir, inputs_path, output_path, *presets = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32).eval()
    inputs = torch.load(inputs_path)
    results = {}
    for preset in presets:
        cache = kvpolar.enable(model, preset, residual_length=RESIDUAL)
        logits = teacher_forced(model, inputs["ids"], inputs["mask"], inputs["continuation"], cache)
        local = cache.memory_report()
        total = cache.memory_report(total_over_ranks=True)
        heads = {layer.num_heads for layer in cache.layers}
        results[preset] = {"logits": logits, "local": local, "total": total, "local_kv_heads": heads}
    if dist.get_rank() == 0:
        results["world_size"] = dist.get_world_size()
        torch.save(results, output_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
