"""``parnet bench``: batch-1 latency and large-batch throughput, ParNet against deep baselines.

Every (model, mode) pair is timed in the same run, interleaved: each repetition calls every pair
once, in a rotating order, so that load from other processes falls on all of them alike. The
first calls of each pair (``--warmup``; they include torch.compile's compilation) are not timed.
Each pair's output is checked against its plain model's eval output (max absolute difference,
recorded) before it is timed.

ParNet variants run in training form (``train``: unfused, eval), ``fused`` and every deploy mode
of the device; the baselines (timm's ResNet-34, ResNet-50, RepVGG-B1g4/B2g4, RepVGG
re-parameterized) run ``eager``, ``channels_last``, ``packed`` and ``winograd`` (ParNet's modes in
their generic form, ``pack_convs`` of ``parnet/deploy.py``, BNs folded first), ``frozen`` (TorchScript
frozen and optimized for inference: PyTorch's generic oneDNN path) and ``compiled``
(channels_last + torch.compile): the same modes ParNet gets; on CUDA also ``cuda_graph``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .factory import create_model
from .io import atomic_write

__all__ = ["PAPER", "Record", "run_bench", "format_markdown", "check_targets", "plot_results", "machine_info"]

# Depth and ImageNet top-1 of the paper's comparison table (reference/ARCHITECTURE.md).
PAPER: dict[str, tuple[int, float]] = {
    "parnet_s": (12, 75.19),
    "parnet_s_official": (12, 75.19),
    "parnet_m": (12, 76.60),
    "parnet_m_official": (12, 76.60),
    "parnet_l": (12, 77.66),
    "parnet_l_official": (12, 77.66),
    "parnet_xl": (12, 78.55),
    "parnet_xl_official": (12, 78.55),
    "resnet34": (34, 74.12),
    "resnet50": (50, 77.53),
    "repvgg_b1g4": (29, 77.59),
    "repvgg_b2g4": (29, 79.38),
}
PARNET_CPU_MODES = (
    "train", "fused", "folded", "channels_last", "packed", "winograd", "frozen", "parallel", "compiled"
)  # fmt: skip
PARNET_CUDA_MODES = ("train", "fused", "channels_last", "parallel", "cuda_graph", "compiled")
BASELINE_CPU_MODES = ("eager", "channels_last", "packed", "winograd", "frozen", "compiled")
BASELINE_CUDA_MODES = ("eager", "channels_last", "cuda_graph", "compiled")
# Issue 4's targets: the best CPU mode of ParNet-S against the baselines' best modes.
LATENCY_TARGET = 0.95  # ParNet-S batch-1 latency at most this times ResNet-34's
THROUGHPUT_TARGET = 1.2  # ParNet-S large-batch throughput at least this times ResNet-50's


@dataclass
class Record:
    """One (model, mode, batch, device) measurement, times in milliseconds."""

    model: str
    mode: str
    batch: int
    device: str
    resolution: int
    threads: int
    reps: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    throughput_img_s: float
    max_abs_diff: float
    max_rel_diff: float = 0.0  # max_abs_diff / max |reference output|: deep baselines' logits can be huge
    depth: int | None = None
    paper_top1: float | None = None
    params_m: float | None = None
    times_ms: list[float] = field(default_factory=list)


def machine_info(threads: int) -> dict:
    """What the results were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import timm

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }
    return info


def _is_parnet(name: str) -> bool:
    return name.startswith("parnet")


def _channels_last(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module = module.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x.contiguous(memory_format=torch.channels_last))

    return run


