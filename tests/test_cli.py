import json

import pytest

from kvpolar.cli import main
from kvpolar.demo import run_demo


def test_synthetic_demo_covers_every_quantizer(capsys):
    import kvpolar

    assert main(["demo", "--synthetic", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    for name in kvpolar.available_quantizers():
        assert f"| {name} |" in out


def test_synthetic_demo_rows_are_consistent():
    rows = {r.method: r for r in run_demo(tokens=64, head_dim=64)}
    assert rows["none"].key_relative_error == 0 and rows["none"].key_bits_per_element == 16
    assert 0 < rows["kivi"].key_relative_error < 0.5 and rows["kivi"].key_bits_per_element == 3


def test_demo_on_the_built_in_model(capsys):
    assert main(["demo", "--presets", "none,kivi-2", "--prompt-tokens", "200", "--new-tokens", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "preset" not in line}
    assert set(rows) == {"16-bit", "none", "kivi-2"}
    # the lossless preset agrees with the stock cache token for token, at 16 bits
    assert "| 100% | - |" in rows["none"] and "| 16.00 |" in rows["none"]
    assert "| 100% | - |" in rows["16-bit"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["demo", "--presets", "kivi-3"], "unknown preset(s) kivi-3; available:"),
        (["demo", "--model", "/nonexistent/model"], "no such directory"),
        (["demo", "--device", "tpu"], "--device 'tpu' is not supported"),
    ],
)
def test_bad_input_exits_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_that_is_not_a_causal_lm(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(SystemExit) as info:
        main(["demo", "--model", str(tmp_path)])
    assert info.value.code == 2 and "not a causal LM" in capsys.readouterr().err


def test_eval_fidelity_writes_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["eval", "fidelity", "--presets", "kivi-2", "--max-length", "96", "--device", "cpu",
                 "--out", str(out)]) == 0
    data = json.loads((out / "fidelity.json").read_text())
    rows = [r for r in data["rows"] if r["preset"] == "kivi-2"]
    assert len(rows) == 6 and all(0 < r["score_rel_error"] < 1 for r in rows)  # one row per layer
    assert (out / "fidelity.md").is_file() and (out / "fidelity_layers.png").stat().st_size > 0


def test_bench_writes_a_report(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--presets", "kivi-2", "--max-length", "200", "--new-tokens", "4", "--device", "cpu",
                 "--out", str(out)]) == 0  # float16 by default, on the CPU too
    data = json.loads((out / "bench.json").read_text())
    assert data["setup"]["dtype"] == "float16"
    assert [r["preset"] for r in data["rows"]] == ["16-bit", "kivi-2"]
    assert data["rows"][0]["bits_per_element"] == 16.0 and data["rows"][0]["compression"] == 1.0
    # 196 tokens: 64 packed beyond the 128-token 16-bit window
    assert data["rows"][1]["bits_per_element"] < 16 and (out / "bench.png").stat().st_size > 0
    err = capsys.readouterr().err  # the progress bar names the command that runs
    assert "kvpolar bench" in err and "kvpolar demo" not in err


def test_bench_decoding_in_stretches_gives_generate_tokens(tmp_path, capsys, monkeypatch):
    """``--decoding stretches`` (the replayed path's steps run eagerly: its CPU form) decodes the tokens
    ``generate`` decodes, and the table says how each row decoded; a preset the replayed path refuses
    takes ``generate``, its row saying why."""
    from kvpolar.cache import replayed_generate

    rows = {}
    for decoding in ("generate", "stretches"):
        out = tmp_path / decoding
        assert main(["bench", "--presets", "kivi-2,polar-rope-3", "--max-length", "200", "--new-tokens", "40",
                     "--device", "cpu", "--decoding", decoding, "--out", str(out)]) == 0
        data = json.loads((out / "bench.json").read_text())
        assert data["setup"]["decoding"] == decoding
        rows[decoding] = data["rows"]
    assert [r["text"] for r in rows["stretches"]] == [r["text"] for r in rows["generate"]]
    assert [r["decoding"] for r in rows["stretches"]] == ["generate", "stretches", "stretches"]
    assert "| decoding |" in (tmp_path / "stretches" / "bench.md").read_text()
    assert "| decoding |" not in (tmp_path / "generate" / "bench.md").read_text()

    def refuse(*args, **kwargs):
        raise ValueError("every layer keeps a 16-bit cache")

    monkeypatch.setattr(replayed_generate, "generate_with_graphs", refuse)  # (what replayed_decoding calls)
    out = tmp_path / "refused"
    assert main(["bench", "--presets", "kivi-2", "--max-length", "200", "--new-tokens", "40", "--device", "cpu",
                 "--decoding", "stretches", "--out", str(out)]) == 0
    row = json.loads((out / "bench.json").read_text())["rows"][1]
    assert row["decoding"] == "generate (replaying refused: every layer keeps a 16-bit cache)"
    assert row["text"] == rows["generate"][1]["text"]
    table = (out / "bench.md").read_text()
    assert "| generate (replaying refused) |" in table and "- kivi-2: generate (replaying refused: every" in table


def test_bench_replayed_decoding_needs_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--presets", "kivi-2", "--max-length", "200", "--new-tokens", "4", "--device", "cpu",
              "--decoding", "replayed", "--out", str(tmp_path / "b")])
    assert info.value.code == 2
    assert "decoding='replayed' records CUDA graphs; device='cpu' is not a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bench_decoding_choices_are_the_demo_s():
    from kvpolar.cli import DECODING_CHOICES
    from kvpolar.generation_demo import DECODINGS

    assert DECODING_CHOICES == DECODINGS


def test_bench_float32_names_and_counts_the_stock_cache_as_32_bit(tmp_path, capsys):
    """A float32 model's stock cache holds 32 bits per element: its row says so (not "16-bit")."""
    out = tmp_path / "bench"
    assert main(["bench", "--presets", "kivi-2", "--max-length", "200", "--new-tokens", "4", "--device", "cpu",
                 "--dtype", "float32", "--out", str(out)]) == 0
    stock, kivi = json.loads((out / "bench.json").read_text())["rows"]
    assert stock["preset"] == "32-bit" and stock["bits_per_element"] == 32.0 and stock["compression"] == 0.5
    assert kivi["cache_bytes"] < stock["cache_bytes"]
    assert "agreement with 32-bit" in (out / "bench.md").read_text()


def test_a_context_longer_than_the_model_supports(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "ppl", "--presets", "kivi-2", "--max-length", "4096", "--device", "cpu", "--out", str(tmp_path)])
    assert info.value.code == 2 and "longer than the model's context (2048" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written half-way


def test_eval_ppl_with_a_short_residual_window_reads_the_quantized_cache(tmp_path, capsys):
    out = tmp_path / "ppl"
    assert main(["eval", "ppl", "--presets", "kivi-2", "--max-length", "96", "--residual-length", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "perplexity.json").read_text())
    assert data["settings"]["residual_length"] == 0
    rows = {r["preset"]: r for r in data["rows"]}
    assert rows["kivi-2"]["perplexity"] != rows["fp16"]["perplexity"]
    assert rows["kivi-2"]["bits_per_element"] < 16
