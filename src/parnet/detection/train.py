"""Training and evaluating detectors: :func:`train_det` (settings: :class:`DetTrainConfig`) and :func:`eval_det`.

::

    from parnet.detection import DetTrainConfig, train_det
    stats = train_det(DetTrainConfig(data="data/fmnist_det", output="runs/det", backbone="parnet_s",
                                     backbone_kwargs={"widths": [16, 32, 64], "head_width": 128}, epochs=2))

The commands ``parnet train-det`` / ``eval-det`` (:mod:`parnet.cli.detection`) are flags over
these. A run folder is kept like a classification run's (:mod:`parnet.checkpoint`): locked while
it trains, the state written first and the metrics after it (and restored from it on resume), and
the final files (``eval.json``, ``predictions.png``) written before the state says ``finished``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from ..settings import Settings
from .detectors import create_detector, load_detector, save_detector
from .evaluation import detection_loader, draw_predictions, evaluate_dataset, save_png

__all__ = ["DetTrainConfig", "data_paths", "detector_file", "eval_det", "eval_folder", "train_det"]

# Backbone keywords the command sets itself, and why.
RESERVED_BACKBONE_KWARGS = {
    "in_chans": "the detector takes RGB images (3 channels)",
    "num_classes": "set by the dataset's categories (the backbone has no classifier)",
    "features_only": "the detector always takes the backbone's features",
}


class DetTrainConfig(Settings):
    """Every knob of a detection training run (``parnet train-det --help`` shows the same)."""

    data: str | None = Field(
        None, description="a folder laid out as make-det-dataset writes it: SPLIT/ and annotations/instances_SPLIT.json"
    )
    train_images: str | None = Field(None, description="image folder of the train split (overrides --data)")
    train_ann: str | None = Field(None, description="COCO JSON of the train split (overrides --data)")
    val_images: str | None = Field(None, description="image folder of the val split (overrides --data)")
    val_ann: str | None = Field(None, description="COCO JSON of the val split (overrides --data)")
    lenient: bool = Field(
        False, description="drop annotations with unknown categories or malformed boxes instead of stopping"
    )
    workers: int = Field(0, ge=0, le=256, description="data loader processes")
    draw: int = Field(8, ge=0, le=1024, description="images in predictions.png (0: none)")
    score_thresh: float = Field(0.3, ge=0, le=1, description="lowest score drawn in predictions.png")
    progress: bool = Field(True, description="progress bars")
    output: str = Field(description="run folder: checkpoints, metrics, eval.json, predictions.png")
    detector: Literal["fcos", "retinanet", "fasterrcnn"] = Field("fcos", description="the torchvision detector")
    backbone: str = Field("parnet_s", description="timm model: parnet_* or a baseline such as resnet18")
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="timm.create_model arguments, e.g. widths=[16,32,64] head_width=128"
    )
    backbone_weights: str | None = Field(
        None,
        description="classification weights: a `parnet train` run folder, ours (.safetensors) or the authors' "
        "(.pth.tar); the input convolutions adapt to RGB",
    )
    ema: bool = Field(False, description="take the EMA weights of --backbone-weights (a run folder's last_ema)")
    freeze_bn: bool = Field(
        False,
        description="FrozenBatchNorm2d in the backbone; off unless given, also with --backbone-weights (torchvision "
        "freezes a pretrained backbone's BN: give --freeze-bn with small batches)",
    )
    fpn_channels: int = Field(256, ge=1, le=4096, description="FPN and head width")
    image_size: int | None = Field(
        None, ge=1, le=8192, description="resize images to this side (default: the largest training image side)"
    )
    epochs: int = Field(12, ge=1, description="training epochs")
    batch_size: int = Field(16, ge=1, description="images per step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (cosine decay after warm-up)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on biases and norms)")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    clip_grad: float = Field(10.0, ge=0, description="gradient norm clip (0: none)")
    max_steps: int = Field(0, ge=0, description="steps per epoch at most (0: the whole set); for quick runs")
    eval_every: int = Field(0, ge=0, description="evaluate every N epochs (always after the last)")
    resume: bool = Field(False, description="continue the run in --output from its last checkpoint")
    stop_after: int = Field(
        0, ge=0, description="end after this many epochs of this invocation (time-limited jobs); 0 = no limit"
    )
    seed: int = Field(0, ge=0, description="seed of everything")
    device: Literal["cpu", "cuda"] | None = Field(None, description="cpu or cuda (default: cuda when available)")

    @field_validator("backbone")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from ..factory import check_model_name

        return check_model_name(value)

    @field_validator("data", "train_images", "train_ann", "val_images", "val_ann", "backbone_weights")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Absolute, so that the run's saved settings name its files wherever ``--resume`` is run from."""
        return None if value is None else str(Path(value).expanduser().absolute())

    @field_validator("backbone_kwargs", mode="before")
    @classmethod
    def _architecture_only(cls, value: Any) -> Any:
        from ..weights import FEATURE_KEYS, setting_kwargs

        return setting_kwargs(value, RESERVED_BACKBONE_KWARGS, FEATURE_KEYS)


