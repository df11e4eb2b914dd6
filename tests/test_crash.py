"""A kill at any instant of a run, then --resume: the same files as an uninterrupted run, bit for bit.

Deterministic, not timing-based: ``parnet.io``'s test hook (``_kill_at = N``, or the environment
variable ``PARNET_TEST_KILL_AT_WRITE=N``) ends the training process at its N-th write boundary (each
file written has two: its temporary file complete, and renamed into place) with ``os._exit``, which
like a SIGKILL skips every clean-up.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
from pathlib import Path

import pytest
import yaml

from parnet import checkpoint, io
from parnet.cli import main

from .test_data import make_fashion_mnist
from .test_detection import fake_fashion_mnist  # noqa: F401 - a fixture

# Timings differ from run to run; everything else must not.
TIMING = ("epoch_seconds", "images_per_s", "train_seconds", "train_images_per_s", "wall_seconds", "epoch_time_s",
          "eval_time_s")  # fmt: skip
WEIGHT_FILES = ("last.safetensors", "last_ema.safetensors", "fused.safetensors", "ema_fused.safetensors")


def _flags(data: Path, out: Path) -> list[str]:
    return ["train", "--data-dir", str(data), "--output", str(out), "--model-kwargs", "widths=[8,16,32]",
            "head_width=64", "stem_width=8", "--epochs", "2", "--batch-size", "32", "--train-subset", "64",
            "--test-subset", "32", "--warmup-epochs", "0.5", "--lr", "0.05", "--workers", "0", "--threads", "1",
            "--no-progress", "--no-depth", "--device", "cpu", "--amp", "off"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=64, n_test=32)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, int]:
    """An uninterrupted run, and how many write boundaries it passes."""
    out = tmp_path_factory.mktemp("crash") / "ref"
    count = []
    original = io._write_boundary
    io._write_boundary = lambda: count.append(1)
    try:
        assert main(_flags(data, out)) == 0
    finally:
        io._write_boundary = original
    return out, len(count)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_run(ref: Path, out: Path) -> None:
    for name in WEIGHT_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert _without_timing(checkpoint.read_metrics(out)) == _without_timing(checkpoint.read_metrics(ref))
    csv_rows = [_without_timing(list(csv.DictReader((d / "metrics.csv").open()))) for d in (ref, out)]
    assert csv_rows[1] == csv_rows[0] and len(csv_rows[0]) == len(checkpoint.read_metrics(ref))
    where = ("output", "resume")  # how each was invoked: the settings of the run are the same
    configs = [yaml.safe_load((d / "config.yaml").read_text()) for d in (ref, out)]
    assert [{k: v for k, v in c.items() if k not in where} for c in configs[1:]] == [
        {k: v for k, v in c.items() if k not in where} for c in configs[:1]
    ]
    results = [json.loads((d / "results.json").read_text()) for d in (ref, out)]
    assert _without_timing(results[1:]) == _without_timing(results[:1])
    assert checkpoint.read_state(out)["stage"] == checkpoint.FINISHED
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def _train_until_killed(args: list[str], at: int) -> None:
    """The body of a killed run's process: the command line, ended by ``parnet.io`` at write boundary ``at``."""
    import torch

    torch.set_num_threads(1)  # as the reference run: the same sums in the same order
    io._kill_at = at
    sys.exit(main(args))


