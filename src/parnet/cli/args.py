"""Argument types and options every command shares: ``KEY=VALUE`` lists, checked integers and model
names, and flags generated from a settings model (:func:`add_settings_flags`)."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Mapping
from typing import Any

from ..factory import check_model_name, refuse_reserved


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


def nonneg_float(text: Any) -> float:
    """A finite number >= 0, as an argparse type."""
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def unit_float(text: Any) -> float:
    """A number from 0 to 1 (a threshold, an IoU), as an argparse type."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def model_name(text: Any) -> str:
    """A timm model name, as an argparse type (:func:`parnet.factory.check_model_name`)."""
    try:
        return check_model_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class MergeKwargs(argparse.Action):
    """Collects ``KEY=VALUE`` arguments (parsed by :func:`key_value`) into one dict; repeats merge.

    ``reserved`` maps the keys the command sets itself to why they are not accepted; ``architecture``:
    the keys and values must be architecture keywords, input channels or class count
    (:func:`parnet.weights.architecture_kwargs`), for commands that pass them to ``timm.create_model`` as
    they are.
    """

    def __init__(
        self, *args: Any, reserved: dict[str, str] | None = None, architecture: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reserved = dict(reserved or {})
        self.architecture = architecture

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from ..weights import IO_KEYS, architecture_kwargs

        try:
            refuse_reserved(dict(values), self.reserved)
            merged = dict(getattr(namespace, self.dest, None) or {})
            merged.update(values)
            if self.architecture:
                merged = architecture_kwargs(merged, "", IO_KEYS)
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, merged)


def add_kwargs_option(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    default: Any = None,
    reserved: dict[str, str] | None = None,
    architecture: bool = False,
) -> None:
    """The one way this CLI takes keyword arguments for ``timm.create_model``: ``KEY=VALUE ...``.

    ``reserved`` maps keys the command sets itself to why they are not accepted (e.g.
    ``{"num_classes": "set by the dataset"}``); giving one is a usage error that says so. ``architecture``:
    checked as ParNet architecture keywords as they are parsed (a settings field checks its own instead).
    """
    parser.add_argument(
        flag, nargs="+", type=key_value, action=MergeKwargs, metavar="KEY=VALUE",
        default={} if default is None else default, help=help, reserved=reserved, architecture=architecture,
    )  # fmt: skip


def add_settings_flags(
    parser: argparse.ArgumentParser,
    model: Any,
    reserved: Mapping[str, Mapping[str, str]] | None = None,
    note: Mapping[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> None:
    """One flag per field of a pydantic settings ``model`` (``--batch-size`` for ``batch_size``): its
    description as help, ``--x/--no-x`` for booleans, ``KEY=VALUE ...`` for mappings (``reserved``: field ->
    refused keys). Each value is checked by the model's own rules as it is parsed; a flag not given is
    absent from the namespace (``argparse.SUPPRESS``), so defaults, files and the command line combine.
    A ``Literal`` field's values are its choices. ``note`` adds text to a field's help; ``skip`` leaves fields out."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        described, extra = field.description or "", (note or {}).get(name, "")
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        if "(default" in described:  # the description says what its default means: not twice
            text = described if not extra else f"{described} ({extra.removeprefix(', ')})"
        else:
            text = f"{described} ({default}{extra})"
        text = text.replace("%", "%%")
        kind = field.annotation
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif getattr(kind, "__origin__", None) is dict:
            add_kwargs_option(parser, flag, text, default=argparse.SUPPRESS, reserved=(reserved or {}).get(name))
        else:
            choices = literal_values(kind)
            parser.add_argument(
                flag,
                type=field_type(model, name),
                choices=choices,
                default=argparse.SUPPRESS,
                required=field.is_required(),
                help=text,
            )


def literal_values(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` annotation, or of the one ``Literal`` of an optional one; None if it has none."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    literals = [kind for kind in (annotation, *kinds) if typing.get_origin(kind) is typing.Literal]
    return typing.get_args(literals[0]) if len(literals) == 1 else None


def field_type(model: Any, name: str) -> Any:
    """An argparse type checking one field of ``model`` with the model's rules."""
    from ..settings import check_config

    def parse(text: str) -> Any:
        try:
            return check_config({name: text}, "", model)[name]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f": {name}: ")) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def settings_given(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The fields of ``model`` given on the command line."""
    return {k: v for k, v in vars(args).items() if k in model.model_fields}


def note_unfinished(weights: str | None) -> None:
    """Say on stderr when ``weights`` is a run folder whose training has not finished: its weights are those of
    its last epoch, not the final ones (``eval``, ``export``, ``predict``, ``quantize``)."""
    import sys

    from ..checkpoint import unfinished_run

    if weights and (reached := unfinished_run(weights)):
        print(f"note: {weights} has not finished training ({reached}): these are the weights of its last epoch",
              file=sys.stderr)  # fmt: skip
