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

import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .deploy.engines import ENGINES
from .deploy.kernels import cpu_flags
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
# Low-precision and engine modes, as ``precision:mode`` (fp32 without a prefix); each is given to the
# ParNet variants and the baselines alike, where the CPU and the installed engines can run it.
CPU_EXTRA_MODES = (
    "onnxruntime", "openvino", "bf16:channels_last", "bf16:packed", "bf16:compiled", "bf16:openvino",
    "int8:compiled", "int8:onnxruntime", "int8:openvino",
)  # fmt: skip
BASELINE_SKIPS = ("bf16:packed",)  # ParNet's own bf16 packed blocks; the baselines' bf16 is channels_last/compiled
CUDA_EXTRA_MODES = ("bf16:channels_last", "bf16:cuda_graph", "bf16:compiled")
PEAK_SIZE = 4096  # the square matrix product that measures the machine's peak
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
    precision: str = "fp32"
    gflop: float | None = None  # per image, 2 x multiply-adds (torch.utils.flop_counter)
    achieved_gflops: float | None = None  # gflop x images per second
    peak_fraction: float | None = None  # achieved_gflops / the machine's peak in this precision, same run
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
        "cpu_flags": sorted(cpu_flags() & SIMD_FLAGS),
        "engines": engine_versions(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }
    return info


SIMD_FLAGS = {
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
    "amx_bf16",
}  # fmt: skip


def engine_versions() -> dict[str, str | None]:
    """Versions of the libraries that run the modes (``None``: not installed)."""
    import importlib.metadata

    out: dict[str, str | None] = {"onednn": str(torch.backends.mkldnn.is_available())}
    for name in ("onnxruntime", "openvino", "nncf", "torchao", "onnx"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_modes(device: torch.device, parnet: bool) -> list[str]:
    """Every mode of ``device`` for a ParNet or a baseline, precisions and engines the machine can run included."""
    from .deploy.engines import ENGINES, installed
    from .deploy.kernels import has_native_bf16

    if device.type == "cuda":
        base = PARNET_CUDA_MODES if parnet else BASELINE_CUDA_MODES
        return list(base) + list(CUDA_EXTRA_MODES)
    base = PARNET_CPU_MODES if parnet else BASELINE_CPU_MODES
    extra = [m for m in CPU_EXTRA_MODES if parnet or m not in BASELINE_SKIPS]
    for label in list(extra):
        precision, mode = split_mode(label)
        if (mode in ENGINES and not installed(mode)) or (precision == "bf16" and not has_native_bf16()):
            extra.remove(label)
        elif label == "int8:compiled" and importlib.util.find_spec("torchao") is None:
            extra.remove(label)
    return list(base) + extra


@torch.no_grad()
def model_gflop(model: nn.Module, in_chans: int, resolution: int) -> float:
    """GFLOP (2 x multiply-adds) of one image through ``model`` (torch's flop counter, on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_chans, resolution, resolution, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def machine_peak(precisions: Sequence[str], reps: int = 3, size: int = PEAK_SIZE) -> dict[str, dict[str, float]]:
    """The CPU's practical peak per precision, GFLOP/s: the best of a large matrix product and a large 3x3 conv.

    fp32/bf16: ``torch.mm`` (BLAS, which on AMD may run at half oneDNN's rate) and ``F.conv2d`` in
    channels_last (oneDNN); int8: ``torch._int_mm`` (a private op: the only int8 x int8 -> int32
    product torch exposes; VNNI) and ONNX Runtime's int8 ``ConvInteger`` is not used, so int8's conv
    peak is not measured. Each kernel is timed ``reps`` times after a warm-up; its best time counts.
    """
    import torch.nn.functional as F

    def best_rate(fn: Callable[[], object], flop: float) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flop / min(times) / 1e9

    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    mm_flop = 2.0 * size**3
    n, c, hw = 8, 256, 56  # a ResNet/ParNet stage-2 conv: 256 -> 256 channels, 56x56, batch 8
    conv_flop = 2.0 * n * c * c * 9 * hw * hw
    for precision in precisions:
        if precision == "int8":
            a = torch.randint(-128, 127, (size, size), generator=g, dtype=torch.int8)
            b = torch.randint(-128, 127, (size, size), generator=g, dtype=torch.int8)
            out["int8"] = {"matmul": best_rate(lambda a=a, b=b: torch._int_mm(a, b), mm_flop)}
            continue
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a = torch.randn(size, size, generator=g).to(dtype)
        x = torch.randn(n, c, hw, hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        out[precision] = {
            "matmul": best_rate(lambda a=a: torch.mm(a, a), mm_flop),
            "conv3x3": best_rate(lambda x=x, w=w: F.conv2d(x, w, padding=1), conv_flop),
        }
    return out


def _is_parnet(name: str) -> bool:
    return name.startswith("parnet")


def _channels_last(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module = module.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x.contiguous(memory_format=torch.channels_last))

    return run


def split_mode(label: str) -> tuple[str, str]:
    """``"int8:onnxruntime"`` -> ``("int8", "onnxruntime")``; a label without a precision is fp32."""
    precision, _, mode = label.rpartition(":")
    return precision or "fp32", mode


def calibration_noise(in_chans: int, resolution: int, batches: int = 2, batch: int = 8) -> list[torch.Tensor]:
    """Seeded random calibration batches: timing does not depend on the values (accuracy: ``parnet quantize``)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, in_chans, resolution, resolution, generator=g) for _ in range(batches)]