def _run_killed(args: list[str], at: int) -> None:
    """Run ``parnet <args>`` in its own process until its ``at``-th write boundary ends it, as a kill would.

    The processes are forked from a server that imported parnet once (multiprocessing's forkserver,
    which has run no torch op, so no thread pool is copied): a fresh interpreter for each of the 30
    kills spent more time importing torch and timm than training."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["parnet.cli"])
    proc = ctx.Process(target=_train_until_killed, args=(args, at))
    proc.start()
    proc.join()
    assert proc.exitcode == io.KILL_EXIT_CODE, f"killed at write boundary {at}: exit code {proc.exitcode}"


def _kill_then_resume(data: Path, tmp_path: Path, at: int) -> Path:
    out = tmp_path / f"killed_at_{at}"
    _run_killed(_flags(data, out), at)
    assert main([*_flags(data, out), "--resume"]) == 0
    return out


# Representative instants (test_every_other_write_boundary, marked slow, takes the other 26):
# the first checkpoint's state written but not renamed; the second epoch's state in place, but not its
# weights nor metrics; its metrics.jsonl in place but not metrics.csv (which the resumed run rewrites
# from the checkpoint's rows); results.json in place before the state says the run is finished.
FAST = {"first_state_unrenamed": 2, "state_before_weights": 13, "csv_behind_jsonl": 19, "results_before_finished": 27}


@pytest.mark.parametrize("at", FAST.values(), ids=FAST.keys())
def test_a_kill_at_a_write_boundary_then_resume_gives_the_same_run(data, reference, tmp_path, at):
    ref, boundaries = reference
    assert boundaries == 30  # config.yaml, 5 files an epoch, fused x2, results.json, the finished state: 15 files
    _assert_same_run(ref, _kill_then_resume(data, tmp_path, at))


@pytest.mark.slow
@pytest.mark.parametrize("at", [at for at in range(30) if at not in FAST.values()])
def test_every_other_write_boundary(data, reference, tmp_path, at):
    """The 26 boundaries the fast test leaves out, one case each, so that pytest-xdist spreads them."""
    ref, boundaries = reference
    assert at < boundaries
    _assert_same_run(ref, _kill_then_resume(data, tmp_path, at))


def test_a_finished_run_resumed_again_changes_nothing(data, reference, tmp_path, capsys):
    ref, _ = reference
    out = _kill_then_resume(data, tmp_path, 29)  # killed after its very last write: finished
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}
    assert main([*_flags(data, out), "--resume"]) == 0
    out_text = capsys.readouterr().out
    assert "has already finished its 2 epochs" in out_text and "after its 2 epochs" in out_text
    assert "at epoch 3/2" not in out_text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_train_det_killed_then_resumed_gives_the_same_run(tmp_path, fake_fashion_mnist):  # noqa: F811
    """The detection loop keeps its folder the same way: killed once its state is written but not its
    weights nor metrics, and once eval.json is written but not the finished state."""
    pytest.importorskip("pycocotools")  # each epoch ends with a COCO evaluation
    data = tmp_path / "data"
    assert main(["make-det-dataset", str(data), "--train", "3", "--val", "2", "--canvas", "64", "--min-size", "16",
                 "--max-size", "40", "--source", str(fake_fashion_mnist)]) == 0  # fmt: skip

    def flags(out: Path) -> list[str]:
        return ["train-det", "--data", str(data), "--output", str(out), "--backbone", "parnet_s", "--backbone-kwargs",
                "widths=[8,16,32]", "head_width=64", "stem_width=8", "--fpn-channels", "64", "--batch-size", "3",
                "--warmup-steps", "1", "--no-progress", "--draw", "1", "--device", "cpu", "--epochs", "1"]  # fmt: skip

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed processes: the same sums in the same order
    try:
        assert main(flags(tmp_path / "ref")) == 0
        _kill_det_runs(tmp_path, flags)
    finally:
        torch.set_num_threads(threads)


def _kill_det_runs(tmp_path: Path, flags) -> None:
    for at in (3, 11):  # writes: best, state, last, metrics.jsonl, metrics.csv, eval.json, predictions.png, state
        out = tmp_path / f"killed_at_{at}"
        _run_killed(flags(out), at)
        assert main([*flags(out), "--resume"]) == 0
        for name in ("last.safetensors", "best.safetensors", "eval.json"):
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), (at, name)
        assert _without_timing(checkpoint.read_metrics(out)) == _without_timing(
            checkpoint.read_metrics(tmp_path / "ref")
        )
        assert checkpoint.read_state(out)["stage"] == checkpoint.FINISHED
