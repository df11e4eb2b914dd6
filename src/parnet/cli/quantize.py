"""``parnet quantize``: a trained model as a deployable int8 (or fp32/bf16) engine file, scored against fp32."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..deployment.engines import ENGINES, ORT_CALIBRATION
from ..deployment.quantize import CALIBRATION_IMAGES, PRECISIONS
from ..settings import SUBSET_RULE
from .args import nonneg_int, note_unfinished, positive_int
from .export import file_stem


def default_out(checkpoint: str, precision: str, suffix: str) -> str:
    """Beside the checkpoint, named after it: ``run_int8.onnx`` beside run folder ``run`` (``.`` too),
    ``last_ema_int8.onnx`` beside ``last_ema.safetensors``, ``model_best_int8.onnx`` beside ``model_best.pth.tar``."""
    return str(Path(checkpoint).resolve().parent / f"{file_stem(checkpoint)}_{precision}{suffix}")


def choose_engine(engine: str | None, out: str | None) -> str:
    """The engine ``--engine`` names, else the one ``--out``'s suffix is written by (.xml: openvino), else
    onnxruntime; a suffix that is not the engine's is refused before any work."""
    from ..deployed import SUFFIX

    if out is None:
        return engine or "onnxruntime"
    suffix = Path(out).suffix.lower()
    by_suffix = {s: e for e, s in SUFFIX.items()}.get(suffix)
    engine = engine or by_suffix
    if engine is None:
        raise ValueError(f"--out {out}: name the file .onnx (an onnxruntime model) or .xml (an openvino model)")
    if suffix != SUFFIX[engine]:  # deployed.save_deployed's message, said before calibrating and scoring
        other = f", or leave --engine out ({suffix} is {by_suffix}'s)" if by_suffix else ""
        raise ValueError(
            f"an {engine} model is written to a {SUFFIX[engine]} file, got --out {out}: name it "
            f"{Path(out).with_suffix(SUFFIX[engine])}{other}"
        )
    return engine


def _quantize(args: argparse.Namespace) -> int:
    from ..deployed import SUFFIX, quantize_checkpoint
    from ..io import check_output_path

    if args.out is not None:  # a folder or a path under a file: said before the suffix is read for the engine
        check_output_path(args.out, what="--out")
    args.engine = choose_engine(args.engine, args.out)
    # an option that would be ignored is refused, not silently dropped
    if args.precision != "int8" and args.calibration_images is not None:
        raise ValueError(f"--calibration-images is for int8; {args.precision} needs no calibration (leave it out)")
    if args.calibration_method is not None and (args.precision != "int8" or args.engine != "onnxruntime"):
        raise ValueError("--calibration-method is ONNX Runtime's int8 calibration; leave it out for "
                         f"{args.precision} in {args.engine}")  # fmt: skip
    out = args.out or default_out(args.checkpoint, args.precision, SUFFIX[args.engine])
    check_output_path(out, what="--out")  # before calibrating and scoring, not after
    given = {"calibration_images": args.calibration_images, "method": args.calibration_method}
    result = quantize_checkpoint(
        args.checkpoint, out, args.precision, args.engine, dataset=args.dataset, data_dir=args.data_dir,
        batch_size=args.batch_size, test_subset=args.test_subset, workers=args.workers, img_size=args.resolution,
        **{k: v for k, v in given.items() if v is not None},  # the rest: quantize_checkpoint's defaults
    )  # fmt: skip
    note_unfinished(args.checkpoint)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        r = result
        calibrated = f", calibrated on {r['calibration_images']} training images" if r["calibration_images"] else ""
        print(f"wrote {r['file']} ({r['engine']}, {r['precision']}{calibrated})")
        print(
            f"top-1 on {r['images']} {r['dataset']} test images: fp32 {r['fp32_top1']:.2f}, "
            f"{r['precision']} {r['top1']:.2f} ({r['prediction_changes']} predictions changed)"
        )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``parnet quantize``."""
    p = subparsers.add_parser("quantize", help="write a deployable int8/bf16/fp32 engine model and score it")
    p.add_argument(
        "checkpoint", help="a training run folder, a .safetensors file or an authors' .pth.tar (EMA weights where kept)"
    )
    p.add_argument("--precision", choices=PRECISIONS, default="int8", help="[int8]")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        help="[--out's: .xml openvino, .onnx onnxruntime; no --out: onnxruntime]",
    )
    p.add_argument(
        "--calibration-images", type=positive_int,
        help=f"int8: training images (test transforms) to calibrate on [{CALIBRATION_IMAGES}]",
    )  # fmt: skip
    p.add_argument(
        "--calibration-method", choices=ORT_CALIBRATION,
        help="int8 in ONNX Runtime: its calibration [minmax] (NNCF, for OpenVINO, calibrates its own way)",
    )  # fmt: skip
    p.add_argument(
        "--out",
        help="file to write (.onnx: onnxruntime, .xml: openvino; its suffix chooses the engine) "
        "[beside the checkpoint, NAME_PRECISION.onnx/.xml]",
    )
    p.add_argument("--dataset", help="dataset (default: the run's, else fashion_mnist)")
    p.add_argument("--data-dir", help="where the dataset is (default: the run's, else its usual place)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size [256]")
    p.add_argument(
        "--test-subset",
        type=nonneg_int,
        default=0,
        help=f"only N test images (0 = all): {SUBSET_RULE}",
    )
    p.add_argument("--workers", type=nonneg_int, default=2, help="data loader worker processes [2]")
    p.add_argument(
        "--resolution",
        type=positive_int,
        default=0,
        help="image side the engine model is built, calibrated and scored at (an engine model runs at one size) "
        "[the size the weights trained at]",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_quantize)