def build_entries(
    name: str, modes: Sequence[str], device: torch.device, threads: int, kwargs: dict | None = None,
    resolution: int = 224,
) -> tuple[nn.Module, dict[str, Callable[[torch.Tensor], torch.Tensor]]]:  # fmt: skip
    """The plain model (eval, the reference) and one callable per mode label (``[precision:]mode``)."""
    from timm.utils import reparameterize_model

    from .deploy import compile_cpu, deploy, freeze_cpu, pack_convs

    model = create_model(name, **(kwargs or {})).eval().to(device)
    randomize_statistics(model)
    in_chans = getattr(model, "in_chans", 3)
    calibration = calibration_noise(in_chans, resolution)
    example = calibration[0][:1].to(device)
    entries: dict[str, Callable] = {}
    for label in modes:
        precision, mode = split_mode(label)
        if _is_parnet(name):
            if label == "train":
                entries[label] = model
            else:
                calib = calibration if precision == "int8" else None
                entries[label] = deploy(model, device, mode, precision, calib, example, threads=threads)
            continue
        fused = reparameterize_model(model).eval()  # RepVGG: one conv per block; ResNet: unchanged
        if precision != "fp32" or mode in ENGINES:
            entries[label] = _baseline_low_precision(fused, mode, precision, device, calibration, example, threads)
        elif mode == "eager":
            entries[label] = fused
        elif mode == "channels_last":
            entries[label] = _channels_last(fused)
        elif mode in ("packed", "winograd", "frozen") and device.type != "cpu":
            raise ValueError(f"baseline mode {mode!r} runs on the CPU only")
        elif mode in ("packed", "winograd"):  # ParNet's modes, in their generic form: BNs folded first
            from torch.fx.experimental.optimization import fuse

            entries[label] = _channels_last(pack_convs(fuse(fused), winograd=mode == "winograd"))
        elif mode == "frozen":
            entries[label] = _channels_last(freeze_cpu(fused.to(memory_format=torch.channels_last)))
        elif mode == "compiled":
            cl = fused.to(memory_format=torch.channels_last)
            compiled = compile_cpu(cl) if device.type == "cpu" else torch.compile(cl)
            entries[label] = _channels_last(compiled)
        elif mode == "cuda_graph":
            from .deploy import CudaGraphModule

            entries[label] = CudaGraphModule(fused.to(memory_format=torch.channels_last))
        else:
            raise ValueError(f"unknown baseline mode {mode!r}; choose from {BASELINE_CUDA_MODES}")
    return model, entries


