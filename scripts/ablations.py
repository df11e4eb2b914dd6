"""Issue 13's runs: the full-schedule Fashion-MNIST runs and the paper's ablations (command line).

Every run of the issue is a ``Run`` of the grid (``ablation/grid.py``: ``FULL_CONFIGS``,
``LONG_CONFIGS`` (the same at 60 epochs) and ``ABLATION_CONFIGS``, each queue with its one
``Budget``; ``COMPARISONS`` groups them). The runner (``ablation/runner.py``) trains them with
``parnet train`` (any python and PYTHONPATH, e.g. a frozen copy of the code), ``--jobs`` runs at
a time (one per core), each into ``ROOT/<config>-seed<k>/``, and is resumable:

* a run with ``results.json`` is finished and skipped;
* a run with a checkpoint (``last_state.pt``) continues with ``--resume``;
* every invocation trains at most one piece of epochs (``--stop-after``); after each piece the
  table and the plot are written again (every epoch also checkpoints, so a stop loses at most the
  epoch in progress);
* a folder left without a checkpoint (killed in its first epoch) is moved aside (``*.stale-<time>``);
* a folder that another process is training into (its ``parnet train`` command line names it) is
  left alone, so that a run started by hand is neither trained twice nor moved.

The report (``ablation/report.py``) writes ``ROOT/TABLE.md`` and ``ROOT/ablations.png``.

Usage (with the venv python; ``parnet`` must import, for the parameter counts)::

    python scripts/ablations.py plan                     # every run: params, depth, MMACs, status
    python scripts/ablations.py run --queue ablations    # train what is not finished, in order
    python scripts/ablations.py run --queue full         # item 1, 30 epochs (--queue long: 60)
    python scripts/ablations.py report                   # table (TABLE.md) and plots from what finished

Why a script and not a ``parnet`` command: it drives the command line as a subprocess (so the
runs can use a frozen copy of the code while this file changes) and holds this project's own
experiment plan; it is not part of the library.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from ablation.grid import CONFIGS, DEFAULT_ROOT, QUEUES, Budget, measure_all, queue_runs, run_state
from ablation.report import write_report
from ablation.runner import Runner, Settings, lower_session_priority


def _budget(args: argparse.Namespace, queue: str) -> Budget:
    b = QUEUES[queue][1]
    overrides = {k: getattr(args, k) for k in ("epochs", "piece", "train_subset", "test_subset") if getattr(args, k)}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    return replace(b, **overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("plan", "run", "report"))
    p.add_argument("--queue", choices=tuple(QUEUES), default="ablations", help="which runs (run; plan shows all)")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the run folders go")
    p.add_argument("--python", default=sys.executable, help="python that runs `-m parnet` (e.g. the venv's)")
    p.add_argument("--pythonpath", default=None, help="PYTHONPATH for the training runs (a frozen copy's src)")
    # One thread per run: under load, 2 threads trained 8x slower (RESULTS.md); two queues fill both cores.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (one per free core)")
    p.add_argument("--nice", type=int, default=19)
    p.add_argument("--hours", type=float, default=0, help="start no new piece after this many hours (0: no limit)")
    p.add_argument("--no-depth", action="store_true", help="skip measuring depths (faster plan)")
    # Budget overrides: for a smoke test into a scratch --root only (they change the runs).
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--piece", type=int, default=0)
    p.add_argument("--train-subset", type=int, default=0)
    p.add_argument("--test-subset", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--only", nargs="*", default=None, metavar="CONFIG", help="run only these configs (run)")
    args = p.parse_args(argv)
    unknown = set(args.only or ()) - set(CONFIGS)
    if unknown:
        p.error(f"--only: unknown configs {sorted(unknown)}; the grid has {', '.join(CONFIGS)}")
    if (args.epochs or args.train_subset or args.test_subset) and args.root.resolve() == DEFAULT_ROOT.resolve():
        p.error("--epochs/--train-subset/--test-subset change the runs: use them with a scratch --root only")

    all_runs = [r for q in QUEUES for r in queue_runs(q, _budget(args, q))]
    measured = measure_all(CONFIGS.values(), depth=not args.no_depth)
    if args.action == "plan":
        for r in all_runs:
            print(f"{r.queue:9s} {r.name:28s} {run_state(args.root / r.name, r.budget.epochs)}")
        return 0
    if args.action == "report":
        write_report(args.root, measured, all_runs)
        print(f"wrote {args.root / 'TABLE.md'} and {args.root / 'ablations.png'}")
        return 0
    settings = Settings(args.root, args.python, args.pythonpath, args.threads, args.workers, args.nice,
                        time.time() + args.hours * 3600 if args.hours else None)  # fmt: skip
    lock = args.root / f".{args.queue}.lock"
    args.root.mkdir(parents=True, exist_ok=True)
    if lock.is_file():
        pid = int(lock.read_text().strip() or 0)
        if pid and Path(f"/proc/{pid}").exists():
            raise SystemExit(f"queue {args.queue} is already being run by process {pid} ({lock})")
    lock.write_text(str(os.getpid()))
    runner = Runner(settings, log=lambda m: print(m, flush=True), jobs=max(1, args.jobs))
    runner.log(lower_session_priority(args.nice))
    signal.signal(signal.SIGTERM, runner.stop)
    signal.signal(signal.SIGINT, runner.stop)
    try:
        runs = [
            r for r in queue_runs(args.queue, _budget(args, args.queue)) if not args.only or r.config.name in args.only
        ]
        runner.run(runs, report=lambda: write_report(args.root, measured, all_runs))
    finally:
        lock.unlink(missing_ok=True)
    write_report(args.root, measured, all_runs)
    return 130 if runner.stopping else 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
