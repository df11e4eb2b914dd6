"""Scoring a classifier over a loader, and the checks that a model fits the data it is scored on.

:func:`evaluate_model` is what every evaluation of this project runs (training's epochs, ``parnet eval``,
``parnet quantize``); :func:`check_fits_dataset` and :func:`check_same_classes` refuse data a model was
not trained for before any score is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["check_fits_dataset", "check_same_classes", "evaluate_model"]


def evaluate_model(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    reference: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` over ``loader``, summed over all ranks.

    Also returns ``n`` (images) and ``preds`` (this rank's predicted classes, a tensor). ``reference``: this
    rank's ``preds`` of another model over the same loader; ``changes`` then counts the images, on all ranks,
    whose predicted class differs.
    """
    import torch

    from .engine import all_reduce_sum

    model.eval()
    device = torch.device(device)
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count, changes
    preds = []
    seen = 0  # images of this rank so far: where the batch starts in ``reference``
    with torch.inference_mode():
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            totals[0] += (top[:, 0] == y).sum()
            totals[1] += (top == y[:, None]).any(dim=1).sum()
            totals[2] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            if reference is not None:
                totals[4] += (top[:, 0].cpu() != reference[seen : seen + len(y)]).sum()
            seen += len(y)
            totals[3] += len(y)
            preds.append(top[:, 0].cpu())
    totals = all_reduce_sum(totals)
    n = max(float(totals[3]), 1.0)
    return {
        "top1": 100 * float(totals[0]) / n,
        "top5": 100 * float(totals[1]) / n,
        "loss": float(totals[2]) / n,
        "n": int(totals[3]),
        **({"changes": int(totals[4])} if reference is not None else {}),
        "preds": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
    }


def check_fits_dataset(
    model: Any, source: Any, dataset: str, run_dataset: str | None = None, num_classes: int | None = None
) -> None:
    """``ValueError`` unless ``model`` reads ``dataset``'s images (its input channels: ParNet's ``in_chans``, else
    its first convolution's) and, given ``num_classes`` (the dataset's), predicts as many classes.

    ``run_dataset``: the dataset the weights say they were trained on, named in the message.
    """
    import torch

    from .data import DATASETS

    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    model_chans = getattr(model, "in_chans", conv.in_channels if conv is not None else None)
    chans = getattr(DATASETS.get(dataset), "in_chans", None)
    if chans and model_chans and model_chans != chans:
        hint = "" if run_dataset else _datasets_with(model_chans)
        trained_with = f"{model_chans}-channel data" + (f" ({run_dataset})" if run_dataset else "")
        raise ValueError(
            f"{source} was trained on {trained_with}, {dataset} has {chans}-channel images: "
            f"use it on {run_dataset or f'a {model_chans}-channel dataset'}"
            + (f" (leave out --dataset, or pass --dataset {run_dataset})" if run_dataset else "")
            + (f" ({hint})" if hint else "")
        )
    if num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        raise ValueError(
            f"{source} has {model.num_classes} classes, {dataset} has {num_classes}: use it on the data it was "
            f"trained on" + (f" ({run_dataset}: leave out --dataset)" if run_dataset else "")
        )


def _datasets_with(chans: int) -> str:
    """The ``--dataset`` choices whose images have ``chans`` channels, as a hint."""
    from .data import DATASETS

    names = [n + (" --data-dir DIR" if n == "imagefolder" else "") for n, i in DATASETS.items() if i.in_chans == chans]
    return ", ".join(f"--dataset {n}" for n in names)


def check_same_classes(trained: tuple[str, ...] | None, info: Any, source: Any) -> None:
    """``ValueError`` if the weights name their classes (``trained``) and the data ``info`` describes has others:
    scores against shifted labels would mean nothing."""
    if trained and info.classes and tuple(trained) != tuple(info.classes):
        from .data import class_difference

        change = class_difference(trained, info.classes, "only in the weights", "only in the data")
        raise ValueError(
            f"{source} was trained on other classes than the data in {info.default_dir} has ({change}): "
            "give the data it was trained on (--data-dir)"
        )
