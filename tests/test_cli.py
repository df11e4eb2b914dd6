"""The command line: `parnet summary` and `python -m parnet`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("command", ["train", "train-det"])
def test_a_literal_setting_offers_its_values_as_choices(command, capsys):
    """Each Literal field (optional ones too: ``--device``) is a flag whose choices are its values, in --help and
    in the refusal of any other value, which names them."""
    import typing

    from parnet.cli import build_parser
    from parnet.detection.train import DetTrainConfig
    from parnet.settings import TrainConfig

    model = TrainConfig if command == "train" else DetTrainConfig
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and command in a.choices).choices[command]
    choices = {a.dest: a.choices for a in sub._actions if a.choices}
    literals = {name for name, field in model.model_fields.items() if "Literal" in str(field.annotation)}
    assert {"amp", "device"} <= literals if command == "train" else {"detector", "device"} <= literals
    assert choices.keys() == literals
    assert choices["device"] == ("cpu", "cuda")
    for name in literals:
        assert all(typing.get_origin(a) is not typing.Literal for a in choices[name])
    with pytest.raises(SystemExit):
        main([command, "--device", "gpu"])
    assert "argument --device: Input should be 'cpu' or 'cuda' (got 'gpu')" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module, function, argv",
    [("parnet.cli.export", "_export", ["export"]), ("parnet.cli.train", "_eval_command", ["eval", "run"]),
     ("parnet.cli.predict", "_predict", ["predict", "a.png"]),
     ("parnet.cli.quantize", "_quantize", ["quantize", "run"])],
)  # fmt: skip
def test_ctrl_c_is_one_line_and_exit_code_130(module, function, argv, monkeypatch, capsys):
    """Ctrl-C in any command: one line, no traceback, 130 (128 + SIGINT) as Unix tools exit."""
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), function, interrupted)  # the parser takes it at build
    try:
        code = main(argv)
    except KeyboardInterrupt:  # not passed on: it would stop pytest itself
        pytest.fail("the interruption came out of main() as a traceback")
    assert code == 130
    captured = capsys.readouterr()
    assert captured.err == f"parnet {argv[0]}: interrupted\n" and captured.out == ""


def test_ctrl_c_in_training_says_how_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """Before the first epoch's checkpoint there is nothing to continue: said so, and how to start over."""
    import parnet.train

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(parnet.train, "train", interrupted)
    run = tmp_path / "run"
    assert main(["train", "--output", str(run)]) == 130  # killed before its folder was made: nothing there
    assert capsys.readouterr().err == (
        "parnet train: interrupted before the first epoch finished, so there is no checkpoint: run it again\n"
    )
    run.mkdir()
    (run / ".lock").write_text("1\n")
    (run / "config.yaml").write_text("epochs: 1\n")
    assert main(["train", "--output", str(run)]) == 130  # in epoch 1: the lock and config.yaml only
    err = capsys.readouterr().err
    assert "before the first epoch finished, so there is no checkpoint" in err and "or with --resume" in err
    (run / "last_state.pt").write_bytes(b"a checkpoint")
    assert main(["train", "--output", str(run)]) == 130
    assert (
        capsys.readouterr().err == "parnet train: interrupted; the last checkpoint is kept (continue with --resume)\n"
    )


