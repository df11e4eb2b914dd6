"""The ``parnet`` command line: argument parsing only, one module per command group, over the library.

Each module in ``COMMAND_MODULES`` exposes ``add_commands(subparsers)``; each parser it adds sets
``func`` to a function taking the parsed arguments and returning an exit code. A command module
turns arguments into a library call (:mod:`parnet.train`, :mod:`parnet.evaluate`, ...); nothing
below this package imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

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
    "CommandParser",
    "MergeKwargs",
    "add_kwargs_option",
    "add_settings_flags",
    "build_parser",
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


class CommandParser(argparse.ArgumentParser):
    """A command's parser. ``intermixed=True`` (an ``add_parser`` keyword): its positionals may come before,
    between and after its options (``parnet predict IMG --top 1 RUN``), by argparse's
    ``parse_known_intermixed_args``. The subcommand action calls ``parse_known_args``, where a ``nargs="+"``
    positional takes only the values before the first option and the later ones are left unrecognized."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        # No abbreviated options: `export --model X` would be read as --model-kwargs X, and a new option could
        # change what an abbreviation in someone's script means.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._in_intermixed = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        if not self.intermixed or self._in_intermixed:  # intermixed parsing calls this method itself, twice
            return super().parse_known_args(args, namespace)
        self._in_intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._in_intermixed = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parnet", description="ParNet: depth-12 non-deep networks.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


TERMINATED = 128 + signal.SIGTERM  # the exit code of a command ended by SIGTERM, as a shell reports one


@contextlib.contextmanager
def _sigterm_exits(terminated: list[int]) -> Iterator[None]:
    """While the command runs, SIGTERM (``kill``, ``timeout``, a job scheduler) raises ``SystemExit``, so that
    ``finally`` blocks run: :func:`parnet.io.atomic_write` removes its temporary file, a run drops its lock. By
    default SIGTERM ends the process at once, leaving them. Each SIGTERM is noted in ``terminated``. The
    caller's handler is put back afterwards (main() is called from Python too); only the main thread may set
    handlers, elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        terminated.append(signum)
        raise SystemExit(TERMINATED)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = ""
        if args.command == "bench" and any(os.path.exists(a) for a in extra):  # parnet bench RUN_int8.onnx
            hint = " (bench times models by name: give a `parnet quantize` file as --deployed FILE)"
        elif args.command == "export" and "--model" in extra:  # as `parnet train --model NAME` takes it
            hint = " (give the model name as the first argument: parnet export NAME)"
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    args.argv = ["parnet", *(sys.argv[1:] if argv is None else argv)]  # what was asked, for records that keep it
    terminated: list[int] = []
    try:
        code = _run(args, terminated)
    except BaseException:
        if not terminated:
            raise
    # SIGTERM, and whatever its clean-up raised after it (a group's SIGTERM also ends a loader's workers, and
    # torch then reports them killed): one line and the exit code a shell gives a terminated command.
    if terminated:
        print(f"parnet {args.command}: terminated", file=sys.stderr)
        return TERMINATED
    return code


def _run(args: argparse.Namespace, terminated: list[int]) -> int:
    """``args.func(args)``; the errors a user can act on as one line and an exit code."""
    try:
        with _sigterm_exits(terminated):
            return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: every file is written atomically, so none is left half-written
        print(f"parnet {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
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
