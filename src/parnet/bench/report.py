"""What a benchmark's records say: the best mode per model, the targets, the markdown table, the plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_write
from .run import Record, is_parnet_model

# Issue 4's targets: the best CPU mode of ParNet-S against the baselines' best modes.
LATENCY_TARGET = 0.95  # ParNet-S batch-1 latency at most this times ResNet-34's
THROUGHPUT_TARGET = 1.2  # ParNet-S large-batch throughput at least this times ResNet-50's


def best(
    records: Sequence[Record], model: str, batch: int, device: str, precision: str | None = "fp32"
) -> Record | None:
    """The fastest mode of ``model`` at ``batch`` on ``device`` in ``precision`` (``None``: any), lowest median."""
    rows = [
        r for r in records
        if r.model == model and r.batch == batch and r.device == device and precision in (None, r.precision)
    ]  # fmt: skip
    return min(rows, key=lambda r: r.median_ms) if rows else None


def check_targets(records: Sequence[Record], parnet: str, large_batch: int) -> list[dict]:
    """Issue 4's CPU targets for ``parnet``'s best mode; empty when a needed baseline is missing."""
    out = []
    for device in sorted({r.device for r in records}):
        p1, r34 = best(records, parnet, 1, device), best(records, "resnet34", 1, device)
        if p1 and r34:
            ratio = p1.median_ms / r34.median_ms
            out.append(
                dict(
                    device=device,
                    target=f"{parnet} batch-1 latency <= {LATENCY_TARGET} x resnet34 (best modes)",
                    parnet_mode=p1.mode,
                    baseline_mode=r34.mode,
                    ratio=ratio,
                    met=ratio <= LATENCY_TARGET,
                )
            )
        pb, r50 = best(records, parnet, large_batch, device), best(records, "resnet50", large_batch, device)
        if pb and r50 and large_batch != 1:
            ratio = pb.throughput_img_s / r50.throughput_img_s
            out.append(
                dict(
                    device=device,
                    target=f"{parnet} batch-{large_batch} throughput >= {THROUGHPUT_TARGET} x resnet50 (best modes)",
                    parnet_mode=pb.mode,
                    baseline_mode=r50.mode,
                    ratio=ratio,
                    met=ratio >= THROUGHPUT_TARGET,
                )
            )
    return out


def format_markdown(records: Sequence[Record], targets: Sequence[dict] = ()) -> str:
    """Markdown: every (model, mode) with latency and throughput side by side, then the best modes."""
    batches = sorted({r.batch for r in records})
    lines = []
    for device in sorted({r.device for r in records}):
        head = "| model | mode | depth | paper top-1 | params (M) |"
        sep = "| --- | --- | ---: | ---: | ---: |"
        for b in batches:
            head += f" batch {b}: median ms [p25-p75] | batch {b}: img/s |"
            sep += " ---: | ---: |"
        lines += [
            f"**{device}**",
            "",
            head + " max abs diff (relative) | GFLOP/s, batch " + str(batches[-1]) + " (fraction of peak) |",
            sep + " ---: | ---: |",
        ]
        keys = list(dict.fromkeys((r.model, r.mode) for r in records if r.device == device))
        for model, mode in keys:
            rows = {r.batch: r for r in records if r.device == device and r.model == model and r.mode == mode}
            any_row = next(iter(rows.values()))
            cells = [
                model,
                mode,
                str(any_row.depth or ""),
                f"{any_row.paper_top1:.2f}" if any_row.paper_top1 else "",
                f"{any_row.params_m:.1f}" if any_row.params_m is not None else "",
            ]
            for b in batches:
                r = rows.get(b)
                cells += (
                    [f"{r.median_ms:.1f} [{r.p25_ms:.1f}-{r.p75_ms:.1f}]", f"{r.throughput_img_s:.1f}"]
                    if r
                    else ["", ""]
                )
            diff = max(r.max_abs_diff for r in rows.values())
            cells.append(f"{diff:.1e} ({max(r.max_rel_diff for r in rows.values()):.0e})")
            last = rows.get(batches[-1])
            rate = last.achieved_gflops if last else None
            frac = f" ({last.peak_fraction:.0%})" if last and last.peak_fraction is not None else ""
            cells.append(f"{rate:.0f}{frac}" if rate is not None else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Best mode per model and precision ({device}):", ""]
        lines += ["| model | precision | " + " | ".join(f"batch {b}: best mode, median ms, img/s" for b in batches)]
        lines[-1] += " |"
        lines += ["| --- | --- |" + " --- |" * len(batches)]
        precisions = [p for p in ("fp32", "bf16", "int8") if any(r.precision == p for r in records)]
        for model in dict.fromkeys(r.model for r in records if r.device == device):
            for precision in precisions:
                cells = [model, precision]
                for b in batches:
                    r = best(records, model, b, device, precision)
                    cells.append(f"{r.mode}, {r.median_ms:.1f}, {r.throughput_img_s:.1f}" if r else "")
                if any(cells[2:]):
                    lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for t in targets:
        verdict = "MET" if t["met"] else "MISSED"
        lines.append(
            f"- target ({t['device']}) {t['target']}: {verdict} (ratio {t['ratio']:.3f}; "
            f"ParNet {t['parnet_mode']}, baseline {t['baseline_mode']})"
        )
    return "\n".join(lines) + "\n"


def plot_results(records: Sequence[Record], path: str | os.PathLike, device: str = "cpu") -> Path | None:
    """Batch-1 latency (best mode) against depth, and paper top-1 against it; PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for model in dict.fromkeys(r.model for r in records if r.device == device):
        r = best(records, model, 1, device)
        if r is not None:
            points.append((model, r))
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, r in points:
        color = "tab:red" if is_parnet_model(model) else "tab:blue"
        if r.depth is not None:
            axes[0].scatter(r.depth, r.median_ms, color=color)
            axes[0].annotate(f"{model}\n({r.mode})", (r.depth, r.median_ms), fontsize=7)
        if r.paper_top1 is not None:
            axes[1].scatter(r.median_ms, r.paper_top1, color=color)
            axes[1].annotate(model, (r.median_ms, r.paper_top1), fontsize=7)
    axes[0].set(xlabel="depth (layers)", ylabel="batch-1 latency, best mode (ms)", title="latency vs depth")
    axes[1].set(
        xlabel="batch-1 latency, best mode (ms)", ylabel="ImageNet top-1 (paper, %)", title="accuracy vs latency"
    )
    res, thr = points[0][1].resolution, points[0][1].threads
    fig.suptitle(f"{device}, {thr} threads, {res}x{res}; red: ParNet, blue: deep baselines", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)
