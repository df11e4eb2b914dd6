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

import argparse
import contextlib
import io
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cli import add_kwargs_option, create_model, model_name

__all__ = [
    "DETECTORS",
    "FPNBackbone",
    "add_commands",
    "build_backbone",
    "coco_evaluate",
    "create_detector",
    "draw_predictions",
    "freeze_batchnorm",
    "load_backbone_weights",
    "load_detector",
    "predict",
    "save_detector",
]

DETECTORS = ("fcos", "retinanet", "fasterrcnn")
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
        levels = [int(i) for i in levels]
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
        detector_kwargs: passed to the torchvision detector (``score_thresh``, ``nms_thresh``, ...).

    The returned model carries ``detector_config``, the arguments that rebuild it (see
    :func:`save_detector`).
    """
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    if kind not in DETECTORS:
        raise ValueError(f"unknown detector {kind!r}; choose one of {DETECTORS}")
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
    from .weights import MAX_CLASSES, architecture_kwargs, bounded_int

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

    out_indices = {"out_indices": lambda v, k, src: levels(v, k)}
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
        "backbone_kwargs": lambda v, k: architecture_kwargs(v, f"{source}: {k}", out_indices),
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


# -- commands -----------------------------------------------------------------------------------


def _data_paths(args: argparse.Namespace, split: str) -> tuple[Path, Path]:
    """(image folder, COCO JSON) of a split: explicit flags, or the ``--data`` layout of make-det-dataset."""
    images, ann = getattr(args, f"{split}_images", None), getattr(args, f"{split}_ann", None)
    if args.data is not None:
        images = images or Path(args.data) / split
        ann = ann or Path(args.data) / "annotations" / f"instances_{split}.json"
    if images is None or ann is None:
        raise ValueError(f"give --data DIR, or both --{split}-images and --{split}-ann")
    return Path(images), Path(ann)


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
        persistent_workers=workers > 0,
    )


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


def evaluate_dataset(
    model: nn.Module, dataset: Any, batch_size: int, workers: int, device: torch.device, progress: bool = True
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COCO metrics of ``model`` on a :class:`~parnet.det_data.CocoDetectionDataset`, and its detections."""
    from tqdm.auto import tqdm

    loader = _loader(dataset, batch_size, workers)
    bar = (lambda it: tqdm(it, desc="eval", total=len(loader), dynamic_ncols=True)) if progress else None
    results = predict(model, loader, dataset.label_to_cat, device, bar)
    return coco_evaluate(dataset.coco_dict, results), results


def _lr_lambda(warmup: int, total: int) -> Any:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


