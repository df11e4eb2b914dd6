"""Issue 13's grid: the full-schedule Fashion-MNIST runs and the paper's ablations, as data.

Every run of the issue is a :class:`Run` built from the tables below (``FULL_CONFIGS`` and
``ABLATION_CONFIGS``, each queue with its one :class:`Budget`; ``COMPARISONS`` groups them). The
runner trains them with ``parnet train`` (any python and PYTHONPATH, e.g. a frozen copy of the code),
``--jobs`` runs at a time (one per core), each into ``ROOT/<config>-seed<k>/``, and is resumable:

* a run with ``results.json`` is finished and skipped;
* a run with a checkpoint (``last_state.pt``) continues with ``--resume``;
* every invocation trains at most one piece of epochs (``--stop-after``); after each piece the
  table and the plot are written again (every epoch also checkpoints, so a stop loses at most the
  epoch in progress);
* a folder left without a checkpoint (killed in its first epoch) is moved aside (``*.stale-<time>``);
* a folder that another process is training into (its ``parnet train`` command line names it) is
  left alone, so that a run started by hand is neither trained twice nor moved.

Usage (with the venv python; ``parnet`` must import, for the parameter counts)::

    python scripts/ablations.py plan                     # every run: params, depth, MMACs, status
    python scripts/ablations.py run --queue ablations    # train what is not finished, in order
    python scripts/ablations.py run --queue full
    python scripts/ablations.py report                   # table (TABLE.md) and plots from what finished

Why a script and not a ``parnet`` command: it drives the command line as a subprocess (so the
runs can use a frozen copy of the code while this file changes) and holds this project's own
experiment plan; it is not part of the library.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO / "results" / "ablations"
DATASET = "fashion_mnist"
IN_CHANS, NUM_CLASSES, IMG_SIZE = 1, 10, 32  # Fashion-MNIST padded to 32x32 by parnet.data
FULL_TRAIN_SET = 60000
MATCH_TOLERANCE = 0.05  # configs of one matched comparison differ by at most 5% in parameters


@dataclass(frozen=True)
class Config:
    """One architecture of the grid: a timm model name and its keyword arguments."""

    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # what the table calls it
    depth: int | None = None  # the depth it is designed to have (checked with parnet.network_depth)

    def __hash__(self) -> int:
        return hash(self.name)


@dataclass(frozen=True)
class Comparison:
    """Configs compared with each other; ``matched``: their parameters must agree within 5%."""

    name: str
    configs: tuple[str, ...]
    matched: bool
    question: str
    paper: str = ""  # the paper's own figures for this comparison, where ARCHITECTURE.md gives them


@dataclass(frozen=True)
class Budget:
    """The training recipe and budget shared by every run of one queue (the same for all its configs)."""

    epochs: int
    amp: str  # "off" (fp32) or "bf16"; one precision for every run of a queue
    warmup_epochs: float
    seeds: tuple[int, ...]
    piece: int  # epochs per invocation (--stop-after)
    train_subset: int = 0
    test_subset: int = 0


@dataclass(frozen=True)
class Run:
    queue: str
    config: Config
    seed: int
    budget: Budget

    @property
    def name(self) -> str:
        return f"{self.config.name}-seed{self.seed}"

    def train_args(self, output: Path, threads: int, workers: int) -> list[str]:
        """The ``parnet train`` arguments of this run (the same for a new run and a resumed one)."""
        b = self.budget
        args = ["--dataset", DATASET, "--model", self.config.model]
        if self.config.kwargs:
            args += [
                "--model-kwargs",
                *(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in self.config.kwargs.items()),
            ]
        args += ["--epochs", str(b.epochs), "--batch-size", "128", "--lr", "0.1"]
        args += ["--warmup-epochs", str(b.warmup_epochs), "--seed", str(self.seed), "--amp", b.amp]
        args += ["--threads", str(threads), "--workers", str(workers)]
        if b.train_subset:
            args += ["--train-subset", str(b.train_subset)]
        if b.test_subset:
            args += ["--test-subset", str(b.test_subset)]
        return args + ["--no-progress", "--output", str(output)]


# -- the grid ------------------------------------------------------------------------------------

# Item 1: the full schedule. parnet_cifar_s (1.45 M, depth 12) against ResNet-20 and ResNet-56 with the
# same recipe and budget: the dataset's default schedule (30 epochs, 2 of warm-up), bf16 autocast.
FULL_CONFIGS = (
    Config("full-parnet_cifar_s", "parnet_cifar_s", {}, "ParNet parnet_cifar_s", 12),
    Config("full-resnet20", "resnet20_cifar", {}, "ResNet-20", 20),
    Config("full-resnet56", "resnet56_cifar", {}, "ResNet-56", 56),
)
FULL_BUDGET = Budget(epochs=30, amp="bf16", warmup_epochs=2, seeds=(0,), piece=1)

# Item 2: the ablations, around a small base ParNet (3 streams 8/16/32, head 128, SiLU, SSE gate: 0.149 M,
# depth 12). Small so that the whole grid fits in a few sessions of a shared 2-core CPU, yet with
# the paper's structure: every stream and block is there, only narrower.
_BASE = dict(widths=[8, 16, 32], head_width=128, stem_width=8)


def _parnet(name: str, label: str, depth: int, **changes: Any) -> Config:
    """A small ParNet: the base with ``changes`` (same head and stem widths everywhere)."""
    return Config(name, "parnet_cifar_s", {**_BASE, **changes}, label, depth)


ABLATION_CONFIGS = (
    _parnet("base", "3 streams (base)", 12),
    _parnet("no_sse", "SSE gate off", 12, use_gate=False),
    _parnet("relu", "ReLU instead of SiLU", 12, act="relu"),
    _parnet("deep24", "ParNet depth 24, narrower", 24, widths=[6, 10, 20], blocks=[16, 17, 17]),
    _parnet("streams2", "2 streams", 12, widths=[16, 30], blocks=[6, 6]),
    _parnet("streams1", "1 stream", 12, widths=[33], blocks=[8]),
    Config("resnet20n", "resnet20_cifar", dict(widths=[12, 24, 47]), "ResNet-20, narrower", 20),
)
# 10 epochs on the first 20,000 training images (a third of the set), scored on the full 10k test set, bf16
# autocast (measured 1.35x faster than fp32 on this CPU's native bf16, one thread): about 11 CPU-hours for
# the 14 runs on the shared 2-core machine, where the full 60k would take about 30.
ABLATION_BUDGET = Budget(epochs=10, amp="bf16", warmup_epochs=0.5, seeds=(0, 1), piece=2, train_subset=20000)

_RESNET34 = (
    "ImageNet, Table 1 (ARCHITECTURE.md): ParNet-S, depth 12, 19.2 M fused: 75.19; ResNet34, depth 34, 21.8 M: 74.12"
)
COMPARISONS = (
    Comparison("streams", ("streams1", "streams2", "base"), True, "1, 2 or 3 streams at matched parameters, depth 12"),
    Comparison("sse", ("base", "no_sse"), False, "the SSE gate on and off (off drops the gates' parameters)"),
    Comparison("activation", ("base", "relu"), True, "SiLU against ReLU"),
    Comparison("depth", ("base", "deep24", "resnet20n"), True, "depth 12 against deeper, narrower networks",
               paper=_RESNET34),
    Comparison("full", tuple(c.name for c in FULL_CONFIGS), False, "item 1: the full schedule, same recipe and budget"),
)  # fmt: skip

QUEUES = {"ablations": (ABLATION_CONFIGS, ABLATION_BUDGET), "full": (FULL_CONFIGS, FULL_BUDGET)}
CONFIGS = {c.name: c for c in (*ABLATION_CONFIGS, *FULL_CONFIGS)}


def queue_runs(queue: str, budget: Budget | None = None) -> list[Run]:
    """The runs of a queue in the order they train: every config's first seed before any second seed."""
    configs, default = QUEUES[queue]
    budget = budget or default
    return [Run(queue, c, seed, budget) for seed in budget.seeds for c in configs]


