"""Train classifiers (ParNet and baselines) on Fashion-MNIST, CIFAR-10/100 and image folders.

The command ``parnet train`` (:mod:`parnet.cli.train`), and the same as a Python API::

    from parnet.train import TrainConfig, train
    from parnet.evaluate import evaluate
    result = train(TrainConfig(dataset="fashion_mnist", epochs=1, output="runs/demo"))
    evaluate("runs/demo")     # raw, EMA and re-parameterized top-1/top-5

The recipe is the paper's: SGD with momentum, cosine schedule with linear warm-up, label smoothing
0.1, RandAugment ``rand-m9-mstd0.5``, random erasing and an EMA of the weights; bf16 autocast on CUDA,
and on a CPU with native bf16 where a timed step is faster (:mod:`parnet.precision`); channels_last on
CUDA only; ``--compile``.
The settings are :class:`parnet.settings.TrainConfig` (validated; see :func:`parnet.settings.make_config`
for where they come from).

``torchrun --nproc_per_node=N -m parnet train ...`` trains with DistributedDataParallel; every epoch
ends with a checkpoint in the run folder (:mod:`parnet.checkpoint`) that ``--resume`` continues from
exactly, whenever the process was killed.

The loop below (:func:`_train`) reads top to bottom: setup, data, model, optimizer, resume, epochs
(train, evaluate, checkpoint, log), then the final stage: the re-parameterized models' scores, the
fused weights and results.json, after which the checkpoint says the run is finished.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CONFIG_FILE, FUSED_WEIGHTS_FILES, RESULTS_FILE
from .factory import create_classifier
from .scoring import evaluate_model
from .settings import PER_INVOCATION, TrainConfig, make_config, peak_lr

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .data import DatasetInfo
    from .engine import DistInfo

__all__ = ["TrainConfig", "train"]


def _weights_metadata(cfg: TrainConfig, info: DatasetInfo, image_prep: dict[str, Any] | None = None) -> dict[str, str]:
    """The header of a run's weights files: the model to build, and the data it reads, with its class names and,
    where not ImageNet's, how an image folder's images are prepared."""
    return {
        **({"image_prep": json.dumps(image_prep)} if image_prep is not None else {}),
        "timm_model": cfg.model,
        "model_kwargs": json.dumps(cfg.model_kwargs),
        "num_classes": str(info.num_classes),
        "in_chans": str(info.in_chans),
        "dataset": cfg.dataset,
        "img_size": str(cfg.img_size),
        "class_names": json.dumps(list(info.classes), ensure_ascii=False),
        "data_dir": info.default_dir,  # where it was read, as an absolute path
    }


# What a run writes besides the engine's files; a new run must not overwrite them either.
_RESULT_FILES = (RESULTS_FILE, *FUSED_WEIGHTS_FILES)

# How --layer-decay's optimizer groups were made (ParNet.group_matcher), saved with a run: its optimizer state
# fits those groups only.
LAYER_GROUPS = "depth"

# Settings a resumed run must keep: the data and model, and those the restored optimizer and schedule
# state would silently override (a longer --epochs would continue at the finished cosine's min_lr).
_RESUME_FIXED = ("dataset", "img_size", "model", "model_kwargs", "batch_size", "seed", "train_subset", "epochs", "lr",
                 "lr_base_size", "opt", "momentum", "weight_decay", "layer_decay", "sched", "warmup_epochs",
                 "warmup_lr", "warmup_prefix", "min_lr", "decay_epochs", "decay_milestones", "decay_rate",
                 "ema")  # fmt: skip


# -- training -----------------------------------------------------------------------------------


def train(config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    """Train as ``config`` says (a :class:`TrainConfig` or a dict of its fields); returns the final results.

    Raises :class:`parnet.engine.NonFiniteLossError` if the loss becomes NaN/inf (the last
    checkpoint is kept), ``ValueError``/``FileNotFoundError`` for bad settings or data, and
    ``ValueError`` while another training writes into the run folder (its lock).
    """
    import contextlib

    from . import engine

    # A TrainConfig built by hand gets what the command line's gets: the dataset's defaults, the image size and
    # data folder resolved, the checks across settings (its fields set: a make_config result comes out unchanged).
    if isinstance(config, TrainConfig):
        config = config.model_dump(include=config.model_fields_set)
    cfg = make_config(config)
    dist_info = engine.init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, once taken
            return _train(cfg, dist_info, held)
    finally:
        engine.cleanup_distributed()


def _check_resume_classes(saved: list[str] | None, classes: tuple[str, ...], run_dir: Path, data: str) -> None:
    """Refuse a resumed run whose data now has other classes (a class folder renamed, added or removed would
    shift or break the labels the weights learnt)."""
    if saved is None or list(saved) == list(classes):
        return
    from .data import class_difference

    raise ValueError(
        f"--resume: {run_dir} was trained on other classes than {data} now has "
        f"({class_difference(saved, classes, 'no longer there', 'new')}): restore the data's class folders, "
        "or start a new run (--initial-checkpoint keeps its weights)"
    )


def _check_resume_settings(cfg: TrainConfig, saved: dict[str, Any] | None, run_dir: Path) -> None:
    """Refuse a resumed run whose settings differ from its checkpoint's in what the restored state depends on."""
    import yaml

    if not saved:
        return
    now = yaml.safe_load(yaml.safe_dump(cfg.model_dump()))  # tuples as the checkpoint has them: lists
    # A setting added since the run was saved: it ran with the default (img_size: resolved from its data then).
    default = {k: f.get_default(call_default_factory=True) for k, f in TrainConfig.model_fields.items()}
    was = {k: saved.get(k, default[k]) for k in _RESUME_FIXED if k != "img_size" or k in saved}
    changed = [f"{k} was {was[k]!r}, now {now[k]!r}" for k in was if was[k] != now[k]]
    if changed:
        raise ValueError(
            f"--resume: {run_dir} was trained with other settings: {'; '.join(changed)} "
            "(leave them out to take the run's, from its checkpoint)"
        )


