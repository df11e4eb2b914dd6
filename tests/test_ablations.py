"""scripts/ablations.py and its package scripts/ablation: the grid's parameter matching and depths, the
runner's skip/resume decisions, the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the scripts' own package, as `python scripts/ablations.py` sees it
from ablation import grid  # noqa: E402
from ablation import report as report_mod  # noqa: E402
from ablation import runner as runner_mod  # noqa: E402


def test_matched_comparisons_match_within_5_percent():
    params = {c.name: grid.measure(c, depth=False)["params"] for c in grid.ABLATION_CONFIGS}
    params.update({c.name: 1 for c in (*grid.FULL_CONFIGS, *grid.LONG_CONFIGS)})  # item 1: no matched comparison
    assert grid.check_matching(params) == []
    # and the check does catch a mismatch
    assert grid.check_matching({**params, "streams1": int(params["base"] * 1.2)})[0].startswith("streams:")


@pytest.mark.slow
def test_designed_depths_are_measured():
    for c in grid.ABLATION_CONFIGS:
        assert grid.measure(c)["depth"] == c.depth, c.name


def test_queue_order_first_seeds_first():
    runs = grid.queue_runs("ablations")
    names = [r.name for r in runs]
    n = len(grid.ABLATION_CONFIGS)
    assert names[:n] == [f"{c.name}-seed0" for c in grid.ABLATION_CONFIGS]
    assert names[n:] == [f"{c.name}-seed1" for c in grid.ABLATION_CONFIGS]
    assert {r.budget.epochs for r in runs} == {grid.ABLATION_BUDGET.epochs}  # one budget for all
    assert {r.budget.amp for r in runs} == {grid.ABLATION_BUDGET.amp}  # one precision for all


def _fake_run(run_dir: Path, epochs_done: int, finished: bool = False, state: bool = True, top1=(80.0,)) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("amp: 'off'\n")
    rows = [{"epoch": e, "test_top1": top1[min(e, len(top1) - 1)], "ema_top1": 1.0, "epoch_seconds": 360.0,
             "images_per_s": 100.0} for e in range(epochs_done)]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if state:
        (run_dir / "last_state.pt").write_bytes(b"x")
    if finished:
        res = {"epochs_done": epochs_done, "test_top1": top1[-1], "ema_top1": top1[-1] - 0.1, "params": 1000,
               "depth": 12, "train_seconds": 360.0 * epochs_done, "train_images_per_s": 100.0}  # fmt: skip
        (run_dir / "results.json").write_text(json.dumps(res))


def test_next_action_skips_finished_resumes_unfinished_moves_stale(tmp_path):
    runs = grid.queue_runs("ablations")
    epochs = grid.ABLATION_BUDGET.epochs
    runner = runner_mod.Runner(runner_mod.Settings(root=tmp_path), log=lambda m: None)
    _fake_run(tmp_path / runs[0].name, epochs, finished=True)  # done: skipped
    _fake_run(tmp_path / runs[1].name, epochs)  # trained, no results.json (killed in the final evaluation)
    _fake_run(tmp_path / runs[2].name, 3)  # unfinished: resumed
    run, args = runner.next_action(runs)
    assert run is runs[1] and "--resume" in args  # resumed: parnet train writes the final files
    runner.failed.add(runs[1].name)  # had it ended without them, it waits for the next start: no loop
    run, args = runner.next_action(runs)
    assert run is runs[2]
    assert args[:1] == ["train"] and "--resume" in args
    assert args[args.index("--stop-after") + 1] == str(grid.ABLATION_BUDGET.piece)
    assert args[args.index("--output") + 1] == str(tmp_path / runs[2].name)
    assert args[args.index("--amp") + 1] == grid.ABLATION_BUDGET.amp
    assert [grid.run_state(tmp_path / r.name, epochs) for r in runs[:4]] == ["done", "no-results", "resume", "new"]

    runner.failed.add(runs[2].name)  # a failed run waits for the next start; a stale folder is moved aside
    _fake_run(tmp_path / runs[3].name, 1, state=False)
    run, args = runner.next_action(runs)
    assert run is runs[3] and "--resume" not in args
    assert not (tmp_path / runs[3].name).exists()
    assert len(list(tmp_path.glob(f"{runs[3].name}.stale-*"))) == 1


FAKE_PARNET = """\
import json, pathlib, sys
args = sys.argv[3:]  # python -m parnet <args>
if args[0] == "plot":
    sys.exit(0)
out = pathlib.Path(args[args.index("--output") + 1])
epochs, piece = int(args[args.index("--epochs") + 1]), int(args[args.index("--stop-after") + 1])
if "--resume" not in args and (out / "last_state.pt").exists():
    sys.exit("refuses: already holds a run")
if "fail" in str(out) and "--resume" in args:
    sys.exit(2)
path = out / "metrics.jsonl"
rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
for _ in range(piece):
    if len(rows) < epochs:
        rows.append({"epoch": len(rows), "test_top1": 80.0 + len(rows), "ema_top1": 80.0})
