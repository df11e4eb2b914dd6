"""The detection backbone: a timm ``features_only`` body (ParNet or a baseline) with torchvision's FPN on it,
its classification weights, and frozen batch norm."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..factory import create_model

__all__ = ["FPNBackbone", "build_backbone", "freeze_batchnorm", "load_backbone_weights"]


class FPNBackbone(nn.Module):
    """A timm ``features_only`` body and torchvision's FPN: ``OrderedDict`` of pyramid levels.

    The interface of torchvision's ``BackboneWithFPN``: ``out_channels`` and a forward returning
    ``{"0": finest, ..., "pool" | "p6", "p7": extra levels}``.

    Args:
        body: a timm features model (``features_only=True``) returning a list of feature maps.
        levels: which of the body's features feed the FPN (positions in its feature list).
        out_channels: FPN width.
        extra: ``"p6p7"`` (two stride-2 convs on P5, as in RetinaNet and FCOS), ``"pool"``
            (max-pool of the coarsest level, as in Faster R-CNN) or ``None``.
    """

    def __init__(self, body: nn.Module, levels: Sequence[int], out_channels: int = 256, extra: str | None = "p6p7"):
        from torchvision.ops.feature_pyramid_network import (
            FeaturePyramidNetwork,
            LastLevelMaxPool,
            LastLevelP6P7,
        )

        super().__init__()
        channels, reductions = body.feature_info.channels(), body.feature_info.reduction()
        if any(isinstance(i, bool) or not isinstance(i, int) for i in levels):
            raise TypeError(f"levels must be integer positions in the body's features, got {list(levels)}")
        levels = list(levels)
        if not levels or any(not 0 <= i < len(channels) for i in levels) or sorted(set(levels)) != levels:
            raise ValueError(
                f"levels must be increasing positions in the body's {len(channels)} features, got {levels}"
            )
        if extra not in ("p6p7", "pool", None):
            raise ValueError(f"extra must be 'p6p7', 'pool' or None, got {extra!r}")
        _check_strides(body, levels)
        self.body = body
        self.levels = levels
        self.in_channels_list = [channels[i] for i in levels]
        self.out_channels = out_channels
        blocks = {"p6p7": LastLevelP6P7(out_channels, out_channels), "pool": LastLevelMaxPool(), None: None}[extra]
        self.fpn = FeaturePyramidNetwork(self.in_channels_list, out_channels, extra_blocks=blocks)
        base = [reductions[i] for i in levels]
        self.strides = base + [base[-1] * 2 ** (k + 1) for k in range({"p6p7": 2, "pool": 1, None: 0}[extra])]
        self.names = [str(k) for k in range(len(levels))] + {"p6p7": ["p6", "p7"], "pool": ["pool"], None: []}[extra]
        cfg = getattr(getattr(body, "model", None), "cfg", None)
        self.input_multiple = int(getattr(cfg, "input_multiple", max(reductions)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        if not isinstance(feats, list):  # timm's feature getters may say a tuple too: TorchScript needs one type
            raise TypeError("the backbone body must return a list of feature maps")
        levels: dict[str, torch.Tensor] = {}  # ordered; a loop: TorchScript (torchvision's detectors script)
        for k, i in enumerate(self.levels):
            levels[str(k)] = feats[i]
        return self.fpn(levels)


def _check_strides(body: nn.Module, levels: list[int]) -> None:
    """``ValueError`` unless the chosen features' strides strictly increase: an FPN of two levels at one stride
    has anchors (and strides) repeated, which trains without a word but is not the pyramid asked for.
    ParNet has several features at one stride (its streams and fusions), so out_indices can pick them."""
    info = body.feature_info.get_dicts()
    strides = [info[i]["reduction"] for i in levels]
    if all(a < b for a, b in zip(strides, strides[1:])):
        return
    indices = ", ".join(f"{info[i].get('index', i)} (stride {s})" for i, s in zip(levels, strides))
    from ..model import ParNetCfg, default_out_indices

    cfg = getattr(getattr(body, "model", None), "cfg", None)
    hint = "choose one feature per stride (out_indices, levels)"
    if isinstance(cfg, ParNetCfg):
        hint += f", e.g. ParNet's default out_indices {default_out_indices(cfg)}"
    raise ValueError(f"the FPN's features must have strictly increasing strides, got features {indices}; {hint}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every batch norm frozen: timm's ``freeze_batch_norm_2d``, in place where it can be.

    ``BatchNorm2d`` becomes torchvision's ``FrozenBatchNorm2d`` and timm's ``BatchNormAct2d`` (BN with its
    activation, as in EfficientNet) ``FrozenBatchNormAct2d``, which keeps the activation: they normalise with
    the stored statistics and affine parameters and never update them (buffers, not parameters), as
    torchvision's detection backbones do. Returns the module (a new one only if ``module`` itself is a BN).
    """
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(module)


