"""Train and evaluate classifiers (ParNet and baselines) on Fashion-MNIST, CIFAR-10/100 and image folders.

The commands ``parnet train``, ``parnet eval`` and ``parnet plot``, and the same as a Python API::

    from parnet.train import TrainConfig, train, evaluate
    result = train(TrainConfig(dataset="fashion_mnist", epochs=1, output="runs/demo"))
    evaluate("runs/demo", dataset="fashion_mnist")     # raw, EMA and re-parameterized top-1/top-5

The recipe is the paper's: SGD with momentum, cosine schedule with linear warm-up, label smoothing
0.1, RandAugment ``rand-m9-mstd0.5``, random erasing and an EMA of the weights; bf16 autocast and
channels_last on CUDA (off on CPU, where they were measured to be slower here); ``--compile``.
Configuration comes from, in increasing priority: :class:`TrainConfig`'s defaults, the dataset's
defaults (``DATASET_DEFAULTS``; ``configs/<dataset>.yaml`` writes them out), with ``--resume`` the
run's own ``config.yaml``, a YAML file (``--config``), the command line.

``torchrun --nproc_per_node=N -m parnet train ...`` trains with DistributedDataParallel; every epoch
ends with a checkpoint in the run folder (see :mod:`parnet.engine`) that ``--resume`` continues
from exactly.

The loop below (:func:`_train`) reads top to bottom: setup, data, model, optimizer, resume, epochs
(train, evaluate, log, checkpoint), then the final evaluation of the re-parameterized model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import add_kwargs_option, create_model, model_name, nonneg_int, positive_int, refuse_reserved

__all__ = ["DATASET_DEFAULTS", "TrainConfig", "add_commands", "evaluate", "evaluate_model", "plot", "train"]


# -- configuration ------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of a training run (``parnet train --help`` shows the same with their defaults)."""

    dataset: str = "fashion_mnist"  # fashion_mnist, cifar10, cifar100 or imagefolder
    data_dir: str | None = None  # where the dataset is (default: the dataset's usual place)
    download: bool = False  # CIFAR: fetch it with torchvision if missing (needs internet)
    model: str = "parnet_cifar_s"  # any timm model name (ParNet variants, resnet20_cifar, ...)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    epochs: int = 30  # training epochs
    batch_size: int = 128  # images per step per process
    lr: float = 0.1  # peak learning rate (after warm-up)
    opt: str = "momentum"  # timm optimizer name: momentum = SGD with momentum (the paper), sgd = Nesterov, adamw...
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 weight decay (not applied to biases and norms)
    sched: str = "cosine"  # timm scheduler name
    warmup_epochs: float = 2  # linear warm-up from warmup_lr to lr, in epochs (fractional allowed)
    warmup_lr: float = 1e-4  # learning rate at the start of warm-up
    min_lr: float = 0.0  # learning rate at the end of the cosine
    label_smoothing: float = 0.1  # label smoothing of the cross-entropy
    auto_augment: str = "rand-m9-mstd0.5"  # timm RandAugment spec ("" for none)
    re_prob: float = 0.25  # random erasing probability
    hflip: float = 0.5  # horizontal flip probability
    mixup: float = 0.0  # Mixup alpha (0 = off)
    cutmix: float = 0.0  # CutMix alpha (0 = off)
    drop_rate: float = 0.0  # dropout before the classifier
    grad_clip: float = 0.0  # clip the gradient norm to this (0 = off)
    ema: bool = True  # keep an EMA of the weights (timm ModelEmaV3, with warm-up)
    ema_decay: float = 0.999  # EMA decay per step
    amp: str = "auto"  # autocast: bf16, fp16, off, or auto (bf16 on CUDA, and on a CPU with native bf16 if faster)
    channels_last: str = "auto"  # on, off, or auto (on with CUDA)
    compile: bool = False  # torch.compile the model
    workers: int = 2  # data loader worker processes
    seed: int = 0  # seed of everything (each rank adds its rank)
    device: str | None = None  # cpu or cuda (default: cuda when available)
    output: str = ""  # run folder (default runs/<dataset>-<model>)
    resume: bool = False  # continue the run in `output` from its last checkpoint, with its config.yaml's settings
    stop_after: int = 0  # end after this many epochs of this invocation (time-limited jobs); 0 = no limit
    train_subset: int = 0  # use only the first N training images (0 = all)
    test_subset: int = 0  # use only the first N test images (0 = all)
    eval_batch_size: int = 0  # evaluation batch size (0 = batch_size)
    progress: bool = True  # show a progress bar
    threads: int = 0  # torch CPU threads per process (0 = torch's default; 1 is fastest on a busy CPU)
    depth: bool = True  # measure the network depth at the end (torch.export; takes a few seconds)

    def run_dir(self) -> Path:
        return Path(self.output or f"runs/{self.dataset}-{self.model}")


