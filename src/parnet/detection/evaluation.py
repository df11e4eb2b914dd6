"""Detections of a model over a dataset, their COCO scores (pycocotools' ``COCOeval``) and pictures of them."""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["STAT_NAMES", "coco_evaluate", "draw_predictions", "evaluate_dataset", "predict", "save_png"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]],
    label_to_cat: Mapping[int, int],
    device: str | torch.device = "cpu",
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Run ``model`` (eval mode) over a loader; COCO results ``{image_id, category_id, bbox (xywh), score}``."""
    from torchvision.ops import box_convert

    model.eval()
    results = []
    for images, targets in progress(loader) if progress else loader:
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            boxes = box_convert(out["boxes"].detach().cpu(), "xyxy", "xywh")
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
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], verbose: bool = False, strict: bool = True
) -> dict[str, float]:
    """pycocotools bbox evaluation: ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", ...}``.

    ``gt`` is a COCO dataset dict, checked by :func:`parnet.detection.data.check_coco` first (e.g.
    :attr:`parnet.detection.data.CocoDetectionDataset.coco_dict`) and scored as written, boxes outside
    the image included, as pycocotools scores a file; ``results`` are COCO detections.
    Values are pycocotools' own: -1 where there is no ground truth to score (e.g. no large
    objects). No detections at all score 0 (pycocotools' ``loadRes`` refuses an empty list).
    ``ValueError`` for ground truth with no images or no boxes (every metric would be -1).
    ``strict``: refuse ground-truth annotations of unknown categories or malformed boxes (``False``: drop them,
    with a warning).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .data import check_coco

    check = check_coco(gt, strict=strict)  # clear errors for malformed ground truth; fills area and iscrowd
    check.require_ground_truth()
    gt = check.data
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for r in results:
        _check_detection(r)
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


def _check_detection(result: Any) -> None:
    """``ValueError`` unless ``result`` is a COCO detection of numbers (Python's or NumPy's, not tensors)."""

    def number(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(result, Mapping):
        raise ValueError(f"a detection must be a dict, got {type(result).__name__}")
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in result]
    if missing:
        raise ValueError(f"detection {dict(result)} lacks {missing}: COCO detections have image_id, category_id, "
                         "bbox [x, y, w, h] and score")  # fmt: skip
    box = result["bbox"]
    ids_ok = all(
        isinstance(result[k], numbers.Integral) and not isinstance(result[k], bool) for k in ("image_id", "category_id")
    )
    box_ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(number(v) for v in box)
    if not (ids_ok and box_ok and number(result["score"])):
        raise ValueError(
            f"detection {dict(result)} must hold integer ids, bbox [x, y, w, h] and a score of finite numbers "
            "(plain Python numbers: call .tolist() / int() on tensors)"
        )


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
    # make_grid stacks its tiles: pad images of other sizes (COCO's are) to the largest, in white.
    height, width = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    tiles = [F.pad(t, (0, width - t.shape[2], 0, height - t.shape[1]), value=255) for t in tiles]
    return make_grid(tiles, nrow=nrow, padding=2, pad_value=255)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 (C, H, W) tensor (1 or 3 channels) as PNG, atomically."""
    from torchvision.transforms.functional import to_pil_image

    from ..io import atomic_write

    with atomic_write(path) as tmp:
        to_pil_image(image.cpu()).save(tmp, format="PNG")
    return Path(path)


# -- data loading and evaluation over a dataset ----------------------------------------------


def detection_loader(
    dataset: Any, batch_size: int, workers: int, sampler: Any = None, shuffle: bool = False, generator: Any = None
) -> Any:
    """A ``DataLoader`` of ``(images, targets)`` lists, the input torchvision's detectors take."""
    from .data import collate_detection

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
    """COCO metrics of ``model`` on a :class:`~parnet.detection.data.CocoDetectionDataset`, and its detections."""
    from tqdm.auto import tqdm

    loader = detection_loader(dataset, batch_size, workers)
    bar = (lambda it: tqdm(it, desc="eval", total=len(loader), dynamic_ncols=True)) if progress else None
    results = predict(model, loader, dataset.label_to_cat, device, bar)
    return coco_evaluate(dataset.coco_dict, results), results
