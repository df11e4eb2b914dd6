"""torchvision's FCOS, RetinaNet and Faster R-CNN on a :mod:`~parnet.detection.backbone`, and their files:
:func:`create_detector`, :func:`save_detector`, :func:`load_detector`."""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import unwrap_model  # DDP, torch.compile and timm's ModelEma* wrappers
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from ..weights import FEATURE_KEYS, architecture_kwargs
from .backbone import build_backbone

__all__ = [
    "DETECTORS",
    "DETECTOR_KWARGS",
    "KWARGS_OF",
    "create_detector",
    "detector_config",
    "load_detector",
    "save_detector",
]

# timm keywords that load weights or shape training only: used for the build, not kept with the detector.
BUILD_ONLY_BACKBONE_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                              "checkpoint_path", "cache_dir", "drop_rate", "drop_path_rate")  # fmt: skip
_CLASSES = {"fcos": FCOS, "retinanet": RetinaNet, "fasterrcnn": FasterRCNN}
DETECTORS = tuple(_CLASSES)  # their names; DetTrainConfig.detector spells them again (a test holds them equal)
# Bounds of the keywords that are neither a count (1 to 100,000) nor a threshold or fraction (0 to 1).
_BOUNDS: dict[str, tuple[float, float]] = {
    "detections_per_img": (1, 10_000),
    "box_detections_per_img": (1, 10_000),
    "center_sampling_radius": (0.0, 100.0),
}


def _number_keywords(cls: type) -> dict[str, int | float]:
    """The keywords of a torchvision detector's signature that take a number, with their defaults, but for the
    resize create_detector sets itself: post-processing, sampling and matching (``rpn_post_nms_top_n_test``, ...)."""
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if isinstance(p.default, (int, float))
        and not isinstance(p.default, bool)
        and name not in ("min_size", "max_size")
    }


_DEFAULTS = {kind: _number_keywords(cls) for kind, cls in _CLASSES.items()}
# Each detector's own keywords (torchvision passes one it does not take on to its image transform, which ignores it).
KWARGS_OF: dict[str, tuple[str, ...]] = {kind: tuple(defaults) for kind, defaults in _DEFAULTS.items()}
# The keywords create_detector passes on (and a saved detector keeps): name -> bounds; integer bounds make an
# integer keyword, as its default in the signature is.
DETECTOR_KWARGS: dict[str, tuple[float, float]] = {
    name: _BOUNDS.get(name, (1, 100_000) if isinstance(default, int) else (0.0, 1.0))
    for defaults in _DEFAULTS.values()
    for name, default in defaults.items()
}


def _statistics(value: Any, name: str) -> list[float]:
    """An RGB mean or std: three finite numbers (a std's positive); ``ValueError`` naming it."""
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, Sequence)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
        or (name.endswith("std") and min(value) <= 0)
    ):
        what = "positive numbers" if name.endswith("std") else "numbers"
        raise ValueError(f"{name} must be three {what} (R, G, B: the detector reads RGB images), got {value!r}")
    return [float(v) for v in value]