def _baseline_low_precision(
    fused: nn.Module, mode: str, precision: str, device: torch.device, calibration: list, example: torch.Tensor,
    threads: int,
) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """A baseline in ParNet's bf16/int8/engine modes, in their generic form (the same tools, any model)."""
    from .deploy import CudaGraphModule, compile_cpu
    from .deploy.quantize import Bf16Module, check_precision, pt2e_int8
    from .deployed import build

    check_precision(precision, device)
    if mode in ENGINES:
        return build(fused.cpu(), mode, precision, calibration, example.cpu(), threads)
    if precision == "int8" and mode == "compiled":
        from torch.fx.experimental.optimization import fuse

        return pt2e_int8(fuse(fused), calibration)
    if precision == "bf16" and mode in ("channels_last", "compiled", "cuda_graph"):
        net = Bf16Module(fused.to(memory_format=torch.channels_last)).eval()
        if mode == "cuda_graph":
            return CudaGraphModule(net)
        if mode == "compiled":
            net = compile_cpu(net) if device.type == "cpu" else torch.compile(net)
        return _channels_last(net)
    raise ValueError(f"no baseline mode {precision}:{mode}")


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
    peaks: dict | None = None,
    peak_size: int = PEAK_SIZE,
) -> list[Record]:
    """Time every model in every mode at every batch size on every device (see module docstring).

    ``peaks``, if given, receives each device's measured peak GFLOP/s per precision (:func:`machine_peak`,
    with a ``peak_size`` matrix product; 0: no peak, no fractions).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_bench(
            models, baselines, devices, batches, reps, resolution, threads, warmup,
            parnet_modes, baseline_modes, model_kwargs, log, {} if peaks is None else peaks, peak_size,
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
    peaks: dict,
    peak_size: int,
) -> list[Record]:
    from timm.utils import reparameterize_model

    from .deploy import fold

    records: list[Record] = []
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        pm = parnet_modes or default_modes(device, parnet=True)
        bm = baseline_modes or default_modes(device, parnet=False)
        if device.type == "cpu":
            pm = [m for m in pm if m != "cuda_graph"]
            bm = [m for m in bm if m != "cuda_graph"]
        refs, entries, params, gflop = {}, {}, {}, {}
        precisions = sorted({split_mode(m)[0] for m in list(pm) + list(bm)})
        peak = machine_peak(precisions, size=peak_size) if device.type == "cpu" and peak_size > 0 else {}
        log(f"[{device}] peak GFLOP/s: {json.dumps(peak)}")
        peaks[str(device)] = peak
        for name in list(models) + list(baselines):
            is_parnet = _is_parnet(name)
            log(f"[{device}] building {name}: {', '.join(pm if is_parnet else bm)}")
            ref, ents = build_entries(
                name, pm if is_parnet else bm, device, threads, model_kwargs if is_parnet else None, resolution
            )
            refs[name] = ref
            # the work of the deployed form: ParNet folded (one 3x3 conv per block), baselines re-parameterized
            counted = fold(ref) if is_parnet else reparameterize_model(ref)
            gflop[name] = model_gflop(counted, getattr(ref, "in_chans", 3), resolution)
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
                precision = split_mode(mode)[0]
                rate = gflop[name] * batch / med * 1e3
                best_peak = max(peak.get(precision, {}).values(), default=None)
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
                        precision=precision,
                        gflop=round(gflop[name], 3),
                        achieved_gflops=round(rate, 1),
                        peak_fraction=round(rate / best_peak, 3) if best_peak else None,
                    )
                )
    return records


def bench_files(
    paths: Sequence[str], batches: Sequence[int], reps: Sequence[int], warmup: int, threads: int,
    log: Callable[[str], None] = print,
) -> list[Record]:  # fmt: skip
    """Time files written by ``parnet quantize`` (CPU, at the resolution each was built for), interleaved.

    There is no plain model to compare with, so ``max_abs_diff`` is NaN: ``parnet quantize`` scored them.
    """
    from .deployed import load_deployed

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        nets = {Path(p).name: load_deployed(p, threads) for p in paths}
        records = []
        for batch, nrep in zip(batches, reps):
            log(f"[cpu] deployed files, batch {batch}: {len(nets)} x {nrep} interleaved repetitions")
            timed = {}
            for name, net in nets.items():
                x = torch.randn(batch, net.in_chans, net.height, net.width, generator=torch.Generator().manual_seed(0))
                timed[name] = _bind(net, x)
            times = time_interleaved(timed, torch.empty(0), nrep, warmup, torch.device("cpu"))
            for name, ts in times.items():
                med, net = statistics.median(ts), nets[name]
                records.append(
                    Record(
                        name, f"{net.precision}:{net.engine}", batch, "cpu", net.height, threads, nrep, med,
                        _quantile(ts, 0.25), _quantile(ts, 0.75), min(ts), max(ts),
                        _quantile(ts, 0.75) - _quantile(ts, 0.25), batch / med * 1e3, float("nan"), float("nan"),
                        precision=net.precision, times_ms=[round(t, 3) for t in ts],
                    )
                )  # fmt: skip
        return records
    finally:
        torch.set_num_threads(previous)


def _bind(fn: Callable, x: torch.Tensor) -> Callable:
    """``fn`` on a fixed input (models with other input channels get their own)."""
    return lambda _x: fn(x)


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

