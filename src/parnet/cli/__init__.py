"""The ``parnet`` command line: argument parsing only, one module per command group, over the library.

Each module in ``COMMAND_MODULES`` exposes ``add_commands(subparsers)``; each parser it adds sets
``func`` to a function taking the parsed arguments and returning an exit code. A command module
turns arguments into a library call (:mod:`parnet.train`, :mod:`parnet.evaluate`, ...); nothing
below this package imports it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from ..factory import create_model
from .args import (
    MergeKwargs,
    add_kwargs_option,
    add_settings_flags,
    key_value,
    model_name,
    nonneg_int,
    positive_int,
    settings_given,
)

__all__ = [
    "COMMAND_MODULES",
    "MergeKwargs",
    "add_kwargs_option",
    "add_settings_flags",
    "build_parser",
    "create_model",
    "key_value",
    "main",
    "model_name",
    "nonneg_int",
    "positive_int",
    "settings_given",
]

# Modules that add their own subcommands, in the order ``parnet --help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "parnet.cli.models",
    "parnet.cli.train",
    "parnet.cli.detection",
    "parnet.cli.export",
    "parnet.cli.bench",
    "parnet.cli.predict",
    "parnet.cli.quantize",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parnet", description="ParNet: depth-12 non-deep networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = ["parnet", *(sys.argv[1:] if argv is None else argv)]  # what was asked, for records that keep it
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"parnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped (`parnet predict ... | head`): no error, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # a full or read-only disk, a folder we may not write: what and where, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"parnet {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
