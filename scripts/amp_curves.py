"""Training curves of runs that differ only in precision (bf16 autocast against fp32), side by side.

    PYTHONPATH=src python scripts/amp_curves.py bf16=results/ablations/base-seed0 \
        fp32=results/amp/base-fp32-seed0 --out results/amp/curves.png

Reads each run folder's ``metrics.csv`` (written by ``parnet train``), plots train loss, test top-1 and
EMA top-1 per epoch on one figure, and prints a markdown table of the epochs both runs finished with
the differences (first run minus second).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from parnet.checkpoint import METRICS_TABLE_FILE  # noqa: E402
from parnet.io import atomic_write  # noqa: E402

COLUMNS = (("train_loss", "train loss"), ("test_top1", "test top-1 (%)"), ("ema_top1", "EMA test top-1 (%)"))


def read_metrics(run: Path) -> list[dict[str, float]]:
    path = run / METRICS_TABLE_FILE
    if not path.is_file():
        raise SystemExit(f"{run} has no {METRICS_TABLE_FILE}: give `parnet train` run folders")
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def shared_columns(rows: list[list[dict[str, float]]]) -> list[tuple[str, str]]:
    """The columns both runs have at every epoch (a run trained with --no-ema has no EMA column)."""
    return [(key, name) for key, name in COLUMNS if all(key in row for metrics in rows for row in metrics)]


def table(labels: list[str], rows: list[list[dict[str, float]]]) -> str:
    (a, b), (ra, rb) = labels, rows
    columns = shared_columns(rows)
    head = "| epoch | " + " | ".join(f"{name} {a} | {name} {b} | diff" for _, name in columns) + " |"
    lines = [head, "|" + "---:|" * (1 + 3 * len(columns))]
    for x, y in zip(ra, rb):
        cells = [str(int(x["epoch"]) + 1)]
        for key, _ in columns:
            cells += [f"{x[key]:.4g}", f"{y[key]:.4g}", f"{x[key] - y[key]:+.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs=2, metavar="LABEL=RUN_DIR", help="two run folders, each with a label")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    labels, rows = [], []
    for item in args.runs:
        label, sep, run = item.partition("=")
        if not sep or not run:
            raise SystemExit(f"give LABEL=RUN_DIR, got {item!r}")
        labels.append(label)
        rows.append(read_metrics(Path(run)))
    columns = shared_columns(rows)
    if not columns:
        raise SystemExit(f"the two runs share none of the columns {', '.join(k for k, _ in COLUMNS)}")
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.4), squeeze=False)
    axes = axes[0]
    for ax, (key, name) in zip(axes, columns):
        for label, metrics, style in zip(labels, rows, ("-o", "--s")):
            ax.plot([m["epoch"] + 1 for m in metrics], [m[key] for m in metrics], style, label=label, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_write(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(table(labels, rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
