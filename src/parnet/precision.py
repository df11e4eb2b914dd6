"""What the CPU computes natively, and the training precision ``--amp auto`` picks on it.

On CUDA ``auto`` is bf16. On a CPU it is bf16 only where the CPU has native bf16 (AVX512-BF16 or
AMX) *and* a bf16-autocast training step of the actual model measured faster than an fp32 one
(:func:`bf16_step_is_faster`: 3 timed steps each, after a warm-up, on a random batch of the run's
size, at most :data:`PROBE_BATCH` images, at start-up); everywhere else fp32.
Emulated bf16 (AVX-512 without BF16, AVX2) is several times slower than fp32.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch
from torch import nn

MIN_SPEEDUP = 1.05  # bf16 must beat fp32 by this much: a tie is not worth the rounding
# The probe's largest batch. Too small a batch hides bf16's gain behind per-step overhead: on a Zen 5
# with AVX512-BF16 (0.33 M ParNet, 2 threads) bf16 stepped 1.03-1.10x faster at 8 images, 1.21-1.47x
# at 32 and 1.32-1.59x at 128, so a probe of 8 chose fp32 in two of three runs whose epochs bf16
# trained 1.10-1.29x faster. 32 keeps the start-up probe to about a second for that model.
PROBE_BATCH = 32


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The names torch.cpu.get_capabilities() (torch's own detection, the cpuinfo library) gives features that
# /proc/cpuinfo spells otherwise.
PROC_CPUINFO_NAMES = {
    "avx512_f": "avx512f",
    "avx512_bw": "avx512bw",
    "avx512_vl": "avx512vl",
    "avx512_dq": "avx512dq",
    "avx512_cd": "avx512cd",
    "fma3": "fma",
}


def torch_cpu_flags() -> set[str]:
    """The CPU's features as torch detects them (``torch.cpu.get_capabilities``, also where /proc/cpuinfo is
    hidden or absent: containers, Windows, macOS), by their ``/proc/cpuinfo`` names."""
    found = torch.cpu.get_capabilities().items()
    return {PROC_CPUINFO_NAMES.get(name, name) for name, present in found if present is True}


def cpu_features() -> set[str]:
    """The CPU's flags from ``/proc/cpuinfo``, or where that gives none, torch's detection (:func:`torch_cpu_flags`)."""
    return cpu_flags() or torch_cpu_flags()


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), not by emulation."""
    return bool(cpu_features() & {"avx512_bf16", "amx_bf16"})


def has_int8_dot_product() -> bool:
    """Whether the CPU has an x86 8-bit dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_features() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_pairs_saturate() -> bool:
    """Whether this is an x86 CPU without an 8-bit dot product, whose int8 kernels multiply u8 by s8
    with ``vpmaddubsw``: its 16-bit pair sums can saturate on 8-bit weights, so ONNX Runtime's
    quantizer needs 7-bit ones there (``reduce_range``)."""
    return platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"} and not has_int8_dot_product()


def _step_seconds(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, reps: int) -> float:
    best = float("inf")
    for _ in range(reps + 1):  # the first call warms up (oneDNN primitives) and is not counted
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        best = min(best, time.perf_counter() - start) if _ else best
    model.zero_grad(set_to_none=True)
    return best


def bf16_step_is_faster(model: nn.Module, example: torch.Tensor, reps: int = 3) -> bool:
    """Whether a bf16-autocast forward+backward of ``model`` on ``example`` beats fp32 by :data:`MIN_SPEEDUP`.

    The model's BN running statistics are saved and restored, so the probe leaves no trace.
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    try:
        fp32 = _step_seconds(model, example, None, reps)
        bf16 = _step_seconds(model, example, torch.bfloat16, reps)
    finally:
        model.load_state_dict(state)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return fp32 > MIN_SPEEDUP * bf16


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a settled ``--amp`` (``bf16``, ``fp16``; ``off``: ``None``, fp32)."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
    if amp not in dtypes:
        raise ValueError(f"amp must be one of {', '.join(dtypes)} once settled, got {amp!r}")
    return dtypes[amp]


def auto_amp(device: torch.device, model: nn.Module | None = None, example: torch.Tensor | None = None) -> Any:
    """The autocast dtype of ``--amp auto`` (``None``: fp32): bf16 on CUDA; on a CPU, see the module docstring."""
    if device.type == "cuda":
        return torch.bfloat16
    if not has_native_bf16() or model is None or example is None:
        return None
    return torch.bfloat16 if bf16_step_is_faster(model, example) else None
