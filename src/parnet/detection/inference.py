"""A trained detector on new images, without annotations: :func:`detect` (``parnet predict-det``).

::

    model, extra = parnet.detection.load_detector("runs/det/last.safetensors")
    results = parnet.detection.detect(model, ["photo.jpg", "folder/"], extra["names"],
                                      label_to_cat=extra["label_to_cat"])

Images are read as ``parnet predict`` reads them (:func:`parnet.images.open_image`): upright by their EXIF
orientation, 8-bit, transparency on white, RGB; boxes are in the pixels of that upright image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

__all__ = ["detect", "draw_detections", "format_detections"]

ImageInput = str | os.PathLike | Image.Image


def _image_tensor(name: str, item: Path | Image.Image) -> torch.Tensor:
    """(3, H, W) float in [0, 1], the input torchvision's detectors take."""
    from torchvision.transforms.functional import pil_to_tensor

    from ..predict import read_item

    return pil_to_tensor(read_item(name, item, "RGB")).float().div_(255)


@torch.no_grad()
def detect(
    model: nn.Module,
    images: Sequence[ImageInput] | ImageInput,
    names: Mapping[Any, str] | None = None,
    score_thresh: float = 0.3,
    batch_size: int = 8,
    label_to_cat: Mapping[Any, int] | None = None,
) -> list[dict[str, Any]]:
    """``[{"image": name, "detections": [{"label", "category_id", "name", "score", "bbox"}, ...]}, ...]``.

    Args:
        model: a detector (:func:`~parnet.detection.create_detector`, :func:`~parnet.detection.load_detector`),
            run in eval mode on the device of its weights.
        images: image files, folders (their image files, sorted; subfolders not searched) and PIL images, or
            one of these; a file is named by its path, a PIL image ``<image i>`` by its place. Every file's
            header is read before any image is decoded; then ``batch_size`` images at a time are decoded and run.
        names: detector label -> category name (a run's ``extra["names"]``; keys may be strings).
        score_thresh: the lowest score kept, above the detector's own threshold.
        batch_size: images decoded and run at once.
        label_to_cat: detector label -> COCO category id of the training annotations (a run's
            ``extra["label_to_cat"]``; keys may be strings): each detection's ``category_id`` (``None`` for a
            label that is no category, such as background 0, which eval-det's ``detections.json`` leaves out).
            Not given: no ``category_id``.

    ``bbox`` is COCO's ``[x, y, width, height]`` in pixels; detections come best score first.
    """
    from torchvision.ops import box_convert

    from ..predict import check_image_headers, image_items

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(score_thresh, bool) or not isinstance(score_thresh, (int, float)) or not 0 <= score_thresh <= 1:
        raise ValueError(f"score_thresh must be a number from 0 to 1, got {score_thresh!r}")
    by_label = {int(k): str(v) for k, v in (names or {}).items()}
    cat_of = None if label_to_cat is None else {int(k): int(v) for k, v in label_to_cat.items()}
    items = image_items(images)
    check_image_headers([item for _, item in items if not isinstance(item, Image.Image)])
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    model.eval()
    results = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        outputs = model([_image_tensor(name, item).to(device) for name, item in batch])
        for (name, _), out in zip(batch, outputs):
            keep = out["scores"] >= score_thresh
            found = []
            boxes = box_convert(out["boxes"][keep], "xyxy", "xywh")
            for box, score, label in zip(boxes.tolist(), out["scores"][keep].tolist(), out["labels"][keep].tolist()):
                entry: dict[str, Any] = {"label": int(label)}
                if cat_of is not None:
                    entry["category_id"] = cat_of.get(int(label))
                entry.update(
                    name=by_label.get(int(label), f"class {label}"),
                    score=round(float(score), 5),
                    bbox=[round(v, 2) for v in box],
                )
                found.append(entry)
            results.append({"image": name, "detections": found})
    return results


def draw_detections(
    images: Sequence[ImageInput] | ImageInput, results: list[dict[str, Any]], path: str | os.PathLike
) -> Path:
    """A PNG grid of ``images`` with the boxes :func:`detect` found on them (``results``, in the same order)."""
    from torchvision.ops import box_convert

    from ..predict import image_items
    from .evaluation import draw_predictions, save_png

    items = image_items(images)
    if len(items) != len(results):
        raise ValueError(f"{len(items)} images but {len(results)} results: give the images detect() was given")
    tensors, predictions, names = [], [], {}
    for (name, item), result in zip(items, results):
        tensors.append(_image_tensor(name, item))
        found = result["detections"]
        boxes = torch.tensor([d["bbox"] for d in found], dtype=torch.float32).reshape(-1, 4)
        predictions.append(
            {
                "boxes": box_convert(boxes, "xywh", "xyxy"),
                "scores": torch.tensor([d["score"] for d in found], dtype=torch.float32),
                "labels": torch.tensor([d["label"] for d in found], dtype=torch.int64),
            }
        )
        names.update({d["label"]: d["name"] for d in found})
    return save_png(draw_predictions(tensors, predictions, names, score_thresh=0.0), path)


def format_detections(results: list[dict[str, Any]]) -> str:
    """The report ``parnet predict-det`` prints: per image, its detections (score, name, box)."""
    lines = []
    for result in results:
        found = result["detections"]
        lines.append(f"{result['image']}: {len(found)} detection{'' if len(found) == 1 else 's'}")
        for d in found:
            x, y, w, h = d["bbox"]
            lines.append(f"  {d['score']:.3f}  {d['name']}  x={x:g} y={y:g} w={w:g} h={h:g}")
    return "\n".join(lines)