def _decay_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """timm's decay keywords for the step schedules, defaulting to the run's length (timm's own defaults, 90
    epochs and milestones 90/180/270, are ImageNet's: a shorter run would never decay)."""
    if cfg.sched == "step":
        return {"decay_epochs": cfg.decay_epochs or cfg.epochs / 3, "decay_rate": cfg.decay_rate}
    if cfg.sched == "multistep":
        return {"decay_milestones": cfg.decay_milestones or [cfg.epochs / 2, cfg.epochs * 3 / 4],
                "decay_rate": cfg.decay_rate}  # fmt: skip
    return {"decay_epochs": cfg.decay_epochs} if cfg.sched == "wsd" and cfg.decay_epochs else {}


def _train(cfg: TrainConfig, d: DistInfo, held: ExitStack) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist
    import yaml
    from timm.utils import ModelEmaV3, distribute_bn

    from . import checkpoint, engine
    from .data import AugmentCfg, build_datasets
    from .io import atomic_write, remove_temporaries
    from .loaders import available_cpus, build_loaders
    from .precision import autocast_dtype

    t_start = time.perf_counter()
    run_dir = cfg.run_dir()
    log = print if d.is_main else (lambda *a, **k: None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        if cfg.threads > (cpus := available_cpus()):  # oversubscribed threads spin on each other: many times slower
            log(f"warning: --threads {cfg.threads} is more than the CPUs this process may use ({cpus}): slower")
    checkpoint.check_run_folder(run_dir, cfg.resume, _RESULT_FILES)  # before any work: nothing written yet
    if d.is_main:  # one training writes into a folder at a time; then look again, under the lock
        held.enter_context(checkpoint.RunLock(run_dir))
    has_checkpoint = checkpoint.check_run_folder(run_dir, cfg.resume, _RESULT_FILES)
    if d.is_main and (removed := remove_temporaries(run_dir)):  # left by a killed run
        log(f"removed {len(removed)} temporary file(s) a killed run left in {run_dir}")
    checkpoint.seed_everything(cfg.seed, d.rank)
    state = checkpoint.read_state(run_dir) if has_checkpoint else None

    # Data: the train split with the paper's augmentation, sharded over ranks; the full test split.
    aug = AugmentCfg(auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, hflip=cfg.hflip)
    image_prep = state["extra"].get("image_prep") if state is not None else _pretrained_image_prep(cfg)
    train_set, test_set, info = build_datasets(
        cfg.dataset, cfg.data_dir, aug, cfg.download, cfg.train_subset, cfg.test_subset, img_size=cfg.img_size,
        image_prep=image_prep,
    )  # fmt: skip
    if image_prep is not None and state is None:
        log(f"images prepared as {cfg.model}'s released weights were trained: {image_prep}")
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
    model = _create_model(cfg, info, has_checkpoint, log)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and d.device.type == "cuda")
    model = model.to(d.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    n_params = sum(p.numel() for p in model.parameters())
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    lr = peak_lr(cfg, d.world_size)
    if cfg.lr_base_size:
        global_batch = cfg.batch_size * d.world_size
        log(f"--lr {cfg.lr:g} for {cfg.lr_base_size} images: {lr:g} for the global batch of {global_batch}")
    optimizer, scheduler = _optimizer_and_schedule(cfg, model, lr, steps_per_epoch)
    if state is not None:
        _check_resume(cfg, state["extra"], run_dir, info.classes)
    amp = _settle_amp(cfg.amp, state, d, model, info, cfg.batch_size)
    if cfg.amp == "auto":  # timed on this machine: say what it chose
        log(f"--amp auto: {'float32' if amp == 'off' else amp}" + (" (the run's checkpoint)" if state else ""))
    amp_dtype = autocast_dtype(amp)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)
    mixup_fn, criterion = _loss(cfg, info.num_classes)
    weights_meta = _weights_metadata(cfg, info, image_prep)

    # Resume from the checkpoint, the authority: weights, EMA, optimizer, schedule, scaler, every RNG (each
    # rank its own), metric rows, the stage reached; the weights files a kill may have left behind rewritten.
    generators = {"loader": loader_gen}
    start_epoch, global_step, extra, stage = 0, 0, {}, "epochs"
    if state is not None:
        start_epoch, extra = checkpoint.load_checkpoint(
            run_dir, model, ema, optimizer, scheduler, scaler, generators, restore_rng=False, state=state
        )
        stage = state.get("stage", "epochs")
        del state
        if extra.get("world_size", 1) != d.world_size:
            raise ValueError(f"--resume: the run used {extra.get('world_size')} processes, now {d.world_size}")
        checkpoint.set_rng_state(extra["rng_ranks"][d.rank], generators)
        global_step = int(extra["global_step"])
        if d.is_main:
            checkpoint.write_run_weights(run_dir, start_epoch - 1, model, ema, weights_meta)
        at = f"at epoch {start_epoch + 1}/{cfg.epochs}"
        log(f"resuming {run_dir} " + (at if start_epoch < cfg.epochs else f"after its {cfg.epochs} epochs"))
    elif cfg.resume:
        log(f"{run_dir} holds no checkpoint yet: starting from the first epoch")

    train_model: Any = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if d.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None
        )

    if d.is_main:  # the run's settings, to read or replay with --config: not this invocation's folder or stop
        run_settings = {k: v for k, v in cfg.model_dump().items() if k not in PER_INVOCATION}
        with atomic_write(run_dir / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(run_settings, sort_keys=False))
    # Rows from the checkpoint (None from one written before it held them: metrics.jsonl's earlier rows).
    logger = checkpoint.MetricLogger(
        run_dir, d.is_main, start_epoch if has_checkpoint else None, rows=extra.get("metrics")
    )
    log(
        f"{cfg.model}: {n_params / 1e6:.3f} M params | {cfg.dataset}: {len(train_set)} train / {len(test_set)} test "
        f"images | {d.world_size} process(es) on {d.device} | {cfg.epochs} epochs of {steps_per_epoch} steps"
    )
    if cfg.dataset == "imagefolder":  # the classes as read from the folders, for the user to check
        shown = ", ".join(info.classes[:20]) + (f", ... ({len(info.classes)} in all)" if len(info.classes) > 20 else "")
        log(f"classes: {shown}")
        if info.num_classes == 1:
            log(f"warning: {cfg.data_dir}/train has one class folder: every prediction is that class")

    # The epochs.
    train_seconds = float(extra.get("train_seconds", 0.0))
    wall_before = float(extra.get("wall_seconds", 0.0))  # the earlier invocations', to their last checkpoint
    train_images = int(extra.get("train_images", 0))
    epochs_run = 0
    metrics: dict[str, Any] = {}
    last_preds: dict[str, Any] = {}

    def save(epoch: int, row: dict[str, Any], rng_ranks: list[Any]) -> None:
        """The checkpoint of ``epoch`` (main rank), with the metric rows up to its ``row``."""
        checkpoint.save_checkpoint(
            run_dir, epoch, model, ema, optimizer, scheduler, scaler,
            extra={
                "config": cfg.model_dump(),
                "classes": list(info.classes),
                "amp": amp,
                "global_step": global_step,
                "wall_seconds": wall_before + time.perf_counter() - t_start,
                "world_size": d.world_size,
                "rng_ranks": rng_ranks,
                "train_seconds": train_seconds,
                "train_images": train_images,
                "image_prep": image_prep,
                "layer_groups": LAYER_GROUPS,
                "metrics": [r for r in logger.rows if r["epoch"] < epoch] + [logger.row(epoch, row)],
            },
            metadata=weights_meta,
            generators=generators,
        )  # fmt: skip

    def score_and_save(epoch: int, trained: dict[str, Any]) -> dict[str, Any]:
        """Score the raw and EMA weights of ``epoch`` on the test split, checkpoint (the metrics with it), then
        log them; returns the row. Test data that fails to load (one process) checkpoints the epoch's training
        first: ``--resume`` scores it once the data is fixed."""
        nonlocal last_preds
        rng_before = [checkpoint.rng_state(generators)]  # scoring draws a loader seed from torch's RNG
        try:
            res = evaluate_model(model, test_loader, d.device, amp_dtype, channels_last)
            scores = {"test_loss": res["loss"], "test_top1": res["top1"], "test_top5": res["top5"]}
            last_preds = {"": res["preds"]}
            if ema is not None:
                res_ema = evaluate_model(ema.module, test_loader, d.device, amp_dtype, channels_last)
                scores.update(ema_loss=res_ema["loss"], ema_top1=res_ema["top1"], ema_top5=res_ema["top5"])
                last_preds["ema_"] = res_ema["preds"]
        except Exception:
            if not d.distributed:  # (under DDP the other ranks wait in a collective: nothing is saved)
                save(epoch, trained, rng_before)
                print(f"epoch {epoch + 1}'s training is saved in {run_dir}: fix the test data and continue with "
                      "--resume", file=sys.stderr, flush=True)  # fmt: skip
            raise
        train_keys = ("lr", "train_loss", "train_acc")
        rest = {k: v for k, v in trained.items() if k not in train_keys}  # timings: after the scores, as always
        row = {**{k: trained[k] for k in train_keys}, **scores, **rest}
        rng_ranks = [checkpoint.rng_state(generators)]
        if d.distributed:
            rng_ranks = [None] * d.world_size
            tdist.all_gather_object(rng_ranks, checkpoint.rng_state(generators))
        if d.is_main:
            save(epoch, row, rng_ranks)
        logger.log(epoch, row)
        return row

    owed = (extra.get("metrics") or [{}])[-1]
    if has_checkpoint and start_epoch > 0 and owed and "test_top1" not in owed:  # its test data failed to load
        log(f"scoring epoch {start_epoch}, whose test data failed to load")
        metrics = score_and_save(start_epoch - 1, {k: v for k, v in owed.items() if k != "epoch"})
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after and epochs_run >= cfg.stop_after:
            log(f"stopping after {epochs_run} epoch(s) (--stop-after); continue with --resume")
            break
        train_loader.sampler.set_epoch(epoch)
        train_model.train()
        bar = engine.Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", d.is_main and cfg.progress)
        t0 = time.perf_counter()
        step_lr = optimizer.param_groups[0]["lr"]
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
            engine.check_finite(loss, global_step, d, kept_epoch=epoch - 1 if epoch > 0 else None)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this step uses, logged for its epoch
            _step(loss, model, optimizer, scaler, cfg.grad_clip)
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

        # Score raw and EMA weights on the test split; checkpoint (the metrics with it); then log them.
        metrics = score_and_save(
            epoch,
            {
                "lr": step_lr,  # of the epoch's last step (the schedule has moved on for the next one)
                "train_loss": engine.reduce_mean(means.get("loss", float("nan")), d.device),
                "train_acc": engine.reduce_mean(means.get("acc", float("nan")), d.device),
                "epoch_seconds": epoch_seconds,
                "images_per_s": steps_per_epoch * cfg.batch_size * d.world_size / epoch_seconds,
                "global_step": global_step,
            },
        )
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f} | "
            f"test top-1 {metrics['test_top1']:.2f}"
            + (f" | EMA top-1 {metrics['ema_top1']:.2f}" if ema is not None else "")
            + f" | {metrics['images_per_s']:.0f} img/s"
        )
        if d.distributed:
            tdist.barrier()
        epochs_run += 1
    logger.close()

    epochs_done = start_epoch + epochs_run
    last_row = metrics or (extra.get("metrics") or logger.rows or [{}])[-1]  # this invocation's, else the run's
    results: dict[str, Any] = {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": cfg.dataset,
        "img_size": info.img_size,
        "params": n_params,
        "epochs_done": epochs_done,
        "epochs": cfg.epochs,
        "train_seconds": train_seconds,
        "train_images_per_s": train_images / train_seconds if train_seconds else None,
        "world_size": d.world_size,
        "device": str(d.device),
        "amp": amp,
        **{k: v for k, v in last_row.items() if k.startswith(("test_", "ema_"))},
    }
    if epochs_done < cfg.epochs:
        return results
    if stage == checkpoint.FINISHED and (run_dir / RESULTS_FILE).is_file():
        log(f"{run_dir} has already finished its {cfg.epochs} epochs")
        return json.loads((run_dir / RESULTS_FILE).read_text())

    # The final stage: fused files and results.json, then the checkpoint says the run is finished. Killed
    # before that, --resume comes back here and writes the same files from the same weights.
    if d.distributed:  # every rank must hold the same weights, BN statistics and EMA after DDP training
        results["ranks_agree"] = _ranks_agree([model] + ([ema.module] if ema is not None else []), d.world_size)
    if not last_preds and amp_dtype is None:  # resumed after the last epoch: its predictions again (deterministic)
        last_preds = {"": evaluate_model(model, test_loader, d.device, amp_dtype, channels_last)["preds"]}
        if ema is not None:
            last_preds["ema_"] = evaluate_model(ema.module, test_loader, d.device, amp_dtype, channels_last)["preds"]
    results.update(_final_eval(model, ema, test_loader, d, amp_dtype, info, cfg, run_dir, last_preds, weights_meta))
    results["wall_seconds"] = wall_before + time.perf_counter() - t_start  # every invocation's, as train_seconds
    if d.is_main:
        with atomic_write(run_dir / RESULTS_FILE) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
        checkpoint.mark_finished(run_dir)
        log(json.dumps({k: v for k, v in results.items() if k != "model_kwargs"}, indent=None))
    if d.distributed:
        tdist.barrier()
    return results


