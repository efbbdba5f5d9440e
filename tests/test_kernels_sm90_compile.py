"""The decode kernel compiled for the H100 (sm_90) on this machine, by Triton's bundled ``ptxas`` and
``cuobjdump`` (no GPU; ``benchmarks/inspect_preset_kernel.py`` in a process of its own, outside the
interpreter the tests run under): properties of the compiled loop that the interpreter cannot see.

A lookup or tile that reaches the tensor cores through shared memory value by value shows as one
16-bit shared-memory store (``STS``) per value in the main loop: 128 per 32-token block for turbo-3's
keys while the codebook's table words were runtime operands of the lookup asm, 128 more for its
3-bit values read as metadata tiles (``benchmarks/README.md``, twenty-fifth session).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
BENCHMARKS = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")
sys.path.insert(0, BENCHMARKS)
from inspect_attention_sass import loop_opcodes  # noqa: E402

PRESETS = ("turbo-3", "turbo-k3v4", "turbo-4")


def inspect(*args: str) -> subprocess.CompletedProcess:
    """``benchmarks/inspect_preset_kernel.py`` with ``args`` in a process of its own, outside the
    interpreter (asserts exit status 0)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
    env["PYTHONPATH"] = os.pathsep.join([src, BENCHMARKS, env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "inspect_preset_kernel.py"), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@pytest.fixture(scope="module")
def compiled_presets(tmp_path_factory) -> tuple[dict, str]:
    """(main-loop opcode counts of each preset's transposed kernel, the inspection's report), compiled
    for sm_90 at batch 2, 2048 tokens (the launch policy as on an H100)."""
    out = tmp_path_factory.mktemp("sass")
    run = inspect(*PRESETS, "--batch", "2", "--tokens", "2048", "--out", str(out))
    assert run.stdout.count("transposed kernel") == len(PRESETS), run.stdout
    return {name: loop_opcodes((out / f"{name}.sass").read_text()) for name in PRESETS}, run.stdout


@pytest.fixture(scope="module")
def compiled_loops(compiled_presets) -> dict:
    return compiled_presets[0]


def test_split_kernels_let_the_merge_start(compiled_presets, tmp_path):
    """On the H100 each split kernel signals at once that the merge, a dependent launch, may start
    (``griddepcontrol.launch_dependents``; ``kvpolar.kernels.dependent_launch``): at batch 2 at its
    start (before any branch); with ``LaunchConfig(dependent_launch_signal="after-loop")`` after its
    block loop (the transposed and the classic kernel); at batch 32 (``dependent_launch_policy``) not."""
    report = compiled_presets[1]
    assert report.count("grid dependency: signals at start") == len(PRESETS), report
    late = inspect("kivi-2", "turbo-3", "--batch", "2", "--tokens", "2048", "--dependent-launch-signal", "after-loop",
                   "--out", str(tmp_path)).stdout
    assert "classic kernel" in late and "transposed kernel" in late, late
    assert late.count("grid dependency: signals after the loop") == 2, late
    assert "grid dependency: none" in inspect("kivi-2", "--batch", "32", "--out", str(tmp_path)).stdout


@pytest.mark.parametrize("preset", PRESETS)
def test_turbo_lookups_reach_the_tensor_cores_without_shared_memory_stores(preset, compiled_loops):
    """turbo keys (lookup programs with the table words as immediates) and their values (3-bit KIVI
    values gathered per unit, 4-bit KIVI values as 16-bit units): at most a few dozen shared-memory
    stores per block in the main loop (the probabilities' and the query's trips), not one per value."""
    ops = compiled_loops[preset]
    assert sum(ops.values()) > 500, ops  # the loop was found
    assert ops["STS"] <= 32, ops


def test_combine_kernels_compile_for_the_h100(tmp_path):
    """The kernels that merge the splits, plain and with the window folded in (by query row and by KV
    head; its length an argument or read from memory, ``WINDOW_IN_MEMORY``), for values in the plain
    domain and in a rotated one (``ROTATED``: the merged packed partials times ``R`` in the kernel),
    compile for sm_90: Triton's interpreter, which runs every
    other test, accepts code a compile rejects (a global that is not ``tl.constexpr``, for one).
    The few-splits forms keep every value in registers (with 256 splits' partials the one ``[256,
    D]`` tile spills, and is still faster on the H100 than reading it in 32- or 64-split steps without
    spilling: benchmarks/README.md, twenty-seventh session)."""
    run = inspect("--combine", "--out", str(tmp_path))
    reports = dict(line.split(": ", 1) for line in run.stdout.splitlines() if "combine-rotated" in line)
    assert len(reports) == 20, run.stdout
    for tag, usage in reports.items():
        # launched after a split kernel on the H100: dependent launches that wait for it (dependent_launch)
        assert usage.endswith("grid dependency: waits, dependent launch"), (tag, usage)
        if "-s8" in tag:
            assert "STACK:0 " in usage, (tag, usage)


def test_polar_code_fields_keep_the_exponent_in_one_register(tmp_path):
    """polar-rope's pair codes and polar-recursive's angle codes are read into the mantissa of 1.0
    (``polar_pairs.field_as_float``). Written with the exponent as a constant, the compiler reloaded a
    constant (``IMAD.MOV.U32 Rn, RZ, RZ, 0x3f800000`` or ``MOV``) before most codes at 255 registers:
    44 times per block for polar-rope-3, 25 for polar-recursive's level-1 codes, and 55 times the mask
    of its 2-bit level codes at bit 20 (``0x300000``). With the exponent from a register the compiler
    cannot prove constant (``field_asm``) the loop loads neither."""
    import re

    from inspect_attention_sass import loop_instructions

    presets = ("polar-rope-3", "polar-recursive")
    report = inspect(*presets, "--batch", "8", "--tokens", "8192", "--out", str(tmp_path)).stdout
    assert report.count("transposed kernel") == len(presets), report
    reload = re.compile(r"\b(IMAD\.MOV\.U32 R\d+, RZ, RZ|MOV R\d+), (0x3f800000|0x300000)\s*$")
    for name in presets:
        loop = loop_instructions((tmp_path / f"{name}.sass").read_text())
        assert len(loop) > 1000, (name, len(loop))  # the loop was found
        reloads = [t for t in loop if reload.search(t)]
        assert reloads == [], (name, len(reloads), reloads[:4])