def _read_weights(
    source: str | os.PathLike | Mapping[str, Any], use_ema: bool
) -> tuple[dict[str, torch.Tensor], str, nn.Module | None, bool]:
    """A classification state dict from: our safetensors (``parnet.io.save_model``, a run's weights, or a plain
    safetensors state dict), the authors' ``.pth.tar`` (converted), or a torch checkpoint; told apart by content.
    A detector file of :func:`~parnet.detection.save_detector` gives its backbone body's weights.
    Also the network the file describes, when it describes one (ours and the authors' do; a bare state dict
    does not): its ``cfg`` is checked against the backbone's; and whether it is an authors' checkpoint."""
    from ..io import header_flag, is_torch_checkpoint
    from ..official import is_official_layout, load_official, read_checkpoint, select_state_dict

    if isinstance(source, Mapping):
        checkpoint, name = dict(source), "the given state dict"
    else:
        path = Path(source)
        if path.is_dir():  # a `parnet train` run folder: its EMA or its raw weights
            from ..trained import run_weights_file

            path = run_weights_file(path, use_ema)
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights not found: {path}")
        if not is_torch_checkpoint(path):  # by content: a torch.save file named .safetensors is read as one
            from ..io import read_safetensors
            from ..trained import load_weights

            state, meta = read_safetensors(path, None)
            if header_flag(meta, "fused", name):  # a classifier's or a detector's (save_detector records it)
                raise ValueError(
                    f"{name} holds re-parameterized (fused) weights, which a backbone cannot train from: give the "
                    "run folder or its last.safetensors / last_ema.safetensors (the weights before fusion)"
                )
            if meta.get("format") == "parnet-detector":  # a trained detector's backbone, e.g. for other classes
                body = "backbone.body."
                return {k.removeprefix(body): v for k, v in state.items() if k.startswith(body)}, name, None, False
            described = "timm_model" in meta or meta.get("format") == "parnet"
            return state, name, load_weights(path) if described else None, False
        checkpoint = read_checkpoint(path)
    if isinstance(checkpoint.get("model"), Mapping):  # a full training checkpoint
        checkpoint = dict(checkpoint["model"])
    state = select_state_dict(checkpoint, use_ema=use_ema)
    if is_official_layout(state):
        network = load_official(state)  # the released networks' ReLU: their files do not say
        return network.state_dict(), name, network, True
    return state, name, None, False


