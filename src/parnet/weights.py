"""Strict, bounded loading: what a weights file may ask for, and whether its tensors fit the model.

A weights file is data, not instructions. Its header metadata may describe an architecture and
nothing else: a fixed set of keys (:data:`ARCHITECTURE_KEYS`), each with its type and a sane
bound, checked before anything is allocated; ``pretrained``, file paths and unknown keys are
refused. The model is then built on the ``meta`` device (no memory), its size bounded, and every
tensor of the file compared by name, shape and dtype with the model's before one is copied:
the first mismatch is named (:func:`check_state_dict`, :func:`build_checked`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCHITECTURE_KEYS",
    "FEATURE_KEYS",
    "IO_KEYS",
    "MAX_PARAMS",
    "architecture_kwargs",
    "bounded_int",
    "build_checked",
    "check_state_dict",
    "setting_kwargs",
]

# The largest model any file may ask for: 2e9 parameters (8 GB of fp32), far above ParNet-XL's 0.09e9
# (93 M in training form).
MAX_PARAMS = 2_000_000_000
MAX_WIDTH = 16384
MAX_CLASSES = 100_000
MAX_IN_CHANS = 64


def _at(source: str) -> str:
    return f"{source}: " if source else ""


def bounded_int(value: Any, key: str, low: int, high: int, source: str) -> int:
    """``value`` as an int in ``[low, high]`` (booleans and fractions refused), or ``ValueError`` naming ``key``."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{_at(source)}{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def _int_list(low: int, high: int, max_len: int = 4) -> Callable[[Any, str, str], list[int]]:
    def check(value: Any, key: str, source: str) -> list[int]:
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= max_len:
            raise ValueError(f"{_at(source)}{key} must be a list of 1 to {max_len} integers, got {value!r}")
        return [bounded_int(v, key, low, high, source) for v in value]

    return check


def _int_in(low: int, high: int, optional: bool = False) -> Callable[[Any, str, str], int | None]:
    def check(value: Any, key: str, source: str) -> int | None:
        return None if optional and value is None else bounded_int(value, key, low, high, source)

    return check


def _bool(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{_at(source)}{key} must be true or false, got {value!r}")
    return value


def _activation(value: Any, key: str, source: str) -> str:
    from .model import ACTIVATIONS

    if value not in ACTIVATIONS:
        raise ValueError(f"{_at(source)}{key} must be one of {', '.join(sorted(ACTIVATIONS))}, got {value!r}")
    return str(value)


# The keyword arguments of timm.create_model a file or a setting may give: ParNet's architecture
# (ParNetCfg's fields), the CIFAR ResNets' depth and timm ResNets' stage widths (the detection
# baseline's). Nothing that loads weights or reads files.
ARCHITECTURE_KEYS: dict[str, Callable[[Any, str, str], Any]] = {
    "widths": _int_list(1, MAX_WIDTH),
    "head_width": _int_in(1, MAX_WIDTH),
    "blocks": _int_list(1, 64),
    "small_input": _bool,
    "act": _activation,
    "use_gate": _bool,
    "stem_width": _int_in(1, MAX_WIDTH, optional=True),
    "depth_per_stage": _int_in(1, 256),
    "channels": _int_list(1, MAX_WIDTH, max_len=8),
}
# A model's input channels and class count, for the commands that let them be given with the architecture.
IO_KEYS: dict[str, Callable[[Any, str, str], Any]] = {
    "in_chans": _int_in(1, MAX_IN_CHANS),
    "num_classes": _int_in(1, MAX_CLASSES),
}
# Keys refused with their own reason: they would load weights or read files named by the settings.
_LOADING_KEYS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "pretrained_strict",
                 "cache_dir", "file", "url", "hf_hub_id")  # fmt: skip


def architecture_kwargs(
    kwargs: Any, source: str, extra: Mapping[str, Callable[[Any, str, str], Any]] | None = None
) -> dict[str, Any]:
    """``kwargs`` checked against :data:`ARCHITECTURE_KEYS` (and ``extra``): types and bounds; a copy.

    ``ValueError`` names ``source``, the key and what is allowed.
    """
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{_at(source)}model keywords must be a mapping, got {kwargs!r}")
    allowed = {**ARCHITECTURE_KEYS, **(extra or {})}
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in _LOADING_KEYS:
            raise ValueError(
                f"{_at(source)}{key!r} is refused: model keywords describe the architecture only, they never load "
                "weights or files (start from trained weights with `parnet train --initial-checkpoint`, "
                "`parnet export --checkpoint` or `parnet train-det --backbone-weights` instead)"
            )
        if key not in allowed:
            raise ValueError(f"{_at(source)}unknown model keyword {key!r}; allowed: {', '.join(allowed)}")
        out[key] = allowed[key](value, key, source)
    return out


# A features_only backbone's keyword (the detection backbones'): which of its features to return.
FEATURE_KEYS: dict[str, Callable[[Any, str, str], Any]] = {"out_indices": _int_list(0, 16, max_len=8)}


def setting_kwargs(
    value: Any, reserved: Mapping[str, str], extra: Mapping[str, Callable[[Any, str, str], Any]] | None = None
) -> dict[str, Any]:
    """Model keywords given as a setting (``--model-kwargs``, ``--backbone-kwargs``, a YAML file): a mapping,
    none of the ``reserved`` keys the command sets itself (key -> why), architecture keywords only."""
    from .factory import refuse_reserved

    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping, got {value!r}")
    refuse_reserved(value, reserved)
    return architecture_kwargs(value, "", extra)


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    given: Mapping[str, Any],
    source: str,
    allow_unexpected: bool = False,
    optional: Callable[[str], bool] = lambda key: False,
) -> None:
    """``ValueError`` naming the first difference of ``given`` from ``expected``: a missing or unexpected
    name, a shape or a dtype. ``optional`` keys may be missing; ``allow_unexpected`` lets extra names through."""
    problems: list[str] = []
    for key, want in expected.items():
        if key not in given:
            if not optional(key):
                problems.append(f"missing {key} {tuple(want.shape)} {want.dtype}")
            continue
        got = given[key]
        if not isinstance(got, torch.Tensor):
            problems.append(f"{key} is a {type(got).__name__}, not a tensor")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, the model {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{key} is {got.dtype}, the model's is {want.dtype}")
    if not allow_unexpected:
        problems += [f"unexpected {key}" for key in given if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{source} does not fit the model: {problems[0]}{more}")


def build_checked(factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], source: str) -> nn.Module:
    """``factory()`` with ``state`` loaded, strictly: built first on the meta device, its size bounded
    by :data:`MAX_PARAMS` and ``state`` checked by :func:`check_state_dict`, before any memory is used."""
    with torch.device("meta"):
        skeleton = factory()
    n_params = sum(p.numel() for p in skeleton.parameters())
    if n_params > MAX_PARAMS:
        raise ValueError(f"{source} describes a model of {n_params:,} parameters, more than the {MAX_PARAMS:,} allowed")
    check_state_dict(skeleton.state_dict(), state, source)
    model = factory()
    model.load_state_dict(state)
    return model