# Settings a resumed run must keep: the model, the data's size, and what the restored optimizer and schedule
# depend on (the cosine runs over epochs x steps: more epochs after a finished run would restart nothing).
_RESUME_FIXED = ("detector", "backbone", "backbone_kwargs", "fpn_channels", "image_size", "epochs", "batch_size",
                 "lr", "weight_decay", "warmup_steps", "max_steps", "seed", "freeze_bn")  # fmt: skip
EVAL_FILE = "eval.json"  # the scores (of a run: at its end; of eval-det: of the weights it scored)
BEST_FILE = "best.safetensors"  # a run's weights of its best validation AP
DETECTIONS_FILE = "detections.json"  # eval-det's detections, in COCO's results format
PICTURE_FILE = "predictions.png"
_FINAL_FILES = (EVAL_FILE,)
_DERIVED = (BEST_FILE, PICTURE_FILE)  # written by a run: a new run refuses to replace them


def data_paths(data: str | None, images: str | None, ann: str | None, split: str) -> tuple[Path, Path]:
    """(image folder, COCO JSON) of a split: given explicitly, or the ``data`` layout of make-det-dataset."""
    if data is not None:
        images = images or str(Path(data) / split)
        ann = ann or str(Path(data) / "annotations" / f"instances_{split}.json")
    if images is None or ann is None:
        raise ValueError(f"give --data DIR, or both --{split}-images and --{split}-ann")
    return Path(images), Path(ann)


def detector_file(weights: str | Path) -> Path:
    """The detector file a path names: a ``train-det`` run folder's ``last.safetensors``, or the file itself."""
    from ..checkpoint import WEIGHTS_FILE

    weights = Path(weights)
    return weights / WEIGHTS_FILE if weights.is_dir() else weights


def eval_folder(weights: str | Path, split: str) -> Path:
    """Where ``eval-det`` writes by default: beside the weights, named after them, so that evaluations of two
    weights files of one run do not overwrite each other: ``eval_val`` for a run's own weights (the folder or
    its ``last.safetensors``), ``eval_val_best`` for its ``best.safetensors`` (:data:`BEST_FILE`)."""
    weights = detector_file(weights)
    stem = weights.name.removesuffix(".safetensors")
    return weights.parent / (f"eval_{split}" if stem == "last" else f"eval_{split}_{stem}")


