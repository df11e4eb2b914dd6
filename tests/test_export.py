"""Export round trips: ONNX (onnxruntime, dynamic batch), TorchScript and torch.export, via the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import warnings
from io import StringIO
from pathlib import Path

import pytest
import timm
import torch

import parnet
from parnet import cli, io
from parnet import export as export_module
from parnet.deployment import fold
from parnet.export import check_export, export_model, load_runner

from .conftest import randomize_bn

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded: the machine is shared, and 2-thread OpenMP barriers stall under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[torch.nn.Module, Path]:
    """A tiny random-BN model saved as a checkpoint and exported by ``parnet export`` (all formats)."""
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("parnet_cifar_s", widths=(8, 16, 32), head_width=64), 3).eval()
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 1.0)
    root = tmp_path_factory.mktemp("export")
    ckpt = io.save_model(model, root / "tiny.safetensors")
    printed = StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        code = cli.main(["export", "--checkpoint", str(ckpt), "--resolution", "32", "--out", str(root / "out")])
    assert code == 0  # the command itself checked every file against the model to 1e-4
    said = printed.getvalue()
    assert "inputs: any batch at 32x32" in said and "inputs: any batch, sides multiples of 8 from 16" in said
    return io.load_model(ckpt), root / "out"


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".torchscript.pt"), ("export", ".pt2")])
def test_round_trip_any_batch(exported, fmt: str, suffix: str) -> None:
    """Any batch; and but for ONNX (fixed size) any size the model takes, as the command says."""
    model, out = exported
    path = out / f"tiny{suffix}"
    assert path.is_file()
    run = load_runner(fmt, path)
    sizes = [(1, 32), (5, 32)] + ([] if fmt == "onnx" else [(2, 16), (1, 40), (3, 64)])
    with torch.no_grad():
        for batch, side in sizes:  # export used batches 2 and 3 at 32
            x = torch.randn(batch, 3, side, side)
            ref = model(x)
            assert ref.abs().max() > 0.1
            assert (run(x) - ref).abs().max().item() < TOL


def test_files_written_atomically(exported) -> None:
    _, out = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tiny.onnx", "tiny.pt2", "tiny.torchscript.pt"]  # no temporary files left


def test_exported_files_say_how_to_prepare_their_input(exported) -> None:
    """Each file carries the preprocessing `parnet predict` applies, its colour mode and class names, where each
    runtime keeps such things; and a file given where weights are expected is named for what it is."""
    import onnxruntime as ort

    from parnet.official import read_checkpoint

    _, out = exported
    found = [ort.InferenceSession(str(out / "tiny.onnx")).get_modelmeta().custom_metadata_map]
    keys = ("image_reading", "preprocessing", "preprocessing_steps", "image_mode", "class_names")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        extra = dict.fromkeys(keys, "")
        torch.jit.load(str(out / "tiny.torchscript.pt"), _extra_files=extra)
        found.append({k: v.decode() for k, v in extra.items()})
    extra = dict.fromkeys(keys, "")
    torch.export.load(out / "tiny.pt2", extra_files=extra)
    found.append(extra)
    for meta in found:  # a model of no dataset: timm's transform of its variant (parnet_cifar_s), at 32
        assert "Resize(size=32" in meta["preprocessing"] and "Normalize(mean=tensor([0.4914" in meta["preprocessing"]
        steps = json.loads(meta["preprocessing_steps"])  # the same, for a program to follow
        assert [step["op"] for step in steps] == ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"]
        assert steps[0]["size"] == 32 and steps[0]["interpolation"] == "bicubic" and steps[1]["size"] == [32, 32]
        assert steps[3]["mean"] == [0.4914, 0.4822, 0.4465] and steps[3]["std"] == [0.247, 0.2435, 0.2616]
        assert meta["image_mode"] == "RGB" and len(json.loads(meta["class_names"])) == 10
        assert "EXIF orientation" in meta["image_reading"] and "blended onto white" in meta["image_reading"]
    for name, what in (("tiny.pt2", "torch.export program"), ("tiny.torchscript.pt", "TorchScript program")):
        with pytest.raises(ValueError, match=f"is a {what} .*, which runs as it is, not weights"):
            read_checkpoint(out / name)


def test_check_export_fails_on_a_different_model(exported) -> None:
    model, out = exported
    other = randomize_bn(timm.create_model("parnet_cifar_s", widths=(8, 16, 32), head_width=64), 99).eval()
    with torch.no_grad():
        other.head.fc.weight.normal_(0, 1.0)
    with pytest.raises(ValueError, match="differs"):
        check_export("onnx", out / "tiny.onnx", other, [torch.randn(2, 3, 32, 32)])


def test_export_refuses_unknown_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    args = ["export", "parnet_cifar_s", "--model-kwargs", "widths=[8,16,32]", "head_width=64"]
    args += ["--out", str(tmp_path), "--resolution", "32"]
    assert cli.main([*args, "--format", "torchscript,tflite"]) == 2  # refused before anything is written
    assert "unknown export format 'tflite'" in capsys.readouterr().err and not any(tmp_path.iterdir())
    real_find_spec = export_module.importlib.util.find_spec
    monkeypatch.setattr(
        export_module.importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real_find_spec(n, *a)
    )
    assert cli.main([*args, "--format", "onnx"]) == 2  # the check needs onnxruntime: said, no traceback
    assert "ONNX export needs onnxruntime, not installed here: pip install onnxruntime" in capsys.readouterr().err
    assert cli.main([*args, "--format", "onnx", "--no-check"]) == 0  # writing alone needs only onnx


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = randomize_bn(timm.create_model("parnet_cifar_s", widths=(8, 16, 32), head_width=64), seed)
    with torch.no_grad():
        model.head.fc.weight.normal_(0, 1.0)
    return model


def test_a_check_that_proves_little_is_said_to(tmp_path: Path) -> None:
    """A fresh network answers nearly the same to every input (its BN statistics are the identity's): a file that
    ignored its input would pass the round-trip check, so the export warns; a network that tells inputs apart
    does not."""
    fresh = timm.create_model("parnet_cifar_s", widths=(8, 16, 32), head_width=64)
    with pytest.warns(UserWarning, match="the check compared little") as caught:
        export_model(fresh, tmp_path, "fresh", formats="torchscript", input_size=(3, 32, 32))
    # attributed to the call (here), not to torch's no_grad wrapper
    assert {w.filename for w in caught if "compared little" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_model(_tiny(4), tmp_path, "tiny", formats="torchscript", input_size=(3, 32, 32))


def test_export_leaves_the_model_and_writes_no_failed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny(4).train()
    export_model(model, tmp_path, "m", formats="torchscript", input_size=(3, 32, 32))  # one format, not letters
    assert all(m.training for m in model.modules())  # the caller's model keeps its mode (and device)
    path = tmp_path / "m.torchscript.pt"
    good = path.read_bytes()
    other = fold(_tiny(5)).eval()  # an exporter that gets it wrong
    monkeypatch.setattr(export_module, "inference_model", lambda m, fused_only=False: other)
    with pytest.raises(ValueError, match=r"m.torchscript.pt differs .*; no file was written"):
        export_model(model, tmp_path, "m", formats=("torchscript",), input_size=(3, 32, 32))
    assert path.read_bytes() == good  # the good file was not replaced by the wrong one
    assert [p.name for p in tmp_path.iterdir()] == ["m.torchscript.pt"]  # and no temporary file is left


@pytest.mark.parametrize(
    "model, message",
    [("parnet_ss", "unknown model 'parnet_ss'; similar: parnet_s"), ("resnet18", "export takes the ParNet variants")],
)
def test_export_refuses_unknown_and_non_parnet_models(model: str, message: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["export", model, "--out", str(tmp_path)])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_export_checks_the_resolution_first(tmp_path: Path, capsys) -> None:
    args = ["export", "parnet_cifar_s", "--model-kwargs", "widths=(8,16,32)", "head_width=64", "--out", str(tmp_path)]
    assert cli.main([*args, "--resolution", "12", "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "the small-input form of ParNet needs height and width that are multiples of 8, got 12x12" in err
    assert "(e.g. to 16x16)" in err and not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="multiples of 32, got 100x100; resize or pad the input \\(e.g. to 128x128"):
        export_model(timm.create_model("parnet_s", widths=(8, 16, 32), head_width=64), tmp_path, "m",
                     input_size=(3, 100, 100))  # fmt: skip
    # the tuple form of --model-kwargs builds the model
    assert cli.main([*args, "--resolution", "16", "--format", "torchscript"]) == 0


def test_export_defaults_to_the_models_own_input_size() -> None:
    from parnet.cli.export import default_resolution

    assert default_resolution(timm.create_model("parnet_cifar_s", widths=(8, 16, 32), head_width=64), None) == 32
    assert default_resolution(timm.create_model("parnet_s", widths=(8, 16, 32), head_width=64), None) == 224
    small = parnet.ParNet(parnet.ParNetCfg(widths=(8, 16, 32), head_width=64, small_input=True))  # no timm config
    assert default_resolution(small, None) == 32


def test_export_takes_an_authors_checkpoint(official_tiny: dict, tmp_path: Path, capsys) -> None:
    """An authors' file (by content, whatever its name) exports with its EMA weights, as eval and predict read it."""
    raw = official_tiny["state_dict"]
    ema = {k: v * 1.01 if v.is_floating_point() else v for k, v in raw.items()}  # outputs differ, same scale
    torch.save({"state_dict": raw, "state_dict_ema": ema}, tmp_path / "model_best.pth.tar")
    torch.save({"state_dict": raw}, tmp_path / "renamed.safetensors")
    x = official_tiny["input"]
    for name, weights in (("model_best.pth.tar", ema), ("renamed.safetensors", raw)):
        args = ["export", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "out"), "--format", "onnx"]
        assert cli.main([*args, "--resolution", "64"]) == 0, capsys.readouterr().err
        stem = name.split(".")[0]
        assert f"{tmp_path / 'out' / stem}.onnx" in capsys.readouterr().out
        with torch.no_grad():
            expected = parnet.load_official(weights).eval()(x)
        assert (load_runner("onnx", tmp_path / "out" / f"{stem}.onnx")(x) - expected).abs().max().item() < TOL
    # a checkpoint brings its architecture: flags that would build another are refused, not ignored
    args = ["export", "--checkpoint", str(tmp_path / "model_best.pth.tar"), "--out", str(tmp_path / "n")]
    for extra in (["--num-classes", "5"], ["parnet_s"]):  # MODEL too: it was ignored silently
        assert cli.main([*args, *extra]) == 2
        assert "a --checkpoint brings its own architecture" in capsys.readouterr().err and not (tmp_path / "n").exists()
    # a timm baseline's weights file is not a ParNet: refused, nothing written
    torch.save({"state_dict": timm.create_model("resnet18", num_classes=3).state_dict()}, tmp_path / "resnet.pth.tar")
    assert cli.main(["export", "--checkpoint", str(tmp_path / "resnet.pth.tar"), "--out", str(tmp_path / "r")]) == 2
    assert "resnet.pth.tar" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_exported_files_are_named_after_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from parnet.cli.export import _checkpoint_name, file_stem

    (tmp_path / "my_run").mkdir()
    monkeypatch.chdir(tmp_path / "my_run")
    for given, stem in ((".", "my_run"), ("../my_run/", "my_run"), ("last.safetensors", "last"),
                        ("model_best.pth.tar", "model_best"), ("a.b.safetensors", "a.b"), ("x.PTH.TAR", "x"),
                        ("pytorch_model.bin", "pytorch_model"), ("model.ckpt", "model"), (".pt", ".pt")):  # fmt: skip
        assert file_stem(given) == stem
    # every run names its weights files alike: theirs are named after the run, a run folder too
    for given, name in (("last.safetensors", "my_run"), ("last_ema.safetensors", "my_run_ema"),
                        ("fused.safetensors", "my_run_fused"), ("ema_fused.safetensors", "my_run_ema_fused"),
                        (".", "my_run"), ("model_best.pth.tar", "model_best")):  # fmt: skip
        assert _checkpoint_name(given) == name
    (tmp_path / "my_run" / "config.yaml").write_text("epochs: 1\n")  # a run folder, whatever its files' names
    assert _checkpoint_name("model_best.pth.tar") == "my_run_model_best"
    assert _checkpoint_name(str(tmp_path / "my_run" / "last_ema.safetensors")) == "my_run_ema"
    # a run folder is named after the file it is read from: its EMA weights where kept, as they differ from the raw
    io.save_model(_tiny(0), tmp_path / "my_run" / "last.safetensors")
    assert _checkpoint_name(".") == "my_run"
    io.save_model(_tiny(0), tmp_path / "my_run" / "last_ema.safetensors")
    assert _checkpoint_name(".") == "my_run_ema"


