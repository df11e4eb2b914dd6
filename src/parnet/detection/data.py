"""Detection data: COCO-format datasets, annotation checks, and a synthetic set from Fashion-MNIST.

A COCO-format dataset is an image folder plus a COCO JSON (``images``, ``annotations``,
``categories``; boxes are ``[x, y, width, height]`` in pixels). :func:`check_coco` reads the JSON
the way the training and evaluation code needs it and says what is wrong with it:

* fatal (``ValueError`` listing the offending entries): missing sections, duplicate image or
  annotation ids, annotations of images that are not listed, an ``iscrowd`` other than 0/1/true/false,
  unknown category ids and boxes that are not four finite numbers (the last two are dropped instead
  with ``strict=False``);
* filled in without a warning (counted in ``CocoCheck.filled``): a missing annotation id, a missing
  ``area`` (the box area) and a missing ``iscrowd`` (0);
* kept as written: every box, inside the image or not. Evaluation scores against the file as written,
  as pycocotools and torchvision's reference scripts do;
* kept: images without annotations (their target has zero boxes), crowd boxes (left out of the
  training targets, kept for pycocotools, which ignores detections on them).

:func:`repair_boxes` makes the training targets from a checked file: boxes reaching outside the image are
clipped to it, as torchvision's COCO reference does, and boxes with no area left (zero or negative width or
height, or entirely outside the image) are dropped, with a warning that counts them.

:func:`make_fashion_mnist_detection` builds a detection set from the real Fashion-MNIST IDX files:
items pasted at random positions and sizes onto larger canvases, written as PNG + COCO JSON.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from ..io import atomic_write, check_output_path

__all__ = [
    "CocoDetectionDataset",
    "CocoCheck",
    "check_coco",
    "collate_detection",
    "make_fashion_mnist_detection",
    "repair_boxes",
]

DEFAULT_FASHION_MNIST = Path(FASHION_MNIST_DIR)


# -- checking COCO annotations ------------------------------------------------------------------


@dataclass
class CocoCheck:
    """A checked COCO dataset: the checked JSON and what had to be done to it."""

    data: dict[str, Any]
    """The checked dataset: every annotation has a valid id, category, box (as written), area and iscrowd."""
    cat_ids: list[int]
    """Category ids, sorted; label ``k + 1`` of a detector is category ``cat_ids[k]`` (0 is background)."""
    clipped: list[int] = field(default_factory=list)
    dropped_degenerate: list[int] = field(default_factory=list)
    dropped_unknown_category: list[int] = field(default_factory=list)
    dropped_malformed: list[int] = field(default_factory=list)
    filled: int = 0
    name: str = "the given dataset"
    """Where the data came from (its path), for messages."""

    @property
    def label_to_cat(self) -> dict[int, int]:
        return {i + 1: c for i, c in enumerate(self.cat_ids)}

    @property
    def cat_to_label(self) -> dict[int, int]:
        return {c: i + 1 for i, c in enumerate(self.cat_ids)}

    @property
    def names(self) -> dict[int, str]:
        """Detector label -> category name."""
        by_id = {c["id"]: str(c.get("name", c["id"])) for c in self.data["categories"]}
        return {label: by_id[c] for label, c in self.label_to_cat.items()}

    @property
    def boxes(self) -> int:
        """The boxes detections are scored against: the annotations that are not crowd regions, with some width
        and height, as written. The training targets can hold fewer: :func:`repair_boxes` drops boxes with no
        area inside their image (:attr:`CocoDetectionDataset.target_boxes`)."""
        return sum(1 for a in self.data["annotations"] if not a["iscrowd"] and min(a["bbox"][2:]) > 0)

    def require_ground_truth(self) -> None:
        """``ValueError`` unless there are images and boxes to score detections against: pycocotools would give
        -1 for every metric, which reads as a score."""
        if not self.data["images"]:
            raise ValueError(f"{self.name} lists no images: nothing to evaluate; give a split with annotated images")
        if not self.boxes:
            raise ValueError(
                f"{self.name} has no boxes to score detections against (crowd regions aside): every COCO metric "
                "would be -1; give a split whose images are annotated with boxes"
            )

    def summary(self, targets_only: bool = False) -> str:
        """One line on the repairs made, empty when there were none; ``targets_only``: those of
        :func:`repair_boxes`, not the drops of :func:`check_coco`'s ``strict=False``."""
        parts = []
        for what, ids in (
            ("clipped to the image", self.clipped),
            ("dropped as degenerate (no area inside the image)", self.dropped_degenerate),
            ("dropped for an unknown category id", [] if targets_only else self.dropped_unknown_category),
            ("dropped as malformed (bbox not 4 finite numbers)", [] if targets_only else self.dropped_malformed),
        ):
            if ids:
                parts.append(f"{len(ids)} box{'es' if len(ids) > 1 else ''} {what} (annotation ids {_head(ids)})")
        return "; ".join(parts)