# Defaults per dataset, applied over TrainConfig's and under a YAML file and the command line. This is
# the one source of them: configs/<dataset>.yaml only writes them out (a test holds the two equal),
# because configs/ is not part of the installed package.
# The model is parnet_cifar_s on every small-image dataset: the paper reports S, M and L on both
# CIFARs alike, so the dataset alone is no reason for a 12x bigger network (--model parnet_cifar_m).
# The EMA decay follows the run's length in steps, as timm's 0.9998 does for ImageNet: its horizon
# 1 / (1 - decay) should be a few epochs. Fashion-MNIST's 30 x 468 steps take 0.999 (about 2
# epochs), CIFAR's 200 x 390 steps 0.9995 (about 5 of 200), ImageNet's 120 x 5000 steps 0.9998.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(
        model="parnet_cifar_s", epochs=30, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=2
    ),
    "cifar10": dict(
        model="parnet_cifar_s", epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=5, ema_decay=0.9995
    ),
    "cifar100": dict(
        model="parnet_cifar_s", epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, warmup_epochs=5, ema_decay=0.9995
    ),
    # The paper's ImageNet recipe (lr 0.8 at batch 2048, 120 epochs, wd 5e-5), scaled to batch 256; 224 px
    # JPEGs with RandAugment need more loader workers (never more than the CPUs: see build_loaders).
    "imagefolder": dict(
        model="parnet_s",
        epochs=120,
        batch_size=256,
        lr=0.1,
        weight_decay=5e-5,
        warmup_epochs=5,
        ema_decay=0.9998,
        workers=8,
    ),
}


def _positive_float(s: Any) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _nonneg_float(s: Any) -> float:
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def _probability(s: Any) -> float:
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return v


def _decay(s: Any) -> float:
    v = float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {s}")
    return v


def _dataset_name(s: Any) -> str:
    from .data import DATASETS

    if s not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {s!r}; choose one of {', '.join(DATASETS)}")
    return str(s)


# model_kwargs keys the run sets itself, and why (checked on the command line and in files).
RESERVED_MODEL_KWARGS = {
    "in_chans": "set by the dataset's images",
    "num_classes": "set by the dataset",
    "drop_rate": "use --drop-rate",
}


def _mapping(v: Any) -> dict[str, Any]:
    """model_kwargs from a YAML file or the API (the command line builds it with add_kwargs_option)."""
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a mapping, got {v!r}")
    refuse_reserved(v, RESERVED_MODEL_KWARGS)
    return v


def _choice(*options: str):
    def check(s: Any) -> str:
        if isinstance(s, bool):  # YAML reads a bare on/off as a boolean
            s = "on" if s else "off"
        if str(s) not in options:
            raise argparse.ArgumentTypeError(f"choose one of {', '.join(options)}, got {s!r}")
        return str(s)

    return check


def _bool(s: Any) -> bool:
    if isinstance(s, bool):
        return s
    if str(s).lower() in ("1", "true", "yes", "on"):
        return True
    if str(s).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


