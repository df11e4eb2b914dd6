"""Timing callables against each other, fairly: interleaved, warmed up, each call after a settle pause.

Used by ``deploy(mode="auto", example=...)`` to pick the fastest mode and by ``parnet bench``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

# Untimed pause before each timed CPU call. Engines' thread pools keep spinning after a call returns and
# steal the cores from the next entry: measured here, OpenVINO's ParNet-S batch-1 latency went from
# 57 to 84 ms when timed right after ONNX Runtime's, and back to 53 with a 0.1 s pause (RESULTS.md).
SETTLE_S = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_interleaved(
    entries: dict[str, Callable], x: torch.Tensor, reps: int, warmup: int, device: torch.device,
    settle_s: float = 0.0,
) -> dict[str, list[float]]:  # fmt: skip
    """Milliseconds per call of each entry; every repetition calls all entries, rotating the order.

    ``settle_s``: an untimed pause before each timed call, so that no entry is timed while the previous
    one's threads still spin (see :data:`SETTLE_S`).
    """
    keys = list(entries)
    for key in keys:
        for _ in range(warmup):
            entries[key](x)
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(reps):
        for i in range(len(keys)):
            key = keys[(i + r) % len(keys)]
            if settle_s:
                time.sleep(settle_s)
            _sync(device)
            start = time.perf_counter()
            entries[key](x)
            _sync(device)
            times[key].append((time.perf_counter() - start) * 1e3)
    return times


def fastest(candidates: dict[str, Callable], example: torch.Tensor, reps: int = 5) -> str:
    """Name of the candidate with the lowest median time on ``example`` (interleaved, after one warm-up call;
    on the CPU each timed call after a :data:`SETTLE_S` pause)."""
    device = example.device
    settle = SETTLE_S if device.type == "cpu" else 0.0
    times = time_interleaved(candidates, example, reps, warmup=1, device=device, settle_s=settle)
    return min(times, key=lambda name: statistics.median(times[name]))