path.write_text("".join(json.dumps(r) + "\\n" for r in rows))
(out / "last_state.pt").write_text("x")
if len(rows) == epochs:
    (out / "results.json").write_text(json.dumps({"epochs_done": epochs, "test_top1": 80.0 + epochs}))
"""


def test_runner_trains_in_pieces_and_resumes(tmp_path):
    """The whole loop against a stand-in for `python -m parnet` that writes what parnet train writes."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_PARNET)
    root = tmp_path / "runs"
    budget = grid.Budget(epochs=3, amp="off", warmup_epochs=0, seeds=(0,), piece=2)
    configs = (grid.Config("a", "m"), grid.Config("fail", "m"))
    runs = [grid.Run("q", c, 0, budget) for c in configs]
    logs: list[str] = []
    settings = runner_mod.Settings(root=root, python=f"{sys.executable} {fake}", nice=0)
    runner = runner_mod.Runner(settings, log=logs.append)
    runner.command = lambda *a: [sys.executable, str(fake), "-m", "parnet", *a]
    reports = []
    runner.run(runs, report=lambda: reports.append(1))
    assert json.loads((root / "a-seed0" / "results.json").read_text())["epochs_done"] == 3
    assert len(grid.read_rows(root / "a-seed0")) == 3
    assert runner.failed == {"fail-seed0"}  # its second piece failed: not retried in this invocation
    assert len(grid.read_rows(root / "fail-seed0")) == 2
    assert len(reports) == 4  # a: 2 pieces, fail: 2 pieces
    assert (root / "a-seed0" / "train.log").read_text().count("--resume") == 1
    # A new runner continues the failed one and skips the finished one.
    runner2 = runner_mod.Runner(runner_mod.Settings(root=root, nice=0), log=logs.append)
    run, args = runner2.next_action(runs)
    assert run.name == "fail-seed0" and "--resume" in args


