"""The machine a benchmark runs on: CPU, flags, engine versions, and its practical peak per precision."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..deployment.engines import ENGINES, engine_module, usable
from ..precision import cpu_features, has_int8_dot_product

SIMD_FLAGS = {
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
    "amx_bf16",
}  # fmt: skip


def machine_info(threads: int) -> dict:
    """What the results were measured on, and the code that measured them (``code``: :func:`code_version`)."""
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
        "cpu_flags": sorted(cpu_features() & SIMD_FLAGS),
        "engines": engine_versions(),
        "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "code": code_version(),
    }
    return info


def code_version(source: str | os.PathLike | None = None) -> dict[str, str | bool | None]:
    """parnet's version and the git commit of ``source`` (default: this package's folder), so that a record says
    which code measured it: ``commit`` and ``dirty`` (tracked files changed since it) are ``None`` where ``source``
    is not tracked in a git checkout (an installed wheel), and ``git`` says why."""
    from .. import __version__

    folder = Path(source) if source is not None else Path(__file__).resolve().parents[1]
    info: dict[str, str | bool | None] = {"parnet": __version__, "source": str(folder), "commit": None, "dirty": None}
    try:
        # ls-files: the folder's own files tracked, not merely a folder inside some checkout (a venv in one)
        _git(folder, "ls-files", "--error-unmatch", "--", ".")
        info["commit"] = _git(folder, "rev-parse", "HEAD")
        info["dirty"] = bool(_git(folder, "status", "--porcelain", "--untracked-files=no"))
        info["git"] = "checkout"
    except subprocess.CalledProcessError as e:
        why = (e.stderr or "").strip().splitlines()
        info["git"] = f"not in a git checkout ({why[0] if why else e})"
    except (OSError, subprocess.SubprocessError) as e:  # no git installed, or it hung
        info["git"] = f"unknown: git did not run ({e})"
    return info


def _git(folder: Path, *args: str) -> str:
    """``git args`` run in ``folder``: its output, stripped; ``CalledProcessError`` where git refuses."""
    done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip()


def engine_versions() -> dict[str, str | None]:
    """Versions of the libraries that run the modes (``None``: not installed)."""
    import importlib.metadata

    out: dict[str, str | None] = {"onednn": onednn_version()}
    for name in ("onnxruntime", "openvino", "nncf", "torchao", "onnx"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def onednn_version(config: str | None = None) -> str | None:
    """oneDNN's version in torch (``"3.12.0"``), read from ``torch.__config__.show()`` (``config``), which reports
    ``MKL-DNN v3.12.0``: torch has no API for it. ``None`` where torch was built without oneDNN."""
    if config is None:
        if not torch.backends.mkldnn.is_available():
            return None
        config = torch.__config__.show()
    found = re.search(r"(?:MKL-DNN|oneDNN) v(\d[\w.]*)", config)
    return found.group(1) if found else "unknown (torch.__config__.show() names no version)"


@torch.no_grad()
def model_gflop(model: nn.Module, in_chans: int, resolution: int) -> float:
    """GFLOP (2 x multiply-adds) of one image through ``model`` (torch's flop counter, on the CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, in_chans, resolution, resolution, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


PEAK_SIZE = 4096  # the square matrix product that measures the machine's peak
# The engines' peak probe times two stacks of one 3x3 conv (each with its ReLU), this short and this
# long: their difference is convolution alone. A single stack's time also holds the engine's
# conversion of its float input and output, which on an AMX CPU (int8, OpenVINO) was a third of a
# 4-conv stack's: its rate was 3.0 TOP/s where ResNet-34 ran 4.2 and the difference 7.7.
CONV_STACKS = (2, 8)


def stack_rate(conv_flop: float, short_seconds: float, long_seconds: float) -> float:
    """GFLOP/s of one conv from the best times of the short and the long stack (:data:`CONV_STACKS`):
    the long stack's extra flop over its extra time; its whole rate where timing noise leaves no
    extra time (a tiny probe)."""
    short, long = CONV_STACKS
    extra = long_seconds - short_seconds
    if extra > 0:
        return (long - short) * conv_flop / extra / 1e9
    return long * conv_flop / long_seconds / 1e9


@torch.inference_mode()
def machine_peak(precisions: Sequence[str], reps: int = 3, size: int = PEAK_SIZE) -> dict[str, dict[str, float]]:
    """Each kernel's rate per precision, GFLOP/s (``{precision: {"matmul", "conv3x3", "conv3x3_<engine>"}}``);
    the CPU's practical peak for a precision is the best of them (the callers take it).

    fp32/bf16: ``torch.mm`` (BLAS, which on AMD may run at half oneDNN's rate) and ``F.conv2d`` in
    channels_last (oneDNN). fp32 and int8: a stack of that 3x3 conv with ReLUs through each installed
    engine (:func:`parnet.deployment.engines.engine_module`: OpenVINO, with NNCF for int8; ONNX Runtime,
    QDQ for int8), so that the int8 peak over the fp32 peak compares the same kernels' precisions.
    int8 also: ``torch._int_mm`` (a private op: the only int8 x int8 -> int32 product torch exposes)
    on CPUs with VNNI or AMX only: elsewhere it falls back to a reference loop (0.9 GOP/s measured on
    an AVX2-only EPYC, minutes per call at the default size). Each kernel is timed ``reps`` times
    after a warm-up; its best time counts. ``size``: the matrix product's side; the conv has size / 16
    channels.
    """
    import torch.nn.functional as F

    def best_seconds(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def best_rate(fn: Callable[[], object], flop: float) -> float:
        return flop / best_seconds(fn) / 1e9

    g = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    mm_flop = 2.0 * size**3
    # At the default size a ResNet/ParNet stage-2 conv: 256 -> 256 channels, 56x56, batch 8; its
    # channels scale with ``size`` (size / 16), so that a small size makes a quick probe (tests).
    n, c, hw = 8, max(8, size // 16), 56
    conv_flop = 2.0 * n * c * c * 9 * hw * hw
    stack_input = torch.randn(n, c, hw, hw, generator=g)
    stack = nn.Sequential(*[m for _ in range(max(CONV_STACKS)) for m in (nn.Conv2d(c, c, 3, padding=1), nn.ReLU())])
    stack.eval()
    threads = torch.get_num_threads()
    for precision in precisions:
        out[precision] = {}
        if precision in ("fp32", "bf16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            a = torch.randn(size, size, generator=g).to(dtype)
            x = torch.randn(n, c, hw, hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 3, 3, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            out[precision]["matmul"] = best_rate(lambda a=a: torch.mm(a, a), mm_flop)
            out[precision]["conv3x3"] = best_rate(lambda x=x, w=w: F.conv2d(x, w, padding=1), conv_flop)
        if precision == "int8" and has_int8_dot_product():  # torch._int_mm's only fast kernel
            a = torch.randint(-128, 127, (size, size), generator=g, dtype=torch.int8)
            b = torch.randint(-128, 127, (size, size), generator=g, dtype=torch.int8)
            out["int8"]["matmul"] = best_rate(lambda a=a, b=b: torch._int_mm(a, b), mm_flop)
        if precision in ("fp32", "int8"):
            for engine in ENGINES:
                if usable(engine, precision):
                    calibration = [stack_input] if precision == "int8" else None
                    seconds = []
                    for depth in CONV_STACKS:
                        net = stack[: 2 * depth]
                        run = engine_module(engine, net, stack_input[:1], precision, calibration, threads)
                        seconds.append(best_seconds(lambda run=run: run(stack_input)))
                    out[precision][f"conv3x3_{engine}"] = stack_rate(conv_flop, *seconds)
    return out
