"""The run folder: one training at a time (its lock), the checkpoint as the authority on settings,
clear errors for a bad --output, a damaged config.yaml or metrics.jsonl, a NaN before any checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from parnet import checkpoint
from parnet.cli import main

from .test_data import make_fashion_mnist


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=32, n_test=16)


def _flags(data: Path, out: Path, *more: str) -> list[str]:
    return ["train", "--data-dir", str(data), "--output", str(out), "--model-kwargs", "widths=[8,16,32]",
            "head_width=64", "stem_width=8", "--batch-size", "16", "--warmup-epochs", "0", "--workers", "0",
            "--threads", "1", "--no-progress", "--no-depth", "--no-ema", *more]  # fmt: skip


def test_a_second_training_into_a_running_runs_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    with checkpoint.RunLock(out):  # as a running training holds it
        assert main(_flags(data, out, "--epochs", "1")) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by another training (process {__import__('os').getpid()})" in err
        assert [p.name for p in out.iterdir()] == [".lock"]
    assert main(_flags(data, out, "--epochs", "1")) == 0  # released: the folder is free again


def test_the_checkpoint_not_config_yaml_decides_the_settings_of_a_resumed_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_flags(data, out, "--epochs", "3", "--stop-after", "1")) == 0
    config = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config.replace("epochs: 3", "epochs: 5").replace("lr: 0.1", "lr: 0.7"))
    assert main(["train", "--output", str(out), "--resume", "--stop-after", "1"]) == 0
    assert checkpoint.read_state(out)["extra"]["config"]["epochs"] == 3
    assert "epochs: 3" in (out / "config.yaml").read_text() and "lr: 0.1" in (out / "config.yaml").read_text()
    (out / "config.yaml").unlink()  # deleted: no traceback, the checkpoint has the settings
    assert main(["train", "--output", str(out), "--resume"]) == 0
    rows = checkpoint.read_metrics(out)
    # the last step of a 3-epoch cosine (of 5 epochs, it would still be near half of lr 0.1)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and 0 < rows[-1]["lr"] < 0.01
    assert (out / "results.json").is_file()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_output_that_is_a_file_is_a_clear_error(data, tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    assert main(_flags(data, out, "--epochs", "1")) == 2
    message = "is a file: give a folder" if where == "file" else f"lies under {tmp_path / 'f'}, which is a file"
    assert message in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "x"


def test_damaged_config_yaml_and_metrics_are_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("epochs: [1\n")
    assert main(["train", "--output", str(out), "--resume"]) == 2
    assert f"{out / 'config.yaml'} is not valid YAML" in capsys.readouterr().err
    (out / "config.yaml").unlink()
    assert main(_flags(data, out, "--epochs", "1")) == 0
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"epoch": 1, "lo\n')
    assert main(["plot", str(out)]) == 2
    assert f"{metrics}, line 2: not a JSON row" in capsys.readouterr().err


def test_nan_in_the_first_epoch_does_not_claim_a_checkpoint(data, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", lambda self, x, t: x.sum() * float("nan"))
    out = tmp_path / "run"
    assert main(_flags(data, out, "--epochs", "1", "--label-smoothing", "0")) == 3
    err = capsys.readouterr().err
    assert "No checkpoint was written (the first epoch did not finish)" in err and "is kept" not in err
    assert not (out / "last_state.pt").exists()


@pytest.mark.parametrize(
    "errno_name, where", [("ENOSPC", "fsync"), ("EROFS", "open")], ids=["full_disk", "read_only_disk"]
)
def test_a_full_or_read_only_disk_is_an_error_not_a_traceback(data, tmp_path, capsys, monkeypatch, errno_name, where):
    import errno
    import os

    import parnet.io

    error = OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))
    real = {"fsync": os.fsync, "open": os.open}

    def failing(*args, **kwargs):
        if where == "open" and not str(args[0]).endswith(".tmp"):
            return real[where](*args, **kwargs)  # the lock file opens; the first file written fails
        raise error

    monkeypatch.setattr(parnet.io.os, where, failing)
    out = tmp_path / "run"
    code = main(_flags(data, out, "--epochs", "1"))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1 and os.strerror(getattr(errno, errno_name)) in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_eval_does_not_read_the_training_split(tmp_path):
    """A damaged training file must not block evaluating on the test split."""
    from parnet.evaluate import evaluate
    from parnet.io import save_model
    from parnet.model import ParNet, ParNetCfg

    root = make_fashion_mnist(tmp_path / "fm", n_train=16, n_test=8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"damaged")
    model = ParNet(ParNetCfg(widths=(8, 16, 32), head_width=64, small_input=True), num_classes=10, in_chans=1)
    path = save_model(model, tmp_path / "m.safetensors")
    scores = evaluate(path, dataset="fashion_mnist", data_dir=str(root), workers=0)
    assert scores["raw"]["n"] == 8
