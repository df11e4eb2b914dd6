"""Issue 13's grid as data: the configs, their budgets, the runs, and the state of a run folder.

``FULL_CONFIGS`` and ``ABLATION_CONFIGS`` are the two queues (each with its one :class:`Budget`);
``COMPARISONS`` groups configs into the tables of the report. Nothing here trains or plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
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

# Item 1 again, twice as long: the same three networks and recipe at 60 epochs, because 30 left every
# network short of 94.9% (RESULTS.md). The two slowest first, so that `--jobs 2` starts them together.
# In fp32: these runs span several sessions, and a session may get a CPU without native bf16, where bf16
# autocast is emulated (parnet_cifar_s, one thread, AVX2-only EPYC: 5 images/s against 62 in fp32).
LONG_CONFIGS = tuple(
    replace(c, name=c.name.replace("full-", "long-", 1)) for c in (FULL_CONFIGS[0], FULL_CONFIGS[2], FULL_CONFIGS[1])
)
LONG_BUDGET = replace(FULL_BUDGET, epochs=60, amp="off")

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
    _parnet("hardswish", "hard-swish instead of SiLU", 12, act="hardswish"),
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
    Comparison("activation", ("base", "relu", "hardswish"), True, "SiLU against ReLU and hard-swish"),
    Comparison("depth", ("base", "deep24", "resnet20n"), True, "depth 12 against deeper, narrower networks",
               paper=_RESNET34),
    Comparison("full", tuple(c.name for c in FULL_CONFIGS), False, "item 1: the full schedule, same recipe and budget"),
    Comparison("long", tuple(c.name for c in LONG_CONFIGS), False, "item 1 at 60 epochs, same recipe and budget"),
)  # fmt: skip

QUEUES = {
    "ablations": (ABLATION_CONFIGS, ABLATION_BUDGET),
    "full": (FULL_CONFIGS, FULL_BUDGET),
    "long": (LONG_CONFIGS, LONG_BUDGET),
}
CONFIGS = {c.name: c for c in (*ABLATION_CONFIGS, *FULL_CONFIGS, *LONG_CONFIGS)}
SCHEDULE_QUEUES = ("full", "long")  # item 1's queues: one network per run, not matched comparisons


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

    import parnet.baselines  # noqa: F401 - registers resnet20_cifar/resnet56_cifar with timm
    from parnet import network_depth
    from parnet.bench.machine import model_gflop

    model = timm.create_model(config.model, num_classes=NUM_CLASSES, in_chans=IN_CHANS, **config.kwargs).eval()
    mmacs = model_gflop(model, IN_CHANS, IMG_SIZE) * 1e3 / 2  # GFLOP counts 2 per multiply-add
    out = {"params": sum(p.numel() for p in model.parameters()), "mmacs": mmacs}
    if depth:
        out["depth"] = network_depth(model, torch.randn(1, IN_CHANS, IMG_SIZE, IMG_SIZE))
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
