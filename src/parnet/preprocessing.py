"""How a trained model's images are prepared where its weights do not say what data they were trained on
(their header names no dataset: an authors' file, a bare file of ours): timm's evaluation transform from a
pretrained config. ``parnet predict``, ``parnet eval`` on an image folder and ``parnet export``'s metadata
use it for such weights (weights that name their dataset get the dataset's own, :mod:`parnet.data`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

__all__ = ["pretrained_transform"]


def pretrained_transform(
    model: torch.nn.Module, model_name: str | None, img_size: int = 0, authors: bool = False
) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """(transform, image mode) for weights that do not say what data they were trained on: timm's evaluation
    transform from the pretrained config of ``model_name``, the model's own or its released variant's
    (``authors``: the weights are from an authors' file, whose architecture may be none of the released
    ones: their validation's bilinear resizing); at ``img_size`` where given. ``parnet predict``, ``eval``
    (on an image folder) and ``export``'s metadata prepare such weights' images with it."""
    import timm
    from timm.data import create_transform, resolve_data_config

    pretrained_cfg = None
    if model_name:
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        pretrained_cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else None
    if pretrained_cfg is None:
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or _released_variant_cfg(model, authors)
    config = resolve_data_config(pretrained_cfg=pretrained_cfg)
    in_chans = getattr(model, "in_chans", 3)
    config["input_size"] = (in_chans, *((img_size, img_size) if img_size else config["input_size"][1:]))
    if len(config["mean"]) != in_chans:  # a grey model under an RGB config: the channels' average
        config["mean"] = (sum(config["mean"]) / len(config["mean"]),) * in_chans
        config["std"] = (sum(config["std"]) / len(config["std"]),) * in_chans
    return create_transform(**config), "L" if in_chans == 1 else "RGB"


def _released_variant_cfg(model: torch.nn.Module, authors: bool = False) -> dict[str, Any]:
    """The pretrained config of the released ParNet variant with ``model``'s architecture, else of its form (for
    an authors' file, of their release: their validation's bilinear resizing)."""
    import timm

    from .official import official_variant

    cfg = getattr(model, "cfg", None)
    form = "parnet_cifar_s" if getattr(model, "small_input", False) else "parnet_s"
    name = (official_variant(cfg) if cfg is not None else None) or ("parnet_s_official" if authors else form)
    return timm.models.get_pretrained_cfg(name).to_dict()
