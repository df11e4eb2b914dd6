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


def test_a_reader_that_stops_early_is_no_error():
    """`parnet predict ... | head`: the pipe closes before the command writes; it stops quietly with 141 (128 +
    SIGPIPE) as Unix tools do, without a traceback or an error message."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "parnet", "summary", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.close()  # before the command has imported torch, let alone written
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 141 and err == b""


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


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A folder where a file goes (or a file where a folder goes) is said at once, naming the flag, not after
    a benchmark, a calibration or an evaluation; nothing is written."""
    import parnet.cli.bench

    folder, afile = tmp_path / "dir.json", tmp_path / "file"
    folder.mkdir()
    afile.write_text("mine")
    monkeypatch.setattr(parnet.cli.bench, "run_bench", lambda *a, **k: pytest.fail("benchmarked first"))
    cases = [
        (["bench", "--models", "parnet_cifar_s", "--json", str(folder)], f"--json {folder} is a folder"),
        (["bench", "--models", "parnet_cifar_s", "--markdown", str(afile / "t.md")], f"lies under {afile}"),
        (["quantize", str(tmp_path / "no_run"), "--out", str(folder)], f"--out {folder} is a folder"),
        (["plot", str(tmp_path / "no_run"), "--output", str(folder)], f"--output {folder} is a folder"),
        (["export", "parnet_cifar_s", "--out", str(afile)], f"--out {afile} is a file: give a folder"),
        (["export", "parnet_cifar_s", "--format", ",", "--out", str(tmp_path / "e")], "no export format given"),
        (["eval-det", str(tmp_path / "no_run"), "--data", str(tmp_path), "--output", str(afile)],
         f"--output {afile} is a file"),
        (["convert", str(tmp_path), str(tmp_path / "w.safetensors")], "is a folder: give the checkpoint file"),
        (["convert", str(afile), str(tmp_path / "w.safetensors")], "is not a PyTorch checkpoint (empty, or"),
        (["convert", str(afile), str(tmp_path / "w.pt")], "convert writes safetensors; name the file w.safetensors"),
        (["train", "--config", str(tmp_path)], "is a folder: give the YAML file"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "file"] and not any(folder.iterdir())
    assert afile.read_text() == "mine"
    (tmp_path / "bad.yaml").write_text("epochs: [1\nlr: 2\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not valid YAML" in err and "(line 2, column" in err


@pytest.mark.parametrize("command", ["train", "train-det"])
def test_settings_flags_state_each_default_once(command):
    """Flags generated from the settings: a description that says its own default gets no second one."""
    from parnet.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and command in a.choices).choices[command]
    helps = {a.dest: a.help for a in sub._actions if a.help}
    assert all(h.count("(default") <= 1 for h in helps.values()), [h for h in helps.values() if h.count("(default") > 1]
    assert all("(default" in h or "required" in h for d, h in helps.items() if d not in ("help", "config"))