# -- measuring the configs -----------------------------------------------------------------------


def measure(config: Config, depth: bool = True) -> dict[str, Any]:
    """Parameters (training form), MMACs per 32x32 image and the measured depth of a config."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import parnet.baselines  # noqa: F401 - registers resnet20_cifar/resnet56_cifar with timm
    from parnet import network_depth

    model = timm.create_model(config.model, num_classes=NUM_CLASSES, in_chans=IN_CHANS, **config.kwargs).eval()
    x = torch.randn(1, IN_CHANS, IMG_SIZE, IMG_SIZE)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    out = {"params": sum(p.numel() for p in model.parameters()), "mmacs": counter.get_total_flops() / 2e6}
    if depth:
        out["depth"] = network_depth(model, x)
    return out


def check_matching(params: dict[str, int], comparisons=COMPARISONS, tolerance: float = MATCH_TOLERANCE) -> list[str]:
    """Problems with the matched comparisons: configs whose parameters differ by more than ``tolerance``."""
    problems = []
    for comp in comparisons:
        if not comp.matched:
            continue
        counts = [params[c] for c in comp.configs]
        spread = (max(counts) - min(counts)) / min(counts)
        if spread > tolerance:
            detail = ", ".join(f"{c} {params[c] / 1e6:.4f} M" for c in comp.configs)
            problems.append(f"{comp.name}: parameters differ by {spread:.1%} (> {tolerance:.0%}): {detail}")
    return problems


# -- the state of a run folder -------------------------------------------------------------------


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_state(run_dir: Path, epochs: int) -> str:
    """What to do with a run folder.

    ``done`` (results.json), ``resume`` (a checkpoint), ``new`` (nothing), ``no-checkpoint`` (files but no
    checkpoint) or ``no-results`` (every epoch trained, but no results.json: killed in the final evaluation).
    """
    if (run_dir / "results.json").is_file():
        return "done"
    if (run_dir / "last_state.pt").is_file():
        return "no-results" if len(read_rows(run_dir)) >= epochs else "resume"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "no-checkpoint"  # in its first epoch, or stopped there
    return "new"


def trained_elsewhere(run_dir: Path, own: set[int] = frozenset()) -> bool:
    """Whether a process (not one of ``own``) is running ``parnet train`` with ``--output run_dir``.

    Read from ``/proc`` (Linux), because the frozen training code the runs use predates the run
    folder's lock file.
    """
    target = str(run_dir.resolve())
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) in own:
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if "train" in args and "--output" in args[:-1]:
            out = args[args.index("--output") + 1]
            cwd = proc / "cwd"
            try:
                path = Path(out) if Path(out).is_absolute() else Path(os.readlink(cwd)) / out
            except OSError:
                continue
            if str(path.resolve()) == target:
                return True
    return False


# -- the runner ----------------------------------------------------------------------------------


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
            if state in ("done", "no-results"):
                continue
            if out.is_dir() and trained_elsewhere(out, own):
                continue
            if state == "no-checkpoint":  # nothing trains it: killed in its first epoch
                aside = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%dT%H%M%S')}")
                self.log(f"{out} holds files but no checkpoint: moved to {aside}")
                out.rename(aside)
            args = ["train", *run.train_args(out, self.s.threads, self.s.workers)]
            args += ["--stop-after", str(run.budget.piece)] + (["--resume"] if state == "resume" else [])
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
                report()

    def stop(self, *_: Any) -> None:
        """On SIGTERM/SIGINT: pass SIGINT to the training children (they keep their last checkpoint); no new piece."""
        self.stopping = True
        for piece in self.pieces.values():
            if piece.process.poll() is None:
                piece.process.send_signal(signal.SIGINT)


# -- the table and the plots ---------------------------------------------------------------------


@dataclass
class Outcome:
    """What a run folder says: final results, or the last epoch of an unfinished run."""

    run: Run
    finished: bool
    epochs_done: int
    top1: float | None
    ema_top1: float | None
    params: int | None = None
    depth: int | None = None
    amp: str | None = None
    train_seconds: float | None = None
    images_per_s: float | None = None
    curve: list[float] = field(default_factory=list)


def read_outcome(run: Run, root: Path) -> Outcome | None:
    out = root / run.name
    rows = read_rows(out)
    if not rows:
        return None
    amp = None
    if (out / "config.yaml").is_file():
        import yaml

        amp = (yaml.safe_load((out / "config.yaml").read_text()) or {}).get("amp")
    curve = [r["test_top1"] for r in rows]
    if (out / "results.json").is_file():
        res = json.loads((out / "results.json").read_text())
        return Outcome(
            run, True, res["epochs_done"], res.get("test_top1"), res.get("ema_top1"), res.get("params"),
            res.get("depth"), amp, res.get("train_seconds"), res.get("train_images_per_s"), curve,
        )  # fmt: skip
    last = rows[-1]
    seconds = sum(r.get("epoch_seconds", 0.0) for r in rows)
    return Outcome(run, False, len(rows), last.get("test_top1"), last.get("ema_top1"), amp=amp,
                   train_seconds=seconds, images_per_s=last.get("images_per_s"), curve=curve)  # fmt: skip


def summarize(values: list[float]) -> tuple[float, float] | None:
    """Mean and spread (max - min) of the seeds' values."""
    if not values:
        return None
    return statistics.fmean(values), max(values) - min(values)


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def config_cell(outcomes: list[Outcome], key: str) -> str:
    """A table cell: mean and spread of the finished seeds, and each unfinished one marked."""
    done = [getattr(o, key) for o in outcomes if o.finished and getattr(o, key) is not None]
    parts = []
    stats = summarize(done)
    if stats:
        mean, spread = stats
        parts.append(f"**{mean:.2f}**" + (f" ± {spread / 2:.2f}" if len(done) > 1 else "") + f" (n={len(done)})")
    for o in outcomes:
        if not o.finished:
            parts.append(f"_{_fmt(getattr(o, key))} at epoch {o.epochs_done}/{o.run.budget.epochs}, unfinished_")
    return "; ".join(parts) or "-"


