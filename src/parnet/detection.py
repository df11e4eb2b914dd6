"""ParNet as a detection backbone: an FPN on its multi-scale features, torchvision detectors on it.

::

    model = parnet.detection.create_detector("fcos", backbone="parnet_s", num_classes=11)
    model.train(); losses = model(images, targets)   # lists of (3, H, W) images and target dicts
    model.eval(); detections = model(images)         # [{"boxes", "scores", "labels"}, ...]

The backbone is any timm ``features_only`` model (ParNet in both forms, or ``resnet18`` etc. for
a baseline) feeding torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`, like
torchvision's ``BackboneWithFPN``. The detectors are torchvision's FCOS, RetinaNet and Faster
R-CNN unchanged: heads, losses, box coding, anchors and NMS are all theirs. Only the anchor sizes
are set from the backbone's strides (torchvision's defaults are the same rule for stride-8..128
pyramids). Labels follow torchvision: ``1..K`` for the K categories, 0 for background, so
``num_classes = K + 1``.

Data (COCO JSON + images), the annotation checks and the synthetic Fashion-MNIST set are in
:mod:`parnet.det_data`; evaluation is pycocotools' ``COCOeval``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .factory import create_model

__all__ = [
    "DETECTORS",
    "DETECTOR_KWARGS",
    "FPNBackbone",
    "build_backbone",
    "coco_evaluate",
    "create_detector",
    "detector_config",
    "draw_predictions",
    "evaluate_dataset",
    "freeze_batchnorm",
    "load_backbone_weights",
    "load_detector",
    "predict",
    "save_detector",
]

DETECTORS = ("fcos", "retinanet", "fasterrcnn")
# The torchvision detectors' post-processing keywords create_detector passes on (and a saved detector keeps):
# name -> bounds; integer bounds make an integer keyword. FCOS and RetinaNet take the first four, Faster R-CNN
# the box_ ones.
DETECTOR_KWARGS: dict[str, tuple[float, float]] = {
    "score_thresh": (0.0, 1.0),
    "nms_thresh": (0.0, 1.0),
    "detections_per_img": (1, 10_000),
    "topk_candidates": (1, 100_000),
    "box_score_thresh": (0.0, 1.0),
    "box_nms_thresh": (0.0, 1.0),
    "box_detections_per_img": (1, 10_000),
}
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


# -- backbone -----------------------------------------------------------------------------------


class FPNBackbone(nn.Module):
    """A timm ``features_only`` body and torchvision's FPN: ``OrderedDict`` of pyramid levels.

    The interface of torchvision's ``BackboneWithFPN``: ``out_channels`` and a forward returning
    ``{"0": finest, ..., "pool" | "p6", "p7": extra levels}``.

    Args:
        body: a timm features model (``features_only=True``) returning a list of feature maps.
        levels: which of the body's features feed the FPN (positions in its feature list).
        out_channels: FPN width.
        extra: ``"p6p7"`` (two stride-2 convs on P5, as in RetinaNet and FCOS), ``"pool"``
            (max-pool of the coarsest level, as in Faster R-CNN) or ``None``.
    """

    def __init__(self, body: nn.Module, levels: Sequence[int], out_channels: int = 256, extra: str | None = "p6p7"):
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
            LastLevelP6P7,
        )

        super().__init__()
        channels, reductions = body.feature_info.channels(), body.feature_info.reduction()
        if any(isinstance(i, bool) or not isinstance(i, int) for i in levels):
            raise TypeError(f"levels must be integer positions in the body's features, got {list(levels)}")
        levels = list(levels)
        if not levels or any(not 0 <= i < len(channels) for i in levels) or sorted(set(levels)) != levels:
            raise ValueError(
                f"levels must be increasing positions in the body's {len(channels)} features, got {levels}"
            )
        if extra not in ("p6p7", "pool", None):
            raise ValueError(f"extra must be 'p6p7', 'pool' or None, got {extra!r}")
        self.body = body
        self.levels = levels
        self.in_channels_list = [channels[i] for i in levels]
        self.out_channels = out_channels
        blocks = {"p6p7": LastLevelP6P7(out_channels, out_channels), "pool": LastLevelMaxPool(), None: None}[extra]
        self.fpn = FeaturePyramidNetwork(self.in_channels_list, out_channels, extra_blocks=blocks)
        base = [reductions[i] for i in levels]
        self.strides = base + [base[-1] * 2 ** (k + 1) for k in range({"p6p7": 2, "pool": 1, None: 0}[extra])]
        self.names = [str(k) for k in range(len(levels))] + {"p6p7": ["p6", "p7"], "pool": ["pool"], None: []}[extra]
        cfg = getattr(getattr(body, "model", None), "cfg", None)
        self.input_multiple = int(getattr(cfg, "input_multiple", max(reductions)))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.levels)))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` by torchvision's ``FrozenBatchNorm2d`` with its statistics.

    Frozen BN normalises with the stored statistics and affine parameters and never updates them
    (they are buffers, not parameters), as torchvision's detection backbones do. In place.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats and child.running_mean is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def _read_weights(source: str | os.PathLike | Mapping[str, Any], use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """A classification state dict from: our safetensors (``parnet.io.save_model`` or a plain
    safetensors state dict), the authors' ``.pth.tar`` (converted), or a torch checkpoint; told apart by content."""
    from .io import is_torch_checkpoint
    from .official import is_official_layout, load_official, read_checkpoint, select_state_dict

    if isinstance(source, Mapping):
        checkpoint, name = dict(source), "the given state dict"
    else:
        path, name = Path(source), str(source)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights not found: {path}")
        if not is_torch_checkpoint(path):  # by content: a torch.save file named .safetensors is read as one
            from .io import read_safetensors

            return read_safetensors(path, None)[0], name
        checkpoint = read_checkpoint(path)
    if isinstance(checkpoint.get("model"), Mapping):  # a full training checkpoint
        checkpoint = dict(checkpoint["model"])
    state = select_state_dict(checkpoint, use_ema=use_ema)
    if is_official_layout(state):
        return load_official(state).state_dict(), name
    return state, name


