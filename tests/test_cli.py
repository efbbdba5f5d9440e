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
