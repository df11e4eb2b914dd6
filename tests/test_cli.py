"""The command line: `parnet summary` and `python -m parnet`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parnet.cli import main


def test_summary_json(capsys):
    assert main(["summary", "--json", "parnet_cifar_s", "parnet_s_official"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["parnet_cifar_s", "parnet_s_official"]
    s = rows[1]
    assert s["depth"] == 12 and s["act"] == "relu" and s["input_size"] == [3, 224, 224]
    assert round(s["params_fused_m"], 1) == 19.2 and round(s["gflops"], 1) == 9.7


def test_summary_table_via_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "parnet", "summary", "parnet_cifar_s"], capture_output=True, text=True, check=True
    ).stdout
    assert "| parnet_cifar_s | small-input | 24,48,96 | 512 | silu | 32x32 | 1.45 M | 1.31 M | 0.21 | 12 |" in out


def test_unknown_variant_is_a_clear_error(capsys):
    assert main(["summary", "parnet_q"]) == 2
    assert "unknown ParNet variant 'parnet_q'" in capsys.readouterr().err


def test_kwargs_comma_lists_and_tuples_are_lists():
    from parnet.cli import key_value

    for text in ("widths=8,16,32", "widths=(8,16,32)", "widths=(8, 16, 32)", "widths=[8,16,32]"):
        assert key_value(text) == ("widths", [8, 16, 32])
    assert key_value("widths=(8,)") == ("widths", [8])
    assert key_value("head_width=64") == ("head_width", 64) and key_value("act=relu") == ("act", "relu")
    assert key_value('name="a,b"') == ("name", "a,b")  # quoted: YAML, as before


def test_kwargs_reserved_keys_are_refused_with_the_reason(capsys):
    import argparse

    import pytest

    from parnet.cli import add_kwargs_option

    parser = argparse.ArgumentParser(prog="x")
    add_kwargs_option(parser, "--model-kwargs", "help", reserved={"num_classes": "set by the dataset"})
    assert parser.parse_args(["--model-kwargs", "widths=8,16,32"]).model_kwargs == {"widths": [8, 16, 32]}
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-kwargs", "widths=8,16,32", "num_classes=10"])
    assert "num_classes is not accepted here: set by the dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwarg, message",
    [("num_streams=4", "unknown model keyword 'num_streams'; allowed: widths, head_width"),
     ("widths=8", "widths must be a list of 1 to 4 integers, got 8"),
     ("pretrained=true", "'pretrained' is refused: model keywords describe the architecture only")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["export", "bench"])
def test_a_keyword_the_model_does_not_take_is_a_clear_error(tmp_path, capsys, command, kwarg, message):
    """A --model-kwargs typo, a wrong value, a keyword that would load weights: a usage error naming it, before
    any work, in each command that passes them to timm.create_model."""
    args = [command, "--model-kwargs", kwarg, "head_width=64"]
    args += ["--out", str(tmp_path)] if command == "export" else ["--json", str(tmp_path / "b.json")]
    with pytest.raises(SystemExit):
        main(args)
    assert f"argument --model-kwargs: {message}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