def _head(items: Sequence[Any], n: int = 8) -> str:
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _load_json(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(source, Mapping):
        return json.loads(json.dumps(source)), "the given dataset"  # a deep copy, JSON types only
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        return json.loads(path.read_text()), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def check_coco(source: str | os.PathLike | Mapping[str, Any], strict: bool = True) -> CocoCheck:
    """Read and check a COCO detection dataset (a path or an already-loaded dict).

    Raises ``ValueError`` naming the offending entries for problems that make the file unusable, and
    in ``strict`` mode for unknown category ids and malformed boxes (dropped otherwise, with a warning).
    Boxes are kept as written: :func:`repair_boxes` clips them for training (see the module doc).
    """
    data, name = _load_json(source)
    if not isinstance(data, dict):
        raise ValueError(f"{name}: a COCO dataset is a JSON object, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise ValueError(f"{name}: missing or non-list COCO sections {missing}")

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if (
            not isinstance(img, dict)
            or not isinstance(img.get("id"), int)
            or isinstance(img.get("id"), bool)
            or not isinstance(img.get("file_name"), str)
        ):
            raise ValueError(f"{name}: images[{i}] needs an integer 'id' and a string 'file_name', got {img!r:.200}")
        for key in ("width", "height"):
            value = img.get(key)
            if isinstance(value, float) and value.is_integer():  # some exporters write 640.0; pycocotools takes it
                value = img[key] = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: image {img['id']} needs a positive integer {key!r}, got {img.get(key)!r}")
        if img["id"] in images:
            raise ValueError(f"{name}: duplicate image id {img['id']}")
        images[img["id"]] = img

    cat_ids = []
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise ValueError(f"{name}: categories[{i}] needs an integer 'id', got {cat!r:.200}")
        cat_ids.append(cat["id"])
    if len(set(cat_ids)) != len(cat_ids):
        raise ValueError(f"{name}: duplicate category ids in {sorted(cat_ids)}")
    if not cat_ids:
        raise ValueError(f"{name}: no categories")
    known_cats = set(cat_ids)

    check = CocoCheck(data=data, cat_ids=sorted(cat_ids), name=name)
    kept, orphans, unknown, malformed, ann_ids = [], [], [], [], set()
    next_id = 1 + max(
        (a["id"] for a in data["annotations"] if isinstance(a, dict) and isinstance(a.get("id"), int)), default=0
    )
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise ValueError(f"{name}: annotations[{i}] is not an object: {ann!r:.200}")
        if not isinstance(ann.get("id"), int):
            ann["id"], next_id = next_id, next_id + 1
            check.filled += 1
        if ann["id"] in ann_ids:
            raise ValueError(f"{name}: duplicate annotation id {ann['id']}")
        ann_ids.add(ann["id"])
        if not isinstance(ann.get("image_id"), int) or ann["image_id"] not in images:  # a list is not hashable
            orphans.append(ann["id"])
            continue
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in known_cats:
            unknown.append((ann["id"], ann.get("category_id")))
            continue
        box = ann.get("bbox")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            malformed.append((ann["id"], box))
            continue
        if ann.get("area") is None:  # pycocotools needs it: the box's, as written (none for a negative side)
            ann["area"] = max(float(box[2]), 0.0) * max(float(box[3]), 0.0)
            check.filled += 1
        elif isinstance(ann["area"], bool) or not isinstance(ann["area"], (int, float)) or not ann["area"] >= 0:
            raise ValueError(  # pycocotools sorts objects into small/medium/large by it: a wrong one moves them
                f"{name}: annotation {ann['id']} has area {ann['area']!r}; it must be a number of pixels, at least 0 "
                "(leave it out to take the box's)"
            )
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            check.filled += 1
        # bool("0") is True: only the values that say yes or no are read as one
        if isinstance(ann["iscrowd"], (str, bytes)) or ann["iscrowd"] not in (0, 1):
            raise ValueError(
                f"{name}: annotation {ann['id']} has iscrowd {ann['iscrowd']!r}; it must be 0 or 1 (true or false)"
            )
        ann["iscrowd"] = int(ann["iscrowd"])
        kept.append(ann)

    if orphans:
        raise ValueError(f"{name}: annotations {_head(orphans)} refer to image ids that are not in 'images'")
    if unknown:
        msg = f"{name}: annotations with category ids not in 'categories' {sorted(known_cats)}: " + _head(
            [f"{a} (category {c!r})" for a, c in unknown]
        )
        if strict:
            raise ValueError(msg + "; fix the file or pass strict=False (--lenient) to drop them")
        check.dropped_unknown_category = [a for a, _ in unknown]
    if malformed:
        msg = f"{name}: annotations whose bbox is not [x, y, w, h] of finite numbers: " + _head(
            [f"{a} ({b!r:.60})" for a, b in malformed]
        )
        if strict:
            raise ValueError(msg + "; fix the file or pass strict=False (--lenient) to drop them")
        check.dropped_malformed = [a for a, _ in malformed]
    data["annotations"] = kept
    if check.summary():
        warnings.warn(f"{name}: {check.summary()}", stacklevel=2)
    return check


def repair_boxes(check: CocoCheck, warn: bool = True) -> list[dict[str, Any]]:
    """The annotations of a checked dataset as training targets: copies whose boxes are clipped to their image
    (as torchvision's COCO reference does; ``area`` follows), those with no area left dropped.

    Records them in ``check.clipped`` and ``check.dropped_degenerate`` and, with ``warn``, says so.
    ``check.data`` is left as written: the ground truth evaluation scores against.
    """
    sizes = {im["id"]: (im["width"], im["height"]) for im in check.data["images"]}
    check.clipped, check.dropped_degenerate = [], []
    repaired = []
    for ann in check.data["annotations"]:
        width, height = sizes[ann["image_id"]]
        x0, y0, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = x0 + w, y0 + h
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 <= cx0 or cy1 <= cy0:
            check.dropped_degenerate.append(ann["id"])
            continue
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            check.clipped.append(ann["id"])
            ann = {**ann, "bbox": [cx0, cy0, cx1 - cx0, cy1 - cy0], "area": (cx1 - cx0) * (cy1 - cy0)}
        repaired.append(ann)
    if warn and check.summary(targets_only=True):
        warnings.warn(f"{check.name}: {check.summary(targets_only=True)} in the training targets", stacklevel=2)
    return repaired


# -- the dataset --------------------------------------------------------------------------------


class CocoDetectionDataset(torch.utils.data.Dataset):
    """A COCO-format detection set for torchvision detectors.

    Items are ``(image, target)``: a float RGB tensor in [0, 1] (3, H, W) and a dict with
    ``boxes`` (N, 4, xyxy pixels), ``labels`` (N, detector labels 1..K), ``image_id``, ``area``
    and ``iscrowd``. The targets' boxes are clipped to the image (:func:`repair_boxes`, said for a training
    set); :attr:`coco_dict`, the ground truth of evaluation, keeps them as written. Crowd boxes are left out
    of the targets (pycocotools still sees them).

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        ann_file: the COCO JSON (or a loaded dict).
        train: random horizontal flips.
        strict: see :func:`check_coco`.
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike | Mapping[str, Any],
        train: bool = False,
        strict: bool = True,
    ):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        self.check = check_coco(ann_file, strict=strict)
        self.train = train
        data = self.check.data
        targets = repair_boxes(self.check, warn=train)
        self.images = sorted(data["images"], key=lambda im: im["id"])
        missing = [im["file_name"] for im in self.images if not (self.image_dir / im["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images listed in the annotations are not in {self.image_dir}: {_head(missing)}"
            )
        self._check_headers()
        self.anns: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in targets:
            self.anns[ann["image_id"]].append(ann)
        self.cat_to_label = self.check.cat_to_label
        self.label_to_cat = self.check.label_to_cat
        self.names = self.check.names
        self.num_classes = len(self.check.cat_ids) + 1  # labels 1..K, 0 for background

    def _check_headers(self) -> None:
        """Refuse files Pillow cannot open or whose size is not the annotations', listing them, before any
        training: found while loading, a bad validation image would stop a run after its first epoch."""
        from PIL import Image

        from ..data import CorruptDatasetError

        bad = []
        for info in self.images:
            try:
                with Image.open(self.image_dir / info["file_name"]) as img:  # the header only: fast
                    size = img.size
            except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError...
                bad.append(f"{info['file_name']} (not an image Pillow can read: {type(e).__name__})")
                continue
            if size != (info["width"], info["height"]):
                said = f"{info['width']}x{info['height']}"
                bad.append(f"{info['file_name']} is {size[0]}x{size[1]}, the annotations say {said}")
        if bad:
            raise CorruptDatasetError(
                f"{self.image_dir}: {len(bad)} of {len(self.images)} images do not fit the annotations: "
                f"{_head(bad, 5)}. "
                "Fix the files or their width/height in the annotations and run again"
            )

    @property
    def coco_dict(self) -> dict[str, Any]:
        """The checked COCO dataset, boxes as written: ground truth for :func:`parnet.detection.coco_evaluate`."""
        return self.check.data

    @property
    def target_boxes(self) -> int:
        """How many boxes the targets hold: the non-crowd ones with an area inside their image."""
        return sum(len([a for a in anns if not a["iscrowd"]]) for anns in self.anns.values())

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        from ..images import open_image

        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:  # PIL: torchvision.io's image decoding is deprecated since torchvision 0.29
            image = pil_to_tensor(open_image(path, "RGB", upright=False))  # COCO boxes: the stored pixels' frame
        except (OSError, ValueError) as e:  # unreadable and truncated files
            from ..data import CorruptDatasetError

            raise CorruptDatasetError(str(e)) from None
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise ValueError(
                f"{path} is {image.shape[2]}x{image.shape[1]} but the annotations say {info['width']}x{info['height']}"
            )
        return image

    def target(self, index: int) -> dict[str, torch.Tensor]:
        info = self.images[index]
        anns = [a for a in self.anns[info["id"]] if not a["iscrowd"]]
        from torchvision.ops import box_convert

        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        return {
            "boxes": box_convert(boxes, "xywh", "xyxy"),
            "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(info["id"]),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = self.load_image(index).float().div_(255)
        target = self.target(index)
        if self.train and torch.rand(()) < 0.5:
            image = image.flip(-1)
            w = image.shape[-1]
            target["boxes"] = torch.stack(
                [w - target["boxes"][:, 2], target["boxes"][:, 1], w - target["boxes"][:, 0], target["boxes"][:, 3]], 1
            )
        return image, target


def collate_detection(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Lists of images and targets, the input torchvision detectors take."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# -- Fashion-MNIST items ------------------------------------------------------------------------


def _load_fashion_mnist(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 28, 28) and labels of a split, read and checked as training reads them."""
    from ..data import FashionMNIST

    items = FashionMNIST(source, train=split == "train")
    return items.images, items.targets


def _iou(box: Sequence[float], boxes: Sequence[Sequence[float]]) -> float:
    """Largest IoU of an xyxy box with any of ``boxes`` (0 for none)."""
    from torchvision.ops import box_iou

    if not boxes:
        return 0.0
    # float64: the arithmetic of the Python floats the boxes are, so the same placements on every run
    return box_iou(torch.tensor([box], dtype=torch.float64), torch.tensor(boxes, dtype=torch.float64)).max().item()


def _render_canvas(
    rng: np.random.Generator,
    items: np.ndarray,
    labels: np.ndarray,
    canvas: int,
    num_objects: tuple[int, int],
    object_size: tuple[int, int],
    max_iou: float,
) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    """One canvas: a noisy dark background with 1..k items pasted (pixel-wise max) on it."""
    base = rng.integers(0, 48)
    image = np.clip(base + rng.normal(0, 8, (canvas, canvas)), 0, 255).astype(np.float32)
    objects: list[tuple[list[float], int]] = []
    boxes: list[list[float]] = []
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        idx = int(rng.integers(len(items)))
        size = int(rng.integers(object_size[0], object_size[1] + 1))
        contrast = float(rng.uniform(0.6, 1.0))
        item = torch.from_numpy(items[idx].astype(np.float32))[None, None]
        item = F.interpolate(item, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        item = (item[0, 0].clamp(0, 255) * contrast).numpy()
        ys, xs = np.nonzero(item > 40)
        if len(xs) == 0:
            continue
        for _try in range(20):  # find a place where it does not cover another item much
            x, y = (int(v) for v in rng.integers(0, canvas - size + 1, 2))
            box = [float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1)]
            if _iou(box, boxes) <= max_iou:
                break
        else:
            continue
        image[y : y + size, x : x + size] = np.maximum(image[y : y + size, x : x + size], item)
        boxes.append(box)
        objects.append((box, int(labels[idx])))
    return np.round(image).clip(0, 255).astype(np.uint8), objects


def make_fashion_mnist_detection(
    out_dir: str | os.PathLike,
    num_train: int = 2000,
    num_val: int = 300,
    canvas: int = 128,
    num_objects: tuple[int, int] = (1, 4),
    object_size: tuple[int, int] = (24, 64),
    max_iou: float = 0.2,
    seed: int = 0,
    source: str | os.PathLike = DEFAULT_FASHION_MNIST,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a COCO-format detection set built from Fashion-MNIST items.

    Each canvas (``canvas`` x ``canvas``, grayscale PNG) gets ``num_objects`` items (inclusive
    range), each resized to a random square size in ``object_size`` and placed at a random position
    where its box overlaps any earlier one by IoU at most ``max_iou`` (items that find no place in
    20 tries are left out). The box is the item's visible extent (pixels brighter than 40 of 255
    after resizing), in whole pixels. Training canvases use Fashion-MNIST's training items,
    validation canvases its test items. Categories are ids 1..10 in Fashion-MNIST's label order.

    Output: ``out_dir/{train,val}/*.png`` and ``out_dir/annotations/instances_{train,val}.json``.
    The same arguments give the same files, byte for byte. Returns the two JSON paths. A split whose images
    got no boxes at all (``num_objects`` from 0) is refused: nothing is left of the set.
    An existing dataset there (either JSON, or files in ``train/`` or ``val/``) is refused unless
    ``overwrite``, which removes its JSON files first (a run cut short leaves no annotations beside new
    images) and the images of the old set that the new one does not write again (``NNNNNN.png``; other
    files are left); both Fashion-MNIST splits are read before anything is written.
    """
    from PIL import Image

    if canvas < 8 or num_train < 0 or num_val < 0:
        raise ValueError(f"need canvas >= 8 and non-negative image counts, got {canvas}, {num_train}, {num_val}")
    if not 0 <= num_objects[0] <= num_objects[1] or num_objects[1] < 1:  # no objects: a set without boxes
        raise ValueError(
            "num_objects (--min-objects, --max-objects) must be a range (lo, hi) with 0 <= lo <= hi and hi >= 1, "
            f"got {num_objects}"
        )
    if not 1 <= object_size[0] <= object_size[1] <= canvas:
        raise ValueError(
            f"object_size (--min-size, --max-size) must be a range (lo, hi) with 1 <= lo <= hi <= the canvas side "
            f"{canvas} (--canvas), got {object_size}"
        )
    if not 0 <= max_iou <= 1:  # NaN too: no item would ever find a place, and the dataset would have no boxes
        raise ValueError(f"max_iou must be a number from 0 to 1, got {max_iou}")
    source, out = Path(source), check_output_path(out_dir, folder=True, what="the output")
    existing = [p for split in ("train", "val") if (p := out / "annotations" / f"instances_{split}.json").exists()]
    occupied = [d for split in ("train", "val") if (d := out / split).is_dir() and any(d.iterdir())]
    if (existing or occupied) and not overwrite:  # images of the same names would be written over
        raise ValueError(
            f"{out} already holds a dataset or images ({', '.join(map(str, existing + occupied))}); "
            "choose another folder or pass overwrite=True (--overwrite) to replace them"
        )
    sources = {split: _load_fashion_mnist(source, split) for split in ("train", "val")}
    for path in existing:  # the old annotations go first: a run cut short leaves no JSON over new images
        path.unlink()
    categories = [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(FASHION_MNIST_CLASSES)]
    datasets = {}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        items, labels = sources[split]
        rng = np.random.default_rng([seed, split_index])
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            pixels, objects = _render_canvas(rng, items, labels, canvas, num_objects, object_size, max_iou)
            file_name = f"{i:06d}.png"
            with atomic_write(out / split / file_name) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG", compress_level=6)
            images.append({"id": i + 1, "file_name": file_name, "width": canvas, "height": canvas})
            for box, label in objects:
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": label + 1,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        for stale in (out / split).glob("[0-9]" * 6 + ".png"):  # an overwritten larger set's: not of this one
            if int(stale.stem) >= count:
                stale.unlink()
        datasets[split] = {
            "info": {
                "description": f"Fashion-MNIST items on {canvas}x{canvas} canvases ({split})",
                "generator": "parnet make-det-dataset",
                "seed": seed,
                "num_objects": list(num_objects),
                "object_size": list(object_size),
                "max_iou": max_iou,
            },
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
    # A split of images without boxes can neither train nor score a detector: no set is written, its images go.
    empty = [split for split, d in datasets.items() if d["images"] and not d["annotations"]]
    if empty:
        for split, d in datasets.items():
            for image in d["images"]:
                (out / split / image["file_name"]).unlink()
        raise ValueError(
            f"the generated {' and '.join(empty)} images hold no boxes (with --min-objects {num_objects[0]} an image "
            "may have none, and an item that finds no place is left out): raise --min-objects or the image count"
        )
    written = {}
    for split, dataset in datasets.items():
        path = out / "annotations" / f"instances_{split}.json"
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(dataset))
        written[split] = path
    return written