def _to_device(
    images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[list, list]:
    return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _draw_examples(
    model: nn.Module, dataset: Any, path: Path, count: int, score_thresh: float, device: torch.device
) -> Path | None:
    """Predictions (red) and ground truth (green) on the first ``count`` images of ``dataset``, as PNG;
    ``None`` (nothing written) when there is nothing to draw (``--draw 0`` or an empty dataset)."""
    model.eval()
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    if not items:
        return None
    with torch.no_grad():
        preds = model([im.to(device) for im, _ in items])
    grid = draw_predictions([im for im, _ in items], preds, dataset.names, [t for _, t in items], score_thresh)
    return save_png(grid, path)


def _with_saved_settings(cfg: DetTrainConfig, run_dir: Path) -> DetTrainConfig:
    """On resume, the run's own settings wherever ``cfg`` does not set one (``model_fields_set``), as
    ``parnet train --resume`` takes them: a resumed run needs no flag but ``--output``."""
    from ..checkpoint import STATE_FILE, read_state
    from ..settings import PER_INVOCATION, check_config

    saved = read_state(run_dir)["extra"].get("settings")
    if not isinstance(saved, dict):
        raise ValueError(f"{run_dir / STATE_FILE} holds no settings: it was not written by `parnet train-det`")
    saved = {k: v for k, v in saved.items() if k not in PER_INVOCATION}
    saved = check_config(saved, f"the settings in {run_dir / STATE_FILE}", DetTrainConfig)
    return DetTrainConfig(**{**saved, **cfg.model_dump(include=cfg.model_fields_set)})


def _lr_lambda(warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def train_det(cfg: DetTrainConfig) -> dict[str, float]:
    """Train a detector on a COCO-format set with the shared training engine; returns the last val stats.

    Raises :class:`parnet.engine.NonFiniteLossError` on a NaN/inf loss, ``ValueError`` /
    ``FileNotFoundError`` for bad settings, data or run folders (also while another training holds it).
    """
    from .. import checkpoint, engine

    run_dir = Path(cfg.output)
    # Before any work: nothing written yet.
    if checkpoint.check_run_folder(run_dir, cfg.resume, _FINAL_FILES, _DERIVED):
        cfg = _with_saved_settings(cfg, run_dir)
    elif cfg.resume and cfg.data is None and None in (cfg.train_images, cfg.train_ann):  # saved with a checkpoint
        raise ValueError(
            f"--resume: {run_dir} holds no checkpoint yet (its run stopped before the first epoch finished), so "
            "there is nothing to continue and no saved settings: run the original command again, with its --data "
            "and other flags, to start it over"
        )
    dist_info = engine.init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as held:
            if dist_info.is_main:  # one training writes into a folder at a time
                held.enter_context(checkpoint.RunLock(run_dir))
            return _train_det(cfg, dist_info, run_dir)
    finally:
        engine.cleanup_distributed()


def _train_det(cfg: DetTrainConfig, dist_info: Any, run_dir: Path) -> dict[str, float]:
    from torch.nn.parallel import DistributedDataParallel

    from .. import checkpoint, engine
    from ..io import atomic_write, remove_temporaries
    from .data import CocoDetectionDataset

    has_checkpoint = checkpoint.check_run_folder(run_dir, cfg.resume, _FINAL_FILES, _DERIVED)
    device, main = dist_info.device, dist_info.is_main
    if main:
        remove_temporaries(run_dir)  # left by a killed run
    checkpoint.seed_everything(cfg.seed, dist_info.rank)
    strict = not cfg.lenient
    train_images, train_ann = data_paths(cfg.data, cfg.train_images, cfg.train_ann, "train")
    train_ds = CocoDetectionDataset(train_images, train_ann, train=True, strict=strict)
    val_ds = CocoDetectionDataset(*data_paths(cfg.data, cfg.val_images, cfg.val_ann, "val"), train=False, strict=strict)
    if train_ds.check.cat_ids != val_ds.check.cat_ids:
        raise ValueError(f"train and val categories differ: {train_ds.check.cat_ids} vs {val_ds.check.cat_ids}")
    if not len(train_ds):
        raise ValueError(f"{train_ann} lists no images: a detector needs training images")
    if not train_ds.target_boxes:  # every loss but the classifier's would be zero: it would learn to find nothing
        raise ValueError(
            f"{train_ann} has no boxes to train on (crowd regions and boxes with no area inside their image aside): "
            "give annotations with boxes"
        )
    val_ds.check.require_ground_truth()  # before the epochs, not after them
    size = cfg.image_size or max(max(im["width"], im["height"]) for im in train_ds.images)
    # What the run's weights depend on in its data, kept with the state: a resume on other data is refused.
    data = {
        "categories": {str(k): v for k, v in train_ds.label_to_cat.items()},
        "image_size": size,
        "train_images": len(train_ds),
        "val_images": len(val_ds),
    }
    # Resume from the checkpoint: the settings it was trained with must hold, and its data (checked before the
    # model is built, so that other data is said to be so); metrics and stage come from it, and the weights file
    # a kill may have cut short is written again from it.
    state = checkpoint.read_state(run_dir) if has_checkpoint else None
    if state is not None:
        saved = state["extra"].get("settings") or {}
        now = json.loads(cfg.model_dump_json())
        changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in _RESUME_FIXED if k in saved and saved[k] != now[k]]
        saved_data = state["extra"].get("data") or {}
        changed += [f"data {k} was {saved_data[k]!r}, now {v!r}" for k, v in data.items()
                    if k in saved_data and saved_data[k] != v]  # fmt: skip
        if changed:
            raise ValueError(f"--resume: {run_dir} was trained with other settings or data: {'; '.join(changed)}")
    if main and state is None and cfg.freeze_bn and cfg.backbone_weights is None:
        note = "--freeze-bn without --backbone-weights freezes untrained batch norms (mean 0, variance 1) for good"
        print(f"note: {note}; give --backbone-weights, or leave --freeze-bn out", file=sys.stderr, flush=True)
    model = create_detector(
        cfg.detector,
        backbone=cfg.backbone,
        num_classes=train_ds.num_classes,
        fpn_channels=cfg.fpn_channels,
        backbone_weights=cfg.backbone_weights if state is None else None,  # a resume's checkpoint holds them all
        use_ema=cfg.ema,
        freeze_bn=cfg.freeze_bn,
        min_size=size,
        max_size=size,
        backbone_kwargs=cfg.backbone_kwargs,
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_backbone = sum(p.numel() for p in model.backbone.body.parameters())
    if main:
        print(
            f"{cfg.detector} on {cfg.backbone}: {n_params / 1e6:.3f} M params ({n_backbone / 1e6:.3f} M backbone), "
            f"strides {model.backbone.strides}, images {size}px, {len(train_ds)} train / {len(val_ds)} val images, "
            f"{train_ds.num_classes - 1} classes",
            flush=True,
        )
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    if dist_info.distributed:
        sampler: Any = torch.utils.data.DistributedSampler(
            train_ds, dist_info.world_size, dist_info.rank, seed=cfg.seed
        )
    else:
        sampler = torch.utils.data.RandomSampler(train_ds, generator=generator)
    loader = detection_loader(train_ds, cfg.batch_size, cfg.workers, sampler=sampler, generator=generator)
    steps = len(loader) if not cfg.max_steps else min(len(loader), cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, steps * cfg.epochs))

    meta = {"format": "parnet-detector", "config": json.dumps(model.detector_config)}
    meta_extra = {
        "names": {str(k): v for k, v in train_ds.names.items()},
        "label_to_cat": {str(k): v for k, v in train_ds.label_to_cat.items()},
    }
    meta["extra"] = json.dumps(meta_extra)

    start_epoch, extra, stage = 0, {}, "epochs"
    if state is not None:
        start_epoch, extra = checkpoint.load_checkpoint(
            run_dir, model, optimizer=optimizer, scheduler=scheduler, generators={"loader": generator}, state=state
        )
        stage = state.get("stage", "epochs")
        del state
        if main:
            checkpoint.write_run_weights(run_dir, start_epoch - 1, model, metadata=meta)
            where = f"at epoch {start_epoch + 1}" if start_epoch < cfg.epochs else f"after its {cfg.epochs} epochs"
            print(f"resumed from {run_dir} {where}", flush=True)
    elif cfg.resume and main:  # started over from the flags given: they may not be the first start's
        print(f"{run_dir} holds no checkpoint yet: starting from the first epoch with the settings given now",
              flush=True)  # fmt: skip
    train_model = DistributedDataParallel(model) if dist_info.distributed else model
    logger = checkpoint.MetricLogger(
        run_dir, enabled=main, start_epoch=start_epoch if has_checkpoint else None, rows=extra.get("metrics")
    )
    best = extra.get("best_ap", -1.0)
    stats: dict[str, float] = dict(extra.get("stats") or {})

    def save(epoch: int, row: dict[str, float], stats: dict[str, float], best: float) -> None:
        """The checkpoint of ``epoch``, with the metric rows up to its ``row``."""
        checkpoint.save_checkpoint(
            run_dir,
            epoch,
            model,
            optimizer=optimizer,
            scheduler=scheduler,
            extra={
                "best_ap": best,
                "config": model.detector_config,
                "settings": json.loads(cfg.model_dump_json()),
                "data": data,
                "stats": stats,
                "metrics": [r for r in logger.rows if r["epoch"] < epoch] + [logger.row(epoch, row)],
            },
            metadata=meta,
            generators={"loader": generator},
        )

    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after and epoch - start_epoch >= cfg.stop_after:
            if main:
                print(f"stopping after {cfg.stop_after} epoch(s) (--stop-after); continue with --resume", flush=True)
            logger.close()
            return stats
        if dist_info.distributed:
            sampler.set_epoch(epoch)
        train_model.train()
        bar = engine.Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=main and cfg.progress)
        t0 = time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            if step >= steps:
                break
            images, targets = _to_device(images, targets, device)
            losses = train_model(images, targets)
            loss = sum(losses.values())
            engine.check_finite(loss, epoch * steps + step, dist_info, kept_epoch=epoch - 1 if epoch > 0 else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            bar.update(len(images), loss=loss.item(), **{k: v.item() for k, v in losses.items()})
        bar.close()
        epoch_time = time.perf_counter() - t0
        row = {f"train_{k}": engine.reduce_mean(v) for k, v in bar.means().items()}
        row.update(epoch_time_s=epoch_time, lr=scheduler.get_last_lr()[0])
        last = epoch + 1 == cfg.epochs
        if main and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            t1 = time.perf_counter()
            try:
                stats, _ = evaluate_dataset(model, val_ds, cfg.batch_size, cfg.workers, device, cfg.progress)
            except Exception:  # bad validation data: the epoch's training is kept, its evaluation owed on resume
                save(epoch, row, {}, best)
                print(f"epoch {epoch + 1}'s training is saved in {run_dir}: fix the validation data and continue "
                      "with --resume", file=sys.stderr, flush=True)  # fmt: skip
                raise
            row.update({f"val_{k}": v for k, v in stats.items()}, eval_time_s=time.perf_counter() - t1)
            if stats["AP"] > best:
                best = stats["AP"]
                save_detector(model, run_dir / BEST_FILE, meta_extra | {"epoch": epoch, "stats": stats})
        if main:  # the checkpoint first, with the metric rows; then the metrics files
            save(epoch, row, stats, best)
            logger.log(epoch, row)
            print(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        if dist_info.distributed:
            torch.distributed.barrier()
    logger.close()
    if main and not stats and stage != checkpoint.FINISHED:  # the final evaluation failed (bad data) and is owed
        stats, _ = evaluate_dataset(model, val_ds, cfg.batch_size, cfg.workers, device, cfg.progress)
        if stats["AP"] > best:
            save_detector(model, run_dir / BEST_FILE, meta_extra | {"epoch": cfg.epochs - 1, "stats": stats})
    if not main or not stats:
        return stats
    if stage == checkpoint.FINISHED and all((run_dir / f).is_file() for f in _FINAL_FILES):
        print(f"{run_dir} has already finished its {cfg.epochs} epochs", flush=True)
        return stats
    # The final files, then the checkpoint says the run is finished (killed before, --resume writes them again).
    with atomic_write(run_dir / EVAL_FILE) as tmp:
        tmp.write_text(json.dumps({"stats": stats, "split": "val", "epochs": cfg.epochs}, indent=2))
    png = _draw_examples(model, val_ds, run_dir / PICTURE_FILE, cfg.draw, cfg.score_thresh, device)
    checkpoint.mark_finished(run_dir)
    print("val: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
    if png is not None:
        print(f"wrote {png}", flush=True)
    return stats


def eval_det(
    weights: str | Path,
    images: str | Path,
    ann: str | Path,
    split: str = "val",
    output: str | Path | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: str = "cpu",
    lenient: bool = False,
    draw: int = 8,
    score_thresh: float = 0.3,
    progress: bool = True,
) -> tuple[dict[str, float], list[Path]]:
    """pycocotools metrics and a picture of predictions for a trained detector (a run folder or a file).

    Writes ``eval.json`` (with the weights file it scored), ``detections.json`` and ``predictions.png`` (unless
    nothing is drawn: an earlier one there is removed) to ``output`` (default: beside the weights,
    :func:`eval_folder`); returns the stats and the files written. ``ValueError`` for data with no images or
    no boxes to score against.
    """
    from ..devices import check_device
    from ..io import atomic_write
    from .data import CocoDetectionDataset

    device = str(check_device(device))
    weights = detector_file(weights)
    model, extra = load_detector(weights, device)
    dataset = CocoDetectionDataset(Path(images), Path(ann), train=False, strict=not lenient)
    dataset.check.require_ground_truth()  # before the detector runs
    if model.detector_config["num_classes"] != dataset.num_classes:
        raise ValueError(
            f"the detector has {model.detector_config['num_classes'] - 1} classes, the data {dataset.num_classes - 1}"
        )
    trained = {int(k): v for k, v in extra.get("label_to_cat", {}).items()}
    if trained and trained != dataset.label_to_cat:  # labels would be written back as the wrong category ids
        raise ValueError(
            f"the detector was trained on category ids {sorted(trained.values())}, the data has "
            f"{sorted(dataset.label_to_cat.values())}; evaluate on data with the training categories"
        )
    dev = torch.device(device)
    stats, results = evaluate_dataset(model, dataset, batch_size, workers, dev, progress)
    out = Path(output) if output else eval_folder(weights, split)
    (out / PICTURE_FILE).unlink(missing_ok=True)  # an earlier evaluation's: never beside these numbers
    with atomic_write(out / EVAL_FILE) as tmp:
        tmp.write_text(json.dumps({"weights": str(weights.absolute()), "split": split, "stats": stats}, indent=2))
    with atomic_write(out / DETECTIONS_FILE) as tmp:
        tmp.write_text(json.dumps(results))
    png = _draw_examples(model, dataset, out / PICTURE_FILE, draw, score_thresh, dev)
    return stats, [out / EVAL_FILE, out / DETECTIONS_FILE] + ([png] if png is not None else [])