def train_det(args: argparse.Namespace) -> int:
    """``parnet train-det``: train a detector on a COCO-format set with the shared training engine."""
    from torch.nn.parallel import DistributedDataParallel

    from . import engine
    from .det_data import CocoDetectionDataset

    run_dir = Path(args.output)
    engine.check_run_folder(run_dir, args.resume, ("eval.json",))
    dist_info = engine.init_distributed(args.device)
    try:
        engine.seed_everything(args.seed, dist_info.rank)
        device, main = dist_info.device, dist_info.is_main
        strict = not args.lenient
        train_ds = CocoDetectionDataset(*_data_paths(args, "train"), train=True, strict=strict)
        val_ds = CocoDetectionDataset(*_data_paths(args, "val"), train=False, strict=strict)
        if train_ds.check.cat_ids != val_ds.check.cat_ids:
            raise ValueError(f"train and val categories differ: {train_ds.check.cat_ids} vs {val_ds.check.cat_ids}")
        size = args.image_size or max(max(im["width"], im["height"]) for im in train_ds.images)
        model = create_detector(
            args.detector,
            backbone=args.backbone,
            num_classes=train_ds.num_classes,
            fpn_channels=args.fpn_channels,
            backbone_weights=args.backbone_weights,
            use_ema=args.ema,
            freeze_bn=args.freeze_bn,
            min_size=size,
            max_size=size,
            backbone_kwargs=args.backbone_kwargs,
        ).to(device)
        n_params = sum(p.numel() for p in model.parameters())
        n_backbone = sum(p.numel() for p in model.backbone.body.parameters())
        if main:
            print(
                f"{args.detector} on {args.backbone}: {n_params / 1e6:.3f} M params "
                f"({n_backbone / 1e6:.3f} M backbone), "
                f"strides {model.backbone.strides}, images {size}px, {len(train_ds)} train / {len(val_ds)} val images, "
                f"{train_ds.num_classes - 1} classes",
                flush=True,
            )
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
        )
        generator = torch.Generator().manual_seed(args.seed)
        if dist_info.distributed:
            sampler = torch.utils.data.DistributedSampler(
                train_ds, dist_info.world_size, dist_info.rank, seed=args.seed
            )
        else:
            sampler = torch.utils.data.RandomSampler(train_ds, generator=generator)
        loader = _loader(train_ds, args.batch_size, args.workers, sampler=sampler)
        steps = len(loader) if not args.max_steps else min(len(loader), args.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(args.warmup_steps, steps * args.epochs))
        start_epoch, extra = 0, {}
        if args.resume:
            start_epoch, extra = engine.load_checkpoint(
                run_dir, model, optimizer=optimizer, scheduler=scheduler, generators={"loader": generator}
            )
            if main:
                print(f"resumed from {run_dir} at epoch {start_epoch + 1}", flush=True)
        train_model = DistributedDataParallel(model) if dist_info.distributed else model
        logger = engine.MetricLogger(run_dir, enabled=main, start_epoch=start_epoch if args.resume else None)
        meta = {"format": "parnet-detector", "config": json.dumps(model.detector_config)}
        meta_extra = {
            "names": {str(k): v for k, v in train_ds.names.items()},
            "label_to_cat": {str(k): v for k, v in train_ds.label_to_cat.items()},
        }
        meta["extra"] = json.dumps(meta_extra)
        best = extra.get("best_ap", -1.0)
        stats: dict[str, float] = {}
        for epoch in range(start_epoch, args.epochs):
            if dist_info.distributed:
                sampler.set_epoch(epoch)
            train_model.train()
            bar = engine.Progress(steps, f"epoch {epoch + 1}/{args.epochs}", enabled=main and not args.no_progress)
            t0 = time.perf_counter()
            for step, (images, targets) in enumerate(loader):
                if step >= steps:
                    break
                images, targets = _to_device(images, targets, device)
                losses = train_model(images, targets)
                loss = sum(losses.values())
                engine.check_finite(loss, epoch * steps + step, dist_info)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
                scheduler.step()
                bar.update(len(images), loss=loss.item(), **{k: v.item() for k, v in losses.items()})
            bar.close()
            epoch_time = time.perf_counter() - t0
            row = {f"train_{k}": engine.reduce_mean(v) for k, v in bar.means().items()}
            row.update(epoch_time_s=epoch_time, lr=scheduler.get_last_lr()[0])
            last = epoch + 1 == args.epochs
            if main and (last or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
                t1 = time.perf_counter()
                stats, _ = evaluate_dataset(model, val_ds, args.batch_size, args.workers, device, not args.no_progress)
                row.update({f"val_{k}": v for k, v in stats.items()}, eval_time_s=time.perf_counter() - t1)
                if stats["AP"] > best:
                    best = stats["AP"]
                    save_detector(model, run_dir / "best.safetensors", meta_extra | {"epoch": epoch, "stats": stats})
            if main:
                logger.log(epoch, row)
                print(
                    f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True
                )
                engine.save_checkpoint(
                    run_dir,
                    epoch,
                    model,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    extra={"best_ap": best, "config": model.detector_config},
                    metadata=meta,
                    generators={"loader": generator},
                )
            if dist_info.distributed:
                torch.distributed.barrier()
        logger.close()
        if main and stats:
            from .io import atomic_write

            with atomic_write(run_dir / "eval.json") as tmp:
                tmp.write_text(json.dumps({"stats": stats, "split": "val", "epochs": args.epochs}, indent=2))
            png = _draw_examples(model, val_ds, run_dir / "predictions.png", args.draw, args.score_thresh, device)
            print("val: " + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
            if png is not None:
                print(f"wrote {png}", flush=True)
    finally:
        engine.cleanup_distributed()
    return 0


def eval_det(args: argparse.Namespace) -> int:
    """``parnet eval-det``: pycocotools metrics and a picture of predictions for a trained detector."""
    from .det_data import CocoDetectionDataset
    from .io import atomic_write

    weights = Path(args.weights)
    if weights.is_dir():
        weights = weights / "last.safetensors"
    model, extra = load_detector(weights, args.device)
    dataset = CocoDetectionDataset(*_data_paths(args, args.split), train=False, strict=not args.lenient)
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
    device = torch.device(args.device)
    stats, results = evaluate_dataset(model, dataset, args.batch_size, args.workers, device, not args.no_progress)
    out = Path(args.output) if args.output else weights.parent / f"eval_{args.split}"
    with atomic_write(out / "eval.json") as tmp:
        tmp.write_text(json.dumps({"weights": str(weights), "split": args.split, "stats": stats}, indent=2))
    with atomic_write(out / "detections.json") as tmp:
        tmp.write_text(json.dumps(results))
    png = _draw_examples(model, dataset, out / "predictions.png", args.draw, args.score_thresh, device)
    print("\n".join(f"{k:6s} {v:.4f}" for k, v in stats.items()))
    print(f"wrote {out / 'eval.json'}, {out / 'detections.json'}" + (f", {png}" if png else ""))
    return 0


def make_det_dataset(args: argparse.Namespace) -> int:
    """``parnet make-det-dataset``: the synthetic Fashion-MNIST detection set."""
    from .det_data import make_fashion_mnist_detection

    paths = make_fashion_mnist_detection(
        args.output,
        num_train=args.train,
        num_val=args.val,
        canvas=args.canvas,
        num_objects=(args.min_objects, args.max_objects),
        object_size=(args.min_size, args.max_size),
        max_iou=args.max_iou,
        seed=args.seed,
        source=args.source,
        overwrite=args.overwrite,
    )
    for split, path in paths.items():
        data = json.loads(path.read_text())
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} boxes -> {path}")
    return 0


def _add_data_args(p: argparse.ArgumentParser, splits: Sequence[str]) -> None:
    p.add_argument(
        "--data", help="a folder laid out as make-det-dataset writes it: SPLIT/ and annotations/instances_SPLIT.json"
    )
    for split in splits:
        p.add_argument(f"--{split}-images", help=f"image folder of the {split} split (overrides --data)")
        p.add_argument(f"--{split}-ann", help=f"COCO JSON of the {split} split (overrides --data)")
    p.add_argument(
        "--lenient",
        action="store_true",
        help="drop annotations with unknown categories or malformed boxes instead of stopping",
    )
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--draw", type=int, default=8, help="images in predictions.png (0: none)")
    p.add_argument("--score-thresh", type=float, default=0.3, help="lowest score drawn in predictions.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_commands(subparsers: Any) -> None:
    """Add ``make-det-dataset``, ``train-det`` and ``eval-det`` to the ``parnet`` command line."""
    from .det_data import DEFAULT_FASHION_MNIST

    p = subparsers.add_parser("make-det-dataset", help="synthetic COCO-format detection set from Fashion-MNIST items")
    p.add_argument("output", help="folder to write (train/, val/, annotations/)")
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--val", type=int, default=300, help="validation images")
    p.add_argument("--canvas", type=int, default=128, help="image side in pixels")
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=4)
    p.add_argument("--min-size", type=int, default=24, help="smallest item side in pixels")
    p.add_argument("--max-size", type=int, default=64, help="largest item side in pixels")
    p.add_argument("--max-iou", type=float, default=0.2, help="largest IoU between two items' boxes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=str(DEFAULT_FASHION_MNIST), help="folder of the Fashion-MNIST IDX .gz files")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in the output folder")
    p.set_defaults(func=make_det_dataset)

    p = subparsers.add_parser("train-det", help="train a detector (FCOS, RetinaNet, Faster R-CNN) on a COCO-format set")
    _add_data_args(p, ("train", "val"))
    p.add_argument("--output", required=True, help="run folder: checkpoints, metrics, eval.json, predictions.png")
    p.add_argument("--detector", choices=DETECTORS, default="fcos")
    p.add_argument(
        "--backbone", default="parnet_s", type=model_name, help="timm model: parnet_* or a baseline such as resnet18"
    )
    add_kwargs_option(
        p, "--backbone-kwargs", "timm.create_model arguments, e.g. widths=[16,32,64] head_width=128",
        reserved={
            "in_chans": "the detector takes RGB images (3 channels)",
            "num_classes": "set by the dataset's categories (the backbone has no classifier)",
            "features_only": "the detector always takes the backbone's features",
        },
    )  # fmt: skip
    p.add_argument(
        "--backbone-weights", help="classification checkpoint: ours (.safetensors) or the authors' (.pth.tar)"
    )
    p.add_argument("--ema", action="store_true", help="take the EMA weights of --backbone-weights")
    p.add_argument(
        "--freeze-bn", action="store_true", help="FrozenBatchNorm2d in the backbone (for pretrained weights)"
    )
    p.add_argument("--fpn-channels", type=int, default=256)
    p.add_argument(
        "--image-size", type=int, help="resize images to this side (default: the largest training image side)"
    )
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (cosine decay after warm-up)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--clip-grad", type=float, default=10.0, help="gradient norm clip (0: none)")
    p.add_argument(
        "--max-steps", type=int, default=0, help="steps per epoch at most (0: the whole set); for quick runs"
    )
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N epochs (always after the last)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=train_det)

    p = subparsers.add_parser("eval-det", help="COCO AP of a trained detector, and a picture of its predictions")
    p.add_argument("weights", help="a train-det run folder, or a detector .safetensors (last/best)")
    _add_data_args(p, ("val", "test", "train"))
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--output", help="folder for eval.json, detections.json, predictions.png (default: beside the weights)"
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=eval_det)
