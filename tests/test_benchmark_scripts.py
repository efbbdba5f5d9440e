"""The benchmark scripts behind README's GPU figures still run, and their own checks pass: each in
its ``--smoke`` mode (tiny sizes on the CPU, Triton kernels under the interpreter), as a user would
start it from the repository root. A script that no longer runs is a figure nobody can reproduce."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

pytest.importorskip("triton")


def run_script(script: str, *args: str, timeout: int = 600) -> str:
    """Run ``benchmarks/<script>`` with ``args`` on the CPU; returns its stdout (asserts exit status 0)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(BENCHMARKS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_bench_dequantize_checks_every_kernel_row(tmp_path):
    out = tmp_path / "dequantize.json"
    stdout = run_script("bench_dequantize.py", "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    kernel_rows = [r for r in rows if r["kernel"]]
    assert kernel_rows and all(r["ok"] for r in kernel_rows)
    assert "checks ok: True" in stdout


def test_bench_encode_matches_the_pytorch_quantizer(tmp_path):
    out = tmp_path / "encode.json"
    run_script("bench_encode.py", "--smoke", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["ok"] for r in rows)


def test_bench_end_to_end_runs_every_cache_kind(tmp_path):
    """The 16-bit baselines (dynamic, dynamic without cuDNN attention, static) and three quantized
    presets, decode steps at two batch sizes and the prefill timing, with each point's cache accounted."""
    out = tmp_path / "end_to_end.json"
    presets = ["fp16", "fp16-flash", "fp16-static", "kivi-2", "polar-rope-3", "turbo-4"]
    run_script("bench_end_to_end.py", "--smoke", "--presets", ",".join(presets), "--prefill", "--out", str(out))
    result = json.loads(out.read_text())
    points = result["points"]
    assert {p["preset"] for p in points} == set(presets) and {p["batch"] for p in points} == {1, 2}
    assert all(p["status"] == "ok" and p["decode_ms_per_step"] > 0 and p["cache_gib"] > 0 for p in points)
    quantized = [p for p in points if not p["preset"].startswith("fp16")]
    assert all(p["cache_bits_per_element"] < 16 for p in quantized)
    assert set(result["prefill_seconds_batch1"]) == set(presets)
    assert result["model"]["hidden_size"] < 4096  # the smoke model, not the 8B shape it times on a GPU


def test_bench_end_to_end_replayed_decoding_marks_its_points(tmp_path):
    """``--decoding replayed``: the kvpolar presets decode through ``decode_with_graphs`` (eagerly on the
    CPU), the 16-bit baseline stays eager, and each point says which."""
    out = tmp_path / "end_to_end_replayed.json"
    run_script("bench_end_to_end.py", "--smoke", "--presets", "fp16-flash,kivi-2", "--decoding", "replayed",
               "--out", str(out))
    result = json.loads(out.read_text())
    assert result["decoding"] == "replayed"
    decoding = {(p["preset"], p["batch"]): p["decoding"] for p in result["points"]}
    assert decoding == {("fp16-flash", 1): "eager", ("fp16-flash", 2): "eager", ("kivi-2", 1): "replayed",
                        ("kivi-2", 2): "replayed"}
    replayed = [p for p in result["points"] if p["decoding"] == "replayed"]
    assert all(p["status"] == "ok" and p["decode_ms_per_step"] > 0 and len(p["step_ms"]) == 2 for p in replayed)


def test_read_bound_takes_the_best_16_bit_batch_that_fit(monkeypatch):
    """The most tokens/s a 16-bit decoder could reach: batch / read-bound time over the 16-bit points that
    fit; quantized points and points out of memory do not count."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_end_to_end as e2e

    points = [
        {"preset": "fp16", "batch": 8, "status": "ok", "read_bound_ms": 20.0},  # 400 tokens/s
        {"preset": "fp16-flash", "batch": 12, "status": "ok", "read_bound_ms": 24.0},  # 500
        {"preset": "fp16-flash", "batch": 16, "status": "out of memory", "read_bound_ms": float("nan")},
        {"preset": "kivi-2", "batch": 64, "status": "ok", "read_bound_ms": 20.0},  # 3200: not a 16-bit decoder
    ]
    assert e2e.read_bound_tokens_per_second(points) == (500.0, 12)
    assert e2e.read_bound_tokens_per_second(points[3:]) is None


def test_bench_long_step_checks_against_the_reference(tmp_path):
    out = tmp_path / "long_step.json"
    run_script("bench_long_step.py", "--smoke", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["checks"] and all(c["ok"] for c in result["checks"])
    assert result["steps"] and result["chunked_prefill"]


def test_bench_verify_step_checks_every_variant():
    """Exits non-zero on a failed check; every preset x kernel variant is checked."""
    stdout = run_script("bench_verify_step.py", "--smoke")
    last = stdout.strip().splitlines()[-1]
    passed, total = (int(x) for x in last.split(" checks passed")[0].split(" of "))
    assert passed == total >= 15


def test_host_cost_times_each_preset():
    stdout = run_script("host_cost.py", "--presets", "kivi-2", "turbo-4", "--calls", "5", "--repeats", "1")
    timed = [line.split() for line in stdout.splitlines() if line.strip().endswith(" us")]
    assert [t[0] for t in timed] == ["kivi-2", "turbo-4"] and all(float(t[1]) > 0 for t in timed)


def test_profile_decode_step_host_split_clocks_the_attention_and_restores_it(monkeypatch):
    """``profile_decode_step.host_split`` (``--host-split``) on the CPU smoke model: kvpolar's attention
    function, its cache update and the decoder layers are clocked once per layer per step, and every
    wrapped function (a class method, the attention registry's entry) is the original again after."""
    import transformers

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_end_to_end as e2e
    import profile_decode_step as pds
    from kvpolar.cache.layer import QuantizedLayer

    model = e2e.build_model(2, "cpu")
    cache = e2e.make_cache(model, "kivi-2")
    e2e.fill_cache(model, cache, "kivi-2", 1, 96)
    kw = e2e.cache_kwargs(model, cache)
    ids, pos = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 96)
    mapping = transformers.AttentionInterface._global_mapping
    before = (dict(mapping), QuantizedLayer.update, type(model.model.layers[0]).forward)

    def step():
        nonlocal pos
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
        pos = pos + 1

    report = pds.host_split(model, step, 3, "kivi-2 smoke")
    rows = {line[2:36].strip(): line[36:].split() for line in report.splitlines()[2:]}
    for label in ("decoder layer", "attention function 'kvpolar'", "kvpolar cache update"):
        assert float(rows[label][0]) > 0 and float(rows[label][2]) == 2.0, (label, report)  # 2 layers a step
    assert (dict(mapping), QuantizedLayer.update, type(model.model.layers[0]).forward) == before


def test_sdpa_priority_steps_times_both_settings():
    """Both step kinds (the 16-bit window, 16-bit layers) under both backend orders, as a table."""
    stdout = run_script("sdpa_priority_steps.py", "--smoke")
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| steps")}
    assert set(rows) == {"window", "16-bit layers"}
    assert all(float(ms) > 0 for pair in rows.values() for ms in pair)


@pytest.mark.parametrize("switch, labels, preset", [("bound", "dispatcher | bound launches", "kivi-2"),
                                                    ("fold", "window launched | window folded", "kivi-2"),
                                                    ("rotate", "host products | in the combine kernel", "polar-recursive"),
                                                    ("addresses", "tensors | addresses", "kivi-2")])
def test_bound_launch_steps_times_both_settings(tmp_path, switch, labels, preset):
    """Each quantized preset with the switch on and off, the 16-bit baseline once, as a table and JSON."""
    out = tmp_path / "steps.json"
    stdout = run_script("bound_launch_steps.py", "--smoke", "--switch", switch, "--presets", f"fp16-flash,{preset}",
                        "--batches", "1", "--out", str(out))
    assert f"| preset | batch | {labels} |" in stdout
    rows = [line.split("|")[1:5] for line in stdout.splitlines() if line.startswith("| ") and "preset" not in line]
    assert [row[0].strip() for row in rows] == ["fp16-flash", preset]
    assert rows[0][2].strip() == "" and float(rows[0][3]) > 0
    assert float(rows[1][2]) > 0 and float(rows[1][3]) > 0
    saved = json.loads(out.read_text())["rows"]
    assert [len(r["steps"]) for r in saved] == [1, 2]


def test_dependent_launch_steps_times_both_settings(tmp_path):
    out = tmp_path / "dependent.json"
    stdout = run_script("dependent_launch_steps.py", "--smoke", "--presets", "kivi-2", "--rounds", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["dependent launch", "plain launch"]
    assert all(r["ms_per_step"] > 0 and r["eager_steps"] > 0 for r in rows)
    assert "| kivi-2 | 1 |" in stdout


def test_report_attention_plots_only_where_asked(tmp_path):
    """A results file named without a ``.png`` prints its table and writes no plot (it once overwrote the
    committed ``benchmarks/attention_speedup_h100.png``, its default); with a ``.png`` it writes that
    plot. Each table row is the JSON's time and speed-up."""
    source = BENCHMARKS / "results" / "attention_h100_34th.json"
    work = tmp_path / "cwd"
    (work / "benchmarks").mkdir(parents=True)  # (where the default plot would go, relative to the cwd)
    script = [sys.executable, str(BENCHMARKS / "report_attention.py"), str(source)]
    table = subprocess.run(script, cwd=work, capture_output=True, text=True, timeout=300, check=True).stdout
    assert list(work.rglob("*.png")) == []
    results = json.loads(source.read_text())["results"]
    rows = [line.split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == len(results)
    for cells, r in zip(rows, results):
        assert (int(cells[1]), int(cells[2]), cells[3].strip()) == (r["batch"], r["tokens"], r["method"])
        assert float(cells[4]) == pytest.approx(r["median_ms"], abs=5e-5)
        assert float(cells[6]) == pytest.approx(r["speedup_vs_sdpa_fp16"], abs=0.005)
    png = tmp_path / "plot.png"
    subprocess.run([*script, str(png)], cwd=work, capture_output=True, text=True, timeout=300, check=True)
    assert png.stat().st_size > 10_000 and list(work.rglob("*.png")) == []


def test_report_end_to_end_tables_and_plots_the_committed_runs(tmp_path):
    """The committed H100 runs merged by (preset, batch): one row per preset with its best tokens/s
    over each 16-bit baseline's best, as the JSON's own points give them, and a plot."""
    sources = [BENCHMARKS / "results" / f"end_to_end_flash{part}_h100.json" for part in ("", "_small")]
    png = tmp_path / "end_to_end.png"
    stdout = run_script("report_end_to_end.py", *map(str, sources), str(png))
    assert png.stat().st_size > 10_000
    points = [p for src in sources for p in json.loads(src.read_text())["points"] if p["status"] == "ok"]
    best = {}
    for p in points:
        best[p["preset"]] = max(best.get(p["preset"], 0.0), p["tokens_per_second"])
    rows = {line.split("|")[1].strip(): line.split("|") for line in stdout.splitlines() if line.startswith("| ")}
    header = rows.pop("preset")
    rows.pop("---", None)
    assert set(rows) == set(best)
    flash = [i for i, cell in enumerate(header) if cell.strip() == "x fp16-flash"][0]
    for preset, cells in rows.items():
        assert float(cells[flash]) == pytest.approx(best[preset] / best["fp16-flash"], abs=0.006)


def test_report_end_to_end_rows_replayed_points_apart_and_divides_by_the_read_bound(tmp_path):
    """A preset's replayed and eager points are rows of their own; the read-bound column divides each
    row's best tokens/s by the 16-bit baselines' best bound (batch / read-bound time where they fit)."""
    def point(preset, batch, tps, status="ok", decoding="eager", bound=float("nan")):
        return {"preset": preset, "batch": batch, "context": 32768, "status": status, "decoding": decoding,
                "tokens_per_second": tps, "decode_ms_per_step": batch * 1000.0 / tps if tps else float("nan"),
                "read_bound_ms": bound}

    run = {"gpu": "test GPU", "points": [
        point("fp16-flash", 8, 300.0, bound=16.0), point("fp16-flash", 12, 400.0, bound=20.0),  # bound 600 tok/s at 12
        point("fp16-flash", 16, 0.0, status="out of memory"),
        point("kivi-2", 64, 1000.0), point("kivi-2", 64, 2400.0, decoding="replayed")]}
    src, png = tmp_path / "run.json", tmp_path / "run.png"
    src.write_text(json.dumps(run))
    stdout = run_script("report_end_to_end.py", str(src), str(png))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in stdout.splitlines() if line.startswith("| ")}
    header = rows.pop("preset")
    assert header[-1] == "x 16-bit read bound (600 tok/s, B=12)" and header[-2] == "x fp16-flash"
    assert rows["kivi-2"][-2:] == ["2.50", "1.67"] and rows["kivi-2 replayed"][-2:] == ["6.00", "4.00"]
    assert png.stat().st_size > 10_000


def test_kernel_variants_records_every_preset_s_launches():
    """Each preset's own launches are recorded, the second preset's window launches too (an earlier
    preset's bound launches once kept its recorders), and the folded window's kernel compiles once over
    the steps (its per-step integers are not specialized)."""
    stdout = run_script("kernel_variants.py", "--presets", "kivi-2,polar-rope-3", "--steps", "3")
    rows = {tuple(line.split()[:2]): line for line in stdout.splitlines() if "variant(s)" in line}
    for preset in ("kivi-2", "polar-rope-3"):
        window = [line for (name, kernel), line in rows.items() if name == preset and "window_combine_kernel" in kernel]
        assert len(window) == 1, rows  # (by query row or by KV head, as the launch policy chose)
        assert "1 variant(s)" in window[0] and window[0].endswith("changing: -")


def test_bench_graphed_decode_checks_tokens_then_times(tmp_path):
    """The CPU smoke run (no graphs there): the eager stretches give ``generate``'s tokens, greedy and
    sampled (``--sampling``: under one seed, and with ``top_k=1`` the greedy tokens wherever no tie
    intervenes), a refused preset (16-bit layers only, at 2 layers) is reported, and the table has the
    16-bit row and the preset's."""
    out = tmp_path / "graphed.json"
    stdout = run_script("bench_graphed_decode.py", "--smoke", "--sampling", "--presets", "kivi-2", "turbo-k3v4",
                        "--batches", "1", "--out", str(out))
    saved = json.loads(out.read_text())
    assert saved["checks"][0]["eager_equals_generate"] is True and saved["checks"][0]["graphed_equals_generate"] is None
    assert "every layer keeps a 16-bit cache" in saved["checks"][1]["refused"]
    sampled, refused = saved["sampling_checks"]
    assert sampled["sampled_eager_equals_generate"] is True and sampled["top1_ok"] is True
    assert "sampled_graphed_equals_eager" not in sampled and "every layer keeps" in refused["refused"]
    assert [r["preset"] for r in saved["rows"]] == ["fp16-flash", "kivi-2", "turbo-k3v4"]
    assert all(r["eager_ms"] > 0 for r in saved["rows"])
    assert "| kivi-2 | 1 |" in stdout


def test_bench_generate_replayed_times_both_calls_with_equal_tokens(tmp_path):
    """The CPU smoke run of ``bench_generate_replayed.py``: ``generate`` with and without
    ``custom_generate=kvpolar.replayed_decoding`` (its stretches eagerly there), greedy and sampled, the
    same tokens, the 16-bit reference row, and (``--stream``) the replayed call's streamed tokens equal
    to its output."""
    out = tmp_path / "generate.json"
    stdout = run_script("bench_generate_replayed.py", "--smoke", "--presets", "kivi-2", "--stream", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["sampled"]) for r in rows] == [("fp16-flash", False), ("fp16-flash", True),
                                                            ("kivi-2", False), ("kivi-2", True)]
    assert [r["tokens_equal"] for r in rows[2:]] == [True, True]
    # (a per-token time is the difference of two timed calls, so on a loaded CPU it can come out at or
    # below zero for the smoke model's few tokens: only its presence is checked)
    assert all(isinstance(r["replayed_ms_per_token"], float) and math.isfinite(r["replayed_ms_per_token"])
               for r in rows[2:])
    assert all(r["streamed_tokens_equal"] is True and r["stream_gap_ms_max"] > 0 for r in rows[2:])
    assert "| kivi-2 | sampled |" in stdout


def test_polar_trig_cost_replaces_the_trig_the_kernel_compiles():
    """``polar_trig_cost.py``'s modes (timed on a GPU only) change what the decode kernel compiles: in an
    sm_90 compile of polar-rope-3's split kernel (``inspect_preset_kernel.py``, no GPU needed) the main
    loop's special-function ops fall from two per key pair to one, and to none (the softmax's few left
    are below the mix's listing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (compiled, as test_kernels_sm90_compile)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(BENCHMARKS), env.get("PYTHONPATH", "")])
    counts = {}
    for mode in ("sfu", "one", "none"):
        code = ("import sys, polar_trig_cost as m\n"
                f"if '{mode}' != 'sfu': m._patch('{mode}')\n"
                "sys.argv = ['x', 'polar-rope-3', '--batch', '32', '--tokens', '4096']\n"
                "import inspect_preset_kernel as ipk; ipk.main()")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        loop = next(line for line in proc.stdout.splitlines() if "loop " in line and "instructions:" in line)
        found = [part for part in loop.split(", ") if part.split()[0].endswith("MUFU")]
        counts[mode] = int(found[0].split()[-1]) if found else 0
    assert counts["sfu"] >= 128 and counts["none"] < counts["one"] < counts["sfu"], counts