def test_two_runs_export_to_two_names(tmp_path: Path, capsys) -> None:
    """Each run's last_ema.safetensors exports under its run's name: the second does not replace the first."""
    for run, seed in (("run_a", 1), ("run_b", 2)):
        io.save_model(_tiny(seed), tmp_path / run / "last_ema.safetensors")
        args = ["export", "--checkpoint", str(tmp_path / run / "last_ema.safetensors"), "--out", str(tmp_path / "ex")]
        assert cli.main([*args, "--format", "torchscript", "--resolution", "32"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == [
        "run_a_ema.torchscript.pt",
        "run_b_ema.torchscript.pt",
    ]


@pytest.mark.parametrize("name", ["../escaped", "sub/m", "/tmp/m", "", ".", ".."])
def test_export_name_is_a_plain_file_stem(name: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["export", "parnet_cifar_s", "--model-kwargs", "widths=[8,16,32]", "head_width=32", "--resolution", "32"]
    assert cli.main([*args, "--out", str(out), "--name", name, "--format", "torchscript"]) == 2
    assert "the export name must be a plain file stem such as 'my_model'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written, inside --out or beside it
    with pytest.raises(ValueError, match="plain file stem"):  # the library refuses it too
        export_model(_tiny(4), out, name, formats="torchscript", input_size=(3, 32, 32))
    assert not any(tmp_path.iterdir())


def test_export_refuses_a_target_in_the_way_before_writing(tmp_path: Path, monkeypatch, capsys) -> None:
    """A target that is not a file, or a folder that cannot be written, fails the whole export up front: no new
    file is left beside the old ones of the other formats."""
    (tmp_path / "m.pt2").mkdir()
    os.mkfifo(tmp_path / "f.torchscript.pt")
    args = ["export", "parnet_cifar_s", "--model-kwargs", "widths=[8,16,32]", "head_width=32", "--resolution", "32"]
    args += ["--out", str(tmp_path), "--format", "torchscript,export"]
    for target, kind in (("m.pt2", "a folder"), ("f.torchscript.pt", "not a regular file")):
        assert cli.main([*args, "--name", target.split(".")[0]]) == 2
        assert f"{tmp_path / target} is in the way: it is {kind}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.torchscript.pt", "m.pt2"]
    real_access = os.access  # as root every folder is writable: a read-only one is faked
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != tmp_path and real_access(p, mode, **kw))
    assert cli.main([*args, "--out", str(tmp_path / "new")]) == 2
    assert f"cannot write in {tmp_path} (no permission or a read-only disk)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.torchscript.pt", "m.pt2"]


