"""``parnet train``, ``parnet eval`` and ``parnet plot``: flags over :mod:`parnet.train`, :mod:`parnet.evaluate`
and :mod:`parnet.curves`.

The flags of ``train`` are generated from :class:`parnet.settings.TrainConfig`, so their types,
ranges, choices and help are the settings model's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..settings import DATASET_DEFAULTS, RESERVED_MODEL_KWARGS, SUBSET_RULE, TrainConfig
from .args import add_settings_flags, field_type, nonneg_int, note_unfinished, positive_int, settings_given


def interrupted_message(run_dir: Path) -> str:
    """What ``parnet train`` says when Ctrl-C stops it: how the run in ``run_dir`` goes on."""
    from ..checkpoint import STATE_FILE, run_started

    if (run_dir / STATE_FILE).is_file():
        return "parnet train: interrupted; the last checkpoint is kept (continue with --resume)"
    # No epoch finished: nothing to continue. --resume restarts a folder a run was started in (its lock file or
    # config.yaml, checkpoint.check_run_folder); a folder made for the run alone was removed again.
    again = "run the same command again, or with --resume, to start it over" if run_started(run_dir) else "run it again"
    return f"parnet train: interrupted before the first epoch finished, so there is no checkpoint: {again}"


def _train_command(args: argparse.Namespace) -> int:
    from ..engine import NonFiniteLossError
    from ..settings import make_config
    from ..train import train

    cfg = make_config(settings_given(args, TrainConfig), args.config)
    try:
        train(cfg)
    except NonFiniteLossError as e:
        print(f"parnet train: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(interrupted_message(cfg.run_dir()), file=sys.stderr)
        return 130
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate

    out = evaluate(
        args.checkpoint,
        args.dataset,
        args.data_dir,
        args.batch_size,
        args.workers,
        args.test_subset,
        args.device,
        official=True if args.official else None,
        img_size=args.img_size,
    )
    note_unfinished(args.checkpoint)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print("| weights | top-1 | top-5 | loss | images |\n|---|---|---|---|---|")
        for name, r in out.items():
            print(f"| {name} | {r['top1']:.2f} | {r['top5']:.2f} | {r['loss']:.4f} | {r['n']} |")
    return 0


def _plot_command(args: argparse.Namespace) -> int:
    from ..curves import plot
    from ..io import check_output_path

    if args.output:
        check_output_path(args.output, what="--output")
    print(f"wrote {plot(args.run_dir, args.output)}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``train``, ``eval`` and ``plot`` to the ``parnet`` command line."""
    p = subparsers.add_parser(
        "train",
        help="train a classifier (Fashion-MNIST, CIFAR, image folders) with the paper's recipe",
        description="Train with the paper's recipe. Settings: defaults < dataset defaults < --config FILE < flags.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (field: value), under the command line")
    per_dataset = {name: ", or the dataset's" for defaults in DATASET_DEFAULTS.values() for name in defaults}
    add_settings_flags(p, TrainConfig, reserved={"model_kwargs": RESERVED_MODEL_KWARGS}, note=per_dataset)
    p.set_defaults(func=_train_command)

    p = subparsers.add_parser("eval", help="top-1/top-5 of a run or checkpoint, raw, EMA and re-parameterized")
    p.add_argument(
        "checkpoint", help="a run folder, a .safetensors file, an authors' .pth.tar, or a `parnet quantize` file"
    )
    p.add_argument(
        "--dataset",
        type=field_type(TrainConfig, "dataset"),
        default=None,
        help="dataset (default: the run's, else fashion_mnist)",
    )
    p.add_argument(
        "--data-dir", default=None, help="where the dataset is (default: a run folder's, else its usual place)"
    )
    p.add_argument("--batch-size", type=positive_int, default=256, help="evaluation batch size")
    p.add_argument("--workers", type=nonneg_int, default=2, help="data loader worker processes")
    p.add_argument(
        "--test-subset",
        type=nonneg_int,
        default=0,
        help=f"only N test images (0 = all): {SUBSET_RULE}",
    )
    p.add_argument(
        "--img-size",
        type=field_type(TrainConfig, "img_size"),
        default=0,
        help="image side, pixels (default: the size the weights trained at, else the dataset's)",
    )
    p.add_argument(
        "--device", type=field_type(TrainConfig, "device"), default=None, help="cpu or cuda (default: cuda if any)"
    )
    p.add_argument("--official", action="store_true", help="the checkpoint is an authors' .pth.tar (load_official)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_eval_command)

    p = subparsers.add_parser("plot", help="draw a run's learning curves to PNG")
    p.add_argument("run_dir", help="the training run folder (with metrics.jsonl)")
    p.add_argument("--output", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(func=_plot_command)