def _detector_kwarg(value: Any, key: str, source: str) -> float | int:
    """One of :data:`DETECTOR_KWARGS`, checked against its bounds; ``ValueError`` naming ``source`` and the key."""
    from ..weights import bounded_int

    if key not in DETECTOR_KWARGS:
        raise ValueError(f"{source}: unknown detector keyword {key!r}; allowed: {', '.join(DETECTOR_KWARGS)}")
    low, high = DETECTOR_KWARGS[key]
    if isinstance(high, int):
        return bounded_int(value, key, int(low), high, source)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{source}: {key} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def create_detector(
    kind: str = "fcos",
    backbone: str = "parnet_s",
    num_classes: int = 91,
    fpn_channels: int = 256,
    levels: Sequence[int] | None = None,
    anchor_scale: float | None = None,
    backbone_weights: str | os.PathLike | Mapping[str, Any] | None = None,
    use_ema: bool = False,
    freeze_bn: bool = False,
    min_size: int = 800,
    max_size: int = 1333,
    backbone_kwargs: Mapping[str, Any] | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector (``"fcos"``, ``"retinanet"``, ``"fasterrcnn"``) on a timm backbone + FPN.

    Args:
        kind: the detector.
        backbone: timm model name, ``parnet_*`` or a baseline such as ``resnet18``.
        num_classes: categories + 1 (label 0 is background, as in torchvision).
        fpn_channels: FPN and head width (for FCOS, whose head uses GroupNorm(32), a multiple of 32, >= 64).
        levels: backbone features fed to the FPN (see :func:`build_backbone`).
        anchor_scale: anchor size / stride at each level: FCOS 1 (its anchors are the locations),
            RetinaNet 4 (times 2^0, 2^1/3, 2^2/3, three aspect ratios), Faster R-CNN 8. These are
            torchvision's defaults written per stride, so they follow the backbone's strides.
        backbone_weights, use_ema, freeze_bn: see :func:`build_backbone`.
        min_size, max_size: torchvision's resize of the input images (shorter side to ``min_size``
            unless the longer one passes ``max_size``); set both to the image size to keep it.
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``{"widths": (16, 32, 64)}``). The architecture's
            keywords are kept with the detector; timm's loading and training ones (``pretrained``,
            ``pretrained_cfg_overlay``, ``drop_path_rate``, ...) act on this build only (a saved detector holds its
            weights); any other is refused, as a saved detector could not be rebuilt from it.
        image_mean, image_std: the RGB normalisation of the input images; default: the backbone's
            ``pretrained_cfg``, which follows ``backbone_weights`` (a run's data statistics).
        detector_kwargs: passed to the torchvision detector: the number keywords of its signature,
            :data:`KWARGS_OF` the detector (FCOS, RetinaNet: ``score_thresh``, ``nms_thresh``, ...; Faster R-CNN:
            ``box_score_thresh``, ``rpn_post_nms_top_n_test``, ...), checked against :data:`DETECTOR_KWARGS`' bounds.

    The returned model carries ``detector_config``, the arguments that rebuild it (see
    :func:`save_detector`).
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
    other = [k for k in detector_kwargs if k not in KWARGS_OF[kind]]
    if other:  # torchvision would pass them on to its image transform, which ignores them
        raise ValueError(
            f"{kind} takes none of {other} (it would ignore them); its keywords: {', '.join(KWARGS_OF[kind])}"
        )
    detector_kwargs = {k: _detector_kwarg(v, k, "create_detector") for k, v in detector_kwargs.items()}
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an integer (categories + 1), got {num_classes!r}")
    if anchor_scale is not None and not (isinstance(anchor_scale, (int, float)) and 0 < anchor_scale < float("inf")):
        raise ValueError(f"anchor_scale must be a positive number (anchor size / stride), got {anchor_scale!r}")
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size (torchvision's resize), got {min_size}, {max_size}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too (categories + 1), got {num_classes}")
    if kind == "fcos" and (fpn_channels % 32 or fpn_channels < 64):
        raise ValueError(
            "FCOS's head uses GroupNorm with 32 groups, which needs 2+ values per group on 1x1 levels: "
            f"fpn_channels must be a multiple of 32 and at least 64, got {fpn_channels}"
        )
    backbone_kwargs = dict(backbone_kwargs or {})
    kept = {k: v for k, v in backbone_kwargs.items() if k not in BUILD_ONLY_BACKBONE_KWARGS}
    kept = architecture_kwargs(kept, "create_detector: backbone_kwargs", FEATURE_KEYS)
    config = dict(
        kind=kind,
        backbone=backbone,
        num_classes=num_classes,
        fpn_channels=fpn_channels,
        levels=list(levels) if levels is not None else None,
        anchor_scale=anchor_scale,
        freeze_bn=freeze_bn,
        min_size=min_size,
        max_size=max_size,
        backbone_kwargs=kept,
        **detector_kwargs,
    )
    extra = "pool" if kind == "fasterrcnn" else "p6p7"
    try:
        body = build_backbone(
            backbone,
            levels=levels,
            out_channels=fpn_channels,
            extra=extra,
            weights=backbone_weights,
            use_ema=use_ema,
            freeze_bn=freeze_bn,
            **backbone_kwargs,
        )
    except OSError as e:  # timm's download of pretrained=True weights, offline
        if not backbone_kwargs.get("pretrained") or isinstance(e, FileNotFoundError):
            raise
        raise OSError(
            f"{backbone}: pretrained=True could not fetch the weights ({e}); offline, pass the downloaded file "
            "as backbone_weights=FILE (or backbone_kwargs pretrained_cfg_overlay=dict(file=FILE))"
        ) from e
    pre = getattr(body.body, "pretrained_cfg", None) or {}
    mean = _statistics(image_mean if image_mean is not None else pre.get("mean", IMAGENET_DEFAULT_MEAN), "image_mean")
    std = _statistics(image_std if image_std is not None else pre.get("std", IMAGENET_DEFAULT_STD), "image_std")
    config.update(image_mean=mean, image_std=std)
    common = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std)
    strides = body.strides
    if kind == "fcos":
        scale = 1.0 if anchor_scale is None else anchor_scale
        anchors = AnchorGenerator(tuple((scale * s,) for s in strides), ((1.0,),) * len(strides))
        parts = dict(anchor_generator=anchors)
    elif kind == "retinanet":
        scale = 4.0 if anchor_scale is None else anchor_scale
        sizes = tuple(tuple(scale * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        parts = dict(anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides)))
    else:
        scale = 8.0 if anchor_scale is None else anchor_scale
        anchors = AnchorGenerator(tuple((scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        roi_pool = MultiScaleRoIAlign(featmap_names=body.names[: len(body.levels)], output_size=7, sampling_ratio=2)
        parts = dict(rpn_anchor_generator=anchors, box_roi_pool=roi_pool)
    try:
        model = _CLASSES[kind](body, num_classes, **parts, **common, **detector_kwargs)
    except AssertionError as e:  # torchvision's checks of its keywords, e.g. a matcher's bg_iou_thresh > fg_iou_thresh
        raise ValueError(f"{kind} refused its keywords {detector_kwargs}: {e}") from None
    # torchvision pads batches to multiples of 32; ParNet needs multiples of its input_multiple: both hold.
    model.transform.size_divisible = math.lcm(model.transform.size_divisible, body.input_multiple)
    model.detector_config = config
    return model


def save_detector(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a detector from :func:`create_detector` to safetensors with what rebuilds it, atomically.

    A detector whose backbone body was re-parameterized (``det.backbone.body = parnet.reparameterize(...)``)
    is recorded as ``fused``, and :func:`load_detector` fuses the rebuilt one the same way."""
    from ..io import write_safetensors
    from ..layers import is_reparameterized

    model = unwrap_model(model)
    if not hasattr(model, "detector_config"):
        raise ValueError("save_detector needs a model made by create_detector (it has no detector_config)")
    meta = {
        "format": "parnet-detector",
        "config": json.dumps(model.detector_config),
        "extra": json.dumps(dict(extra or {})),
        "fused": str(is_reparameterized(model.backbone.body)),
    }
    return write_safetensors(path, model, meta)


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a detector written by :func:`save_detector` (a fused one fused again), in eval mode; returns it
    and its ``extra``."""
    from ..io import header_flag, header_json, read_safetensors
    from ..layers import reparameterize
    from ..weights import build_checked

    state, meta = read_safetensors(path, "parnet-detector")
    config = detector_config(header_json(meta, "config", str(path)), f"{path}: config")
    extra = header_json(meta, "extra", str(path)) if "extra" in meta else {}
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: metadata 'extra' must be a mapping")
    fused = header_flag(meta, "fused", str(path))

    def build() -> nn.Module:
        model = create_detector(**config)
        if fused:  # as parnet.io.load_model rebuilds a fused classifier
            model.backbone.body = reparameterize(model.backbone.body, inplace=True)
        return model

    return build_checked(build, state, str(path)).to(device).eval(), extra


def detector_config(config: Any, source: str) -> dict[str, Any]:
    """A ``detector_config`` read from a file, checked: only the keys :func:`create_detector` writes,
    with their types and bounds (:mod:`parnet.weights`); ``ValueError`` names the key."""
    from ..factory import check_model_name
    from ..weights import MAX_CLASSES, bounded_int

    def optional(check: Any) -> Any:
        return lambda v, k: None if v is None else check(v, k)

    def scale(v: Any, k: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1000:
            raise ValueError(f"{source}: {k} must be a number in (0, 1000], got {v!r}")
        return float(v)

    def flag(v: Any, k: str) -> bool:
        if not isinstance(v, bool):
            raise ValueError(f"{source}: {k} must be true or false, got {v!r}")
        return v

    def levels(v: Any, k: str) -> list[int]:
        if not isinstance(v, list) or not 1 <= len(v) <= 8:
            raise ValueError(f"{source}: {k} must be a list of 1 to 8 feature positions, got {v!r}")
        return [bounded_int(i, k, 0, 16, source) for i in v]

    def kind(v: Any, k: str) -> str:
        if v not in DETECTORS:
            raise ValueError(f"{source}: {k} must be one of {', '.join(DETECTORS)}, got {v!r}")
        return v

    checks: dict[str, Any] = {
        "kind": kind,
        "backbone": lambda v, k: check_model_name(v),
        "num_classes": lambda v, k: bounded_int(v, k, 2, MAX_CLASSES, source),
        "fpn_channels": lambda v, k: bounded_int(v, k, 1, 4096, source),
        "levels": optional(levels),
        "anchor_scale": optional(scale),
        "freeze_bn": flag,
        "min_size": lambda v, k: bounded_int(v, k, 1, 8192, source),
        "max_size": lambda v, k: bounded_int(v, k, 1, 8192, source),
        "backbone_kwargs": lambda v, k: architecture_kwargs(v, f"{source}: {k}", FEATURE_KEYS),
        "image_mean": lambda v, k: _statistics(v, f"{source}: {k}"),
        "image_std": lambda v, k: _statistics(v, f"{source}: {k}"),
        **{key: lambda v, k: _detector_kwarg(v, k, source) for key in DETECTOR_KWARGS},
    }
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a mapping, got {type(config).__name__}")
    unknown = [k for k in config if k not in checks]
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(checks)}")
    return {k: checks[k](v, k) for k, v in config.items()}
