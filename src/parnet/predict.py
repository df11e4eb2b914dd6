"""Top-k classes of image files, from a training run, a checkpoint or a timm model's released weights.

The weights come from a run folder (its EMA weights when it has them), a ``.safetensors`` file of this
project, an authors' ``.pth.tar`` (through :func:`parnet.load_official`, EMA weights when present), a
``parnet quantize`` engine file (``.onnx``, OpenVINO's ``.xml``: run on its engine, on the CPU) or timm's
pretrained download of a model name. Preprocessing and class names follow the data the weights were
trained on:

* a run, or a file written by one (its metadata names the dataset): the dataset's own evaluation
  transform at the size the run trained at (an engine file: the size it was built for), as ``parnet
  eval`` scores it (for Fashion-MNIST and CIFAR after the image is brought to the dataset's size and
  colour mode: Fashion-MNIST images are 28x28 grey, padded to 32 as in training; an image folder's is
  timm's resize and center crop with the folder's ImageNet statistics), and the dataset's class names;
* anything else: timm's ``resolve_data_config`` / ``create_transform`` with the pretrained config of the
  model (``model_name``, the model's own, or that of the released variant with its architecture), and
  ImageNet's class names (``timm.data.ImageNetInfo``) for a 1000-class model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

__all__ = ["Predictor", "input_preparation", "load_predictor", "preprocessing_metadata", "read_image"]

# Size of a dataset's images before its own transform (Fashion-MNIST's pads 28 to 32).
NATIVE_SIZE = {"fashion_mnist": 28}


@dataclass
class Predictor:
    """A model in eval mode with the preprocessing and class names of its training data."""

    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]
    image_mode: str  # "RGB" or "L": what the transform expects
    source: str  # where the weights came from, for the report

    @torch.no_grad()
    def predict(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, top_k: int = 5) -> list[dict[str, Any]]:
        """``[{"image": path, "top": [{"index", "label", "probability"}, ...]}, ...]``, best first.

        Every image is read before the model runs, so a file that is not an image fails early.
        """
        if isinstance(paths, (str, os.PathLike)):  # one image, not its characters
            paths = [paths]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        images = [read_image(p, self.image_mode) for p in paths]
        weight = next(self.model.parameters(), None)  # an engine file's module holds none: it runs on the CPU
        device = weight.device if weight is not None else torch.device("cpu")
        k = min(top_k, len(self.class_names))
        results = []
        for path, image in zip(paths, images):
            probs = self.model(self.transform(image).unsqueeze(0).to(device)).softmax(-1)[0]
            top = probs.topk(k)
            results.append(
                {
                    "image": str(path),
                    "top": [
                        {"index": int(i), "label": self.class_names[int(i)], "probability": float(p)}
                        for p, i in zip(top.values, top.indices)
                    ],
                }
            )
        return results


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """An image file as a PIL image in ``mode``, read as for training (:func:`parnet.images.open_image`: upright,
    8-bit, transparency on white); ``ValueError`` for a file that is not an image."""
    from .images import open_image

    return open_image(path, mode)


def load_predictor(
    run: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    use_ema: bool = True,
    device: str = "cpu",
) -> Predictor:
    """A :class:`Predictor` from a run folder, a checkpoint file, or a timm model name alone (its released weights).

    ``model_name`` with ``checkpoint`` chooses the pretrained config that sets the preprocessing (e.g.
    ``parnet_s_official.in1k`` for an authors' file); alone, timm downloads its pretrained weights.
    ``use_ema``: a run's (or an authors' file's) EMA weights when it has them; ``False`` is refused for a file
    that holds EMA weights alone (a run's ``last_ema.safetensors``, an engine file quantized from them).
    A ``parnet quantize`` file as ``checkpoint`` runs on its engine on the CPU, its images prepared as its
    metadata says (``model_name`` is refused: the file says how).
    """
    if run is not None and checkpoint is not None:
        raise ValueError("give a run folder or a checkpoint file, not both")
    if run is None and checkpoint is None and not model_name:
        raise ValueError("give the weights: a run folder, a checkpoint file, or a model name with released weights")
    from .deployed import is_deployed_file
    from .devices import check_device
    from .evaluate import holds_ema_weights, load_trained_model

    device = str(check_device(device))
    if checkpoint is not None and is_deployed_file(checkpoint):
        return _engine_predictor(Path(checkpoint), model_name, use_ema, device)
    if checkpoint is not None and not use_ema and holds_ema_weights(checkpoint):
        raise ValueError(
            f"{checkpoint} holds a run's EMA weights only: leave out --raw, or give the run folder (or its "
            "last.safetensors) for the raw weights"
        )
    weights = run if run is not None else checkpoint
    if weights is not None:
        model, source = load_trained_model(weights, device, use_ema)
    else:
        model, source = _load_pretrained(str(model_name), device)
    model.eval()
    return Predictor(model, *input_preparation(model, weights, model_name), source)


def _engine_predictor(path: Path, model_name: str | None, use_ema: bool, device: str) -> Predictor:
    """A ``parnet quantize`` file on its engine, its images prepared for the dataset and size it was built for."""
    from .deployed import load_deployed
    from .evaluate import TrainedOn

    if model_name:
        raise ValueError(f"{path.name} says how its images are prepared (its dataset and size): leave out --model")
    if not use_ema:
        raise ValueError(f"{path.name} holds the one set of weights it was quantized from: leave out --raw")
    if torch.device(device).type != "cpu":
        raise ValueError(f"{path.name} runs on its engine on the CPU, not on {device}: leave out --device")
    module = load_deployed(path)
    names = tuple(module.class_names or ()) or None
    trained = TrainedOn(module.dataset, module.data_dir, module.height, names)
    transform, mode = _dataset_transform(module.dataset, module.height)
    source = f"{path} ({module.precision}:{module.engine})"
    return Predictor(module, transform, _class_names(trained, module.num_classes), mode, source)


def input_preparation(
    model: nn.Module, weights: str | os.PathLike | None = None, model_name: str | None = None, img_size: int = 0
) -> tuple[Callable[[Image.Image], torch.Tensor], list[str], str]:
    """(transform, class names, image mode) of ``model``'s inputs, as this module's docstring says: from the
    data ``weights`` (a run folder or file, or ``None``) were trained on, else from timm's pretrained config;
    to ``img_size`` (0: the size the weights trained at, where they say)."""
    from .evaluate import TrainedOn, trained_on
    from .io import is_torch_checkpoint

    trained = trained_on(weights) if weights is not None else TrainedOn()
    names = _class_names(trained, model.num_classes)
    if trained.dataset is not None:
        transform, mode = _dataset_transform(trained.dataset, img_size or trained.img_size)
    else:
        authors = weights is not None and Path(weights).is_file() and is_torch_checkpoint(Path(weights))
        transform, mode = _timm_transform(model, model_name, img_size or trained.img_size, authors)
    return transform, names, mode


def preprocessing_metadata(
    model: nn.Module, weights: str | os.PathLike | None = None, model_name: str | None = None, img_size: int = 0
) -> dict[str, str]:
    """What an exported file's input is, for its users (``parnet export`` writes it into each file): the transform
    ``parnet predict`` applies (torchvision's description of it), the colour mode and the class names."""
    transform, names, mode = input_preparation(model, weights, model_name, img_size)
    return {"preprocessing": repr(transform), "image_mode": mode, "class_names": json.dumps(names)}


# -- weights -------------------------------------------------------------------------------------


def _load_pretrained(name: str, device: str) -> tuple[nn.Module, str]:
    import timm

    from . import baselines  # noqa: F401 - registers the baselines (and, through parnet, the variants)

    if not timm.is_model(name.split(".")[0]):
        raise ValueError(f"unknown model {name!r}")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
        raise ValueError(f"{name} has no released weights: pass --checkpoint FILE (or a run folder) with it")
    try:
        model = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError) as e:  # no network, a refused download
        raise ValueError(
            f"cannot get the pretrained weights of {name} ({e}); download them and pass --checkpoint"
        ) from None
    return model.to(device), f"timm pretrained {name}"


# -- preprocessing and names ---------------------------------------------------------------------


def _class_names(trained: Any, num_classes: int) -> list[str]:
    """The names the weights were saved with, else those of their dataset (read from its files where needed),
    else ImageNet's for 1000 classes, else ``class i``."""
    from .data import class_names

    names = list(trained.class_names) if trained.class_names else None
    if names is None and trained.dataset:
        names = class_names(trained.dataset, trained.data_dir)
    if names is None and num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(1000)]
    if names is None or len(names) != num_classes:
        return [f"class {i}" for i in range(num_classes)]
    return names


def _dataset_transform(dataset: str, img_size: int = 0) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The dataset's evaluation transform to ``img_size`` (0: its own size), as ``parnet eval`` scores it;
    for the fixed-size datasets, after resizing an image to the size their images have on disk."""
    from dataclasses import replace

    from torchvision import transforms as T

    from .data import DATASETS, build_transforms

    if dataset not in DATASETS:
        raise ValueError(f"the weights were trained on {dataset!r}, which this version does not know")
    info = DATASETS[dataset]
    mode = "L" if info.in_chans == 1 else "RGB"
    transform = build_transforms(replace(info, img_size=img_size or info.img_size), train=False)
    if dataset == "imagefolder":  # images of any size: resized and center-cropped by the transform itself
        return transform, mode
    size = NATIVE_SIZE.get(dataset, info.img_size)
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    return T.Compose([resize, transform]), mode


def _timm_transform(
    model: nn.Module, model_name: str | None, img_size: int = 0, authors: bool = False
) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """timm's evaluation transform from the pretrained config of ``model_name``, the model or its released variant
    (``authors``: the weights are from an authors' file, whose architecture may be none of the released ones);
    at ``img_size`` where the weights say they were trained at it."""
    import timm
    from timm.data import create_transform, resolve_data_config

    pretrained_cfg = None
    if model_name:
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        pretrained_cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else None
    if pretrained_cfg is None:
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or _variant_cfg(model, authors)
    config = resolve_data_config(pretrained_cfg=pretrained_cfg)
    in_chans = getattr(model, "in_chans", 3)
    config["input_size"] = (in_chans, *((img_size, img_size) if img_size else config["input_size"][1:]))
    if len(config["mean"]) != in_chans:  # a grey model under an RGB config: the channels' average
        config["mean"] = (sum(config["mean"]) / len(config["mean"]),) * in_chans
        config["std"] = (sum(config["std"]) / len(config["std"]),) * in_chans
    return create_transform(**config), "L" if in_chans == 1 else "RGB"


def _variant_cfg(model: nn.Module, authors: bool = False) -> dict[str, Any]:
    """The pretrained config of the released ParNet variant with ``model``'s architecture, else of its form (for
    an authors' file, of their release: their validation's bilinear resizing)."""
    import timm

    from .official import official_variant

    cfg = getattr(model, "cfg", None)
    form = "parnet_cifar_s" if getattr(model, "small_input", False) else "parnet_s"
    name = (official_variant(cfg) if cfg is not None else None) or ("parnet_s_official" if authors else form)
    return timm.models.get_pretrained_cfg(name).to_dict()


def format_predictions(results: list[dict[str, Any]], as_json: bool = False) -> str:
    """The report ``parnet predict`` prints: per image, its classes with probabilities (or JSON)."""
    if as_json:
        return json.dumps(results, indent=2, ensure_ascii=False)
    lines = []
    for result in results:
        lines.append(result["image"])
        lines += [f"  {t['probability']:7.2%}  {t['label']}" for t in result["top"]]
    return "\n".join(lines)