def test_a_failed_format_replaces_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where one format fails to convert after another was converted, none replaces the older set."""
    for suffix in (".torchscript.pt", ".pt2"):
        (tmp_path / f"m{suffix}").write_bytes(b"an older export")

    def fails(*args, **kwargs) -> None:
        raise RuntimeError("torch.export cannot convert this")

    monkeypatch.setattr(export_module, "_write_program", fails)
    with pytest.raises(RuntimeError, match="cannot convert"):  # torchscript first, then torch.export
        export_model(_tiny(4), tmp_path, "m", formats=("torchscript", "export"), input_size=(3, 32, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "m.torchscript.pt"]  # no temporaries either
    assert all(p.read_bytes() == b"an older export" for p in tmp_path.iterdir())


def test_a_model_that_does_not_script_is_traced_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The traced file may take only its export size: a warning names the scripting error, the metadata says so."""
    scripted = []

    def fails(module, *args, **kwargs):
        scripted.append(module)
        raise RuntimeError("Python builtin <built-in function id> is currently not supported in TorchScript")

    monkeypatch.setattr(torch.jit, "script", fails)
    said = r"does not script \(RuntimeError: Python builtin .* not supported .*\); .* traced .* only 32x40 inputs"
    with pytest.warns(UserWarning, match=said) as caught:
        results = export_model(_tiny(4), tmp_path, "m", formats="torchscript", input_size=(3, 32, 40))
    assert {w.filename for w in caught if "does not script" in str(w.message)} == {__file__}  # the caller's line
    assert scripted  # the fallback was taken, and the traced file passed the export's check
    assert results["torchscript"]["note"] == "traced, fixed input size 32x40"  # what `parnet export` prints
    extra = {"torchscript": ""}
    torch.jit.load(str(tmp_path / "m.torchscript.pt"), _extra_files=extra)
    assert extra["torchscript"] == b"traced, fixed input size 32x40"


