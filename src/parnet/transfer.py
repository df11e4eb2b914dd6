"""Starting a training run from trained weights (fine-tuning): ``parnet train --initial-checkpoint``.

The weights come from a run folder (its EMA weights when kept), a ``.safetensors`` file of ours or
an authors' ``.pth.tar`` (their EMA weights when present), read as everywhere else
(:func:`parnet.trained.load_trained_model`: strictly, running no code). As timm's ``load_pretrained``
does, the classifier (the model's ``pretrained_cfg["classifier"]``) keeps its fresh initialization
when the class count differs, and the convolutions that read the image (``pretrained_cfg["first_conv"]``)
are adapted to another channel count with timm's ``adapt_input_conv`` (RGB summed for grey, or
repeated). Everything else must match the model exactly: the same architecture, unfused, and for a
ParNet the same ``ParNetCfg``, the activation included, which the tensor shapes alone do not show.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch
from torch import nn

from .layers import is_reparameterized
from .model import ParNetCfg

__all__ = ["adapt_input_convs", "check_same_parnet", "initialize_from"]


def _module_names(value: str | tuple[str, ...] | list[str] | None) -> set[str]:
    if value is None:
        return set()
    return {value} if isinstance(value, str) else set(value)


def check_same_parnet(
    theirs: nn.Module | None, ours: nn.Module, source: str, flags: str = "--model, --model-kwargs"
) -> None:
    """``ValueError`` when both are ParNets (or their features) of different ``ParNetCfg``s: the activation, the
    gates and the input form change what the same tensors compute, which their shapes do not show. ``flags``: the
    options that choose the architecture, named in the message."""
    cfgs = [getattr(m, "cfg", None) for m in (theirs, ours)]
    if not all(isinstance(c, ParNetCfg) for c in cfgs):
        return
    cfgs = [dataclasses.replace(c, stem_width=c.stem_chs) for c in cfgs]  # None is min(64, widths[0]): the same
    differ = [
        f"{f.name} {getattr(cfgs[0], f.name)!r} (the model: {getattr(cfgs[1], f.name)!r})"
        for f in dataclasses.fields(cfgs[0])
        if getattr(cfgs[0], f.name) != getattr(cfgs[1], f.name)
    ]
    if differ:
        raise ValueError(
            f"{source} holds a ParNet of another architecture: {'; '.join(differ)}. Build the same architecture "
            f"({flags}): e.g. the authors' files are parnet_*_official (ReLU)"
        )


def adapt_input_convs(
    theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], first_conv: str | tuple[str, ...] | list[str] | None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """``theirs`` with the weights of the convolutions that read the image (``first_conv``, as in timm's
    ``pretrained_cfg``) adapted to ``ours``' input channels by timm's ``adapt_input_conv``, and a note
    saying so (``None`` when none needed it); every other tensor is left as it is."""
    from timm.models import adapt_input_conv

    modules, adapted, note = _module_names(first_conv), dict(theirs), None
    for key, weight in theirs.items():
        own = ours.get(key)
        if own is None or own.shape == weight.shape or weight.dim() != 4 or key.rsplit(".", 1)[0] not in modules:
            continue
        if own.shape[0] == weight.shape[0] and own.shape[2:] == weight.shape[2:]:
            adapted[key] = adapt_input_conv(own.shape[1], weight, base_chans=weight.shape[1])
            note = f"input convolutions adapted from {weight.shape[1]} to {own.shape[1]} channels"
    return adapted, note


def initialize_from(model: nn.Module, source: str | os.PathLike, class_names: Sequence[str] | None = None) -> str:
    """Copy the weights of ``source`` into ``model`` (a freshly created training model); say what was done.

    ``class_names``: the new data's classes, in label order. Where the weights name theirs too (a run's), the
    classifier's rows follow the names: a class of both keeps its row wherever it moved, another starts afresh
    (the same count of other names would otherwise pass one class's row to another). Without names, timm's
    rule: the classifier is kept when the class count is the same, restarted otherwise.
    ``ValueError`` for fused weights, another architecture, or a tensor that neither fits nor is the
    classifier or an input convolution; ``FileNotFoundError`` for a missing file.
    """
    from .trained import load_trained_model, trained_on

    src, path = load_trained_model(source)
    if is_reparameterized(src):
        raise ValueError(
            f"{path} holds fused (re-parameterized) weights, which cannot be trained: start from the run's "
            "last_ema.safetensors or last.safetensors (or the run folder)"
        )
    check_same_parnet(src, model, path)
    theirs, ours = src.state_dict(), model.state_dict()
    if set(theirs) != set(ours):
        missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise ValueError(
            f"{path} does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}: train the same architecture"
        )
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = _module_names(cfg.get("classifier"))
    adapted, note = adapt_input_convs(theirs, ours, cfg.get("first_conv"))
    state: dict[str, torch.Tensor] = {}
    notes = {note} if note else set()
    theirs_names = trained_on(source).class_names
    by_name = bool(class_names and theirs_names) and tuple(class_names) != tuple(theirs_names)
    for key, own in ours.items():
        weight = adapted[key]
        if by_name and key.rsplit(".", 1)[0] in classifier:
            weight, kept = _rows_by_name(weight, own, list(theirs_names), list(class_names))
            notes.add(f"classifier rows matched by class name: {kept} of {len(class_names)} kept, the others restarted")
        elif weight.shape != own.shape and key.rsplit(".", 1)[0] in classifier:
            weight = own  # timm's way: a new class count starts a new classifier
            notes.add(f"classifier restarted for {own.shape[0]} classes (the weights have {theirs[key].shape[0]})")
        if weight.shape != own.shape:
            raise ValueError(
                f"{path}: {key} has shape {list(theirs[key].shape)}, this model {list(own.shape)}: train the same "
                "architecture (--model, --model-kwargs)"
            )
        state[key] = weight.to(own.dtype)
    model.load_state_dict(state)
    return f"initialized from {path}" + "".join(f"; {n}" for n in sorted(notes))


def _rows_by_name(
    theirs: torch.Tensor, own: torch.Tensor, theirs_names: list[str], names: list[str]
) -> tuple[torch.Tensor, int]:
    """``own`` (a fresh classifier tensor, one row per class of ``names``) with the rows of ``theirs`` copied in
    for the classes both name; and how many were."""
    rows = own.clone()
    index = {name: i for i, name in enumerate(theirs_names)}
    shared = [(i, index[name]) for i, name in enumerate(names) if name in index]
    for ours_i, theirs_i in shared:
        rows[ours_i] = theirs[theirs_i]
    return rows, len(shared)