# How each field is parsed and checked, on the command line and in YAML files.
_TYPES: dict[str, Any] = {
    "dataset": _dataset_name,
    "data_dir": str,
    "download": _bool,
    "model": model_name,
    "model_kwargs": _mapping,
    "epochs": positive_int,
    "batch_size": positive_int,
    "lr": _positive_float,
    "opt": str,
    "momentum": _nonneg_float,
    "weight_decay": _nonneg_float,
    # Schedules stepped per update (timm's "plateau" steps per epoch only, on a metric: not offered).
    "sched": _choice("cosine", "step", "multistep", "poly", "tanh", "wsd"),
    "warmup_epochs": _nonneg_float,
    "warmup_lr": _nonneg_float,
    "min_lr": _nonneg_float,
    "label_smoothing": _probability,
    "auto_augment": str,
    "re_prob": _probability,
    "hflip": _probability,
    "mixup": _nonneg_float,
    "cutmix": _nonneg_float,
    "drop_rate": _probability,
    "grad_clip": _nonneg_float,
    "ema": _bool,
    "ema_decay": _decay,
    "amp": _choice("auto", "bf16", "fp16", "off"),
    "channels_last": _choice("auto", "on", "off"),
    "compile": _bool,
    "workers": nonneg_int,
    "seed": nonneg_int,
    "device": _choice("cpu", "cuda"),
    "output": str,
    "resume": _bool,
    "stop_after": nonneg_int,
    "train_subset": nonneg_int,
    "test_subset": nonneg_int,
    "eval_batch_size": nonneg_int,
    "progress": _bool,
    "threads": nonneg_int,
    "depth": _bool,
}


def _field_help() -> dict[str, str]:
    """Each field's help text: the comment beside it in TrainConfig's source."""
    import inspect

    helps: dict[str, str] = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            helps[name] = rest.split("#", 1)[1].strip()
    return helps


