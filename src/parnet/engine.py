"""Training machinery shared by every training loop of this project (classification, detection).

Nothing here knows about a task; a loop calls these in order:

``init_distributed() -> DistInfo``
    Reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; starts the process group (gloo on
    CPU; on CUDA nccl for CUDA tensors and gloo for CPU ones) when ``WORLD_SIZE > 1``.
    ``cleanup_distributed()`` ends it.
    ``all_reduce_sum(tensor)`` and ``reduce_mean(value)`` combine metrics across ranks (no-ops
    when not distributed).

``seed_everything(seed, rank)``, ``rng_state()``, ``set_rng_state(state)``
    Seeds python, numpy and torch (``seed + rank``), and captures / restores all their states
    plus any ``torch.Generator`` passed in (e.g. the data loader's), for exact resumption.

``save_checkpoint(run_dir, epoch, model, ema, optimizer, scheduler, scaler, extra, metadata, generators)``
    Writes, each atomically (:func:`parnet.io.atomic_write`):

    * ``run_dir/last_state.pt``: everything, the weights included: ``epoch`` (the last finished
      one), ``model``, ``ema``, ``optimizer``, ``scheduler``, ``scaler`` state dicts, ``rng``
      and ``extra`` (any dict: config, best metric, generator states...). It is the one file
      resumption reads, so a process killed at any moment leaves either the previous or the new
      checkpoint, never a mix of two epochs.
    * ``run_dir/last.safetensors`` (and ``last_ema.safetensors`` with an EMA): the weights to
      evaluate or deploy, with ``metadata`` (strings) and the epoch in the safetensors header;
      for a ParNet also the metadata of :func:`parnet.io.save_model`, so
      :func:`parnet.io.load_model` reads it directly.

    Call it on the main rank only (it writes on any rank that calls it); a DDP or ``torch.compile``
    wrapper is unwrapped.

``load_checkpoint(run_dir, model, ema=None, optimizer=None, scheduler=None, scaler=None) -> (next_epoch, extra)``
    Restores what is passed from ``last_state.pt`` (RNG states too, unless ``restore_rng=False``)
    and returns the epoch to continue from and the ``extra`` dict. A truncated or corrupt file
    raises ``ValueError`` naming it. ``read_state(run_dir)`` returns the raw dict. Under DDP only
    rank 0's RNG states are in ``rng``; the classification loop gathers every rank's into
    ``extra["rng_ranks"]`` and restores them itself (``restore_rng=False``).

``MetricLogger(run_dir, enabled, start_epoch)``
    ``.log(epoch, {"train_loss": ..., ...})`` rewrites ``metrics.jsonl`` and ``metrics.csv``
    atomically and adds scalars to TensorBoard (``run_dir/tb``) when it is installed; rows from
    ``start_epoch`` on (left by a run killed after logging) are dropped when resuming.
    ``read_metrics(run_dir)`` reads the rows back.

``NonFiniteLossError``, ``check_finite(loss, step, dist_info=None)``
    Raise a clear error on a NaN/inf loss (agreed across ranks when ``dist_info`` is distributed).

``Progress(total, desc, enabled)``
    A tqdm bar: ``.update(images, loss=..., acc=...)`` shows running means, images/s and ETA.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .io import atomic_write, write_safetensors

__all__ = [
    "DistInfo",
    "MetricLogger",
    "NonFiniteLossError",
    "Progress",
    "all_reduce_sum",
    "check_finite",
    "check_run_folder",
    "cleanup_distributed",
    "init_distributed",
    "load_checkpoint",
    "read_metrics",
    "read_state",
    "reduce_mean",
    "rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_rng_state",
    "unwrap_model",
]

STATE_FILE = "last_state.pt"
WEIGHTS_FILE = "last.safetensors"
EMA_WEIGHTS_FILE = "last_ema.safetensors"
METRICS_FILE = "metrics.jsonl"
# The files that make a folder a run (config.yaml alone is left by a run killed in its first epoch).
RUN_FILES = (STATE_FILE, WEIGHTS_FILE, EMA_WEIGHTS_FILE, METRICS_FILE)


def check_run_folder(run_dir: str | os.PathLike, resume: bool, results: Sequence[str] = ()) -> None:
    """Refuse to resume a run without a checkpoint, or to start a new run over an old one.

    Any file of a run counts (``RUN_FILES`` and the task's ``results``), not only its checkpoint,
    which a user may delete to save space.
    """
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {run_dir / STATE_FILE}")
        return
    held = [name for name in (*RUN_FILES, *results) if (run_dir / name).is_file()]
    if held:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "or choose another --output (or remove the folder)"
        )


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# -- randomness ---------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with ``seed + rank``."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state this process uses: python, numpy, torch CPU/CUDA, and ``generators``.

    The result holds only tensors, numbers, strings and containers, so it round-trips through
    ``torch.load(weights_only=True)``.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured (``generators`` by name, those present in ``state``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state.get("generators", {}):
            g.set_state(state["generators"][name])


# -- checkpoints --------------------------------------------------------------------------------


def _safetensors_metadata(model: nn.Module, epoch: int, metadata: dict[str, str] | None) -> dict[str, str]:
    from .model import ParNet

    meta: dict[str, str] = {}
    if isinstance(model, ParNet):
        from .io import model_metadata

        meta.update(model_metadata(model))
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    meta["epoch"] = str(epoch)
    return meta


def _ema_module(ema: nn.Module) -> nn.Module:
    """The averaged network inside a timm ``ModelEma*`` (or ``ema`` itself)."""
    return getattr(ema, "module", ema)


def save_checkpoint(
    run_dir: str | os.PathLike,
    epoch: int,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    extra: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write the checkpoint of finished epoch ``epoch`` (see the module docstring); returns the state path.

    ``extra`` must hold only tensors, numbers, strings, ``None`` and containers of them.
    ``generators`` (e.g. ``{"loader": g}``) are saved with the other RNG states.
    """
    run_dir = Path(run_dir)
    model = unwrap_model(model)
    state = {
        "format": "parnet-train-state",
        "epoch": int(epoch),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and getattr(scaler, "is_enabled", lambda: 1)() else None,
        "rng": rng_state(generators),
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)  # serialize fully before touching the disk
    path = run_dir / STATE_FILE
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    meta = _safetensors_metadata(model, epoch, metadata)
    write_safetensors(run_dir / WEIGHTS_FILE, model, meta)
    if ema is not None:
        write_safetensors(run_dir / EMA_WEIGHTS_FILE, _ema_module(ema), {**meta, "ema": "True"})
    return path


def read_state(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``run_dir/last_state.pt`` (or a state file given directly), safely (``weights_only``)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"cannot read checkpoint {path} (truncated or corrupt?): {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != "parnet-train-state":
        raise ValueError(f"{path} is not a parnet training checkpoint")
    return state


def load_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint written by :func:`save_checkpoint` into what is passed.

    Returns ``(next_epoch, extra)``: the epoch to continue from (the saved one plus one) and the
    ``extra`` dict saved with it.
    """
    state = read_state(run_dir)
    unwrap_model(model).load_state_dict(state["model"])
    if ema is not None:
        if state["ema"] is None:
            raise ValueError(f"checkpoint in {run_dir} has no EMA weights, but an EMA was asked for")
        ema.load_state_dict(state["ema"])
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng:
        set_rng_state(state["rng"], generators)
    return int(state["epoch"]) + 1, state["extra"]


# -- metrics ------------------------------------------------------------------------------------


class MetricLogger:
    """Per-epoch metrics to ``metrics.jsonl``, ``metrics.csv`` and TensorBoard (main rank only).

    Args:
        run_dir: the run folder.
        enabled: ``False`` on non-main ranks: every call does nothing.
        start_epoch: keep only earlier rows of an existing ``metrics.jsonl`` (resumption); ``None``
            starts afresh (existing files are replaced on the first ``log``).
        tensorboard: also write TensorBoard scalars to ``run_dir/tb`` (if tensorboard is installed).
    """

    def __init__(
        self, run_dir: str | os.PathLike, enabled: bool = True, start_epoch: int | None = None, tensorboard: bool = True
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.run_dir / METRICS_FILE
        if start_epoch is not None and jsonl.is_file():
            self.rows = [r for r in read_metrics(jsonl) if r.get("epoch", 0) < start_epoch]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_epoch)
            except ImportError:
                self._tb = None

    def log(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of ``epoch`` (numbers and strings); files are rewritten atomically."""
        if not self.enabled:
            return
        row = {"epoch": int(epoch), **{k: _plain(v) for k, v in metrics.items()}}
        self.rows = [r for r in self.rows if r["epoch"] != epoch] + [row]
        with atomic_write(self.run_dir / METRICS_FILE) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with atomic_write(self.run_dir / "metrics.csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)
        if self._tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, epoch)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path} (is it a training run folder?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- loss checks --------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last good checkpoint is kept."""


def check_finite(loss: torch.Tensor, step: int, dist_info: DistInfo | None = None) -> None:
    """Raise :class:`NonFiniteLossError` if ``loss`` is NaN/inf (on any rank, when ``dist_info`` is distributed)."""
    bad = ~torch.isfinite(loss.detach()).all()
    if dist_info is not None and dist_info.distributed:
        bad = all_reduce_sum(bad.to(torch.float32).reshape(1)) > 0
    if bool(bad):
        value = loss.detach().float().mean().item()
        # Under DDP every rank stops, and a rank whose own loss is finite must not report it as the cause.
        mine = not math.isfinite(value)
        what = f"the loss is {value}" if mine else f"another rank's loss is NaN/inf (here {value:.4g})"
        raise NonFiniteLossError(
            f"{what} at step {step}: training stopped. The last checkpoint (the end of the "
            "previous epoch) is kept; lower the learning rate, add warm-up, or check the data."
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
