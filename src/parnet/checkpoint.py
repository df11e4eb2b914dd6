"""A run folder that survives a kill at any instant: the training state, weights, metrics, a lock.

Every file but the ``.lock`` and TensorBoard's events goes through :func:`parnet.io.atomic_write`.
The training state (``last_state.pt``) is the authority: it holds the weights, EMA, optimizer,
schedule, scaler, every RNG state, the run's settings and metric rows (in ``extra``), and the
``stage`` the run reached: ``"epochs"`` while it trains, ``"finished"`` once every final file is
written. The other files are derived from it and written after it, so a kill between two writes
loses nothing: a resumed run rewrites them from the state (:func:`write_run_weights`,
``MetricLogger(rows=...)``), and stale temporary files are removed
(:func:`parnet.io.remove_temporaries`, under the folder's lock).

``check_run_folder(run_dir, resume, results, derived) -> bool``
    Refuses a new run over an old one, ``--output`` that is a file, and ``--resume`` of a folder
    whose checkpoint is gone; returns whether there is a checkpoint to resume from.
``RunLock(run_dir)``
    ``fcntl.flock`` on ``run_dir/.lock`` for the whole run: a second training into the folder is
    refused while the first runs (the kernel drops the lock when a process dies).
``save_checkpoint(run_dir, epoch, model, ema, optimizer, scheduler, scaler, extra, metadata, generators)``
    :func:`save_state` (``last_state.pt``), then :func:`write_run_weights` (``last.safetensors``,
    ``last_ema.safetensors``: the weights to evaluate or deploy, the epoch and ``metadata`` in the
    header, :func:`weights_header`: a ParNet's :func:`parnet.io.model_metadata` too, so
    :func:`parnet.io.load_model` reads it). Call it on the main rank only; DDP, ``torch.compile`` and EMA
    wrappers are unwrapped (``timm.utils.unwrap_model``).
``read_state(run_dir)``, ``load_checkpoint(run_dir, model, ema, optimizer, scheduler, scaler) -> (next_epoch, extra)``
    A damaged state is a ``ValueError`` naming the file. Under DDP only rank 0's RNG states are in
    ``rng``; the classification loop keeps every rank's in ``extra["rng_ranks"]``.
``mark_finished(run_dir)``
    Sets the state's stage to ``"finished"``, after the run's final files are on disk.
``MetricLogger``, ``read_metrics``
    ``metrics.jsonl``, ``metrics.csv`` and TensorBoard; a damaged line is named.
``seed_everything``, ``rng_state``, ``set_rng_state``
    Seed and capture / restore python, numpy, torch (CPU, CUDA) and given generators.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import unwrap_model  # DDP, torch.compile and timm's ModelEma* wrappers
from torch import nn

from .io import atomic_write, check_output_path, write_safetensors

__all__ = [
    "FINISHED",
    "MetricLogger",
    "RunLock",
    "check_run_folder",
    "load_checkpoint",
    "mark_finished",
    "read_metrics",
    "read_state",
    "rng_state",
    "save_checkpoint",
    "save_state",
    "seed_everything",
    "set_rng_state",
    "weights_header",
    "write_run_weights",
]

STATE_FILE = "last_state.pt"
WEIGHTS_FILE = "last.safetensors"
EMA_WEIGHTS_FILE = "last_ema.safetensors"
METRICS_FILE = "metrics.jsonl"
METRICS_TABLE_FILE = "metrics.csv"  # the same rows, for spreadsheets and plots
CONFIG_FILE = "config.yaml"  # the run's settings (parnet train --config reads it)
RESULTS_FILE = "results.json"  # a finished run's final scores
LOCK_FILE = ".lock"
# A finished run's re-parameterized weights, EMA first: what is left where the last* files were pruned to save space.
FUSED_WEIGHTS_FILE, EMA_FUSED_WEIGHTS_FILE = "fused.safetensors", "ema_fused.safetensors"
FUSED_WEIGHTS_FILES = (EMA_FUSED_WEIGHTS_FILE, FUSED_WEIGHTS_FILE)
# The files that make a folder a run (config.yaml alone is left by a run killed in its first epoch).
RUN_FILES = (STATE_FILE, WEIGHTS_FILE, EMA_WEIGHTS_FILE, METRICS_FILE)
# Written from the state, so a new run would replace them: a folder holding one is not taken for a new run.
DERIVED_FILES = (METRICS_TABLE_FILE, CONFIG_FILE)
FINISHED = "finished"


# -- the run folder -----------------------------------------------------------------------------


def run_started(run_dir: str | os.PathLike) -> bool:
    """Whether a run was started in ``run_dir`` (its settings or lock file are there), checkpoint or not."""
    return (Path(run_dir) / CONFIG_FILE).is_file() or (Path(run_dir) / LOCK_FILE).is_file()


def check_run_folder(
    run_dir: str | os.PathLike, resume: bool, results: Sequence[str] = (), derived: Sequence[str] = ()
) -> bool:
    """Refuse to start a new run over an old one, or to resume one without its checkpoint.

    Any file of a run counts (``RUN_FILES`` and the task's ``results``), not only its checkpoint,
    which a user may delete to save space; a new run also refuses a folder holding a file it would
    replace (``DERIVED_FILES`` and the task's ``derived``: a ``config.yaml`` or ``metrics.csv`` of the user's is never
    overwritten; the ``config.yaml`` beside the lock file of a run killed in its first epoch may be).
    ``--resume`` of a folder a run was started in (its
    ``config.yaml`` or lock file is there) but that holds no checkpoint yet (killed in its first
    epoch) starts from the beginning. Returns whether there is a checkpoint to resume from.
    """
    run_dir = Path(run_dir)
    check_output_path(run_dir, folder=True, what="--output")
    held = [name for name in (*RUN_FILES, *results) if (run_dir / name).is_file()]
    if resume:
        if (run_dir / STATE_FILE).is_file():
            return True
        if not run_started(run_dir):
            raise FileNotFoundError(f"--resume: no checkpoint at {run_dir / STATE_FILE}, and no run was started there")
        if held:
            raise FileNotFoundError(
                f"--resume: no checkpoint at {run_dir / STATE_FILE}; the folder holds {', '.join(held)}, but a run "
                "cannot be continued without its checkpoint (start a new run in another --output)"
            )
        return False
    if held:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "or choose another --output (or remove the folder)"
        )
    replaced = [name for name in (*DERIVED_FILES, *derived) if (run_dir / name).exists()]
    if (run_dir / LOCK_FILE).is_file() and replaced == [CONFIG_FILE]:
        return False  # the config.yaml of a run killed in its first epoch (its lock file is there): reused
    if replaced:
        raise ValueError(
            f"{run_dir} holds {', '.join(replaced)}, which a new run would replace: --resume restarts a run "
            "killed there before its first checkpoint; otherwise choose another --output (or move the files)"
        )
    return False


# File descriptors of the run locks this process holds. A forked child (a DataLoader worker) closes its copies:
# they would keep the lock after the training process is killed, until the workers notice (seconds later).
_HELD_LOCKS: set[int] = set()


def _close_held_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's copy: the parent's lock stays (flock belongs to the open file)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


class RunLock:
    """An exclusive ``fcntl.flock`` on ``run_dir/.lock`` (made, with the folder, if missing).

    ``ValueError`` if another process holds it: one training writes into a folder at a time. The
    lock file holds the owner's process id, for the message; it is left in place (removing it would
    race with a waiting process).
    """

    def __init__(self, run_dir: str | os.PathLike):
        import fcntl

        self.path = Path(run_dir) / LOCK_FILE
        check_output_path(self.path.parent, folder=True, what="--output")
        self._made_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise ValueError(
                f"{self.path.parent} is in use by another training (process {owner}): wait for it to end, "
                "or choose another --output"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        _HELD_LOCKS.add(self._fd)

    def release(self) -> None:
        """Drop the lock; a folder made only for it (the run failed before writing) is removed again."""
        if self._fd < 0:
            return
        if self._made_folder and [p.name for p in self.path.parent.iterdir()] == [LOCK_FILE]:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()
        _HELD_LOCKS.discard(self._fd)
        os.close(self._fd)  # closing drops the flock
        self._fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# -- checkpoints --------------------------------------------------------------------------------


def weights_header(model: nn.Module, metadata: dict[str, str], epoch: int | None = None) -> dict[str, str]:
    """The header of a run's weights file of ``model``: ``metadata`` (the run's, ``train._weights_metadata``),
    with a ParNet's architecture (:func:`parnet.io.model_metadata`: ``parnet.io.load_model`` reads the file too)
    and the epoch it ends, when given."""
    from .io import model_metadata
    from .model import ParNet

    meta = model_metadata(model) if isinstance(model, ParNet) else {}
    meta.update({k: str(v) for k, v in metadata.items()})
    if epoch is not None:
        meta["epoch"] = str(epoch)
    return meta


def save_state(
    run_dir: str | os.PathLike,
    epoch: int,
    model: nn.Module,
    ema: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    extra: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> Path:
    """Write ``last_state.pt`` of finished epoch ``epoch`` (stage ``"epochs"``); returns its path.

    ``extra`` must hold only tensors, numbers, strings, ``None`` and containers of them.
    ``generators`` (e.g. ``{"loader": g}``) are saved with the other RNG states.
    """
    model = unwrap_model(model)
    state = {
        "format": "parnet-train-state",
        "epoch": int(epoch),
        "stage": "epochs",
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        # timm's key for EMA weights: timm.models.load_checkpoint(model, path, use_ema=True) reads them
        "model_ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and getattr(scaler, "is_enabled", lambda: 1)() else None,
        "rng": rng_state(generators),
        "extra": extra or {},
    }
    return _write_state(Path(run_dir) / STATE_FILE, state)


def _write_state(path: Path, state: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)  # serialize fully before touching the disk
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def write_run_weights(
    run_dir: str | os.PathLike,
    epoch: int,
    model: nn.Module,
    ema: nn.Module | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """``last.safetensors`` (and ``last_ema.safetensors``) of epoch ``epoch``: the same bytes for the same weights."""
    run_dir, model = Path(run_dir), unwrap_model(model)
    meta = weights_header(model, metadata or {}, epoch)
    write_safetensors(run_dir / WEIGHTS_FILE, model, meta)
    if ema is not None:
        write_safetensors(run_dir / EMA_WEIGHTS_FILE, unwrap_model(ema), {**meta, "ema": "True"})


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
    """The checkpoint of finished epoch ``epoch``: :func:`save_state`, then :func:`write_run_weights`."""
    path = save_state(run_dir, epoch, model, ema, optimizer, scheduler, scaler, extra, generators)
    write_run_weights(run_dir, epoch, model, ema, metadata)
    return path


def mark_finished(run_dir: str | os.PathLike) -> None:
    """Record in the state that every final file of the run is on disk (stage ``"finished"``)."""
    state = read_state(run_dir)
    state["stage"] = FINISHED
    _write_state(Path(run_dir) / STATE_FILE, state)


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
    state: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint written by :func:`save_checkpoint` (or ``state``, already read) into what is passed.

    Returns ``(next_epoch, extra)``: the epoch to continue from (the saved one plus one) and the
    ``extra`` dict saved with it. The weights are checked against the model first
    (:func:`parnet.weights.check_state_dict`: names, shapes, dtypes).
    """
    from .weights import check_state_dict

    state = read_state(run_dir) if state is None else state
    source = f"the checkpoint in {run_dir}"
    check_state_dict(unwrap_model(model).state_dict(), state["model"], source)
    unwrap_model(model).load_state_dict(state["model"])
    if ema is not None:
        ema_state = state["model_ema"] if "model_ema" in state else state.get("ema")  # "ema": files written before
        if ema_state is None:
            raise ValueError(f"checkpoint in {run_dir} has no EMA weights, but an EMA was asked for")
        check_state_dict(ema.state_dict(), ema_state, f"the EMA weights of {source}")
        ema.load_state_dict(ema_state)
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
        start_epoch: resuming at this epoch: TensorBoard events from it on are purged; with no
            ``rows``, the earlier rows of an existing ``metrics.jsonl`` are kept.
        tensorboard: also write TensorBoard scalars to ``run_dir/tb`` (if tensorboard is installed).
        rows: the rows so far, from the checkpoint (the authority): the files are rewritten from
            them at once, so rows a kill kept from reaching the files are restored.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        start_epoch: int | None = None,
        tensorboard: bool = True,
        rows: list[dict[str, Any]] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        jsonl = self.run_dir / METRICS_FILE
        if rows is not None:
            self.rows = [dict(r) for r in rows]
            self._write_files()
        elif start_epoch is not None and jsonl.is_file():
            self.rows = [r for r in read_metrics(jsonl) if r.get("epoch", 0) < start_epoch]
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            # A kill between an epoch's checkpoint and its TensorBoard write loses that epoch's scalars: the
            # last checkpointed row is purged and written again (the checkpoint's rows are the authority).
            replay = [r for r in self.rows if start_epoch is not None and r["epoch"] == start_epoch - 1]
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_epoch - 1 if replay else start_epoch)
            for r in replay:
                self._add_scalars(r)

    def row(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The row :meth:`log` records for ``metrics`` of ``epoch`` (plain numbers and strings)."""
        return {"epoch": int(epoch), **{k: _plain(v) for k, v in metrics.items()}}

    def log(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of ``epoch`` (numbers and strings); files are rewritten atomically."""
        if not self.enabled:
            return
        row = self.row(epoch, metrics)
        self.rows = [r for r in self.rows if r["epoch"] != epoch] + [row]
        self._write_files()
        if self._tb is not None:
            self._add_scalars(row)

    def _add_scalars(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, row["epoch"])
        self._tb.flush()

    def _write_files(self) -> None:
        with atomic_write(self.run_dir / METRICS_FILE) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with atomic_write(self.run_dir / METRICS_TABLE_FILE) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)

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
    """Rows of a ``metrics.jsonl`` (a run folder or the file itself); a damaged line is named."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path} (is it a training run folder?)")
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not a JSON row ({e.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise ValueError(f"{path}, line {number}: a row must be a JSON object with an integer epoch")
        rows.append(row)
    return rows


# -- randomness and wrappers ----------------------------------------------------------------------


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


def unfinished_run(checkpoint: str | os.PathLike) -> str | None:
    """For a run folder whose training has not finished: how far it got (``"epoch 1 of 3"``); else ``None``.

    Only the run's length is read from its ``config.yaml`` (``parnet train``'s dump of its settings), so plain YAML,
    not ``settings.read_yaml``: the loaders check the file as settings.
    """
    import yaml

    run = Path(checkpoint)
    config = run / CONFIG_FILE
    if not run.is_dir() or (run / RESULTS_FILE).is_file() or not config.is_file():
        return None
    try:
        settings = yaml.safe_load(config.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:  # a one-line ValueError naming the file, as read_yaml's
        raise ValueError(f"cannot read {config}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{config} must hold a mapping of settings, got {type(settings).__name__}")
    epochs = settings.get("epochs")
    done = len(read_metrics(run)) if (run / METRICS_FILE).is_file() else 0
    return f"epoch {done} of {epochs}"