def load_backbone_weights(
    body: nn.Module, source: str | os.PathLike | Mapping[str, Any], use_ema: bool = False
) -> list[str]:
    """Load a classification checkpoint into a features body; returns the keys it did not use.

    ``source``: a run folder of ``parnet train``, our safetensors, the authors' ``.pth.tar``, a detector file
    (its backbone) or a state dict. Where the file names the data its weights were trained on, the body's
    ``pretrained_cfg`` takes that data's mean and std (the detector's input normalisation).
    Keys of the classifier (``head.*``, ``fc.*``) are not needed; the convolutions that read the image
    are adapted to the body's channels (timm's ``adapt_input_conv``: a Fashion-MNIST ParNet's grey
    filters repeated for RGB); every other weight of the body must be present with the right shape, or
    ``ValueError`` says which are missing or mismatched.
    """
    from ..transfer import adapt_input_convs, check_same_parnet
    from ..weights import check_state_dict

    state, name, network, authors = _read_weights(source, use_ema)
    target = body.model if hasattr(body, "model") and isinstance(body.model, nn.Module) else body
    try:
        check_same_parnet(network, target, name, "--backbone, --backbone-kwargs")
    except ValueError as e:
        if not authors:
            raise
        raise ValueError(
            f"{e}. An authors' file does not say its activation: read as the released networks' ReLU. For one "
            "trained with SiLU, convert it first (`parnet convert FILE OUT.safetensors --activation silu`; in "
            "Python, parnet.load_official(FILE, activation='silu').state_dict())"
        ) from None
    from timm.models import clean_state_dict

    # timm's clean-up (DDP's "module.", torch.compile's "_orig_mod."), and a features wrapper's "model."
    state = {k.removeprefix("model."): v for k, v in clean_state_dict(state).items()}
    own = target.state_dict()
    state, _ = adapt_input_convs(state, own, (getattr(body, "pretrained_cfg", None) or {}).get("first_conv"))
    try:  # the classifier's weights may be extra; every weight of the body must fit by name, shape and dtype
        check_state_dict(own, state, name, allow_unexpected=True, optional=lambda k: k.endswith("num_batches_tracked"))
    except ValueError as e:
        raise ValueError(
            f"{str(e).replace('does not fit the model', f'does not fit the backbone ({type(target).__name__})')}; "
            "build the backbone with the checkpoint's architecture (widths, head_width, ...)"
        ) from None
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    _take_input_statistics(body, getattr(network, "pretrained_cfg", None) or {})
    return sorted(k for k in state if k not in own)


def _take_input_statistics(body: nn.Module, trained: Mapping[str, Any]) -> None:
    """Give ``body`` the input mean and std its weights were trained with (a run's data, e.g. Fashion-MNIST's),
    so that a detector normalises images as the weights expect; grey statistics serve every channel, as the
    adapted input convolution reads the channels alike. Nothing said, or another channel count: unchanged."""
    own = dict(getattr(body, "pretrained_cfg", None) or {})
    if not {"mean", "std"} <= trained.keys() or "mean" not in own:
        return
    chans = len(own["mean"])
    stats = {k: tuple(trained[k]) * (chans if len(trained[k]) == 1 else 1) for k in ("mean", "std")}
    if all(len(v) == chans for v in stats.values()):
        body.pretrained_cfg = {**own, **stats}


def build_backbone(
    name: str = "parnet_s",
    levels: Sequence[int] | None = None,
    out_channels: int = 256,
    extra: str | None = "p6p7",
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    use_ema: bool = False,
    freeze_bn: bool = False,
    **model_kwargs: Any,
) -> FPNBackbone:
    """A timm model's multi-scale features with an FPN on them.

    Args:
        name: a timm model: ``parnet_*`` (its default features: one per stride, 4/8/16/32 for the
            ImageNet form, 1/2/4/8 for the small-input form) or e.g. ``resnet18`` (strides 4..32).
        levels: positions of the features fed to the FPN; default the three coarsest with
            ``extra="p6p7"`` (C3-C5 for stride-32 backbones) and all four otherwise.
        out_channels: FPN width.
        extra: extra pyramid levels, see :class:`FPNBackbone`.
        weights: a classification checkpoint for the body (see :func:`load_backbone_weights`); the body's
            ``pretrained_cfg`` then says the input statistics those weights were trained with.
        use_ema: take the EMA weights of a checkpoint that has them.
        freeze_bn: freeze every BN (:func:`freeze_batchnorm`, after loading weights).
        model_kwargs: passed to ``timm.create_model`` (e.g. ``widths=(16, 32, 64)``).
    """
    if name.startswith("parnet"):
        body = create_model(name, features_only=True, **model_kwargs)
    else:
        body = create_model(
            name, features_only=True, out_indices=model_kwargs.pop("out_indices", (1, 2, 3, 4)), **model_kwargs
        )
    if weights is not None:
        load_backbone_weights(body, weights, use_ema=use_ema)
    if freeze_bn:
        body = freeze_batchnorm(body)
    n = len(body.feature_info.channels())
    if levels is None:
        levels = list(range(max(0, n - 3), n)) if extra == "p6p7" else list(range(n))
    return FPNBackbone(body, levels, out_channels, extra)