def load_backbone_weights(
    body: nn.Module, source: str | os.PathLike | Mapping[str, Any], use_ema: bool = False
) -> list[str]:
    """Load a classification checkpoint into a features body; returns the keys it did not use.

    Keys of the classifier (``head.*``, ``fc.*``) are not needed; every weight of the body must
    be present with the right shape, or ``ValueError`` says which are missing or mismatched.
    """
    from .weights import check_state_dict

    state, name = _read_weights(source, use_ema)
    target = body.model if hasattr(body, "model") and isinstance(body.model, nn.Module) else body
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    own = target.state_dict()
    try:  # the classifier's weights may be extra; every weight of the body must fit by name, shape and dtype
        check_state_dict(own, state, name, allow_unexpected=True, optional=lambda k: k.endswith("num_batches_tracked"))
    except ValueError as e:
        raise ValueError(
            f"{str(e).replace('does not fit the model', f'does not fit the backbone ({type(target).__name__})')}; "
            "build the backbone with the checkpoint's architecture (widths, head_width, ...)"
        ) from None
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(k for k in state if k not in own)


def build_backbone(
    name: str = "parnet_s",
    levels: Sequence[int] | None = None,
    out_channels: int = 256,
    extra: str | None = "p6p7",
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    use_ema: bool = False,
    freeze_bn: bool = False,
    **model_kwargs: Any,
) -> FPNBackbone:
    """A timm model's multi-scale features with an FPN on them.

    Args:
        name: a timm model: ``parnet_*`` (its default features: one per stride, 4/8/16/32 for the
            ImageNet form, 1/2/4/8 for the small-input form) or e.g. ``resnet18`` (strides 4..32).
        levels: positions of the features fed to the FPN; default the three coarsest with
            ``extra="p6p7"`` (C3-C5 for stride-32 backbones) and all four otherwise.
        out_channels: FPN width.
        extra: extra pyramid levels, see :class:`FPNBackbone`.
        weights: a classification checkpoint for the body (see :func:`load_backbone_weights`).
        use_ema: take the EMA weights of a checkpoint that has them.
        freeze_bn: replace BN by ``FrozenBatchNorm2d`` (after loading weights).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``widths=(16, 32, 64)``).
    """
    if name.startswith("parnet"):
        body = create_model(name, features_only=True, **model_kwargs)
    else:
        body = create_model(
            name, features_only=True, out_indices=model_kwargs.pop("out_indices", (1, 2, 3, 4)), **model_kwargs
        )
    if weights is not None:
        load_backbone_weights(body, weights, use_ema=use_ema)
    if freeze_bn:
        freeze_batchnorm(body)
    n = len(body.feature_info.channels())
    if levels is None:
        levels = list(range(max(0, n - 3), n)) if extra == "p6p7" else list(range(n))
    return FPNBackbone(body, levels, out_channels, extra)


# -- detectors ----------------------------------------------------------------------------------


