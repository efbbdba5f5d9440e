from kvpolar.cli import main
from kvpolar.demo import run_demo


def test_demo_covers_every_quantizer_and_prints_a_table(capsys):
    assert main(["demo", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "| method |" in out and "| kivi |" in out and "| none |" in out


def test_demo_rows_are_consistent():
    rows = {r.method: r for r in run_demo(tokens=64, head_dim=64)}
    assert rows["none"].key_relative_error == 0 and rows["none"].key_bits_per_element == 16
    assert 0 < rows["kivi"].key_relative_error < 0.5 and rows["kivi"].key_bits_per_element == 3
