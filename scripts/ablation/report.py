"""The report: TABLE.md (mean and spread over seeds per comparison) and ablations.png, from the run folders."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parnet.io import atomic_write

from .grid import COMPARISONS, CONFIGS, FULL_TRAIN_SET, SCHEDULE_QUEUES, Budget, Run, read_rows, run_state


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
    ema_curve: list[float] = field(default_factory=list)


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
    ema_curve = [r["ema_top1"] for r in rows if r.get("ema_top1") is not None]
    if (out / "results.json").is_file():
        res = json.loads((out / "results.json").read_text())
        return Outcome(
            run, True, res["epochs_done"], res.get("test_top1"), res.get("ema_top1"), res.get("params"),
            res.get("depth"), amp, res.get("train_seconds"), res.get("train_images_per_s"), curve, ema_curve,
        )  # fmt: skip
    last = rows[-1]
    seconds = sum(r.get("epoch_seconds", 0.0) for r in rows)
    images = sum(r.get("images_per_s", 0.0) * r.get("epoch_seconds", 0.0) for r in rows)
    return Outcome(run, False, len(rows), last.get("test_top1"), last.get("ema_top1"), amp=amp,
                   train_seconds=seconds, images_per_s=images / seconds if seconds else None, curve=curve,
                   ema_curve=ema_curve)  # fmt: skip


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
    outcomes = {run.name: read_outcome(run, root) for run in runs}  # each run folder read once
    by_config: dict[str, list[Outcome]] = {}
    for run in runs:
        if (o := outcomes[run.name]) is not None:
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
    lines += [
        "### Runs",
        "",
        "Training time: the wall time of the epochs done, added up over every resumed piece (an epoch cut "
        "off when a piece is stopped is trained again and counted once), on whatever machine and load each "
        "piece had, and including any time a run was paused (SIGSTOP) for a benchmark; images/s: their "
        "training images over that time.",
        "",
        "| run | state | epochs done | training time | images/s |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        state = run_state(root / run.name, run.budget.epochs)
        o = outcomes[run.name]
        hours = f"{o.train_seconds / 3600:.1f} h" if o and o.train_seconds else "-"
        lines.append(
            f"| {run.name} | {state} | {len(read_rows(root / run.name))}/{run.budget.epochs} | {hours} | "
            f"{_fmt(o.images_per_s if o else None, 0)} |"
        )
    return "\n".join(lines)


def _plot_ablation_curves(ax: Any, outcomes: list[Outcome]) -> None:
    """Test top-1 per epoch of the short-budget runs: one colour per config, one line style per seed."""
    configs = list(dict.fromkeys(o.run.config.name for o in outcomes))
    styles = ("-", "--", ":", "-.")
    for o in outcomes:
        label = o.run.name + ("" if o.finished else " (unfinished)")
        color = f"C{configs.index(o.run.config.name) % 10}"
        ax.plot(range(1, len(o.curve) + 1), o.curve, styles[o.run.seed % len(styles)], color=color, label=label)
    ax.set(title="ablations: test top-1 per epoch", xlabel="epoch")
    ax.grid(alpha=0.3)
    if outcomes:
        ax.legend(fontsize=5, ncol=2)
        finals = [v for o in outcomes for v in o.curve[-1:]]
        ax.set_ylim(min(finals) - 5, max(finals) + 1)


def _plot_full_curves(ax: Any, outcomes: list[Outcome]) -> None:
    """Test top-1 per epoch of the full-schedule runs, raw weights solid and EMA weights dashed."""
    for i, o in enumerate(outcomes):
        state = "" if o.finished else f" (training, {o.epochs_done}/{o.run.budget.epochs})"
        ax.plot(range(1, len(o.curve) + 1), o.curve, "-", color=f"C{i}", label=o.run.config.name + state)
        ax.plot(range(1, len(o.ema_curve) + 1), o.ema_curve, "--", color=f"C{i}")
    ax.set(title="full schedule: test top-1 per epoch (dashed: EMA)", xlabel="epoch")
    ax.grid(alpha=0.3)
    if outcomes:
        ax.legend(fontsize=6)
        values = [v for o in outcomes for v in (*o.curve, *o.ema_curve)]
        ax.set_ylim(max(min(values), max(values) - 15) - 0.5, max(values) + 0.5)


def plot(root: Path, runs: list[Run], output: Path) -> Path:
    """Bars (mean over finished seeds, each seed a dot; unfinished runs hollow) per comparison, and the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outcomes = [o for o in (read_outcome(r, root) for r in runs) if o is not None]
    cols = math.ceil((len(COMPARISONS) + 2) / 2)
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
    for ax in axes[len(COMPARISONS) + 2 :]:
        ax.axis("off")
    _plot_ablation_curves(axes[len(COMPARISONS)], [o for o in outcomes if o.run.queue not in SCHEDULE_QUEUES])
    _plot_full_curves(axes[len(COMPARISONS) + 1], [o for o in outcomes if o.run.queue in SCHEDULE_QUEUES])
    fig.suptitle(
        "Fashion-MNIST test top-1. Bars: mean of finished seeds; filled dots: finished seeds; hollow: unfinished"
    )
    fig.tight_layout()
    try:
        with atomic_write(output) as tmp:  # a unique temporary: two reports at once cannot mix their files
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)
    return output


def write_report(root: Path, measured: dict[str, dict[str, Any]], runs: list[Run]) -> None:
    with atomic_write(root / "TABLE.md") as tmp:
        tmp.write_text(table(root, measured, runs) + "\n")
    plot(root, runs, root / "ablations.png")