def build_entries(
    name: str, modes: Sequence[str], device: torch.device, threads: int, kwargs: dict | None = None
) -> tuple[nn.Module, dict[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The plain model (eval, the reference) and one callable per mode."""
    from timm.utils import reparameterize_model

    from .deploy import compile_cpu, deploy, freeze_cpu, pack_convs

    model = create_model(name, **(kwargs or {})).eval().to(device)
    randomize_statistics(model)
    entries: dict[str, Callable] = {}
    for mode in modes:
        if _is_parnet(name):
            if mode == "train":
                entries[mode] = model
            else:
                entries[mode] = deploy(model, device, mode, threads=threads)
            continue
        fused = reparameterize_model(model).eval()  # RepVGG: one conv per block; ResNet: unchanged
        if mode == "eager":
            entries[mode] = fused
        elif mode == "channels_last":
            entries[mode] = _channels_last(fused)
        elif mode in ("packed", "winograd", "frozen") and device.type != "cpu":
            raise ValueError(f"baseline mode {mode!r} runs on the CPU only")
        elif mode in ("packed", "winograd"):  # ParNet's modes, in their generic form: BNs folded first
            from torch.fx.experimental.optimization import fuse

            entries[mode] = _channels_last(pack_convs(fuse(fused), winograd=mode == "winograd"))
        elif mode == "frozen":
            entries[mode] = _channels_last(freeze_cpu(fused.to(memory_format=torch.channels_last)))
        elif mode == "compiled":
            cl = fused.to(memory_format=torch.channels_last)
            compiled = compile_cpu(cl) if device.type == "cpu" else torch.compile(cl)
            entries[mode] = _channels_last(compiled)
        elif mode == "cuda_graph":
            from .deploy import CudaGraphModule

            entries[mode] = CudaGraphModule(fused.to(memory_format=torch.channels_last))
        else:
            raise ValueError(f"unknown baseline mode {mode!r}; choose from {BASELINE_CUDA_MODES}")
    return model, entries


@torch.no_grad()
def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (seeded), as a trained network has.

    A fresh network's BNs are identities and its features nearly zero, so output differences
    between modes (or between a model and its fused form) would mean little; timing does not
    depend on the values. Also used by the tests.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_interleaved(
    entries: dict[str, Callable], x: torch.Tensor, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Milliseconds per call of each entry; every repetition calls all entries, rotating the order."""
    keys = list(entries)
    for key in keys:
        for _ in range(warmup):
            entries[key](x)
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(reps):
        for i in range(len(keys)):
            key = keys[(i + r) % len(keys)]
            _sync(device)
            start = time.perf_counter()
            entries[key](x)
            _sync(device)
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_bench(
    models: Sequence[str],
    baselines: Sequence[str],
    devices: Sequence[str] = ("cpu",),
    batches: Sequence[int] = (1, 32),
    reps: Sequence[int] = (30, 10),
    resolution: int = 224,
    threads: int = 2,
    warmup: int = 3,
    parnet_modes: Sequence[str] | None = None,
    baseline_modes: Sequence[str] | None = None,
    model_kwargs: dict | None = None,
    log: Callable[[str], None] = print,
) -> list[Record]:
    """Time every model in every mode at every batch size on every device (see module docstring)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_bench(
            models, baselines, devices, batches, reps, resolution, threads, warmup,
            parnet_modes, baseline_modes, model_kwargs, log,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(
    models: Sequence[str],
    baselines: Sequence[str],
    devices: Sequence[str],
    batches: Sequence[int],
    reps: Sequence[int],
    resolution: int,
    threads: int,
    warmup: int,
    parnet_modes: Sequence[str] | None,
    baseline_modes: Sequence[str] | None,
    model_kwargs: dict | None,
    log: Callable[[str], None],
) -> list[Record]:
    records: list[Record] = []
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        pm = parnet_modes or (PARNET_CUDA_MODES if device.type == "cuda" else PARNET_CPU_MODES)
        bm = baseline_modes or (BASELINE_CUDA_MODES if device.type == "cuda" else BASELINE_CPU_MODES)
        if device.type == "cpu":
            pm = [m for m in pm if m != "cuda_graph"]
            bm = [m for m in bm if m != "cuda_graph"]
        refs, entries, params = {}, {}, {}
        for name in list(models) + list(baselines):
            is_parnet = _is_parnet(name)
            log(f"[{device}] building {name}: {', '.join(pm if is_parnet else bm)}")
            ref, ents = build_entries(
                name, pm if is_parnet else bm, device, threads, model_kwargs if is_parnet else None
            )
            refs[name] = ref
            params[name] = sum(p.numel() for p in ref.parameters()) / 1e6
            for mode, fn in ents.items():
                entries[(name, mode)] = fn
        in_chans = {name: ref.in_chans if hasattr(ref, "in_chans") else 3 for name, ref in refs.items()}
        for batch, nrep in zip(batches, reps):
            g = torch.Generator().manual_seed(batch)
            xs = {
                c: torch.randn(batch, c, resolution, resolution, generator=g).to(device) for c in set(in_chans.values())
            }
            diffs, scales = {}, {}
            with torch.inference_mode():
                for (name, mode), fn in entries.items():
                    x = xs[in_chans[name]]
                    ref = refs[name](x).float()
                    diffs[(name, mode)] = (fn(x).float() - ref).abs().max().item()
                    scales[(name, mode)] = max(ref.abs().max().item(), 1e-30)
            log(f"[{device}] batch {batch}: {len(entries)} entries x {nrep} interleaved repetitions")

            timed = {key: _bind(fn, xs[in_chans[key[0]]]) for key, fn in entries.items()}
            times = time_interleaved(timed, xs[3] if 3 in xs else next(iter(xs.values())), nrep, warmup, device)
            for (name, mode), ts in times.items():
                med = statistics.median(ts)
                depth, top1 = PAPER.get(name.split(".")[0], (None, None))
                records.append(
                    Record(
                        model=name,
                        mode=mode,
                        batch=batch,
                        device=str(device),
                        resolution=resolution,
                        threads=threads,
                        reps=nrep,
                        median_ms=med,
                        p25_ms=_quantile(ts, 0.25),
                        p75_ms=_quantile(ts, 0.75),
                        min_ms=min(ts),
                        max_ms=max(ts),
                        iqr_ms=_quantile(ts, 0.75) - _quantile(ts, 0.25),
                        throughput_img_s=batch / med * 1e3,
                        max_abs_diff=diffs[(name, mode)],
                        max_rel_diff=diffs[(name, mode)] / scales[(name, mode)],
                        depth=depth,
                        paper_top1=top1,
                        params_m=round(params[name], 2),
                        times_ms=[round(t, 3) for t in ts],
                    )
                )
    return records


def _bind(fn: Callable, x: torch.Tensor) -> Callable:
    """``fn`` on a fixed input (models with other input channels get their own)."""
    return lambda _x: fn(x)


def best(records: Sequence[Record], model: str, batch: int, device: str) -> Record | None:
    """The fastest mode of ``model`` at ``batch`` on ``device`` (lowest median)."""
    rows = [r for r in records if r.model == model and r.batch == batch and r.device == device]
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
        lines += [f"**{device}**", "", head + " max abs diff (relative) |", sep + " ---: |"]
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
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Best mode per model ({device}):", ""]
        lines += ["| model | " + " | ".join(f"batch {b}: best mode, median ms, img/s" for b in batches) + " |"]
        lines += ["| --- |" + " --- |" * len(batches)]
        for model in dict.fromkeys(r.model for r in records if r.device == device):
            cells = [model]
            for b in batches:
                r = best(records, model, b, device)
                cells.append(f"{r.mode}, {r.median_ms:.1f}, {r.throughput_img_s:.1f}" if r else "")
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
        color = "tab:red" if _is_parnet(model) else "tab:blue"
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