def _detector_kwarg(value: Any, key: str, source: str) -> float | int:
    """One of :data:`DETECTOR_KWARGS`, checked against its bounds; ``ValueError`` naming ``source`` and the key."""
    from .weights import bounded_int

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
        backbone_kwargs: passed to ``timm.create_model`` (e.g. ``{"widths": (16, 32, 64)}``).
        detector_kwargs: passed to the torchvision detector: its post-processing, :data:`DETECTOR_KWARGS`
            (``score_thresh``, ``nms_thresh``, ...).

    The returned model carries ``detector_config``, the arguments that rebuild it (see
    :func:`save_detector`).
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
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
        backbone_kwargs=dict(backbone_kwargs or {}),
        **detector_kwargs,
    )
    extra = "pool" if kind == "fasterrcnn" else "p6p7"
    body = build_backbone(
        backbone,
        levels=levels,
        out_channels=fpn_channels,
        extra=extra,
        weights=backbone_weights,
        use_ema=use_ema,
        freeze_bn=freeze_bn,
        **dict(backbone_kwargs or {}),
    )
    pre = getattr(body.body, "pretrained_cfg", None) or {}
    mean = list(pre.get("mean", (0.485, 0.456, 0.406)))
    std = list(pre.get("std", (0.229, 0.224, 0.225)))
    common = dict(min_size=min_size, max_size=max_size, image_mean=mean, image_std=std)
    strides = body.strides
    if kind == "fcos":
        scale = 1.0 if anchor_scale is None else anchor_scale
        anchors = AnchorGenerator(tuple((scale * s,) for s in strides), ((1.0,),) * len(strides))
        model = FCOS(body, num_classes, anchor_generator=anchors, **common, **detector_kwargs)
    elif kind == "retinanet":
        scale = 4.0 if anchor_scale is None else anchor_scale
        sizes = tuple(tuple(scale * s * 2 ** (k / 3) for k in range(3)) for s in strides)
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
        model = RetinaNet(body, num_classes, anchor_generator=anchors, **common, **detector_kwargs)
    else:
        scale = 8.0 if anchor_scale is None else anchor_scale
        anchors = AnchorGenerator(tuple((scale * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
        roi_pool = MultiScaleRoIAlign(featmap_names=body.names[: len(body.levels)], output_size=7, sampling_ratio=2)
        model = FasterRCNN(
            body, num_classes, rpn_anchor_generator=anchors, box_roi_pool=roi_pool, **common, **detector_kwargs
        )
    # torchvision pads batches to multiples of 32; ParNet needs multiples of its input_multiple: both hold.
    model.transform.size_divisible = math.lcm(model.transform.size_divisible, body.input_multiple)
    model.detector_config = config
    return model


def save_detector(model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a detector from :func:`create_detector` to safetensors with what rebuilds it, atomically."""
    from .io import write_safetensors

    model = getattr(model, "module", model)
    if not hasattr(model, "detector_config"):
        raise ValueError("save_detector needs a model made by create_detector (it has no detector_config)")
    meta = {
        "format": "parnet-detector",
        "config": json.dumps(model.detector_config),
        "extra": json.dumps(dict(extra or {})),
    }
    return write_safetensors(path, model, meta)


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a detector written by :func:`save_detector`, in eval mode; returns it and its ``extra``."""
    from .io import header_json, read_safetensors
    from .weights import build_checked

    state, meta = read_safetensors(path, "parnet-detector")
    config = detector_config(header_json(meta, "config", str(path)), f"{path}: config")
    extra = header_json(meta, "extra", str(path)) if "extra" in meta else {}
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: metadata 'extra' must be a mapping")
    return build_checked(lambda: create_detector(**config), state, str(path)).to(device).eval(), extra


def detector_config(config: Any, source: str) -> dict[str, Any]:
    """A ``detector_config`` read from a file, checked: only the keys :func:`create_detector` writes,
    with their types and bounds (:mod:`parnet.weights`); ``ValueError`` names the key."""
    from .factory import check_model_name
    from .weights import FEATURE_KEYS, MAX_CLASSES, architecture_kwargs, bounded_int

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
        **{key: lambda v, k: _detector_kwarg(v, k, source) for key in DETECTOR_KWARGS},
    }
    if not isinstance(config, dict):
        raise ValueError(f"{source} must be a mapping, got {type(config).__name__}")
    unknown = [k for k in config if k not in checks]
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(checks)}")
    return {k: checks[k](v, k) for k, v in config.items()}


# -- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
    label_to_cat: Mapping[int, int],
    device: str | torch.device = "cpu",
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Run ``model`` (eval mode) over a loader; COCO results ``{image_id, category_id, bbox (xywh), score}``."""
    model.eval()
    results = []
    for images, targets in progress(loader) if progress else loader:
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            xyxy = out["boxes"].detach().cpu()
            boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)  # not in place: outputs may share tensors
            for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist()):
                if int(label) not in label_to_cat:  # label 0 (background) of a sigmoid head: not a category
                    continue
                results.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": int(label_to_cat[int(label)]),
                        "bbox": [round(v, 2) for v in box],
                        "score": round(float(score), 5),
                    }
                )
    return results


def coco_evaluate(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], verbose: bool = False
) -> dict[str, float]:
    """pycocotools bbox evaluation: ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", ...}``.

    ``gt`` is a COCO dataset dict, checked by :func:`parnet.det_data.check_coco` first (e.g.
    :attr:`parnet.det_data.CocoDetectionDataset.coco_dict`); ``results`` are COCO detections.
    Values are pycocotools' own: -1 where there is no ground truth to score (e.g. no large
    objects). No detections at all score 0 (pycocotools' ``loadRes`` refuses an empty list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .det_data import check_coco

    gt = check_coco(gt).data  # clear errors for malformed ground truth; fills area and iscrowd
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for r in results:
        if r["image_id"] not in image_ids or r["category_id"] not in cat_ids:
            raise ValueError(f"detection {dict(r)} names an image or category not in the ground truth")
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = {k: gt[k] for k in ("images", "annotations", "categories")}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {
            "images": gt["images"],
            "categories": gt["categories"],
            "annotations": [
                {**r, "id": i + 1, "area": float(r["bbox"][2] * r["bbox"][3]), "iscrowd": 0}
                for i, r in enumerate(results)
            ],
        }
        coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}


# -- drawing ------------------------------------------------------------------------------------


def draw_predictions(
    images: Sequence[torch.Tensor],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    names: Mapping[int, str],
    targets: Sequence[Mapping[str, torch.Tensor]] | None = None,
    score_thresh: float = 0.3,
    nrow: int = 4,
) -> torch.Tensor:
    """A grid (uint8, 3 x H x W) of images with predicted boxes (red, ``name score``) and, if
    given, the ground truth (green), drawn by ``torchvision.utils.draw_bounding_boxes``."""
    from torchvision.utils import draw_bounding_boxes, make_grid

    tiles = []
    for i, (image, pred) in enumerate(zip(images, predictions)):
        tile = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        if tile.shape[0] == 1:
            tile = tile.expand(3, -1, -1)
        if targets is not None and len(targets[i]["boxes"]):
            tile = draw_bounding_boxes(tile, targets[i]["boxes"].cpu(), colors="lime", width=1)
        keep = pred["scores"].cpu() >= score_thresh
        if keep.any():
            labels = [
                f"{names.get(int(lb), lb)} {s:.2f}"
                for lb, s in zip(pred["labels"][keep].tolist(), pred["scores"][keep].tolist())
            ]
            tile = draw_bounding_boxes(tile, pred["boxes"].cpu()[keep], labels=labels, colors="red", width=1)
        tiles.append(tile)
    if not tiles:
        raise ValueError("draw_predictions needs at least one image")
    return make_grid(tiles, nrow=nrow, padding=2, pad_value=255)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (C, H, W) tensor (1 or 3 channels) as PNG, atomically."""
    from torchvision.transforms.functional import to_pil_image

    from .io import atomic_write

    with atomic_write(path) as tmp:
        to_pil_image(image.cpu()).save(tmp, format="PNG")
    return Path(path)


# -- data loading and evaluation over a dataset ----------------------------------------------


def _loader(
    dataset: Any, batch_size: int, workers: int, sampler: Any = None, shuffle: bool = False, generator: Any = None
) -> Any:
    from .det_data import collate_detection

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        generator=generator,
        num_workers=workers,
        collate_fn=collate_detection,
        # Workers start each epoch, seeded from ``generator``: a resumed run's augmentation is that of one
        # that never stopped (persistent workers would carry their random state across epochs, unsaved).
        persistent_workers=False,
    )


def evaluate_dataset(
    model: nn.Module, dataset: Any, batch_size: int, workers: int, device: torch.device, progress: bool = True
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO metrics of ``model`` on a :class:`~parnet.det_data.CocoDetectionDataset`, and its detections."""
    from tqdm.auto import tqdm

    loader = _loader(dataset, batch_size, workers)
    bar = (lambda it: tqdm(it, desc="eval", total=len(loader), dynamic_ncols=True)) if progress else None
    results = predict(model, loader, dataset.label_to_cat, device, bar)
    return coco_evaluate(dataset.coco_dict, results), results
