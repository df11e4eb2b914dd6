"""A training run's learning curves: loss, accuracy and learning rate per epoch, drawn with matplotlib.

::

    from parnet.curves import plot
    plot("runs/demo")            # runs/demo/curves.png
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["plot"]


def plot(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Draw the learning curves of a run (loss, accuracy, learning rate per epoch) to ``output`` (default: the run's
    ``curves.png``), in the format its suffix names (``.png``, ``.svg``, ``.pdf``...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import read_metrics
    from .io import atomic_write, image_format

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a run folder: give the folder `parnet train --output` wrote")
    out = Path(output or run_dir / "curves.png")
    figure_format = image_format(out)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no epochs yet")
    epochs = [r["epoch"] + 1 for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, series("train_loss"), "o-", label="train")
    axes[0].plot(epochs, series("test_loss"), "o-", label="test")
    if "ema_loss" in rows[0]:
        axes[0].plot(epochs, series("ema_loss"), "o-", label="test (EMA)")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].plot(epochs, series("train_acc"), "o-", label="train (augmented)")
    axes[1].plot(epochs, series("test_top1"), "o-", label="test top-1")
    if "ema_top1" in rows[0]:
        axes[1].plot(epochs, series("ema_top1"), "o-", label="test top-1 (EMA)")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[2].plot(epochs, series("lr"), "o-")
    axes[2].set(title="learning rate (last step of the epoch)", xlabel="epoch")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    try:
        with atomic_write(out) as tmp:
            fig.savefig(tmp, format=figure_format, dpi=100)
    finally:  # a failed write must not leave the figure open in a library user's process
        plt.close(fig)
    return out