def test_the_check_allows_rounding_at_the_outputs_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits around 590 differ by about 3e-4 (5e-7 of them) from float32 rounding alone: passed, as 1e-4 plus 1e-5
    of the largest output; a difference of 1e-3 of them, or 2e-4 on outputs around 1, still fails."""
    big = [590 + torch.randn(3, 10, generator=torch.Generator().manual_seed(0))]
    for runner, inputs, passes in ((lambda x: x * (1 + 5e-7), big, True), (lambda x: x * (1 + 1e-3), big, False),
                                   (lambda x: x + 2e-4, [big[0] - 590], False)):  # fmt: skip
        monkeypatch.setattr(export_module, "load_runner", lambda fmt, path, runner=runner: runner)
        if passes:
            assert 2e-4 < check_export("onnx", "m.onnx", torch.nn.Identity(), inputs) < 4e-4
        else:
            with pytest.raises(ValueError, match="differs from the model by"):
                check_export("onnx", "m.onnx", torch.nn.Identity(), inputs)


@pytest.mark.parametrize("clean_up_fails", [False, True])
def test_sigterm_during_an_export_leaves_no_temporary_file(
    clean_up_fails: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """SIGTERM (kill, timeout, a job scheduler) while a file is written: the command exits 143 (128 + SIGTERM)
    through its clean-up, so no hidden temporary file is left and the older file is kept; the caller's SIGTERM
    handler is back afterwards. An error the clean-up raises after it (a process group's SIGTERM also ends a
    loader's workers, which torch then reports) still ends as terminated, in one line."""
    ckpt = io.save_model(_tiny(4), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny.torchscript.pt").write_bytes(b"an older export")
    write = export_module._write_torchscript

    def write_then_terminated(*args, **kwargs):
        note = write(*args, **kwargs)  # the temporary file is written in full: large, for a large model
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler here, in this thread: deterministic
        finally:
            if clean_up_fails:
                raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Terminated.")
        return note

    monkeypatch.setattr(export_module, "_write_torchscript", write_then_terminated)
    received = []

    def callers_handler(signum, frame):  # were the command's handler missing, this one would take the signal
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        code = cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--format", "torchscript",
                         "--resolution", "32"])  # fmt: skip
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and not received and after is callers_handler
    assert capsys.readouterr().err.strip().splitlines()[-1] == "parnet export: terminated"
    assert [p.name for p in out.iterdir()] == ["tiny.torchscript.pt"]
    assert (out / "tiny.torchscript.pt").read_bytes() == b"an older export"


def test_an_export_removes_the_temporaries_a_killed_export_of_its_files_left(tmp_path: Path) -> None:
    """A SIGKILL skips every clean-up: the next export of the same files removes their temporaries, and only
    theirs (another name's, another format's, a file of the user's are kept)."""
    left = [".m.torchscript.pt.0123456789ab.tmp", ".m.torchscript.pt.ba9876543210.tmp"]
    kept = [".m.pt2.0123456789ab.tmp", ".other.torchscript.pt.0123456789ab.tmp", ".m.torchscript.pt.notes.tmp"]
    for name in left + kept:
        (tmp_path / name).write_bytes(b"half a file")
    export_model(_tiny(4), tmp_path, "m", formats="torchscript", input_size=(3, 32, 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "m.torchscript.pt"])