def _budget_cell(budget: Budget | None) -> str:
    if budget is None:
        return "-"
    return f"{budget.epochs} x {budget.train_subset or FULL_TRAIN_SET}"


def table(root: Path, measured: dict[str, dict[str, Any]], runs: list[Run]) -> str:
    """The markdown table of every comparison from what the run folders hold."""
    by_config: dict[str, list[Outcome]] = {}
    for run in runs:
        o = read_outcome(run, root)
        if o is not None:
            by_config.setdefault(run.config.name, []).append(o)
    lines = [
        "Top-1 in percent on the Fashion-MNIST test set: **mean** ± half the spread between seeds (max - min) / 2, "
        "n = finished seeds; unfinished runs in italics with their last epoch. Params (training form) and MMACs "
        "per 32x32 image from timm.create_model, depth from parnet.network_depth.",
        "",
    ]
    for comp in COMPARISONS:
        lines += [f"### {comp.name}: {comp.question}", ""]
        if comp.paper:
            lines += [f"Paper: {comp.paper}.", ""]
        lines += ["| config | params | MMACs | depth | epochs x images | precision | top-1 | top-1 EMA | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name in comp.configs:
            c, m = CONFIGS[name], measured.get(name, {})
            outs = by_config.get(name, [])
            seeds = ", ".join(f"{o.run.seed}: {_fmt(o.top1)}" + ("" if o.finished else "*") for o in outs) or "-"
            budget = next((r.budget for r in runs if r.config.name == name), None)
            amp = next((o.amp for o in outs if o.amp), budget.amp if budget else "-")
            params = f"{m['params'] / 1e6:.3f} M" if "params" in m else "-"
            lines.append(
                f"| {c.label} (`{name}`) | {params} | {_fmt(m.get('mmacs'), 1)} | {m.get('depth', c.depth)} | "
                f"{_budget_cell(budget)} | {'fp32' if amp == 'off' else amp} | "
                f"{config_cell(outs, 'top1')} | {config_cell(outs, 'ema_top1')} | {seeds} |"
            )
        lines.append("")
    lines += ["### Runs", "", "| run | state | epochs done |", "|---|---|---|"]
    for run in runs:
        state = run_state(root / run.name, run.budget.epochs)
        lines.append(f"| {run.name} | {state} | {len(read_rows(root / run.name))}/{run.budget.epochs} |")
    return "\n".join(lines)


def plot(root: Path, runs: list[Run], output: Path) -> Path:
    """Bars (mean over finished seeds, each seed a dot; unfinished runs hollow) per comparison, and curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = [o for o in (read_outcome(r, root) for r in runs) if o is not None]
    cols = math.ceil((len(COMPARISONS) + 1) / 2)
    fig, grid = plt.subplots(2, cols, figsize=(4.5 * cols, 8.5))
    axes = grid.flatten()
    for ax, comp in zip(axes, COMPARISONS):
        for i, name in enumerate(comp.configs):
            outs = [o for o in outcomes if o.run.config.name == name and o.top1 is not None]
            done = [o.top1 for o in outs if o.finished]
            if done:
                ax.bar(i, statistics.fmean(done), color="C0", alpha=0.6)
            for o in outs:
                ax.plot(i, o.top1, "o", color="k" if o.finished else "none", markeredgecolor="k")
        ax.set_xticks(range(len(comp.configs)), comp.configs, rotation=30, ha="right")
        ax.set_title(comp.name)
        ax.set_ylabel("test top-1 (%)")
        tops = [o.top1 for o in outcomes if o.run.config.name in comp.configs and o.top1 is not None]
        if tops:
            ax.set_ylim(min(tops) - 1.5, max(tops) + 1.0)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(COMPARISONS) + 1 :]:
        ax.axis("off")
    ax = axes[len(COMPARISONS)]
    for o in outcomes:
        style = "-" if o.finished else ":"
        ax.plot(range(1, len(o.curve) + 1), o.curve, style, label=o.run.name)
    ax.set(title="test top-1 per epoch (dotted: unfinished)", xlabel="epoch")
    ax.grid(alpha=0.3)
    if outcomes:
        ax.legend(fontsize=6)
        finals = [v for o in outcomes for v in o.curve[-1:]]
        ax.set_ylim(min(finals) - 5, max(finals) + 1)
    fig.suptitle(
        "Fashion-MNIST test top-1. Bars: mean of finished seeds; filled dots: finished seeds; hollow: unfinished"
    )
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    tmp.replace(output)
    return output


def write_report(root: Path, measured: dict[str, dict[str, Any]], runs: list[Run]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / "TABLE.md.tmp"
    tmp.write_text(table(root, measured, runs) + "\n")
    tmp.replace(root / "TABLE.md")
    plot(root, runs, root / "ablations.png")


# -- command line --------------------------------------------------------------------------------


def measure_all(configs, depth: bool = True, log=print) -> dict[str, dict[str, Any]]:
    measured = {}
    for c in configs:
        m = measured[c.name] = measure(c, depth)
        log(f"{c.name:22s} {c.model:16s} {m['params'] / 1e6:.4f} M  {m['mmacs']:7.1f} MMACs  depth {m.get('depth')}")
        if depth and c.depth is not None and m["depth"] != c.depth:
            raise SystemExit(f"{c.name}: measured depth {m['depth']}, designed {c.depth}: fix the grid")
    problems = check_matching({k: v["params"] for k, v in measured.items()})
    for p in problems:
        log(f"NOT MATCHED: {p}")
    if problems:
        raise SystemExit("parameters of a matched comparison differ by more than 5%: fix the widths")
    return measured


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