def _optimizer_and_schedule(cfg: TrainConfig, model: Any, lr: float, steps_per_epoch: int) -> tuple[Any, Any]:
    """timm's optimizer (``--layer-decay``: ParNet's depth groups) and its schedule, stepped every update."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(
        model, cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, layer_decay=cfg.layer_decay
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        cfg.sched,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        warmup_prefix=cfg.warmup_prefix,
        min_lr=cfg.min_lr,
        **_decay_arguments(cfg),
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def _check_resume(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path, classes: tuple[str, ...]) -> None:
    """Refuse to resume a run whose checkpoint (``saved``: its ``extra``) the restored state would not fit: other
    settings, an older version's optimizer groups, other classes."""
    _check_resume_settings(cfg, saved.get("config"), run_dir)
    if cfg.layer_decay and saved.get("layer_groups") != LAYER_GROUPS:
        raise ValueError(
            f"--resume: {run_dir} was started by an earlier version, whose --layer-decay grouped ParNet's "
            "parameters stream by stream (now by depth): its optimizer state fits those groups only; start "
            "the run again, or resume it with the version that started it"
        )
    _check_resume_classes(saved.get("classes"), classes, run_dir, cfg.data_dir or cfg.dataset)


def _step(loss: Any, model: Any, optimizer: Any, scaler: Any, grad_clip: float) -> None:
    """One update: backward (scaled for float16), gradients clipped to ``grad_clip`` (0: not), the optimizer step."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _create_model(cfg: TrainConfig, info: DatasetInfo, has_checkpoint: bool, log: Callable[..., None]) -> nn.Module:
    """The run's model, with its starting weights unless a checkpoint will give them: timm's released ones for
    ``--pretrained`` or their offline copy as ``--initial-checkpoint``; a file of ours or the authors' through
    :func:`parnet.transfer.initialize_from`. A ParNet that cannot take the run's image size is refused here."""
    import torch

    from .official import is_timm_weights

    initial = None if has_checkpoint else cfg.initial_checkpoint
    timm_file = initial if initial and is_timm_weights(Path(initial)) else None
    model = create_classifier(
        cfg.model, info.num_classes, info.in_chans, cfg.model_kwargs, cfg.drop_rate, cfg.drop_path_rate,
        pretrained=cfg.pretrained and not has_checkpoint, pretrained_file=timm_file,
    )  # fmt: skip
    if timm_file:
        log(f"starting from {timm_file}, read as timm reads {cfg.model}'s released weights")
    elif cfg.pretrained and not has_checkpoint:
        log(f"starting from timm's released weights of {cfg.model}")
    elif "." in cfg.model and not cfg.initial_checkpoint and not has_checkpoint:
        log(f"note: {cfg.model} names released weights, but the run starts from random ones: add --pretrained")
    if hasattr(model, "check_input"):  # a ParNet: refuse a size it cannot take before any work
        try:
            model.check_input(torch.empty(1, info.in_chans, info.img_size, info.img_size, device="meta"))
        except ValueError as e:
            raise ValueError(f"--img-size {info.img_size} does not suit {cfg.model}: {e}") from None
    if initial and not timm_file:
        from .transfer import initialize_from

        log(initialize_from(model, initial, info.classes))
    return model


