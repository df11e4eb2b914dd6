"""What a benchmark's records say: the best mode per model, the targets, the markdown table, the plots."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write, image_format
from .run import Record, is_parnet_model

# Issue 4's targets: the best CPU mode of ParNet-S against the baselines' best modes.
LATENCY_TARGET = 0.95  # ParNet-S batch-1 latency at most this times ResNet-34's
THROUGHPUT_TARGET = 1.2  # ParNet-S large-batch throughput at least this times ResNet-50's
# Issue 14's low-precision targets for ParNet-S, each against its own best fp32 mode.
INT8_LATENCY_TARGET = 0.5  # int8 batch-1 latency at most this times fp32's
INT8_THROUGHPUT_TARGET = 2.5  # int8 large-batch throughput at least this times fp32's
OWN_FP32_TARGET = 1.2  # ParNet's own fp32 modes at least this much faster than every engine at batch 1
ENGINE_MODES = ("onnxruntime", "openvino")
# What the targets were set for: ParNet-S (the paper's or the released weights' network, unchanged) at 224x224
# on 2 threads, the bench's defaults (RESULTS.md measured them on 2 cores).
TARGET_MODELS = ("parnet_s", "parnet_s_official")
TARGET_RESOLUTION = 224
TARGET_THREADS = 2


def targets_skipped(models: Sequence[str], resolution: int, threads: int, model_kwargs: dict | None) -> str | None:
    """Why the targets do not apply to this run (``None``: they do): they are ParNet-S's at 224x224 on 2 threads,
    judged on the first model, so that no other network or setting is judged against them."""
    first = models[0] if models else None
    why = []
    if first not in TARGET_MODELS:
        why.append(f"the first model is {first}" if first else "no --models")
    if model_kwargs:
        why.append("--model-kwargs makes it another network than the paper's")
    if resolution != TARGET_RESOLUTION:
        why.append(f"{resolution}x{resolution}")
    if threads != TARGET_THREADS:
        why.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if not why:
        return None
    return (
        f"no targets checked: they are ParNet-S's ({' or '.join(TARGET_MODELS)} first in --models) at "
        f"{TARGET_RESOLUTION}x{TARGET_RESOLUTION} on {TARGET_THREADS} threads (here: {'; '.join(why)})"
    )


def mode_label(record: Record) -> str:
    """A record's mode as the tables show it: ``auto`` with the mode it chose, e.g. ``auto (packed)``."""
    return f"{record.mode} ({record.chosen_mode})" if record.chosen_mode else record.mode


def best(
    records: Sequence[Record], model: str, batch: int, device: str, precision: str | None = "fp32",
    engines: bool | None = None,
) -> Record | None:  # fmt: skip
    """The fastest mode of ``model`` at ``batch`` on ``device`` in ``precision`` (``None``: any), lowest median.

    ``engines``: ``True`` only ONNX Runtime / OpenVINO modes, ``False`` only the others, ``None`` both.
    """
    rows = [
        r for r in records
        if r.model == model and r.batch == batch and r.device == device and precision in (None, r.precision)
        and engines in (None, r.mode.split(":")[-1] in ENGINE_MODES)
    ]  # fmt: skip
    return min(rows, key=lambda r: r.median_ms) if rows else None


def _speedup(slow: Record | None, fast: Record | None) -> float | None:
    return slow.median_ms / fast.median_ms if slow and fast else None


def check_targets(
    records: Sequence[Record], parnet: str, large_batch: int, peaks: dict[str, dict] | None = None
) -> list[dict]:
    """Issue 4's and issue 14's targets for ``parnet``'s best modes; a target whose records are missing is left out.

    Each is a speedup (the slower record's median over the faster one's) against a bound it must reach.
    ``peaks`` (per device, :func:`parnet.bench.machine.machine_peak`'s result) marks the fixed int8
    targets that no network can reach on this machine: those that need more than its int8 peak over
    its fp32 peak (on a CPU without VNNI or AMX that ratio is about 2, against the 2.5x target).
    """
    out = []
    for device in sorted({r.device for r in records}):
        ceiling = int8_ceiling((peaks or {}).get(device, {}))
        for target, slow, fast, needed, peak_bound in _target_checks(records, device, parnet, large_batch):
            speedup = _speedup(slow, fast)
            if speedup is None or needed is None:
                continue
            check = dict(
                device=device,
                target=target,
                slower_mode=f"{slow.model} {mode_label(slow)}",
                faster_mode=f"{fast.model} {mode_label(fast)}",
                speedup=speedup,
                needed=needed,
                met=speedup >= needed,
            )  # fmt: skip
            if peak_bound and ceiling is not None and ceiling < needed:
                check["out_of_reach"] = f"this machine's int8 peak is {ceiling:.2f}x its fp32 peak"
            out.append(check)
    return out


