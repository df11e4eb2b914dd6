"""Models by name, for every command and library function: timm's registry with clear errors.

``check_model_name`` refuses an unknown name with the registered names that look like it;
``create_model`` is ``timm.create_model`` with our variants and the baselines registered, a
keyword the model does not take a ``ValueError`` naming it; ``refuse_reserved`` refuses keywords
a caller sets itself. The command line wraps these as argparse types (:mod:`parnet.cli`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "check_model_name", "create_classifier", "create_model", "create_pretrained", "default_input_size",
    "refuse_reserved",
]  # fmt: skip


def check_model_name(text: Any) -> str:
    """A timm model name (``name`` or ``name.tag``; ours and the baselines registered), or ``ValueError``
    with the registered names that look like it."""
    import timm

    from . import baselines  # noqa: F401 - registers the baselines

    name = str(text)
    if not timm.is_model(name.split(".")[0]):
        known = timm.list_models()
        close = difflib.get_close_matches(name.split(".")[0], known, n=5, cutoff=0.6)
        close += [m for m in timm.list_models(f"*{name.split('_')[0]}*")[:8] if m not in close]
        hint = f"; similar: {', '.join(close[:8])}" if close else "; `timm.list_models()` lists them"
        raise ValueError(f"unknown model {name!r}{hint}")
    base, _, tag = name.partition(".")
    if tag:  # timm itself would take an unknown tag as a default config and go looking for no weights
        tagged = [m for m in timm.list_models(base, include_tags=True) if "." in m]
        if name not in tagged:
            known = f"its tags: {', '.join(m.partition('.')[2] for m in tagged)}" if tagged else "it has none"
            raise ValueError(f"{base} has no pretrained tag {tag!r} ({known}); give {base} alone or a tag it has")
    return name


def create_model(name: str, **kwargs: Any) -> Any:
    """``timm.create_model`` with our variants and the baselines registered; a keyword the model does
    not take (a ``--model-kwargs`` typo) is a ``ValueError`` that names it rather than a traceback."""
    import timm

    from . import baselines  # noqa: F401 - registers the baselines (and, through parnet, the variants)

    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):  # not a typo of the user's: keep the traceback
            raise
        raise ValueError(f"cannot create {name} with {kwargs}: {e}") from None


def default_input_size(model: str | nn.Module) -> int | None:
    """The image side timm's pretrained config gives ``model``, if it has one: a registered name (``name.tag``
    too) or a built model (its ``pretrained_cfg``; a model rebuilt from a weights file has none)."""
    import timm

    from . import baselines  # noqa: F401 - registers the baselines

    if isinstance(model, str):
        cfg = timm.models.get_pretrained_cfg(model)
        size = cfg.input_size if cfg is not None else None
    else:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return int(size[-1]) if size else None


def create_pretrained(
    name: str, file: str | os.PathLike | None = None, offline: str = "give the file", **kwargs: Any
) -> Any:
    """``name`` with its released weights, loaded as timm loads them: downloaded by timm (its cache first), or
    from ``file``, an offline copy (safetensors, or ``torch.load(weights_only=True)``: no code in it runs). timm
    drops the classifier where ``num_classes`` differs and adapts the input convolutions to ``in_chans``; for an
    authors' ParNet file, the variant's own filter converts it. ``offline`` says, in the error when a download
    fails, how to give the file instead; any failure is a ``ValueError`` saying what to do."""
    import timm

    from . import baselines  # noqa: F401 - registers the baselines (and, through parnet, the variants)

    check_model_name(name)
    if file is None:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
            raise ValueError(f"{name} has no released weights: start from a weights file of yours instead")
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:  # no network, a refused download
            where = f"{cfg.hf_hub_filename or 'model.safetensors'} of https://huggingface.co/{cfg.hf_hub_id}"
            raise ValueError(
                f"cannot get the pretrained weights of {name} ({e}); download them "
                f"({where if cfg.hf_hub_id else cfg.url or cfg.file}) and {offline}"
            ) from None
    # timm's load_state_dict takes a checkpoint's EMA weights where it holds them, drops DDP's "module." and runs
    # the model's own checkpoint filter, then loads strictly (the classifier aside, where num_classes differs).
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **kwargs)
    except Exception as e:  # noqa: BLE001 - a shape or key mismatch (RuntimeError), a file torch cannot read, ...
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        reason = reason if len(reason) <= 400 else reason[:400] + " ..."
        raise ValueError(
            f"cannot load {file} as the weights of {name} ({reason}): give the file of {name}'s weights, or the "
            "model name its weights are for"
        ) from None


def refuse_reserved(kwargs: Mapping[str, Any], reserved: Mapping[str, str]) -> None:
    """``ValueError`` for the first key of ``kwargs`` in ``reserved`` (key -> why it is refused)."""
    for key in kwargs:
        if key in reserved:
            raise ValueError(f"{key} is not accepted here: {reserved[key]}")


def create_classifier(
    name: str,
    num_classes: int,
    in_chans: int,
    model_kwargs: Mapping[str, Any],
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
) -> Any:
    """The classifier a training run builds (and its weights files describe): :func:`create_model` with
    the dataset's classes and channels (``drop_path_rate`` passed only when set: not every model takes it);
    ``pretrained``: starting from ``name``'s released weights (:func:`create_pretrained`; ``pretrained_file``:
    their offline copy)."""
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **extra, **model_kwargs)
    if pretrained or pretrained_file:
        offline = "give the file as --initial-checkpoint FILE"
        return create_pretrained(name, file=pretrained_file, offline=offline, **kwargs)
    return create_model(name, **kwargs)
