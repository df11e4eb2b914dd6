"""``parnet summary`` and ``parnet convert``: the variants, and the authors' checkpoints as safetensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _summary(args: argparse.Namespace) -> int:
    from ..summary import format_table, summary

    rows = summary(args.variants or None)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from ..io import check_output_path, save_model
    from ..official import load_official, read_checkpoint

    out = check_output_path(args.output)
    if out.suffix != ".safetensors":  # read by content everywhere, but a .pt name would promise a pickle
        raise ValueError(f"{out}: convert writes safetensors; name the file {out.with_suffix('.safetensors').name}")
    checkpoint = read_checkpoint(args.input)
    # EMA weights where the file has them, as eval, predict and export read it (--ema insists, --raw declines)
    use_ema = args.ema or (not args.raw and "state_dict_ema" in checkpoint)
    model = load_official(checkpoint, use_ema=use_ema, activation=args.activation)
    meta = {"source": Path(args.input).name, **({"ema": "True"} if use_ema else {})}
    out = save_model(model, args.output, metadata=meta)
    print(
        f"wrote {out} ({'EMA' if use_ema else 'raw'} weights, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} "
        f"M params, widths {model.cfg.widths}, {model.num_classes} classes, {model.cfg.act})"
    )
    return 0


def add_commands(sub: Any) -> None:
    """Add ``summary`` and ``convert``."""
    p = sub.add_parser("summary", help="table of all variants: params, fused params, GFLOPs, depth")
    p.add_argument("variants", nargs="*", help="variant names (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=_summary)

    p = sub.add_parser(
        "convert",
        help="convert an authors' checkpoint to this project's safetensors layout (its EMA weights where it has them)",
    )
    p.add_argument("input", help="the authors' .pth.tar checkpoint")
    p.add_argument("output", help="the .safetensors file to write")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ema", action="store_true", help="the EMA weights (state_dict_ema), an error if it has none")
    which.add_argument("--raw", action="store_true", help="the raw weights (state_dict) even where EMA weights are")
    p.add_argument(
        "--activation",
        choices=("relu", "silu"),
        default="relu",
        help="activation the checkpoint was trained with (released weights: relu)",
    )
    p.set_defaults(func=_convert)
