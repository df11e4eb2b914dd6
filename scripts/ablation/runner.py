"""The runner: trains a queue's runs with ``parnet train`` subprocesses, piece by piece, resumably."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from parnet.checkpoint import LOCK_FILE

from .grid import DEFAULT_ROOT, Run, read_rows, run_state


def trained_elsewhere(run_dir: Path, own: set[int] = frozenset()) -> bool:
    """Whether another process (not one of ``own``) is training into ``run_dir``.

    Either it holds the run folder's lock (``parnet train`` since the lock file came), or its command
    line, read from ``/proc`` (Linux) and parsed as ``parnet`` parses it (so ``--output=DIR`` and
    ``--out DIR`` count), names ``run_dir`` as its output: the frozen training code the runs use
    predates the lock. A folder given only through ``--config`` or left to the default is not seen.
    """
    if _locked(run_dir / LOCK_FILE):
        return True
    target = str(run_dir.resolve())
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) in own:
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        out = _train_output(args)
        if out is not None and str((cwd / out).resolve()) == target:  # an absolute out replaces cwd
            return True
    return False


def _train_output(args: list[str]) -> str | None:
    """The ``--output`` of a ``parnet train`` command line (``python -m parnet train ...`` or ``parnet train``)."""
    from parnet.cli import build_parser

    starts = [i for i, a in enumerate(args[:-1]) if (a == "parnet" or a.endswith("/parnet")) and args[i + 1] == "train"]
    if not starts:
        return None
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # another program's odd flags are no error of ours
            known, _ = build_parser().parse_known_args(args[starts[0] + 1 :])
    except SystemExit:
        return None
    return getattr(known, "output", None)


def _locked(lock: Path) -> bool:
    """Whether another process holds an ``fcntl.flock`` on ``lock`` (a missing file: no)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


def lower_session_priority(nice: int, autogroup: Path = Path("/proc/self/autogroup")) -> str:
    """Give this session's scheduler autogroup the runs' ``nice`` value; say what was done.

    With Linux's autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``), a process's
    nice value ranks it only against processes of its own session: a queue started under ``setsid``
    at ``nice -n 19`` still takes half the CPU from any other busy session (measured here: the test
    suite beside two trainings ran no faster with two pytest workers than with one). Only a session
    leader changes its group, so that a runner started from an interactive shell does not lower
    the shell's whole session.
    """
    if nice <= 0 or not autogroup.is_file():
        return "no autogroup to lower"
    if os.getsid(0) != os.getpid():
        return f"not a session leader: start the runner under setsid for nice {nice} to hold against other sessions"
    try:
        autogroup.write_text(str(nice))
    except OSError as err:
        return f"could not lower the session's autogroup: {err}"
    return f"session autogroup at nice {nice}"


@dataclass
class Settings:
    root: Path = DEFAULT_ROOT
    python: str = sys.executable
    pythonpath: str | None = None  # e.g. a frozen checkout's src
    threads: int = 1
    workers: int = 1
    nice: int = 19
    deadline: float | None = None  # time.time() after which no new piece starts


@dataclass
class Piece:
    """One ``parnet train`` invocation in progress."""

    run: Run
    process: subprocess.Popen
    done_before: int  # epochs finished before it started
    logfile: IO[str]


