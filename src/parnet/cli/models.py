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
    from ..official import load_official

    out = check_output_path(args.output)
    if out.suffix != ".safetensors":  # read by content everywhere, but a .pt name would promise a pickle
        raise ValueError(f"{out}: convert writes safetensors; name the file {out.with_suffix('.safetensors').name}")
    model = load_official(args.input, use_ema=args.ema, activation=args.activation)
    out = save_model(model, args.output, metadata={"source": Path(args.input).name})
    print(
        f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"widths {model.cfg.widths}, {model.num_classes} classes, {model.cfg.act})"
    )
    return 0


def add_commands(sub: Any) -> None:
    """Add ``summary`` and ``convert``."""
    p = sub.add_parser("summary", help="table of all variants: params, fused params, GFLOPs, depth")
    p.add_argument("variants", nargs="*", help="variant names (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    p.set_defaults(func=_summary)

    p = sub.add_parser("convert", help="convert an authors' checkpoint to this project's safetensors layout")
    p.add_argument("input", help="the authors' .pth.tar checkpoint")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema)")
    p.add_argument(
        "--activation",
        choices=("relu", "silu"),
        default="relu",
        help="activation the checkpoint was trained with (released weights: relu)",
    )
    p.set_defaults(func=_convert)