def test_the_sigterm_handler_is_the_commands_only_while_it_runs():
    """main() is called from Python too: the caller's SIGTERM handler is back afterwards, and a thread other than
    the main one, where Python sets no handlers, runs commands as well."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def command(args):
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    import parnet.cli.models

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parnet.cli.models, "_summary", command)
        assert main(["summary"]) == 0
        assert signal.getsignal(signal.SIGTERM) is before and seen[0] is not before  # the command's own, then back
        results = []
        thread = threading.Thread(target=lambda: results.append(main(["summary"])))
        thread.start()
        thread.join()
    assert results == [0] and seen[1] is before


def test_predict_takes_images_and_the_run_before_and_after_options(tmp_path, capsys):
    """`parnet predict IMG --top 1 RUN`: positionals after an option are taken, as before one."""
    import numpy as np
    from PIL import Image

    import parnet
    from parnet.io import save_model

    from .conftest import TINY_STEM

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    run = tmp_path / "run"
    save_model(parnet.create_model("parnet_cifar_s", **TINY_STEM).eval(), run / "last.safetensors")
    image = str(tmp_path / "a.png")
    printed = []
    for argv in ([image, "--top", "2", str(run)], ["--top", "2", image, str(run)], [image, str(run), "--top", "2"]):
        assert main(["predict", *argv, "--json"]) == 0, capsys.readouterr().err
        printed.append(json.loads(capsys.readouterr().out))
    assert printed[0] == printed[1] == printed[2] and len(printed[0][0]["top"]) == 2


def test_quantize_names_its_file_after_the_checkpoint_and_the_engine_after_the_file(tmp_path):
    """`model_best.pth.tar` gives `model_best_fp32.onnx` (not `model_best.pth_fp32.onnx`); `--out x.xml` is an
    OpenVINO model without --engine, and an --engine its suffix is not is refused, saying what to do."""
    from parnet.cli.quantize import choose_engine, default_out

    assert default_out(str(tmp_path / "model_best.pth.tar"), "fp32", ".onnx") == str(tmp_path / "model_best_fp32.onnx")
    assert default_out(str(tmp_path / "last_ema.safetensors"), "int8", ".xml") == str(tmp_path / "last_ema_int8.xml")
    assert default_out(str(tmp_path), "int8", ".onnx") == str(tmp_path.parent / f"{tmp_path.name}_int8.onnx")
    assert choose_engine(None, "q/x.xml") == "openvino" and choose_engine(None, "q/x.ONNX") == "onnxruntime"
    assert choose_engine(None, None) == "onnxruntime" and choose_engine("openvino", None) == "openvino"
    assert choose_engine("openvino", "x.xml") == "openvino"
    with pytest.raises(ValueError, match=r"an onnxruntime model is written to a .onnx file, got --out q/x.xml: name it "
                                         r"q/x.onnx, or leave --engine out \(.xml is openvino's\)"):  # fmt: skip
        choose_engine("onnxruntime", "q/x.xml")
    with pytest.raises(ValueError, match=r"got --out x.bin: name it x.xml$"):
        choose_engine("openvino", "x.bin")
    with pytest.raises(ValueError, match=r"--out x.bin: name the file .onnx \(an onnxruntime model\) or .xml"):
        choose_engine(None, "x.bin")


def test_quantize_writes_for_the_engine_of_its_out_file(tmp_path, monkeypatch, capsys):
    """`--out q/x.xml` without --engine is an OpenVINO model; an --engine the suffix is not is refused before any
    work."""
    import parnet.deployed

    asked = []

    def quantize(checkpoint, out, precision, engine, **kwargs):
        asked.append((Path(out).name, engine))
        raise ValueError("not quantized in this test")

    monkeypatch.setattr(parnet.deployed, "quantize_checkpoint", quantize)
    for name in ("x.xml", "x.onnx"):
        assert main(["quantize", "run", "--precision", "fp32", "--out", str(tmp_path / "q" / name)]) == 2
        assert "not quantized in this test" in capsys.readouterr().err
    assert asked == [("x.xml", "openvino"), ("x.onnx", "onnxruntime")]
    assert main(["quantize", "run", "--engine", "openvino", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "an openvino model is written to a .xml file, got --out" in capsys.readouterr().err and len(asked) == 2


def test_a_file_given_to_bench_points_to_deployed(tmp_path, capsys):
    engine_file = tmp_path / "run_int8.onnx"
    engine_file.write_bytes(b"")
    with pytest.raises(SystemExit) as stopped:
        main(["bench", str(engine_file)])
    assert stopped.value.code == 2
    assert f"unrecognized arguments: {engine_file} (bench times models by name" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # anything else unrecognized: argparse's own words
        main(["bench", "--no-such-option"])
    assert capsys.readouterr().err.rstrip().endswith("unrecognized arguments: --no-such-option")


def test_options_are_not_abbreviated(capsys):
    """`parnet export --model NAME` (as train spells it) is not read as --model-kwargs NAME: no abbreviations."""
    with pytest.raises(SystemExit):
        main(["export", "--model", "parnet_cifar_s", "--format", "onnx"])
    assert "unrecognized arguments: --model (give the model name as the first argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "run", "--calibration-im", "8"])
    assert "unrecognized arguments: --calibration-im 8" in capsys.readouterr().err
