"""Training machinery shared by every training loop of this project (classification, detection).

Nothing here knows about a task; a loop calls these in order:

``init_distributed() -> DistInfo``
    Reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; starts the process group (gloo on
    CPU; on CUDA nccl for CUDA tensors and gloo for CPU ones) when ``WORLD_SIZE > 1``.
    ``cleanup_distributed()`` ends it.
    ``all_reduce_sum(tensor)`` and ``reduce_mean(value)`` combine metrics across ranks (no-ops
    when not distributed).

The run folder, its lock, checkpoints, metrics and RNG state are :mod:`parnet.checkpoint`'s.

``NonFiniteLossError``, ``check_finite(loss, step, dist_info=None, kept_epoch=None)``
    Raise a clear error on a NaN/inf loss (agreed across ranks when ``dist_info`` is distributed)
    that says which checkpoint is kept, if any.

``Progress(total, desc, enabled)``
    A tqdm bar: ``.update(images, loss=..., acc=...)`` shows running means, images/s and ETA.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "NonFiniteLossError",
    "Progress",
    "all_reduce_sum",
    "check_finite",
    "cleanup_distributed",
    "init_distributed",
    "reduce_mean",
]

# -- distributed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank among ``world_size`` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    distributed: bool = False


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``), else a single process.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). Under torchrun each rank
            takes ``cuda:LOCAL_RANK``; the backend is gloo on CPU. On CUDA it is nccl for CUDA
            tensors plus gloo for CPU ones (``reduce_mean(value)`` without a device reduces a CPU
            tensor, which an nccl-only group refuses).
    """
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if want_cuda else "gloo")
    distributed = world_size > 1
    return DistInfo(rank, world_size, local_rank, dev, rank == 0, distributed)


def cleanup_distributed() -> None:
    """End the process group if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks (a new tensor; the input itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Mean of a scalar over all ranks, as a python float."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).detach().reshape(())
    if dist.is_available() and dist.is_initialized():
        t = all_reduce_sum(t) / dist.get_world_size()
    return float(t)


# -- loss checks --------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint is kept."""


def check_finite(
    loss: torch.Tensor, step: int, dist_info: DistInfo | None = None, kept_epoch: int | None = None
) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN/inf (on any rank, when ``dist_info`` is distributed).

    ``kept_epoch``: the (0-based) epoch of the checkpoint on disk, ``None`` when there is none yet.
    """
    bad = ~torch.isfinite(loss.detach()).all()
    if dist_info is not None and dist_info.distributed:
        bad = all_reduce_sum(bad.to(torch.float32).reshape(1)) > 0
    if bool(bad):
        value = loss.detach().float().mean().item()
        # Under DDP every rank stops, and a rank whose own loss is finite must not report it as the cause.
        mine = not math.isfinite(value)
        what = f"the loss is {value}" if mine else f"another rank's loss is NaN/inf (here {value:.4g})"
        kept = (
            "No checkpoint was written (the first epoch did not finish)"
            if kept_epoch is None
            else f"The last checkpoint (the end of epoch {kept_epoch + 1}) is kept"
        )
        raise NonFiniteLossError(
            f"{what} at step {step}: training stopped. {kept}; lower the learning rate, add warm-up, or check the data."
        )


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """A tqdm bar over ``total`` steps showing running loss and accuracy, images/s and ETA.

    Args:
        total: number of steps (batches).
        desc: the bar's label, e.g. ``"epoch 3/10"``.
        enabled: ``False`` shows nothing (non-main ranks, ``--no-progress``).
    """

    def __init__(self, total: int, desc: str = "", enabled: bool = True):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True, unit="it")
        self.start = time.perf_counter()
        self.images = 0
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def update(self, images: int, **metrics: float) -> None:
        """Count one step of ``images`` images; ``metrics`` (loss, acc...) are averaged over images."""
        self.images += images
        for k, v in metrics.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                continue
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * images
            self.weights[k] = self.weights.get(k, 0.0) + images
        shown = {k: f"{self.sums[k] / self.weights[k]:.4g}" for k in self.sums}
        shown["img/s"] = f"{self.images_per_second:.0f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    @property
    def images_per_second(self) -> float:
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def means(self) -> dict[str, float]:
        """Image-weighted means of the metrics seen so far (this rank only)."""
        return {k: self.sums[k] / self.weights[k] for k in self.sums}

    def close(self) -> None:
        self.bar.close()
