"""``parnet make-det-dataset``, ``train-det``, ``eval-det`` and ``predict-det``: flags over
:mod:`parnet.detection`; the flags of ``train-det`` are generated from its :class:`DetTrainConfig`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..detection.train import RESERVED_BACKBONE_KWARGS, DetTrainConfig
from .args import add_settings_flags, nonneg_int, positive_int, settings_given, unit_float


def _make_det_dataset(args: argparse.Namespace) -> int:
    from ..detection.data import make_fashion_mnist_detection

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


def _train_det(args: argparse.Namespace) -> int:
    from ..detection.train import train_det
    from ..engine import NonFiniteLossError
    from ..settings import check_config

    cfg = DetTrainConfig(**check_config(settings_given(args, DetTrainConfig), "arguments", DetTrainConfig))
    try:
        train_det(cfg)
    except NonFiniteLossError as e:  # as `parnet train`: exit 3, no traceback
        print(f"parnet train-det: error: {e}", file=sys.stderr)
        return 3
    return 0


def _eval_det(args: argparse.Namespace) -> int:
    from ..detection.train import data_paths, eval_det
    from ..io import check_output_path

    images, ann = data_paths(
        args.data, getattr(args, f"{args.split}_images"), getattr(args, f"{args.split}_ann"), args.split
    )
    if args.output:  # before the evaluation, not after
        check_output_path(args.output, folder=True, what="--output")
    stats, written = eval_det(
        args.weights, images, ann, args.split, args.output, args.batch_size, args.workers, args.device,
        args.lenient, args.draw, args.score_thresh, not args.no_progress,
    )  # fmt: skip
    print("\n".join(f"{k:6s} {v:.4f}" for k, v in stats.items()))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _predict_det(args: argparse.Namespace) -> int:
    from ..detection import detect, detector_file, draw_detections, format_detections, load_detector
    from ..devices import check_device
    from ..io import atomic_write, check_output_path

    for path, what in ((args.json_out, "--json-out"), (args.draw, "--draw")):
        if path:  # before the detector runs, not after
            check_output_path(path, what=what)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"no image file or folder at {', '.join(missing)}")
    model, extra = load_detector(detector_file(args.weights), str(check_device(args.device)))
    names, cats = extra.get("names"), extra.get("label_to_cat")
    results = detect(model, args.paths, names, args.score_thresh, args.batch_size, label_to_cat=cats)
    print(format_detections(results))
    if args.json_out:
        with atomic_write(args.json_out) as tmp:
            tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        print(f"wrote {args.json_out}")
    if args.draw:
        print(f"wrote {draw_detections(args.paths, results, args.draw)}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``make-det-dataset``, ``train-det``, ``eval-det`` and ``predict-det`` to the ``parnet`` command line."""
    from ..detection.data import DEFAULT_FASHION_MNIST

    p = subparsers.add_parser("make-det-dataset", help="synthetic COCO-format detection set from Fashion-MNIST items")
    p.add_argument("output", help="folder to write (train/, val/, annotations/); a new or an existing folder")
    p.add_argument("--train", type=nonneg_int, default=2000, help="training images")
    p.add_argument("--val", type=nonneg_int, default=300, help="validation images")
    p.add_argument("--canvas", type=positive_int, default=128, help="image side in pixels")
    p.add_argument("--min-objects", type=nonneg_int, default=1)
    p.add_argument("--max-objects", type=nonneg_int, default=4)
    p.add_argument("--min-size", type=positive_int, default=24, help="smallest item side in pixels")
    p.add_argument("--max-size", type=positive_int, default=64, help="largest item side in pixels")
    p.add_argument("--max-iou", type=unit_float, default=0.2, help="largest IoU between two items' boxes")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--source", default=str(DEFAULT_FASHION_MNIST), help="folder of the Fashion-MNIST IDX files (.gz or not)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in the output folder")
    p.set_defaults(func=_make_det_dataset)

    p = subparsers.add_parser("train-det", help="train a detector (FCOS, RetinaNet, Faster R-CNN) on a COCO-format set")
    add_settings_flags(p, DetTrainConfig, reserved={"backbone_kwargs": RESERVED_BACKBONE_KWARGS})
    p.set_defaults(func=_train_det)

    p = subparsers.add_parser("eval-det", help="COCO AP of a trained detector, and a picture of its predictions")
    p.add_argument("weights", help="a train-det run folder, or a detector .safetensors (last/best)")
    p.add_argument(
        "--data", help="a folder laid out as make-det-dataset writes it: SPLIT/ and annotations/instances_SPLIT.json"
    )
    for split in ("val", "test", "train"):
        p.add_argument(f"--{split}-images", help=f"image folder of the {split} split (overrides --data)")
        p.add_argument(f"--{split}-ann", help=f"COCO JSON of the {split} split (overrides --data)")
    p.add_argument("--split", default="val", choices=("val", "test", "train"))
    p.add_argument("--lenient", action="store_true", help="drop annotations with unknown categories or malformed boxes")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data loader processes")
    p.add_argument("--draw", type=nonneg_int, default=8, help="images in predictions.png (0: none)")
    p.add_argument("--score-thresh", type=unit_float, default=0.3, help="lowest score drawn in predictions.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument(
        "--output",
        help="folder for eval.json, detections.json, predictions.png (default: beside the weights, eval_SPLIT for a "
        "run folder or its last.safetensors, eval_SPLIT_NAME for NAME.safetensors, e.g. eval_val_best)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.set_defaults(func=_eval_det)

    p = subparsers.add_parser(
        "predict-det",
        help="boxes a trained detector finds on image files (no annotations needed)",
        description="parnet predict-det WEIGHTS IMAGE|FOLDER...: each image's detections (score, category, COCO "
        "box x, y, width, height in pixels of the image turned upright by its EXIF orientation).",
    )
    p.add_argument("weights", help="a train-det run folder (its last.safetensors), or a detector .safetensors")
    p.add_argument("paths", nargs="+", metavar="IMAGE|FOLDER", help="image files and folders of images (sorted)")
    p.add_argument("--score-thresh", type=unit_float, default=0.3, help="lowest score shown (default 0.3)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images decoded and run at once (default 8)")
    p.add_argument("--json-out", metavar="FILE", help="also write the detections as JSON")
    p.add_argument("--draw", metavar="FILE.png", help="also draw the images with their boxes into one PNG")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.set_defaults(func=_predict_det)