def int8_ceiling(peak: dict[str, dict[str, float]]) -> float | None:
    """The machine's best int8 rate over its best fp32 rate (any kernel), or ``None`` without both."""
    int8, fp32 = peak.get("int8") or {}, peak.get("fp32") or {}
    return max(int8.values()) / max(fp32.values()) if int8 and fp32 else None


def _target_checks(records: Sequence[Record], device: str, parnet: str, large_batch: int) -> list[tuple]:
    """(target, slower record, faster record, the speedup it needs, bound by the machine's int8 peak) of each
    target on ``device``."""

    def top(model: str, batch: int, precision: str = "fp32", engines: bool | None = None) -> Record | None:
        return best(records, model, batch, device, precision, engines)

    def int8_gain(model: str, batch: int) -> tuple[Record | None, Record | None]:
        return top(model, batch), top(model, batch, "int8")

    large = [large_batch] if large_batch != 1 else []
    return [
        (f"{parnet} batch-1 latency <= {LATENCY_TARGET} x resnet34 (best modes)",
         top("resnet34", 1), top(parnet, 1), 1 / LATENCY_TARGET, False),
        *((f"{parnet} batch-{b} throughput >= {THROUGHPUT_TARGET} x resnet50 (best modes)",
           top("resnet50", b), top(parnet, b), THROUGHPUT_TARGET, False) for b in large),
        (f"{parnet} int8 batch-1 latency <= {INT8_LATENCY_TARGET} x its best fp32",
         *int8_gain(parnet, 1), 1 / INT8_LATENCY_TARGET, True),
        *((f"{parnet} int8 batch-{b} throughput >= {INT8_THROUGHPUT_TARGET} x its best fp32",
           *int8_gain(parnet, b), INT8_THROUGHPUT_TARGET, True) for b in large),
        *((f"{parnet} int8 gain at batch {b} >= resnet34's int8 gain", *int8_gain(parnet, b),
           _speedup(*int8_gain("resnet34", b)), False) for b in [1, *large]),
        (f"{parnet} fp32 batch-1: own modes >= {OWN_FP32_TARGET} x faster than every engine",
         top(parnet, 1, engines=True), top(parnet, 1, engines=False), OWN_FP32_TARGET, False),
        *((f"{parnet} fp32 batch-{b}: own modes ahead of every engine",
           top(parnet, b, engines=True), top(parnet, b, engines=False), 1.0, False) for b in large),
    ]  # fmt: skip