def test_report_from_fake_metrics(tmp_path):
    runs = grid.queue_runs("ablations")
    by_name = {r.name: r for r in runs}
    _fake_run(tmp_path / "base-seed0", 10, finished=True, top1=(80.0, 90.0))
    _fake_run(tmp_path / "base-seed1", 10, finished=True, top1=(80.0, 91.0))
    _fake_run(tmp_path / "relu-seed0", 4, top1=(70.0, 85.5))
    measured = {"base": {"params": 148626, "mmacs": 12.5, "depth": 12}}
    text = report_mod.table(tmp_path, measured, runs)
    assert "**90.50** ± 0.50 (n=2)" in text  # mean, half the spread
    assert "_85.50 at epoch 4/10, unfinished_" in text  # unfinished run marked
    assert "0: 90.00, 1: 91.00" in text
    assert "0: 85.50*" in text
    assert "0.149 M" in text and "fp32" in text
    assert "ResNet34" in text  # the paper's figure beside the depth comparison
    assert "| base-seed1 | done | 10/10 | 1.0 h | 100 |" in text  # from results.json
    assert "| relu-seed0 | resume | 4/10 | 0.4 h | 100 |" in text  # from the epochs' rows
    assert "| streams1-seed0 | new | 0/10 | - | - |" in text
    full = grid.queue_runs("full")[0]
    _fake_run(tmp_path / full.name, 3, top1=(70.0, 80.0, 85.0))
    outcome = report_mod.read_outcome(full, tmp_path)
    assert outcome.curve == [70.0, 80.0, 85.0] and outcome.ema_curve == [1.0, 1.0, 1.0]
    shown = [by_name["base-seed0"], by_name["base-seed1"], by_name["relu-seed0"], full]
    out = report_mod.plot(tmp_path, shown, tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    report_mod.write_report(tmp_path, measured, runs)
    assert (tmp_path / "TABLE.md").is_file() and (tmp_path / "ablations.png").is_file()


# Before FAKE_PARNET: each run's first piece marks its start, then waits (30 s at most, then fails) until the
# other run's has started too: both processes are alive at once whatever the machine's load, or a run fails.
BOTH_AT_ONCE = """\
import pathlib, sys, time
if "--output" in sys.argv:  # training, not `parnet plot`
    out = pathlib.Path(sys.argv[sys.argv.index("--output") + 1])
    (out.parent / f"{out.name}.started").touch()
    deadline = time.monotonic() + 30
    while len(list(out.parent.glob("*.started"))) < 2:
        if time.monotonic() > deadline:
            sys.exit("the other run never started")
        time.sleep(0.01)
"""


def test_runner_trains_two_runs_at_once(tmp_path):
    """--jobs 2: both runs progress side by side and finish; the second starts before the first ends."""
    fake = tmp_path / "fake.py"
    fake.write_text(BOTH_AT_ONCE + FAKE_PARNET)
    root = tmp_path / "runs"
    budget = grid.Budget(epochs=2, amp="off", warmup_epochs=0, seeds=(0,), piece=1)
    runs = [grid.Run("q", grid.Config(name, "m"), 0, budget) for name in ("a", "b")]
    logs: list[str] = []
    runner = runner_mod.Runner(runner_mod.Settings(root=root, nice=0), log=logs.append, jobs=2)
    runner.command = lambda *a: [sys.executable, str(fake), "-m", "parnet", *a]
    runner.run(runs, poll_s=0.05)
    assert all((root / f"{n}-seed0" / "results.json").is_file() for n in ("a", "b"))
    starts = [i for i, line in enumerate(logs) if "epochs 1.." in line]
    first_finish = next(i for i, line in enumerate(logs) if "finished" in line)
    assert len(starts) == 2 and starts[1] < first_finish and not runner.pieces


def test_a_broken_report_does_not_stop_the_queue(tmp_path):
    """The table is written after each piece; an error there is logged and the runs still finish."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_PARNET)
    budget = grid.Budget(epochs=2, amp="off", warmup_epochs=0, seeds=(0,), piece=1)
    runs = [grid.Run("q", grid.Config("a", "m"), 0, budget)]
    logs: list[str] = []
    runner = runner_mod.Runner(runner_mod.Settings(root=tmp_path / "runs", nice=0), log=logs.append)
    runner.command = lambda *a: [sys.executable, str(fake), "-m", "parnet", *a]

    def report() -> None:
        raise OSError("disk full")

    runner.run(runs, report=report, poll_s=0.05)
    assert (tmp_path / "runs" / "a-seed0" / "results.json").is_file(), logs
    assert sum("report failed (OSError: disk full)" in line for line in logs) == 2


@pytest.mark.parametrize("output", [["--output", "ABS"], ["--output=ABS"], ["--output", "base-seed1"], "lock"])
def test_a_run_trained_by_another_process_is_left_alone(tmp_path, output):
    """A folder that another process trains into (its `parnet train` names it, however spelled, relative to
    its working folder; or it holds the folder's lock) is neither trained nor moved aside."""
    out = tmp_path / "base-seed1"
    out.mkdir()
    (out / "train.log").write_text("first epoch in progress\n")  # files, no checkpoint yet
    if output == "lock":
        lock = str(out / ".lock")
        code = f"import fcntl, time; f = open({lock!r}, 'w'); fcntl.flock(f, fcntl.LOCK_EX); time.sleep(60)"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-c", "import time; time.sleep(60)", "parnet", "train"]
        argv += [a.replace("ABS", str(out)) for a in output]
    other = subprocess.Popen(argv, cwd=tmp_path)
    try:
        deadline = time.time() + 10  # the lock is taken once the child's interpreter has started
        while not runner_mod.trained_elsewhere(out) and time.time() < deadline:
            time.sleep(0.05)
        assert runner_mod.trained_elsewhere(out) and not runner_mod.trained_elsewhere(tmp_path / "other-seed1")
        budget = grid.Budget(epochs=2, amp="off", warmup_epochs=0, seeds=(1,), piece=1)
        runs = [grid.Run("q", grid.Config(name, "m"), 1, budget) for name in ("base", "other")]
        runner = runner_mod.Runner(runner_mod.Settings(root=tmp_path), log=lambda m: None)
        run, _ = runner.next_action(runs)
        assert run.name == "other-seed1" and (out / "train.log").is_file()
    finally:
        other.kill()
        other.wait()
    assert not runner_mod.trained_elsewhere(out)


def test_command_line_plan_lists_every_run_with_its_state(tmp_path):
    _fake_run(tmp_path / "base-seed0", grid.ABLATION_BUDGET.epochs, finished=True)
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "ablations.py"), "plan", "--no-depth", "--root", str(tmp_path)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    states = dict(line.split()[1:3] for line in out.splitlines() if line.startswith(("ablations ", "full ")))
    assert len(states) == len(grid.queue_runs("ablations")) + len(grid.queue_runs("full"))
    assert states["base-seed0"] == "done" and states["relu-seed1"] == "new"


def test_runner_lowers_its_own_session_only(tmp_path, monkeypatch):
    """Under autogroup scheduling nice ranks only within a session: a session leader lowers its group."""
    group = tmp_path / "autogroup"
    group.write_text("/autogroup-7 nice 0\n")
    monkeypatch.setattr(os, "getsid", lambda pid: 1234)
    monkeypatch.setattr(os, "getpid", lambda: 99)  # started from a shell: its session is the shell's
    assert "setsid" in runner_mod.lower_session_priority(19, group)
    assert group.read_text() == "/autogroup-7 nice 0\n"
    monkeypatch.setattr(os, "getpid", lambda: 1234)  # started under setsid: its own session
    assert runner_mod.lower_session_priority(19, group) == "session autogroup at nice 19"
    assert group.read_text() == "19"
    assert runner_mod.lower_session_priority(19, tmp_path / "none") == "no autogroup to lower"
