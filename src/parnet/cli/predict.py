"""``parnet predict``: the top classes of image files (argument parsing only; the work is in :mod:`parnet.predict`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .args import model_name, note_unfinished, positive_int

# Files that hold models, never images: named when given where images go.
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".pt2", ".tar", ".onnx", ".xml", ".bin", ".ckpt")


def _predict(args: argparse.Namespace) -> int:
    from ..predict import format_predictions, image_files, load_predictor
    from ..trained import is_run_folder

    # A run folder holds the weights; any other folder, the images in it.
    runs = [p for p in args.paths if is_run_folder(p)]
    if len(runs) > 1:
        raise ValueError(f"give one run folder, got {len(runs)}: {', '.join(runs)}")
    given = [p for p in args.paths if p not in runs]
    weights = [p for p in given if Path(p).suffix.lower() in WEIGHTS_SUFFIXES and not Path(p).is_dir()]
    if weights:
        raise ValueError(
            f"{weights[0]} is a model file, not an image: give weights as --checkpoint FILE (a .safetensors, an "
            "authors' .pth.tar or a `parnet quantize` .onnx/.xml) or as a run folder"
        )
    if not given:
        raise ValueError("give at least one image file or folder of images")
    missing = [p for p in given if not Path(p).exists()]
    if missing:  # said before any weights are read, and not taken for a missing run folder's weights
        raise FileNotFoundError(f"no image file or run folder at {', '.join(missing)}")
    images = [str(f) for p in given for f in (image_files(p) if Path(p).is_dir() else [p])]  # an empty one: said now
    predictor = load_predictor(
        run=runs[0] if runs else None,
        checkpoint=args.checkpoint,
        model_name=args.model,
        use_ema=not args.raw,
        device=args.device,
    )
    note_unfinished(runs[0] if runs else args.checkpoint)
    results = predictor.predict(images, top_k=args.top, batch_size=args.batch_size)
    if not args.json:
        print(f"weights: {predictor.source}")
    print(format_predictions(results, as_json=args.json))
    return 0


def add_commands(subparsers: Any) -> None:
    """``parnet predict``."""
    p = subparsers.add_parser(
        "predict",
        intermixed=True,  # images and a run folder before and after the options (parnet.cli.CommandParser)
        help="top-5 classes of image files, from a run folder, a checkpoint or a model's released weights",
        description="parnet predict IMAGE|FOLDER... [--model NAME] [--checkpoint FILE | RUN]: the top classes of each "
        "image with their probabilities, preprocessed as the weights' training data was.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE|FOLDER|RUN",
        help="image files and folders of images (their image files, sorted), and at most one `parnet train` run folder",
    )
    p.add_argument(
        "--checkpoint",
        help="weights file: a .safetensors of this project (a run's, `parnet convert`'s), an authors' .pth.tar, "
        "a `parnet quantize` file (.onnx, OpenVINO .xml; runs on its engine on the CPU), or timm's own weights "
        "file of --model NAME (model.safetensors, pytorch_model.bin)",
    )
    p.add_argument(
        "--model",
        type=model_name,
        help="timm model name: with an authors' file or a bare .safetensors of ours, their architecture, whose "
        "pretrained config sets the preprocessing (e.g. parnet_s_official.in1k); with timm's own weights file as "
        "--checkpoint (model.safetensors, pytorch_model.bin), the model it holds; alone, its released weights "
        "(downloaded by timm). Refused for a run or its files: they say how their images are prepared",
    )
    p.add_argument("--top", type=positive_int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images decoded and run at once (default 32)")
    p.add_argument("--raw", action="store_true", help="the raw weights rather than the EMA weights, where both exist")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_predict)
