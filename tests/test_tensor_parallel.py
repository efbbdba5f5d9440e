"""Tensor parallelism (issue 11): two CPU processes over gloo, ``tp_plan="auto"``, each rank caching
and attending over its own KV heads; logits must match a single process run with the same preset."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import kvpolar
from cache_helpers import continuation, left_padded, teacher_forced, tiny_model

PRESETS = ["none", "kivi-2", "squat-2", "turbo-4"]
HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    if shutil.which("torchrun") is None and not (pathlib.Path(sys.executable).parent / "torchrun").exists():
        pytest.fail("torchrun (from torch) is needed for the tensor-parallel test")
    work = tmp_path_factory.mktemp("tp")
    model = tiny_model("llama", layers=2, kv_heads=2, heads=4, head_dim=32)
    model.save_pretrained(work / "model")
    ids, mask = left_padded([60, 60], seed=3)
    inputs = {"ids": ids, "mask": mask, "continuation": continuation(2, 10, seed=4)}
    torch.save(inputs, work / "inputs.pt")
    torchrun = pathlib.Path(sys.executable).parent / "torchrun"
    # CPU processes also where a GPU is visible: else transformers gives each rank the GPU of its local
    # rank, and a one-GPU machine has no second one
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--standalone", "--nproc_per_node", "2",
           str(HERE / "tp_worker.py"), str(work / "model"), str(work / "inputs.pt"), str(work / "out.pt"), *PRESETS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    single = {}
    for preset in PRESETS:
        cache = kvpolar.enable(model, preset, residual_length=16)
        single[preset] = (teacher_forced(model, ids, mask, inputs["continuation"], cache), cache.memory_report())
    return torch.load(work / "out.pt", weights_only=False), single


def test_each_rank_caches_only_its_local_heads(tp_run):
    tp, _ = tp_run
    assert tp["world_size"] == 2
    for preset in PRESETS:
        assert tp[preset]["local_kv_heads"] == {1}, preset  # 2 KV heads over 2 ranks


def test_none_preset_matches_single_process(tp_run):
    tp, single = tp_run
    assert (tp["none"]["logits"] - single["none"][0]).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "none"])
def test_quantized_presets_match_their_single_process_run(tp_run, preset):
    tp, single = tp_run
    reference, _ = single[preset]
    # each rank quantizes its own heads exactly as the single process does: same codes, so the
    # only difference is the order of the o_proj reduction, as for "none"
    tolerance = max(1e-5, 10 * (tp["none"]["logits"] - single["none"][0]).abs().max().item())
    assert (tp[preset]["logits"] - reference).abs().max() <= tolerance
    # and quantization changed something, so the comparison is not vacuous
    assert (reference - single["none"][0]).abs().max() > tolerance


@pytest.mark.parametrize("preset", PRESETS)
def test_memory_report_local_and_total_over_ranks(tp_run, preset):
    tp, single = tp_run
    local, total, whole = tp[preset]["local"], tp[preset]["total"], single[preset][1]
    # per-token storage splits over the ranks; shared objects (rotations) are held once per rank
    assert total.fp16_bytes == whole.fp16_bytes and local.fp16_bytes * 2 == whole.fp16_bytes
    assert total.total - total.shared == whole.total - whole.shared
    assert (local.total - local.shared) * 2 == whole.total - whole.shared
    assert local.shared == whole.shared and total.shared == 2 * whole.shared