def _pretrained_image_prep(cfg: TrainConfig) -> dict[str, Any] | None:
    """How a new run prepares an image folder's images: as timm's released weights it starts from were trained
    (``--pretrained``, or their file as ``--initial-checkpoint``), as timm's train.py does; ``None`` otherwise
    (ImageNet's statistics, bicubic, 0.875)."""
    if cfg.dataset != "imagefolder":
        return None
    from .official import is_timm_weights

    initial = cfg.initial_checkpoint
    if not (cfg.pretrained or (initial and is_timm_weights(Path(initial)))):
        return None
    import timm

    from .data import image_prep_of

    pretrained = timm.models.get_pretrained_cfg(cfg.model)
    return image_prep_of(pretrained.to_dict() if pretrained is not None else None)


def _loss(cfg: TrainConfig, num_classes: int) -> tuple[Any, Any]:
    """timm's mixup/cutmix (``None`` when off) and the loss that goes with it: soft targets under mixup, else
    label smoothing where asked, else plain cross-entropy."""
    import torch
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
        )
        return mixup, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return None, torch.nn.CrossEntropyLoss()


def _ranks_agree(nets: list[nn.Module], world_size: int) -> bool:
    """Whether every rank holds the same tensors in ``nets`` (weights and buffers): a checksum gathered from all."""
    import torch
    import torch.distributed as tdist

    flat = torch.cat([t.detach().double().reshape(-1) for net in nets for t in net.state_dict().values()])
    check = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device) % 7919).sum()])
    gathered = [torch.zeros_like(check) for _ in range(world_size)]
    tdist.all_gather(gathered, check)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _settle_amp(
    amp: str, state: dict[str, Any] | None, d: DistInfo, model: nn.Module, info: DatasetInfo, batch_size: int
) -> str:
    """The run's autocast precision, ``bf16``, ``fp16`` or ``off``: ``auto`` is settled once per run.

    On a CPU ``auto`` times a training step (:func:`parnet.precision.auto_amp`), which can come out
    differently on another start: so a resumed run takes the precision its checkpoint recorded (another one
    asked for is refused), and every rank takes rank 0's. bf16 on a CPU without native bf16 is refused:
    torch would emulate it.
    """
    import torch

    from .precision import PROBE_BATCH, auto_amp, has_native_bf16

    recorded = state["extra"].get("amp") if state is not None else None
    if (recorded or amp) == "bf16" and d.device.type == "cpu" and not has_native_bf16():
        where = "this run trains in bf16 (its checkpoint says so)" if recorded else "--amp bf16 was asked for"
        raise ValueError(
            f"{where}, but this CPU has no native bf16 (AVX512-BF16 or AMX): torch would emulate it, measured "
            "12x slower than fp32 on an AVX2-only EPYC; "
            + ("resume it on a CPU with native bf16" if recorded else "use --amp off (or auto)")
        )
    if recorded and amp not in ("auto", recorded):  # a flag given with --resume must not go unheard
        raise ValueError(
            f"this run trains with --amp {recorded} (its checkpoint says so); --amp {amp} would change its precision "
            "midway: resume without --amp, or start a new run"
        )
    if recorded:
        return recorded
    if amp == "fp16" and d.device.type == "cpu" and d.is_main:  # allowed (torch runs it), but say what it costs
        note = "a tiny ParNet trained at 9 images/s against 88 in float32 on an AMX Xeon"
        print(f"warning: --amp fp16 on a CPU is slow ({note}): --amp bf16 (native bf16 CPUs) or off", flush=True)
    if amp != "auto":
        return amp
    with torch.random.fork_rng(devices=[]):  # the probe's draws (input, dropout) leave the run's RNG as it was
        size = min(batch_size, PROBE_BATCH)
        probe = torch.randn(size, info.in_chans, info.img_size, info.img_size, device=d.device)
        dtype = auto_amp(d.device, model, probe)
    settled = [{torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")]
    if d.distributed:
        import torch.distributed as tdist

        tdist.broadcast_object_list(settled, src=0)
    return settled[0]


def _final_eval(
    model: nn.Module,
    ema: Any,
    loader: Any,
    d: DistInfo,
    amp_dtype: torch.dtype | None,
    info: DatasetInfo,
    cfg: TrainConfig,
    run_dir: Path,
    ref_preds: dict[str, Any],
    weights_meta: dict[str, str],
) -> dict[str, Any]:
    """Depth, and the re-parameterized (fused) raw and EMA models' scores; writes the fused weights.

    ``ref_preds`` are the unfused models' predictions (keys ``""`` and ``"ema_"``) to compare with. The fused
    models are scored in float32, as ``parnet eval`` scores them: under autocast the fused and unfused convs
    round differently, and the comparison would count rounding as fusion changes. A run trained under autocast
    (whose epochs are scored in its precision, as timm's are) also gets its unfused models' float32 scores
    (``fp32_top1``, ``ema_fp32_top1``) to compare with.
    """
    import torch

    from . import checkpoint
    from .depth import network_depth
    from .io import write_safetensors
    from .layers import has_fusable_blocks, reparameterize

    out: dict[str, Any] = {}
    example = torch.randn(1, info.in_chans, info.img_size, info.img_size, device=d.device)
    model.eval()
    try:
        out["depth"] = network_depth(model, example) if cfg.depth else None
    except Exception as e:  # noqa: BLE001 - depth needs torch.export; report, don't fail the run
        out["depth"] = None
        out["depth_error"] = str(e)[:200]
    if not has_fusable_blocks(model):
        return out
    weights = [("", model, checkpoint.FUSED_WEIGHTS_FILE)]
    if ema is not None:
        weights.append(("ema_", ema.module, checkpoint.EMA_FUSED_WEIGHTS_FILE))
    for name, net, fused_file in weights:
        if amp_dtype is not None:
            unfused = evaluate_model(net, loader, d.device)
            out[f"{name}fp32_top1"], out[f"{name}fp32_top5"] = unfused["top1"], unfused["top5"]
            ref_preds = {**ref_preds, name: unfused["preds"]}
        fused = reparameterize(net)
        res = evaluate_model(fused, loader, d.device, reference=ref_preds[name])  # changes counted on every rank
        out[f"{name}fused_top1"] = res["top1"]
        out[f"{name}fused_top5"] = res["top5"]
        out[f"{name}fused_prediction_changes"] = res["changes"]
        if d.is_main:
            meta = {**weights_meta, "fused": "True", **({"ema": "True"} if name else {})}
            write_safetensors(run_dir / fused_file, fused, checkpoint.weights_header(fused, meta))
        if not name:
            out["fused_params"] = sum(p.numel() for p in fused.parameters())
    return out