def format_markdown(records: Sequence[Record], targets: Sequence[dict] = ()) -> str:
    """Markdown: every (model, mode) with latency and throughput side by side, then the best modes."""
    batches = sorted({r.batch for r in records})
    lines = []
    for device in sorted({r.device for r in records}):
        head = "| model | mode | input | depth | paper top-1 | params (M) |"
        sep = "| --- | --- | --- | ---: | ---: | ---: |"
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
            size = f"{any_row.resolution}x{any_row.resolution}"
            cells = [
                model,
                mode_label(any_row),
                f"{any_row.in_chans}x{size}" if any_row.in_chans else size,  # files run at the size they were built for
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
            if any(r.max_abs_diff is None for r in rows.values()):  # a deployed file: nothing to compare with
                cells.append("")
            else:
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
                    cells.append(f"{mode_label(r)}, {r.median_ms:.1f}, {r.throughput_img_s:.1f}" if r else "")
                if any(cells[2:]):
                    lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    for t in targets:
        verdict = "MET" if t["met"] else "MISSED"
        if "out_of_reach" in t:
            verdict += f" (out of reach for any network here: {t['out_of_reach']})"
        lines.append(
            f"- target ({t['device']}) {t['target']}: {verdict} (speedup {t['speedup']:.2f}x, needed "
            f"{t['needed']:.2f}x; {t['faster_mode']} against {t['slower_mode']})"
        )
    return "\n".join(lines) + "\n"


def format_header(
    machine: dict[str, Any], command: Sequence[str], batches: Sequence[int], reps: Sequence[int], warmup: int,
    settle_ms: float,
) -> str:  # fmt: skip
    """The lines above the tables in ``--markdown``'s file, so that it reads alone: the command, the code, the CPU
    and its SIMD flags, the threads, the repetitions and each precision's peak (``machine``: :func:`machine_info`'s,
    with ``peak_gflops``)."""
    code = machine.get("code") or {}
    commit = code.get("commit")
    dirty = " (with uncommitted changes)" if code.get("dirty") else ""
    at = f"commit {commit[:12]}{dirty}" if commit else code.get("git")
    engines = ", ".join(f"{name} {v}" for name, v in (machine.get("engines") or {}).items() if v)
    timing = ", ".join(f"{n} at batch {b}" for b, n in zip(batches, reps))
    lines = [
        "# parnet bench",
        "",
        f"- command: `{shlex.join(command)}`",
        f"- code: parnet {code.get('parnet')}, {at}",
        f"- CPU: {machine.get('cpu')} ({machine.get('cpu_count')} logical cores; "
        f"{', '.join(machine.get('cpu_flags') or []) or 'none of the SIMD flags looked for'})",
        f"- threads: {machine.get('threads')} (inter-op {machine.get('interop_threads')}); torch {machine.get('torch')}"
        f"{', ' + engines if engines else ''}",
        f"- timed repetitions: {timing}; {warmup} untimed first; {settle_ms:g} ms pause before each timed CPU call",
    ]
    for device, peak in (machine.get("peak_gflops") or {}).items():
        best = {p: max(rates.items(), key=lambda kv: kv[1]) for p, rates in peak.items() if rates}
        text = ", ".join(f"{p} {rate:.0f} ({kernel})" for p, (kernel, rate) in best.items())
        lines.append(f"- peak GFLOP/s ({device}): {text or 'not measured (--peak-size 0)'}")
    return "\n".join(lines) + "\n\n"


def script_record(args: argparse.Namespace) -> dict[str, Any]:
    """A benchmark script's own arguments (``vars(args)``, JSON-ready: paths as text) and command line, for its
    JSON: what to run again to reproduce it."""
    plain = (str, int, float, bool, type(None), list, tuple)
    values = {k: v if isinstance(v, plain) else str(v) for k, v in vars(args).items() if not callable(v)}
    return {"args": values, "command": list(sys.argv)}


def plot_results(records: Sequence[Record], path: str | os.PathLike, device: str = "cpu") -> Path | None:
    """Batch-1 latency (best mode) against depth, and paper top-1 against it, written atomically in the format
    ``path``'s suffix names; ``None`` (nothing written) where no model has a depth or paper top-1 to place it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for model in dict.fromkeys(r.model for r in records if r.device == device):
        r = best(records, model, 1, device)
        if r is not None and (r.depth is not None or r.paper_top1 is not None):
            points.append((model, r))
    if not points:
        return None
    figure_format = image_format(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model, r in points:
        color = "tab:red" if is_parnet_model(model) else "tab:blue"
        if r.depth is not None:
            axes[0].scatter(r.depth, r.median_ms, color=color)
            axes[0].annotate(f"{model}\n({mode_label(r)})", (r.depth, r.median_ms), fontsize=7)
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
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format=figure_format, dpi=90)
    finally:  # a failed write must not leave the figure open in the caller's process
        plt.close(fig)
    return Path(path)


def write_json_and_markdown(out: str | os.PathLike, record: dict[str, Any], markdown: str) -> None:
    """A benchmark script's results, written atomically: ``OUT.json`` (the record) and ``OUT.md`` (its table)."""
    out = Path(out)
    for suffix, text in ((".json", json.dumps(record, indent=1)), (".md", markdown.rstrip("\n") + "\n")):
        with atomic_write(out.with_suffix(suffix)) as tmp:
            tmp.write_text(text)
