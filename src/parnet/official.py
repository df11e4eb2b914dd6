"""The authors' released checkpoints: safe reading, key conversion, architecture inference.

Their files (GitHub release v.0.1.0 of imankgoyal/NonDeepNetworks) are timm training checkpoints:
pickles holding ``state_dict`` (keys maybe prefixed ``module.``), often ``state_dict_ema``, an
``argparse.Namespace`` of arguments, the epoch and the optimizer. They are read with
``torch.load(weights_only=True)`` allowing ``argparse.Namespace`` and nothing else, so a hostile
pickle is refused before any of it runs.

This module also registers their networks with timm (``parnet_*_official``: the paper's widths with
ReLU, see :mod:`parnet.model`), with a ``pretrained_filter_fn`` that converts their keys::

    timm.create_model("parnet_s_official.in1k", pretrained=True)   # downloads and converts their file

The released ParNet-S file is named after widths 92, 192, 384, 1280, but its tensors are 96, 192,
384, 1280 wide (every key and shape is in ``tests/fixtures/parnet_s_official_keys.txt``), so
``parnet_s_official`` is 96 wide; :func:`load_official` infers widths from the tensors and loads either.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from .formats import is_safetensors, is_torch_checkpoint, program_kind
from .model import ParNet, ParNetCfg, build_parnet, create_parnet, imagenet_cfg, model_cfgs

__all__ = ["load_official", "convert_official_state_dict", "infer_official_cfg", "read_checkpoint"]

# Authors' module path -> ours, applied in order to the part of a key before the block internals.
_MODULE_RULES = [
    (re.compile(r"^inits\.0\.(\d+)\.block\."), r"stem.\1."),
    (re.compile(r"^inits\.(\d+)\.block\."), lambda m: f"downsample.{int(m.group(1)) - 1}."),
    (re.compile(r"^streams\.(\d+)\.(\d+)\.block\."), r"streams.\1.\2."),
    (re.compile(r"^downsamples_2\.0\.block\."), "fuse_entry."),
    (re.compile(r"^downsamples_2\.1\.0\.b1\."), "fusions.0.norm_stream."),
    (re.compile(r"^downsamples_2\.1\.0\.b2\."), "fusions.0.norm_fused."),
    (re.compile(r"^downsamples_2\.1\.2\.block\."), "fusions.0.block."),
    (re.compile(r"^combine\.0\.b1\."), "fusions.1.norm_stream."),
    (re.compile(r"^combine\.0\.b2\."), "fusions.1.norm_fused."),
    (re.compile(r"^combine\.2\.block\."), "fusions.1.block."),
    (re.compile(r"^combine\.3\.block\."), "final_block."),
    (re.compile(r"^head\.fc\."), "head.fc."),
]
# Inside a block.
_BLOCK_RULES = [
    (re.compile(r"rbr_dense\.(conv|bn)\."), r"dense.\1."),
    (re.compile(r"rbr_1x1\.(?:1\.)?(conv|bn)\."), r"point.\1."),
    (re.compile(r"rbr_identity\."), "skip."),
    (re.compile(r"se\.cvsig\.conv\."), "gate.conv."),
]


@contextlib.contextmanager
def reading_official_checkpoints() -> Iterator[None]:
    """Let ``torch.load(weights_only=True)`` accept ``argparse.Namespace`` (their ``args``) too."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        yield


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint without running code: tensors, containers and ``argparse.Namespace`` only."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give the checkpoint file (.pth.tar)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not is_torch_checkpoint(path):
        if not is_safetensors(path):
            raise ValueError(f"{path} is not a PyTorch checkpoint (empty, or a file of another kind)")
        raise ValueError(
            f"{path} is a safetensors file, not a PyTorch checkpoint: it needs no conversion. Use it as it is "
            "(`parnet eval FILE` without --official, `parnet export --checkpoint FILE`, "
            "`parnet.io.load_model`, --backbone-weights FILE)"
        )
    program = program_kind(path)
    if program is not None:
        raise ValueError(
            f"{path} is a {program}, which runs as it is, not weights: give the weights it was exported from (a run "
            "folder, a .safetensors or an authors' .pth.tar)"
        )
    try:
        # A file object, not the path: torch.load reads any path named *.safetensors as safetensors.
        with reading_official_checkpoints(), open(path, "rb") as f:
            checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message ends with advice to load with weights_only=False, i.e. to run the file's code: not passed on.
        # torch says "Weights only load failed" for any unpickling error: only a global it would not import
        # is an object that could run code; anything else (an unknown opcode) is a damaged file.
        found = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if found is None:
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt?)") from None
        raise ValueError(
            f"refused to load {path}: it holds an object other than tensors and argparse.Namespace "
            f"({found.group(1)}), which could run code when unpickled; nothing in it was executed"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load of a file that is no checkpoint: KeyError, EOFError, ...
        raise ValueError(
            f"cannot read {path} as a PyTorch checkpoint (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def select_state_dict(checkpoint: Mapping[str, Any], use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint (``state_dict``, ``state_dict_ema`` or a bare state dict),
    without the ``module.`` prefix of DataParallel / DistributedDataParallel."""
    if checkpoint.get("format") == "parnet-train-state":  # checkpoint.save_state marks its files so
        raise ValueError(
            "this is a `parnet train` training state (last_state.pt: model, optimizer, epoch, ...), not an authors' "
            "checkpoint; give the run folder, or its last.safetensors / last_ema.safetensors, instead (and no "
            "--official)"
        )
    if use_ema:
        if "state_dict_ema" not in checkpoint:
            raise ValueError(f"use_ema=True but the checkpoint has no 'state_dict_ema' (keys: {sorted(checkpoint)})")
        state = checkpoint["state_dict_ema"]
    elif "state_dict" in checkpoint:
        state = checkpoint["state_dict"]
    else:
        state = checkpoint
    tensors = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors")
    return tensors


def is_official_layout(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("inits.", "combine.")) for k in state_dict)


def is_timm_weights(path: Path) -> bool:
    """Whether ``path`` holds weights for timm to read rather than this project's loaders: a safetensors or
    ``torch.save`` file that is neither of ours (its header's ``format`` or ``timm_model``) nor an authors' ParNet
    checkpoint. Files of neither kind, or unreadable, go to our loaders, which say what they are."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    if is_safetensors(path):  # by content, whatever the file's name
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - a damaged file: read_safetensors says so
            return False
        ours = str(meta.get("format", "")).startswith("parnet") or "timm_model" in meta  # save_model's, a run's
        return not ours
    if not is_torch_checkpoint(path):
        return False
    checkpoint = read_checkpoint(path)  # tensors only, nothing run; refuses programs and code by name
    if checkpoint.get("format") == "parnet-train-state":  # a run's last_state.pt: its loader says what to give
        return False
    try:
        state = select_state_dict(checkpoint)
    except ValueError:  # no tensors at its top or under state_dict: timm also looks under "model"
        return True
    return not is_official_layout(state)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to this project's; unknown keys raise ``ValueError`` (``strict``) or are left out."""
    converted, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, repl in _MODULE_RULES:
            new_key, hits = pattern.subn(repl, key, count=1)
            if hits:
                break
        else:
            unknown.append(key)
            continue
        for pattern, repl in _BLOCK_RULES:
            new_key = pattern.sub(repl, new_key, count=1)
        converted[new_key] = value
    if unknown and strict:
        raise ValueError(f"not keys of the authors' ParNet layout: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return converted


def infer_official_cfg(state_dict: Mapping[str, torch.Tensor], activation: str = "relu") -> tuple[ParNetCfg, int, int]:
    """(architecture, num_classes, in_chans) of an authors'-layout state dict, from tensor shapes."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    try:
        stream_blocks: dict[int, set[int]] = {}
        for key in sd:
            if m := re.match(r"streams\.(\d+)\.(\d+)\.", key):
                stream_blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        num_streams = len(stream_blocks)
        widths = tuple(sd[f"streams.{i}.0.block.rbr_identity.weight"].shape[0] for i in range(num_streams))
        blocks = tuple(len(stream_blocks[i]) for i in range(num_streams))
        stem = sd["inits.0.0.block.rbr_dense.conv.weight"]
        head_width = sd["combine.3.block.rbr_dense.conv.weight"].shape[0]
        num_classes = sd["head.fc.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an authors' ParNet state dict: key {e} is missing") from None
    if num_streams != 3:
        raise ValueError(f"the authors' layout has 3 streams, this state dict has {num_streams}")
    cfg = ParNetCfg(
        widths=widths,
        head_width=head_width,
        blocks=blocks,
        act=activation,
        use_gate=any(".se.cvsig." in k for k in sd),
        stem_width=stem.shape[0] if stem.shape[0] != min(64, widths[0]) else None,
    )
    return cfg, num_classes, stem.shape[1]


def load_official(
    source: str | os.PathLike | Mapping[str, Any],
    use_ema: bool = False,
    activation: str = "relu",
    strict: bool = True,
) -> ParNet:
    """Build a :class:`ParNet` from one of the authors' checkpoints.

    Args:
        source: path of a ``.pth.tar`` file, or a checkpoint / state dict already loaded.
        use_ema: take ``state_dict_ema`` (the weights their ImageNet results are for).
        activation: ``"relu"`` by default, because the released networks were trained with ReLU
            (their configs never switched SiLU on); ``"silu"`` for checkpoints that did.
        strict: refuse missing, unexpected or mis-shaped keys; ``False`` loads the tensors that fit and leaves
            the others out (the rest of the network keeps its fresh initialization).

    Widths, blocks per stream, class count and input channels come from the tensor shapes; the
    dropout is that of the registered variant of the same architecture (0.1 for L and XL).
    The model is returned in eval mode.
    """
    name = str(source) if not isinstance(source, Mapping) else "the given dict"
    checkpoint = read_checkpoint(source) if not isinstance(source, Mapping) else source
    state = select_state_dict(checkpoint, use_ema)
    cfg, num_classes, in_chans = infer_official_cfg(state, activation)
    variant = official_variant(cfg) or "parnet_s_official"  # its release's pretrained_cfg: bilinear resizing
    model = build_parnet(cfg, variant, num_classes=num_classes, in_chans=in_chans, drop_rate=official_drop_rate(cfg))
    converted = convert_official_state_dict(state, strict)
    if strict:  # names, shapes and dtypes, before anything is copied
        from .weights import check_state_dict

        try:
            check_state_dict(model.state_dict(), converted, name)
        except ValueError as e:
            raise ValueError(f"{e} (in Python, parnet.load_official(..., strict=False) loads what matches)") from None
    else:
        own = model.state_dict()
        converted = {k: v for k, v in converted.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(converted, strict=False)
    return model.eval()


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ParNet) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: accept the authors' files (converted) or our own layout.

    Like timm's own file loading, it prefers the EMA weights when a checkpoint has them (the
    authors' ImageNet results are for those).
    """
    state = select_state_dict(state_dict, use_ema="state_dict_ema" in state_dict)
    return convert_official_state_dict(state) if is_official_layout(state) else state


# -- timm registration of the released networks ------------------------------------------------

AUTHORS_REPOSITORY = "https://github.com/imankgoyal/NonDeepNetworks"
RELEASE_URL = AUTHORS_REPOSITORY + "/releases/download/v.0.1.0/"

# The authors trained L and XL with dropout before the classifier (their files say "dropout_lin").
OFFICIAL_DROP_RATES = {"parnet_l_official": 0.1, "parnet_xl_official": 0.1}


def official_variant(cfg: ParNetCfg) -> str | None:
    """The registered ``parnet_*_official`` variant with architecture ``cfg``, if there is one."""
    return next((name for name, c in model_cfgs.items() if name.endswith("_official") and c == cfg), None)


def official_drop_rate(cfg: ParNetCfg) -> float:
    """Dropout of the registered variant with architecture ``cfg`` (0 for an architecture not released)."""
    return OFFICIAL_DROP_RATES.get(official_variant(cfg) or "", 0.0)


def _official_cfg(file: str) -> dict[str, Any]:
    """An authors' release file: bilinear resizing as in their validation, their repository's BSD-3-Clause license."""
    return imagenet_cfg(
        RELEASE_URL + file, interpolation="bilinear", license="bsd-3-clause", origin_url=AUTHORS_REPOSITORY
    )


# The authors' ImageNet checkpoints, named after their model configs.
default_cfgs = generate_default_cfgs(
    {
        "parnet_s_official.in1k": _official_cfg("planes_92_192_384_1280_num_blocks_5_6_6_1_sebv_13.pth.tar"),
        "parnet_m_official.in1k": _official_cfg("planes_128_256_512_2048_num_blocks_5_6_6_1_sebv_13.pth.tar"),
        "parnet_l_official.in1k": _official_cfg(
            "planes_160_320_640_2560_num_blocks_5_6_6_1_sebv_13_dropout_lin.pth.tar"
        ),
        "parnet_xl_official.in1k": _official_cfg(
            "reg_se13_planes_200_400_800_3200_num_blocks_5_6_6_1_sebv_13_dropout_lin.pth.tar"
        ),
        "parnet_xl_official.in1k_200ep": _official_cfg(
            "reg_se13_cosine_planes_200_400_800_3200_num_blocks_5_6_6_1_sebv_13_dropout_lin.pth.tar"
        ),
    }
)


def _create_official(variant: str, pretrained: bool, **kwargs: Any) -> ParNet:
    kwargs.setdefault("drop_rate", OFFICIAL_DROP_RATES.get(variant, 0.0))
    with reading_official_checkpoints():  # timm reads their pickles with weights_only=True
        return create_parnet(variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def parnet_s_official(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """The network of the authors' released ParNet-S weights: ParNet-S with ReLU.

    The file is named after widths 92, 192, 384, 1280; its tensors are 96, 192, 384, 1280.
    """
    return _create_official("parnet_s_official", pretrained, **kwargs)


@register_model
def parnet_m_official(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """The network of the authors' released ParNet-M weights: ParNet-M with ReLU."""
    return _create_official("parnet_m_official", pretrained, **kwargs)


@register_model
def parnet_l_official(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """The network of the authors' released ParNet-L weights: ParNet-L with ReLU, dropout 0.1."""
    return _create_official("parnet_l_official", pretrained, **kwargs)


@register_model
def parnet_xl_official(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """The network of the authors' released ParNet-XL weights: ParNet-XL with ReLU, dropout 0.1."""
    return _create_official("parnet_xl_official", pretrained, **kwargs)
