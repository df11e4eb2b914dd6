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

``model_name`` with weights that name their dataset is refused (they say how their images are prepared); with
an authors' file or a bare file of ours it must name their architecture; with any other weights file (timm's
own ``model.safetensors`` or ``pytorch_model.bin``) timm builds the model from the file, as it loads an offline
copy of released weights.
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

__all__ = [
    "Predictor",
    "check_image_headers",
    "image_files",
    "image_items",
    "input_preparation",
    "load_predictor",
    "preprocessing_metadata",
    "read_image",
    "read_item",
]

# How an image file is read before `preprocessing` (parnet.images.prepare_image), for an exported file's users.
IMAGE_READING = (
    "turned upright by its EXIF orientation; 16-bit images scaled to 8 bits (/257), float ones from 0..1 or "
    "0..255; transparent pixels blended onto white; then converted to image_mode (parnet.images.prepare_image)"
)

# Size of a dataset's images before its own transform (Fashion-MNIST's pads 28 to 32).
NATIVE_SIZE = {"fashion_mnist": 28}

# What Predictor.predict takes: an image file, a folder of them, or an image already in memory.
ImageInput = str | os.PathLike | Image.Image


@dataclass
class Predictor:
    """A model in eval mode with the preprocessing and class names of its training data."""

    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    class_names: list[str]
    image_mode: str  # "RGB" or "L": what the transform expects
    source: str  # where the weights came from, for the report

    @torch.no_grad()
    def predict(
        self, images: Sequence[ImageInput] | ImageInput, top_k: int = 5, batch_size: int = 32
    ) -> list[dict[str, Any]]:
        """``[{"image": name, "top": [{"index", "label", "probability"}, ...]}, ...]``, best first, one per image.

        ``images``: image files, folders (their image files, :func:`image_files`) and PIL images, or one of these;
        a file is named by its path, a PIL image ``<image i>`` by its place in ``images``. Every file's header is
        read before any image is decoded, so a file that is not an image fails early; then images are decoded,
        prepared and run ``batch_size`` at a time, so only one batch of them is in memory.
        """
        for name, value in (("top_k", top_k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        items = image_items(images)
        check_image_headers([item for _, item in items if not isinstance(item, Image.Image)])
        weight = next(self.model.parameters(), None)  # an engine file's module holds none: it runs on the CPU
        device = weight.device if weight is not None else torch.device("cpu")
        k = min(top_k, len(self.class_names))
        results = []
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            x = torch.stack([self.transform(read_item(name, item, self.image_mode)) for name, item in batch])
            top = self.model(x.to(device)).softmax(-1).topk(k)
            for (name, _), values, indices in zip(batch, top.values, top.indices):
                labels = [
                    {"index": int(i), "label": self.class_names[int(i)], "probability": float(p)}
                    for p, i in zip(values, indices)
                ]
                results.append({"image": name, "top": labels})
        return results


def read_item(name: str, item: Path | Image.Image, mode: str = "RGB") -> Image.Image:
    """An item of :func:`image_items` in ``mode``: a file read as training reads image files, a PIL image
    prepared alike (:func:`parnet.images.prepare_image`)."""
    if not isinstance(item, Image.Image):
        return read_image(item, mode)
    from .images import prepare_image

    return prepare_image(item, mode, name)


def read_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """An image file as a PIL image in ``mode``, read as for training (:func:`parnet.images.open_image`: upright,
    8-bit, transparency on white); ``ValueError`` for a file that is not an image."""
    from .images import open_image

    return open_image(path, mode)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files in ``folder`` (not in its subfolders), sorted: those an image-folder dataset reads
    (:func:`parnet.images.is_image_file`: an extension Pillow opens, not hidden)."""
    from .images import is_image_file

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if is_image_file(p) and p.is_file())
    if not files:
        raise ValueError(
            f"{folder} holds no image files (.jpg, .png, ... not hidden; its subfolders are not searched): "
            "give image files, or a folder that holds some"
        )
    return files


def image_items(images: Sequence[ImageInput] | ImageInput) -> list[tuple[str, Path | Image.Image]]:
    """(name in the results, file or PIL image) of each image, folders replaced by their image files (a PIL
    image is named ``<image i>`` by its place in ``images``); one image alone is taken as a list of one."""
    if isinstance(images, (str, os.PathLike, Image.Image)):  # one image, not its characters
        images = [images]
    items: list[tuple[str, Path | Image.Image]] = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            items.append((f"<image {i}>", image))
        elif isinstance(image, (str, os.PathLike)) and Path(image).is_dir():
            items += [(str(f), f) for f in image_files(image)]
        elif isinstance(image, (str, os.PathLike)):
            items.append((str(image), Path(image)))
        else:
            raise ValueError(f"images are files, folders or PIL images, got a {type(image).__name__}")
    return items


def check_image_headers(paths: list[Path]) -> None:
    """Refuse missing files, and files whose header Pillow cannot read (:func:`parnet.data.check_image_files`,
    which lists them all), before any image is decoded and the model runs."""
    from .data import check_image_files

    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no image file at {', '.join(missing)}")
    if paths:  # named by the folder that holds them all
        folder = Path(os.path.commonpath([os.path.abspath(p.parent) for p in paths]))
        check_image_files(folder, [(str(p), 0) for p in paths])


def load_predictor(
    run: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    use_ema: bool = True,
    device: str = "cpu",
) -> Predictor:
    """A :class:`Predictor` from a run folder, a checkpoint file, or a timm model name alone (its released weights).

    ``model_name`` alone: timm downloads its pretrained weights. With ``checkpoint`` it is refused where the
    weights name the dataset they were trained on (a run's files: they say how their images are prepared);
    with an authors' file or a bare file of ours it must name the weights' architecture, and its pretrained
    config sets the preprocessing (e.g. ``parnet_s_official.in1k`` for an authors' ParNet-S); any other
    weights file (timm's ``model.safetensors``, ``pytorch_model.bin``, a timm training checkpoint) is loaded into
    ``model_name`` as timm loads an offline copy of its pretrained weights, prepared as for ``model_name`` alone.
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
    from .factory import check_model_name
    from .official import is_timm_weights
    from .trained import holds_ema_weights, load_trained_model, trained_on

    model_name = check_model_name(model_name) if model_name else None
    device = str(check_device(device))
    if checkpoint is not None and is_deployed_file(checkpoint):
        return _engine_predictor(Path(checkpoint), model_name, use_ema, device)
    if checkpoint is not None and not use_ema and holds_ema_weights(checkpoint):
        raise ValueError(
            f"{checkpoint} holds a run's EMA weights only: leave out --raw, or give the run folder (or its "
            "last.safetensors) for the raw weights"
        )
    weights = run if run is not None else checkpoint
    if weights is None:
        model, source = _load_pretrained(str(model_name), device)
        return Predictor(model.eval(), *input_preparation(model, None, model_name), source)
    if model_name:
        dataset = trained_on(weights).dataset
        if dataset is not None:  # as for an engine file: a name would only contradict them
            raise ValueError(
                f"{weights}: the weights say how their images are prepared (dataset {dataset}): leave out --model"
            )
        if checkpoint is not None and is_timm_weights(Path(checkpoint)):
            if not use_ema:
                raise ValueError(
                    f"{checkpoint} is read as timm reads a pretrained file (a checkpoint's EMA weights where it "
                    "holds them): leave out --raw"
                )
            model, source = _load_timm_file(model_name, Path(checkpoint), device)
            return Predictor(model.eval(), *input_preparation(model, None, model_name), source)
    model, source = load_trained_model(weights, device, use_ema)
    if model_name:
        _check_architecture(model, model_name, weights)
    model.eval()
    return Predictor(model, *input_preparation(model, weights, model_name), source)


def _engine_predictor(path: Path, model_name: str | None, use_ema: bool, device: str) -> Predictor:
    """A ``parnet quantize`` file on its engine, its images prepared for the dataset and size it was built for."""
    from .deployed import load_deployed
    from .trained import TrainedOn

    if model_name:
        raise ValueError(f"{path.name} says how its images are prepared (its dataset and size): leave out --model")
    if not use_ema:
        raise ValueError(f"{path.name} holds the one set of weights it was quantized from: leave out --raw")
    if torch.device(device).type != "cpu":
        raise ValueError(f"{path.name} runs on its engine on the CPU, not on {device}: leave out --device")
    module = load_deployed(path)
    names = tuple(module.class_names or ()) or None
    trained = TrainedOn(module.dataset, module.data_dir, module.height, names, module.image_prep)
    transform, mode = dataset_transform(module.dataset, module.height, module.image_prep)
    source = f"{path} ({module.precision}:{module.engine})"
    return Predictor(module, transform, _class_names(trained, module.num_classes), mode, source)


def input_preparation(
    model: nn.Module, weights: str | os.PathLike | None = None, model_name: str | None = None, img_size: int = 0
) -> tuple[Callable[[Image.Image], torch.Tensor], list[str], str]:
    """(transform, class names, image mode) of ``model``'s inputs, as this module's docstring says: from the
    data ``weights`` (a run folder or file, or ``None``) were trained on, else from timm's pretrained config;
    to ``img_size`` (0: the size the weights trained at, where they say)."""
    from .formats import is_torch_checkpoint
    from .preprocessing import pretrained_transform
    from .trained import TrainedOn, trained_on

    trained = trained_on(weights) if weights is not None else TrainedOn()
    names = _class_names(trained, model.num_classes)
    if trained.dataset is not None:
        transform, mode = dataset_transform(trained.dataset, img_size or trained.img_size, trained.image_prep)
    else:
        authors = weights is not None and Path(weights).is_file() and is_torch_checkpoint(Path(weights))
        transform, mode = pretrained_transform(model, model_name, img_size or trained.img_size, authors)
    return transform, names, mode


def preprocessing_metadata(
    model: nn.Module, weights: str | os.PathLike | None = None, model_name: str | None = None, img_size: int = 0
) -> dict[str, str]:
    """What an exported file's input is, for its users (``parnet export`` writes it into each file): how an image
    file is read (``image_reading``), the transform ``parnet predict`` then applies (torchvision's description
    of it), the colour mode and the class names."""
    return describe_preparation(*input_preparation(model, weights, model_name, img_size))


def describe_preparation(
    transform: Callable[[Image.Image], torch.Tensor], names: list[str], mode: str
) -> dict[str, str]:
    """The metadata of :func:`preprocessing_metadata` for ``transform``: torchvision's description of it
    (``preprocessing``) and the same as JSON, one object per step with its parameters (``preprocessing_steps``,
    for a program to follow), the image reading, colour mode and class names."""
    return {
        "image_reading": IMAGE_READING,
        "preprocessing": repr(transform),
        "preprocessing_steps": json.dumps(transform_steps(transform)),
        "image_mode": mode,
        "class_names": json.dumps(names),
    }


def transform_steps(transform: Any) -> list[dict[str, Any]]:
    """``transform``'s steps in order (``Compose``es flattened), each ``{"op": class name, **its parameters}``:
    torchvision's and timm's transforms keep their parameters as attributes (``Resize``: size, interpolation,
    max_size, antialias; ``Normalize``: mean, std)."""
    from enum import Enum

    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value  # InterpolationMode.BICUBIC -> "bicubic"
        if isinstance(value, torch.Tensor):
            return [round(v, 6) for v in value.flatten().tolist()]
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)

    if hasattr(transform, "transforms"):  # Compose
        return [step for inner in transform.transforms for step in transform_steps(inner)]
    params = {k: plain(v) for k, v in vars(transform).items() if not k.startswith("_") and k != "training"}
    return [{"op": type(transform).__name__, **params}]


# -- weights -------------------------------------------------------------------------------------


def _load_pretrained(name: str, device: str) -> tuple[nn.Module, str]:
    from .factory import create_pretrained

    model = create_pretrained(name, offline=f"pass the file as --checkpoint FILE with --model {name}")
    return model.to(device), f"timm pretrained {name}"


def _load_timm_file(name: str, path: Path, device: str) -> tuple[nn.Module, str]:
    """``name`` with the weights of ``path``, loaded as timm loads an offline copy of released weights."""
    from .factory import create_pretrained

    return create_pretrained(name, file=path).to(device), f"{path} (timm {name})"


def _check_architecture(model: nn.Module, model_name: str, weights: str | os.PathLike) -> None:
    """Refuse a ``model_name`` of another architecture than ``model`` (the weights' network): its pretrained
    config would prepare the images for another network (another size, statistics, classes).

    The named model is built empty (on the meta device) with the weights' class count and input channels,
    re-parameterized if they are, and compared by its tensors' names and shapes (and ParNet's input form,
    which has none)."""
    from .factory import create_model
    from .layers import is_reparameterized, reparameterize

    fused = is_reparameterized(model)
    in_chans = getattr(model, "in_chans", 3)

    def build() -> nn.Module:
        named = create_model(
            model_name.split(".")[0], pretrained=False, num_classes=model.num_classes, in_chans=in_chans
        )
        return reparameterize(named, inplace=True) if fused else named

    try:
        with torch.device("meta"):  # shapes only: no memory, no initialization
            named = build()
    except (RuntimeError, NotImplementedError):  # a network whose construction or fusion reads tensor values
        named = build()
    if _shapes(named) == _shapes(model) and getattr(named, "small_input", None) == getattr(model, "small_input", None):
        return
    same = _same_architecture_names(model)
    hint = f" (registered: {', '.join(same)})" if same else ""
    raise ValueError(
        f"--model {model_name} is {_describe(named)}, but {weights} holds {_describe(model)}: leave out --model, "
        f"or name a model of the weights' architecture{hint}"
    )


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(model: nn.Module) -> str:
    """A network in words: a ParNet by its architecture, any other by its class."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "widths"):
        return f"a {type(model).__name__}"
    form = ", small-input form" if cfg.small_input else ""
    return f"a ParNet of widths {cfg.widths}, head width {cfg.head_width}, blocks {cfg.blocks}{form}"


def _same_architecture_names(model: nn.Module) -> list[str]:
    """The registered ParNet variants with ``model``'s architecture (its tensors: the activation aside)."""
    from dataclasses import replace

    from .model import model_cfgs

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "widths"):
        return []
    return [
        name
        for name, c in model_cfgs.items()
        if replace(c, act=cfg.act, stem_width=c.stem_chs) == replace(cfg, stem_width=cfg.stem_chs)
    ]


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


def dataset_transform(
    dataset: str, img_size: int = 0, image_prep: dict[str, Any] | None = None
) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The dataset's evaluation transform to ``img_size`` (0: its own size), as ``parnet eval`` scores it (an
    image folder's as ``image_prep`` says); for the fixed-size datasets, after resizing an image to the size
    their images have on disk."""
    from torchvision import transforms as T

    from .data import DATASETS, build_transforms, dataset_info

    if dataset not in DATASETS:
        raise ValueError(f"the weights were trained on {dataset!r}, which this version does not know")
    info = dataset_info(dataset, img_size, image_prep)
    mode = "L" if info.in_chans == 1 else "RGB"
    transform = build_transforms(info, train=False)
    if dataset == "imagefolder":  # images of any size: resized and center-cropped by the transform itself
        return transform, mode
    size = NATIVE_SIZE.get(dataset, DATASETS[dataset].img_size)
    resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    return T.Compose([resize, transform]), mode


def format_predictions(results: list[dict[str, Any]], as_json: bool = False) -> str:
    """The report ``parnet predict`` prints: per image, its classes with probabilities (or JSON)."""
    if as_json:
        return json.dumps(results, indent=2, ensure_ascii=False)
    lines = []
    for result in results:
        lines.append(result["image"])
        lines += [f"  {t['probability']:7.2%}  {t['label']}" for t in result["top"]]
    return "\n".join(lines)
