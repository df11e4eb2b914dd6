"""The ``parnet`` command line: one subcommand per job, each defined beside the code it runs.

A module that adds commands exposes ``add_commands(subparsers)``; each parser it adds sets
``func`` to a function taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Modules that add their own subcommands, in the order ``parnet --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "parnet.train", "parnet.detection", "parnet.export", "parnet.bench", "parnet.cli_quantize"
)  # fmt: skip


def key_value(text: str) -> tuple[str, Any]:
    """One ``KEY=VALUE`` argument, VALUE read as YAML: ``widths=[16,32,64]``, ``act=relu``, ``head_width=64``.

    A comma list, bare or in parentheses as in Python (``widths=16,32,64``, ``widths=(16,32,64)``), is a list.
    """
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. widths=[16,32,64]), got {text!r}")
    stripped = value.strip()
    if stripped.startswith("(") and stripped.endswith(")"):
        inner = stripped[1:-1]
        value = f"[{inner}]" if "," in inner or not inner.strip() else inner  # (8) is 8, as in Python
    elif "," in stripped and not stripped.startswith(("[", "{", '"', "'")):
        value = f"[{stripped}]"
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"{key}: cannot read {value!r} ({e.__class__.__name__})") from None


def positive_int(text: Any) -> int:
    """An integer >= 1, as an argparse type."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def nonneg_int(text: Any) -> int:
    """An integer >= 0, as an argparse type."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def model_name(text: Any) -> str:
    """A timm model name (``name`` or ``name.tag``; ours and the baselines registered), as an argparse type.

    An unknown name is refused with the registered names that look like it.
    """
    import difflib

    import timm

    from . import baselines  # noqa: F401 - registers the baselines

    name = str(text)
    if not timm.is_model(name.split(".")[0]):
        known = timm.list_models()
        close = difflib.get_close_matches(name.split(".")[0], known, n=5, cutoff=0.6)
        close += [m for m in timm.list_models(f"*{name.split('_')[0]}*")[:8] if m not in close]
        hint = f"; similar: {', '.join(close[:8])}" if close else "; `timm.list_models()` lists them"
        raise argparse.ArgumentTypeError(f"unknown model {name!r}{hint}")
    return name


def create_model(name: str, **kwargs: Any) -> Any:
    """``timm.create_model`` for a command: our variants and the baselines registered, and a keyword the
    model does not take (a ``--model-kwargs`` typo) a ``ValueError`` that names it rather than a traceback."""
    import timm

    from . import baselines  # noqa: F401 - registers the baselines (and, through parnet, the variants)

    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):  # not a typo of the user's: keep the traceback
            raise
        raise ValueError(f"cannot create {name} with {kwargs}: {e}") from None


def refuse_reserved(kwargs: dict[str, Any], reserved: dict[str, str]) -> None:
    """``argparse.ArgumentTypeError`` for the first key of ``kwargs`` in ``reserved`` (key -> why it is refused)."""
    for key in kwargs:
        if key in reserved:
            raise argparse.ArgumentTypeError(f"{key} is not accepted here: {reserved[key]}")


class MergeKwargs(argparse.Action):
    """Collects ``KEY=VALUE`` arguments (parsed by :func:`key_value`) into one dict; repeats merge.

    ``reserved`` maps the keys the command sets itself to why they are not accepted.
    """

    def __init__(self, *args: Any, reserved: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reserved = dict(reserved or {})

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            refuse_reserved(dict(values), self.reserved)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        merged = dict(getattr(namespace, self.dest, None) or {})
        merged.update(values)
        setattr(namespace, self.dest, merged)


def add_kwargs_option(
    parser: argparse.ArgumentParser, flag: str, help: str, default: Any = None, reserved: dict[str, str] | None = None
) -> None:
    """The one way this CLI takes keyword arguments for ``timm.create_model``: ``KEY=VALUE ...``.

    ``reserved`` maps keys the command sets itself to why they are not accepted (e.g.
    ``{"num_classes": "set by the dataset"}``); giving one is a usage error that says so.
    """
    parser.add_argument(
        flag, nargs="+", type=key_value, action=MergeKwargs, metavar="KEY=VALUE",
        default={} if default is None else default, help=help, reserved=reserved,
    )  # fmt: skip


def _summary(args: argparse.Namespace) -> int:
    from .summary import format_table, summary

    rows = summary(args.variants or None)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .io import save_model
    from .official import load_official

    model = load_official(args.input, use_ema=args.ema, activation=args.activation)
    out = save_model(model, args.output, metadata={"source": Path(args.input).name})
    print(
        f"wrote {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"widths {model.cfg.widths}, {model.num_classes} classes, {model.cfg.act})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parnet", description="ParNet: depth-12 non-deep networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"parnet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