def check_config(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Parse and check ``values`` (field -> value) with the command line's rules; ``ValueError`` if wrong."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for k, v in values.items():
        k = k.replace("-", "_")
        if k not in fields:
            raise ValueError(f"{source}: unknown setting {k!r}")
        if v is None:
            f = fields[k]
            if f.default is not None:  # only data_dir and device may be left empty
                example = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
                raise ValueError(f"{source}: {k}: needs a value (e.g. {example!r}), got none")
            out[k] = None
            continue
        try:
            out[k] = _TYPES[k](v)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ValueError(f"{source}: {k}: {e}") from None
    return out


# Settings of one invocation, not of the run: a resumed run does not take them from its config.yaml.
_PER_INVOCATION = ("output", "resume", "stop_after")


def _read_settings(path: Path) -> dict[str, Any]:
    """The checked settings of a YAML file."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(loaded).__name__}")
    return check_config(loaded, str(path))


def _with_dataset_defaults(settings: dict[str, Any]) -> TrainConfig:
    dataset = settings.get("dataset", TrainConfig.dataset)
    return TrainConfig(**{**DATASET_DEFAULTS.get(dataset, {}), **settings})


def make_config(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
    """A checked :class:`TrainConfig`: defaults, then the dataset's, then ``config_file`` (YAML), then ``overrides``.

    With ``resume``, the run's own ``config.yaml`` (in its output folder) comes under ``config_file``:
    a resumed run keeps its settings unless told otherwise, and ``train`` refuses a changed one
    that the restored state depends on (``_RESUME_FIXED``).
    """
    overrides = check_config(overrides or {}, "arguments")
    from_file: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        from_file = _read_settings(path)
    given = {**from_file, **overrides}
    cfg = _with_dataset_defaults(given)
    saved_file = cfg.run_dir() / "config.yaml"
    if cfg.resume and saved_file.is_file():
        saved = {k: v for k, v in _read_settings(saved_file).items() if k not in _PER_INVOCATION}
        cfg = _with_dataset_defaults({**saved, **given, "output": str(cfg.run_dir())})
    if cfg.mixup == 0 and cfg.cutmix == 0 and cfg.label_smoothing >= 1:
        raise ValueError("label_smoothing must be below 1")
    return cfg


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_model(
    model: Any, loader: Any, device: Any = "cpu", amp_dtype: Any = None, channels_last: bool = False
) -> dict[str, Any]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` over ``loader``, summed over all ranks.

    Also returns ``n`` (images) and ``preds`` (this rank's predicted classes, a tensor).
    """
    import torch

    from .engine import all_reduce_sum

    model.eval()
    device = torch.device(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    preds = []
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            totals[0] += (top[:, 0] == y).sum()
            totals[1] += (top == y[:, None]).any(dim=1).sum()
            totals[2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            totals[3] += len(y)
            preds.append(top[:, 0].cpu())
    totals = all_reduce_sum(totals)
    n = max(float(totals[3]), 1.0)
    return {
        "top1": 100 * float(totals[0]) / n,
        "top5": 100 * float(totals[1]) / n,
        "loss": float(totals[2]) / n,
        "n": int(totals[3]),
        "preds": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
    }


def _amp_dtype(amp: str, device: Any, model: Any = None, example: Any = None) -> Any:
    import torch

    if amp == "auto":  # bf16 on CUDA, and on a CPU with native bf16 where a step of the model measured faster
        from .precision import auto_amp

        return auto_amp(device, model, example)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _weights_metadata(cfg: TrainConfig, num_classes: int, in_chans: int) -> dict[str, str]:
    return {
        "timm_model": cfg.model,
        "model_kwargs": json.dumps(cfg.model_kwargs),
        "num_classes": str(num_classes),
        "in_chans": str(in_chans),
        "dataset": cfg.dataset,
    }


def _create_model(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any], drop_rate: float = 0.0) -> Any:
    return create_model(name, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **kwargs)


# What a run writes besides the engine's files; a new run must not overwrite them either.
_RESULT_FILES = ("results.json", "fused.safetensors", "ema_fused.safetensors")

# Settings a resumed run must keep: the data and model, and those the restored optimizer and schedule
# state would silently override (a longer --epochs would continue at the finished cosine's min_lr).
_RESUME_FIXED = ("dataset", "model", "model_kwargs", "batch_size", "seed", "train_subset", "epochs", "lr", "opt",
                 "momentum", "weight_decay", "sched", "warmup_epochs", "warmup_lr", "min_lr", "ema")  # fmt: skip


def _fusable(model: Any) -> bool:
    return any(hasattr(m, "reparameterize") for m in model.modules())


# -- training -----------------------------------------------------------------------------------


def train(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Train as ``config`` says (a :class:`TrainConfig` or a dict of its fields); returns the final results.

    Raises :class:`parnet.engine.NonFiniteLossError` if the loss becomes NaN/inf (the last
    checkpoint is kept), ``ValueError``/``FileNotFoundError`` for bad settings or data.
    """
    from . import engine

    cfg = config if isinstance(config, TrainConfig) else make_config(config)
    dist_info = engine.init_distributed(cfg.device)
    try:
        return _train(cfg, dist_info)
    finally:
        engine.cleanup_distributed()


def _train(cfg: TrainConfig, d: Any) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist
    import yaml
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, distribute_bn

    from . import engine
    from .data import AugmentCfg, build_datasets, build_loaders
    from .io import atomic_write

    t_start = time.perf_counter()
    run_dir = cfg.run_dir()
    log = print if d.is_main else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    engine.check_run_folder(run_dir, cfg.resume, _RESULT_FILES)
    engine.seed_everything(cfg.seed, d.rank)

    # Data: the train split with the paper's augmentation, sharded over ranks; the full test split.
    aug = AugmentCfg(auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, hflip=cfg.hflip)
    train_set, test_set, info = build_datasets(
        cfg.dataset, cfg.data_dir, aug, cfg.download, cfg.train_subset, cfg.test_subset
    )
    train_loader, test_loader, loader_gen = build_loaders(
        train_set,
        test_set,
        cfg.batch_size,
        cfg.workers,
        cfg.seed,
        d.rank,
        d.world_size,
        cfg.eval_batch_size or None,
        pin_memory=d.device.type == "cuda",
    )
    steps_per_epoch = len(train_loader)

    # Model, EMA, optimizer, schedule, loss.
    model = _create_model(cfg.model, info.num_classes, info.in_chans, cfg.model_kwargs, cfg.drop_rate)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and d.device.type == "cuda")
    model = model.to(d.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    n_params = sum(p.numel() for p in model.parameters())
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    optimizer = create_optimizer_v2(model, cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    probe = torch.randn(min(cfg.batch_size, 64), info.in_chans, info.img_size, info.img_size, device=d.device)
    amp_dtype = _amp_dtype(cfg.amp, d.device, model, probe)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)
    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=info.num_classes,
        )
        criterion: Any = SoftTargetCrossEntropy()
    elif cfg.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    # Resume: weights, EMA, optimizer, schedule, scaler, every RNG (each rank its own).
    generators = {"loader": loader_gen}
    start_epoch, global_step, extra = 0, 0, {}
    if cfg.resume:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))  # tuples as the file has them: lists
        changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in _RESUME_FIXED if k in saved and saved[k] != now[k]]
        if changed:
            raise ValueError(
                f"--resume: {run_dir} was trained with other settings: {'; '.join(changed)} "
                f"(leave them out to take the run's, from {run_dir / 'config.yaml'})"
            )
        start_epoch, extra = engine.load_checkpoint(
            run_dir, model, ema, optimizer, scheduler, scaler, generators, restore_rng=False
        )
        if extra.get("world_size", 1) != d.world_size:
            raise ValueError(f"--resume: the run used {extra.get('world_size')} processes, now {d.world_size}")
        engine.set_rng_state(extra["rng_ranks"][d.rank], generators)
        global_step = int(extra["global_step"])
        log(f"resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")
    if start_epoch >= cfg.epochs:
        log(f"{run_dir} has already finished its {cfg.epochs} epochs")

    train_model: Any = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if d.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None
        )

    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(run_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    logger = engine.MetricLogger(run_dir, d.is_main, start_epoch if cfg.resume else None)
    log(
        f"{cfg.model}: {n_params / 1e6:.3f} M params | {cfg.dataset}: {len(train_set)} train / {len(test_set)} test "
        f"images | {d.world_size} process(es) on {d.device} | {cfg.epochs} epochs of {steps_per_epoch} steps"
    )

    # The epochs.
    train_seconds = float(extra.get("train_seconds", 0.0))
    train_images = int(extra.get("train_images", 0))
    epochs_run = 0
    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after and epochs_run >= cfg.stop_after:
            log(f"stopping after {epochs_run} epoch(s) (--stop-after); continue with --resume")
            break
        train_loader.sampler.set_epoch(epoch)
        train_model.train()
        bar = engine.Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", d.is_main and cfg.progress)
        t0 = time.perf_counter()
        for x, y in train_loader:
            x = x.to(d.device, non_blocking=True)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = y.to(d.device, non_blocking=True)
            target = y
            if mixup_fn is not None:
                x, target = mixup_fn(x, y)
            with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = train_model(x)
                loss = criterion(logits, target)
            engine.check_finite(loss, global_step, d)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            scheduler.step_update(global_step)
            if ema is not None:
                ema.update(model, step=global_step)
            acc = (logits.detach().argmax(1) == y).float().mean().item() * 100
            bar.update(len(y), loss=loss.item(), acc=acc)
        epoch_seconds = time.perf_counter() - t0
        bar.close()
        scheduler.step(epoch + 1)
        train_seconds += epoch_seconds
        train_images += steps_per_epoch * cfg.batch_size * d.world_size
        means = bar.means()
        if d.distributed:
            # Each rank's BN running statistics (and their EMA) saw only its own batches: average them, so
            # that every rank evaluates, and rank 0 saves, the same model (timm's --dist-bn reduce).
            distribute_bn(model, d.world_size, reduce=True)
            if ema is not None:
                distribute_bn(ema.module, d.world_size, reduce=True)

        # Evaluate raw and EMA weights on the test split; log; checkpoint.
        res = evaluate_model(model, test_loader, d.device, amp_dtype, channels_last)
        last_preds = {"": res["preds"]}
        metrics = {
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": engine.reduce_mean(means.get("loss", float("nan")), d.device),
            "train_acc": engine.reduce_mean(means.get("acc", float("nan")), d.device),
            "test_loss": res["loss"],
            "test_top1": res["top1"],
            "test_top5": res["top5"],
        }
        if ema is not None:
            res_ema = evaluate_model(ema.module, test_loader, d.device, amp_dtype, channels_last)
            metrics.update(ema_loss=res_ema["loss"], ema_top1=res_ema["top1"], ema_top5=res_ema["top5"])
            last_preds["ema_"] = res_ema["preds"]
        metrics.update(
            epoch_seconds=epoch_seconds,
            images_per_s=steps_per_epoch * cfg.batch_size * d.world_size / epoch_seconds,
            global_step=global_step,
        )
        logger.log(epoch, metrics)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f} | "
            f"test top-1 {metrics['test_top1']:.2f}"
            + (f" | EMA top-1 {metrics['ema_top1']:.2f}" if ema is not None else "")
            + f" | {metrics['images_per_s']:.0f} img/s"
        )
        rng_ranks = [engine.rng_state(generators)]
        if d.distributed:
            rng_ranks = [None] * d.world_size
            tdist.all_gather_object(rng_ranks, engine.rng_state(generators))
        if d.is_main:
            engine.save_checkpoint(
                run_dir,
                epoch,
                model,
                ema,
                optimizer,
                scheduler,
                scaler,
                extra={
                    "config": dataclasses.asdict(cfg),
                    "global_step": global_step,
                    "world_size": d.world_size,
                    "rng_ranks": rng_ranks,
                    "train_seconds": train_seconds,
                    "train_images": train_images,
                },
                metadata=_weights_metadata(cfg, info.num_classes, info.in_chans),
                generators=generators,
            )
        if d.distributed:
            tdist.barrier()
        epochs_run += 1
    logger.close()

    results: dict[str, Any] = {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": cfg.dataset,
        "params": n_params,
        "epochs_done": start_epoch + epochs_run,
        "epochs": cfg.epochs,
        "train_seconds": train_seconds,
        "train_images_per_s": train_images / train_seconds if train_seconds else None,
        "world_size": d.world_size,
        "device": str(d.device),
        **{k: v for k, v in metrics.items() if k.startswith(("test_", "ema_"))},
    }
    if d.distributed:
        # Every rank must hold the same weights, BN statistics and EMA after DDP training: compare a checksum.
        nets = [model] + ([ema.module] if ema is not None else [])
        flat = torch.cat([t.detach().double().reshape(-1) for net in nets for t in net.state_dict().values()])
        check = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device) % 7919).sum()])
        gathered = [torch.zeros_like(check) for _ in range(d.world_size)]
        tdist.all_gather(gathered, check)
        results["ranks_agree"] = all(torch.equal(g, gathered[0]) for g in gathered)
    if epochs_run > 0 and results["epochs_done"] == cfg.epochs:
        results.update(_final_eval(model, ema, test_loader, d, amp_dtype, info, cfg, run_dir, last_preds))
        results["wall_seconds"] = time.perf_counter() - t_start
        if d.is_main:
            with atomic_write(run_dir / "results.json") as tmp:
                tmp.write_text(json.dumps(results, indent=2))
            log(json.dumps({k: v for k, v in results.items() if k != "model_kwargs"}, indent=None))
    return results


def _final_eval(
    model: Any,
    ema: Any,
    loader: Any,
    d: Any,
    amp_dtype: Any,
    info: Any,
    cfg: TrainConfig,
    run_dir: Path,
    ref_preds: dict[str, Any],
) -> dict[str, Any]:
    """Depth, and the re-parameterized (fused) raw and EMA models' scores; writes the fused weights.

    ``ref_preds`` are the unfused models' predictions (keys ``""`` and ``"ema_"``) to compare with.
    """
    import torch

    from . import network_depth, reparameterize
    from .engine import _write_weights

    out: dict[str, Any] = {}
    example = torch.randn(1, info.in_chans, info.img_size, info.img_size, device=d.device)
    model.eval()
    try:
        out["depth"] = network_depth(model, example) if cfg.depth else None
    except Exception as e:  # noqa: BLE001 - depth needs torch.export; report, don't fail the run
        out["depth"] = None
        out["depth_error"] = str(e)[:200]
    if not _fusable(model):
        return out
    for name, net in [("", model)] + ([("ema_", ema.module)] if ema is not None else []):
        fused = reparameterize(net)
        res = evaluate_model(fused, loader, d.device, amp_dtype)
        out[f"{name}fused_top1"] = res["top1"]
        out[f"{name}fused_top5"] = res["top5"]
        out[f"{name}fused_prediction_changes"] = int((res["preds"] != ref_preds[name]).sum())
        if d.is_main:
            meta = {**_weights_metadata(cfg, info.num_classes, info.in_chans), "fused": "True"}
            from .model import ParNet

            if isinstance(fused, ParNet):
                from .io import model_metadata

                meta.update(model_metadata(fused))
            _write_weights(run_dir / f"{name}fused.safetensors", fused, meta)
    out["fused_params"] = sum(p.numel() for p in reparameterize(model).parameters())
    return out


# -- evaluating checkpoints ---------------------------------------------------------------------


def load_weights(path: str | os.PathLike, device: str = "cpu", official: bool | None = None, use_ema: bool = False):
    """A model from a run folder's ``last.safetensors``-style file, any file of ours, or an authors' checkpoint."""
    import torch

    from . import reparameterize
    from .io import is_torch_checkpoint, read_safetensors
    from .official import load_official

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if official or (official is None and is_torch_checkpoint(path)):  # by content, not only by name
        return load_official(path, use_ema=use_ema).to(device).eval()
    state, meta = read_safetensors(path, None, device)
    if "timm_model" not in meta:
        from .io import load_model

        return load_model(path, device)
    model = _create_model(
        meta["timm_model"], int(meta["num_classes"]), int(meta["in_chans"]), json.loads(meta["model_kwargs"])
    )
    if meta.get("fused") == "True":
        model = reparameterize(model, inplace=True)
    model.load_state_dict(state)
    return model.to(torch.device(device)).eval()


def evaluate(
    checkpoint: str | os.PathLike,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    workers: int = 2,
    test_subset: int = 0,
    device: str | None = None,
    official: bool | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 of a checkpoint on a dataset's test split, and of its re-parameterized form.

    ``checkpoint`` is a run folder (its raw and EMA weights are both scored), a ``.safetensors``
    file of this project, or an authors' ``.pth.tar`` (``load_official``, EMA weights when present).
    ``dataset`` defaults to the run's. Returns ``{"raw": {...}, "raw_fused": {...}, "ema": ...}``.
    """
    import torch

    from . import reparameterize
    from .data import DATASETS, build_datasets, build_loaders
    from .deployed import is_deployed_file, load_deployed
    from .io import is_torch_checkpoint

    path = Path(checkpoint)
    nets: dict[str, Any] = {}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dataset = None  # the dataset a run folder was trained on, from its config.yaml
    if path.is_dir():
        if not (path / "last.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no last.safetensors: is it a training run folder?")
        nets["raw"] = load_weights(path / "last.safetensors", str(dev))
        if (path / "last_ema.safetensors").is_file():
            nets["ema"] = load_weights(path / "last_ema.safetensors", str(dev))
        if (path / "config.yaml").is_file():
            import yaml

            run_cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
            run_dataset = run_cfg.get("dataset")
            if dataset is None:
                dataset, data_dir = run_dataset, data_dir or run_cfg.get("data_dir")
    elif official or (official is None and path.is_file() and is_torch_checkpoint(path)):  # by content
        from .official import load_official, read_checkpoint

        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        ckpt = read_checkpoint(path)
        nets["raw"] = load_official(ckpt, use_ema=False).to(dev)
        if "state_dict_ema" in ckpt:
            nets["ema"] = load_official(ckpt, use_ema=True).to(dev)
    elif is_deployed_file(path):  # written by `parnet quantize`: runs on its engine, on the CPU
        nets["raw"] = load_deployed(path)
        run_dataset = nets["raw"].dataset
        dataset, dev = dataset or run_dataset, torch.device("cpu")
    else:
        nets["raw"] = load_weights(path, str(dev), official=False)
    dataset = dataset or "fashion_mnist"
    first = next(iter(nets.values()))
    # The model's input channels (ParNet's in_chans, else its first convolution's), checked before
    # looking for the data, which may not be there.
    conv = next((m for m in first.modules() if isinstance(m, torch.nn.Conv2d)), None)
    model_chans = getattr(first, "in_chans", conv.in_channels if conv is not None else None)
    chans = getattr(DATASETS.get(dataset), "in_chans", None)
    if chans and model_chans and model_chans != chans:
        trained_on = f"{model_chans}-channel data" + (f" ({run_dataset})" if run_dataset else "")
        raise ValueError(
            f"{path} was trained on {trained_on}, {dataset} has {chans}-channel images: "
            f"evaluate it on {run_dataset or f'a {model_chans}-channel dataset'}"
            + (f" (leave out --dataset, or pass --dataset {run_dataset})" if run_dataset else "")
        )
    _, test_set, info = build_datasets(dataset, data_dir, test_subset=test_subset)
    _, loader, _ = build_loaders(test_set, test_set, 1, workers, eval_batch_size=batch_size)
    if getattr(first, "num_classes", info.num_classes) != info.num_classes:
        raise ValueError(f"{path} has {first.num_classes} classes, {dataset} has {info.num_classes}")
    out: dict[str, dict[str, float]] = {}
    for name, net in nets.items():
        res = evaluate_model(net, loader, dev)
        out[name] = {k: v for k, v in res.items() if k != "preds"}
        if _fusable(net):
            fused = reparameterize(net)
            res_f = evaluate_model(fused, loader, dev)
            out[f"{name}_fused"] = {k: v for k, v in res_f.items() if k != "preds"}
            out[f"{name}_fused"]["prediction_changes"] = int((res_f["preds"] != res["preds"]).sum())
        if progress:
            print(f"{name}: " + json.dumps(out[name]), flush=True)
    return out


# -- plots --------------------------------------------------------------------------------------


def plot(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Draw the learning curves of a run (loss, accuracy, learning rate per epoch) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .engine import read_metrics
    from .io import atomic_write

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no epochs yet")
    epochs = [r["epoch"] + 1 for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, series("train_loss"), "o-", label="train")
    axes[0].plot(epochs, series("test_loss"), "o-", label="test")
    if "ema_loss" in rows[0]:
        axes[0].plot(epochs, series("ema_loss"), "o-", label="test (EMA)")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].plot(epochs, series("train_acc"), "o-", label="train (augmented)")
    axes[1].plot(epochs, series("test_top1"), "o-", label="test top-1")
    if "ema_top1" in rows[0]:
        axes[1].plot(epochs, series("ema_top1"), "o-", label="test top-1 (EMA)")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[2].plot(epochs, series("lr"), "o-")
    axes[2].set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(output or run_dir / "curves.png")
    with atomic_write(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


# -- command line -------------------------------------------------------------------------------


def _add_train_args(p: argparse.ArgumentParser) -> None:
    helps = _field_help()
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (field: value), under the command line")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else {}
        text = f"{helps.get(f.name, '')} (default {default!r}"
        text += ", or the dataset's)" if any(f.name in v for v in DATASET_DEFAULTS.values()) else ")"
        text = text.replace("%", "%%")
        if f.name == "model_kwargs":
            add_kwargs_option(p, flag, text, default=argparse.SUPPRESS, reserved=RESERVED_MODEL_KWARGS)
        elif f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            p.add_argument(flag, type=_TYPES[f.name], default=argparse.SUPPRESS, help=text)


def _train_command(args: argparse.Namespace) -> int:
    from .engine import NonFiniteLossError

    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    cfg = make_config(overrides, args.config)
    try:
        train(cfg)
    except NonFiniteLossError as e:
        print(f"parnet train: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("parnet train: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    out = evaluate(
        args.checkpoint,
        args.dataset,
        args.data_dir,
        args.batch_size,
        args.workers,
        args.test_subset,
        args.device,
        official=True if args.official else None,
    )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("| weights | top-1 | top-5 | loss | images |\n|---|---|---|---|---|")
        for name, r in out.items():
            print(f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {r['loss']:.4f} | {r['n']} |")
    return 0


def _plot_command(args: argparse.Namespace) -> int:
    print(f"wrote {plot(args.run_dir, args.output)}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``train``, ``eval`` and ``plot`` to the ``parnet`` command line."""
    p = subparsers.add_parser(
        "train",
        help="train a classifier (Fashion-MNIST, CIFAR, image folders) with the paper's recipe",
        description="Train with the paper's recipe. Settings: defaults < dataset defaults < --config FILE < flags.",
    )
    _add_train_args(p)
    p.set_defaults(func=_train_command)

    p = subparsers.add_parser("eval", help="top-1/top-5 of a run or checkpoint, raw, EMA and re-parameterized")
    p.add_argument(
        "checkpoint", help="a run folder, a .safetensors file, an authors' .pth.tar, or a `parnet quantize` file"
    )
    p.add_argument(
        "--dataset", type=_dataset_name, default=None, help="dataset (default: the run's, else fashion_mnist)"
    )
    p.add_argument("--data-dir", default=None, help="where the dataset is (default: its usual place)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size")
    p.add_argument("--workers", type=nonneg_int, default=2, help="data loader worker processes")
    p.add_argument("--test-subset", type=nonneg_int, default=0, help="only the first N test images (0 = all)")
    p.add_argument("--device", type=_choice("cpu", "cuda"), default=None, help="cpu or cuda (default: cuda if any)")
    p.add_argument("--official", action="store_true", help="the checkpoint is an authors' .pth.tar (load_official)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_eval_command)

    p = subparsers.add_parser("plot", help="draw a run's learning curves to PNG")
    p.add_argument("run_dir", help="the training run folder (with metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(func=_plot_command)