class Runner:
    """Trains the runs of a queue piece by piece, ``jobs`` pieces at a time (:meth:`run`)."""

    def __init__(self, settings: Settings, log=print, jobs: int = 1):
        self.s = settings
        self.log = log
        self.jobs = jobs
        self.failed: set[str] = set()
        self.pieces: dict[str, Piece] = {}  # by run name: what this runner is training now
        self.stopping = False  # set by stop(): the current pieces end, no new one starts

    def command(self, *args: str) -> list[str]:
        prefix = ["nice", "-n", str(self.s.nice)] if self.s.nice else []
        return [*prefix, self.s.python, "-m", "parnet", *args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.s.pythonpath:
            env["PYTHONPATH"] = self.s.pythonpath
        return env

    def next_action(self, runs: list[Run]) -> tuple[Run, list[str]] | None:
        """The next run to train and its ``parnet train`` arguments, or ``None`` when nothing is left."""
        own = {os.getpid(), *(p.process.pid for p in self.pieces.values())}
        for run in runs:
            if run.name in self.failed or run.name in self.pieces:
                continue
            out = self.s.root / run.name
            state = run_state(out, run.budget.epochs)
            if state == "done":
                continue
            if out.is_dir() and trained_elsewhere(out, own):
                continue
            if state == "no-checkpoint":  # nothing trains it: killed in its first epoch
                aside = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}")
                self.log(f"{out} holds files but no checkpoint: moved to {aside}")
                out.rename(aside)
            args = ["train", *run.train_args(out, self.s.threads, self.s.workers)]
            # no-results (killed in the final evaluation): --resume writes the fused files and results.json
            resume = ["--resume"] if state in ("resume", "no-results") else []
            args += ["--stop-after", str(run.budget.piece), *resume]
            return run, args
        return None

    def start(self, runs: list[Run]) -> bool:
        """Start one piece of the first run that is neither finished nor being trained; ``False`` if none."""
        action = self.next_action(runs)
        if action is None:
            return False
        run, args = action
        out = self.s.root / run.name
        out.mkdir(parents=True, exist_ok=True)
        done_before = len(read_rows(out))
        self.log(f"{time.strftime('%H:%M:%S')} {run.name}: epochs {done_before + 1}.. of {run.budget.epochs}")
        logfile = open(out / "train.log", "a")  # closed in finish()
        logfile.write(f"$ {' '.join(self.command(*args))}\n")
        logfile.flush()
        process = subprocess.Popen(self.command(*args), env=self.env(), stdout=logfile, stderr=subprocess.STDOUT)
        self.pieces[run.name] = Piece(run, process, done_before, logfile)
        return True

    def finish(self, piece: Piece, rc: int) -> None:
        """What a piece's end means: finished, failed (skipped until the next start), or continue."""
        piece.logfile.close()
        del self.pieces[piece.run.name]
        run, out = piece.run, self.s.root / piece.run.name
        if self.stopping:
            self.log(f"{run.name}: stopped (exit status {rc}); continue by running the queue again")
        elif rc != 0:
            self.failed.add(run.name)
            self.log(f"{run.name}: parnet train exited with {rc}; skipped until the next start (see {out}/train.log)")
        elif (out / "results.json").is_file():
            subprocess.run(self.command("plot", str(out)), env=self.env(), capture_output=True)
            self.log(f"{run.name}: finished")
        elif len(read_rows(out)) <= piece.done_before:
            self.failed.add(run.name)
            self.log(f"{run.name}: no new epoch and no results.json; skipped (see {out}/train.log)")

    def run(self, runs: list[Run], report=None, poll_s: float = 2.0) -> None:
        """Keep ``jobs`` pieces running until nothing is left, the deadline passes or :meth:`stop` is called."""
        while True:
            late = bool(self.s.deadline and time.time() > self.s.deadline)
            while not self.stopping and not late and len(self.pieces) < self.jobs and self.start(runs):
                pass
            if not self.pieces:
                if late:
                    self.log("deadline reached: no new piece started")
                elif not self.stopping:
                    failed = f" (failed: {sorted(self.failed)})" if self.failed else ""
                    self.log(f"nothing left to run in this queue{failed}")
                return
            ended = [(p, p.process.poll()) for p in list(self.pieces.values())]
            ended = [(p, rc) for p, rc in ended if rc is not None]
            if not ended:
                time.sleep(poll_s)
                continue
            for piece, rc in ended:
                self.finish(piece, rc)
            if report:
                try:
                    report()
                except Exception as err:  # noqa: BLE001 - a failed table must not orphan the trainings
                    self.log(f"report failed ({type(err).__name__}: {err}); the queue goes on")

    def stop(self, *_: Any) -> None:
        """On SIGTERM/SIGINT: pass SIGINT to the training children (they keep their last checkpoint); no new piece."""
        self.stopping = True
        for piece in self.pieces.values():
            if piece.process.poll() is None:
                piece.process.send_signal(signal.SIGINT)
