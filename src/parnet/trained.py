"""The models training left behind: run folders, weights files of ours and the authors' checkpoints.

::

    from parnet.trained import load_trained_model, trained_on
    model, source = load_trained_model("runs/demo")   # a run folder's EMA weights, in eval mode
    trained_on("runs/demo").dataset                   # "fashion_mnist": the data it was trained on

A run folder (``parnet train --output``) holds ``last.safetensors`` and ``last_ema.safetensors``, or
once a finished run was pruned only its re-parameterized ``fused`` / ``ema_fused`` ones. Weights are
read strictly (:mod:`parnet.weights`): the header may describe an architecture only, and every tensor
must fit the model by name, shape and dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import (
    CONFIG_FILE,
    EMA_WEIGHTS_FILE,
    FUSED_WEIGHTS_FILES,
    METRICS_FILE,
    RESULTS_FILE,
    RUN_FILES,
    STATE_FILE,
    WEIGHTS_FILE,
    run_started,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "RUN_WEIGHTS",
    "TrainedOn",
    "holds_ema_weights",
    "is_run_folder",
    "load_trained_model",
    "load_weights",
    "run_weights_file",
    "run_weights_files",
    "trained_on",
    "weights_label",
]

RUN_WEIGHTS = (EMA_WEIGHTS_FILE, WEIGHTS_FILE)  # a run folder's weights files, EMA first


def run_weights_files(run: str | os.PathLike) -> list[Path]:
    """Run folder ``run``'s weights files, EMA first: ``last*`` where kept, else the fused ones of a finished run."""
    run = Path(run)
    for names in (RUN_WEIGHTS, FUSED_WEIGHTS_FILES):
        files = [run / f for f in names if (run / f).is_file()]
        if files:
            return files
    ran = any((run / name).is_file() for name in (STATE_FILE, METRICS_FILE, RESULTS_FILE))
    if run_started(run) and not ran:
        raise FileNotFoundError(  # a run stopped (or still) in its first epoch: no weights yet
            f"{run} holds no weights yet: no epoch of its run has finished (still training, or stopped before: "
            f"`parnet train --output {run} --resume` starts it again)"
        )
    raise FileNotFoundError(
        f"{run} holds no {', '.join(RUN_WEIGHTS + FUSED_WEIGHTS_FILES)}: is it a `parnet train` run folder?"
    )


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``parnet train`` run folder (its config, checkpoint, metrics or weights), not a
    folder of images."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (*RUN_FILES, *FUSED_WEIGHTS_FILES, CONFIG_FILE))


def run_weights_file(run: str | os.PathLike, use_ema: bool = True) -> Path:
    """The weights file of run folder ``run``: its EMA weights when kept and ``use_ema``, else its raw ones."""
    files = run_weights_files(run)
    return files[0] if use_ema else files[-1]


@dataclass(frozen=True)
class TrainedOn:
    """The data a ``parnet train`` run folder or weights file says it was trained on (``None`` where unsaid).

    ``img_size`` 0: the dataset's default size (files written before the size was a setting).
    """

    dataset: str | None = None
    data_dir: str | None = None
    img_size: int = 0
    class_names: tuple[str, ...] | None = None  # in label order (files written before they were saved: None)
    image_prep: dict[str, Any] | None = None  # an image folder's, where not ImageNet's (data.image_prep_of)

    def image_prep_on(self, dataset: str, model: Any) -> dict[str, Any] | None:
        """How ``dataset``'s images are prepared for these weights (``model``): the run's way on its own data; for
        weights that say nothing of their data (an authors' file) on an image folder, as their release's
        pretrained config says (as ``parnet predict`` prepares them); else the dataset's own (``None``)."""
        if self.dataset is None and dataset == "imagefolder":
            from .data import image_prep_of

            return image_prep_of(getattr(model, "pretrained_cfg", None))
        return self.image_prep if dataset == self.dataset else None


def _header_class_names(meta: dict[str, str], source: str) -> tuple[str, ...] | None:
    """The ``class_names`` of a weights file's header: a JSON list of strings, one per class; ``None`` if absent."""
    if "class_names" not in meta:
        return None
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: its class_names is not a JSON list of names: {meta['class_names'][:80]!r}")
    return tuple(names) or None  # a run from before names were known for its dataset saved []


def trained_on(path: str | os.PathLike) -> TrainedOn:
    """What ``path`` (a weights file: its header; a run folder: its weights files' header, and its
    ``config.yaml`` for the data folder and for runs whose header predates a field) says of its training data."""
    from .io import header_image_prep, header_img_size

    path = Path(path)
    if path.is_dir():
        from .settings import read_yaml

        weights = next((path / f for f in RUN_WEIGHTS + FUSED_WEIGHTS_FILES if (path / f).is_file()), None)
        header = trained_on(weights) if weights is not None else TrainedOn()
        cfg = read_yaml(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
        dataset, img_size = header.dataset or cfg.get("dataset"), header.img_size or cfg.get("img_size") or 0
        data_dir = cfg.get("data_dir") or header.data_dir
        return TrainedOn(dataset, data_dir, img_size, header.class_names, header.image_prep)
    meta = _weights_header(path)
    if meta is not None:
        size, names = header_img_size(meta, str(path)), _header_class_names(meta, str(path))
        return TrainedOn(meta.get("dataset"), meta.get("data_dir"), size, names, header_image_prep(meta, str(path)))
    return TrainedOn()


def holds_ema_weights(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a weights file a run wrote of its EMA weights (its header says so)."""
    return (_weights_header(Path(path)) or {}).get("ema") == "True"


def weights_label(path: str | os.PathLike) -> str:
    """The row ``parnet eval`` scores a weights file of ours under: ``raw`` or ``ema``, ``_fused`` when it holds
    re-parameterized weights. Its header says so; a run folder's own file names too (files written before the
    fused EMA weights' header said ``ema``)."""
    path = Path(path)
    meta = _weights_header(path) or {}
    in_run = path.name in RUN_WEIGHTS + FUSED_WEIGHTS_FILES and (path.parent / CONFIG_FILE).is_file()
    ema = meta.get("ema") == "True" or (in_run and "ema" in path.name)
    fused = meta.get("fused") == "True" or (in_run and path.name in FUSED_WEIGHTS_FILES)
    return ("ema" if ema else "raw") + ("_fused" if fused else "")


def _weights_header(path: Path) -> dict[str, str] | None:
    """The metadata of a ``.safetensors`` file; ``None`` for anything else, or one unreadable (the loader says why)."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - not readable as safetensors
        return None


# -- loading ------------------------------------------------------------------------------------


def load_weights(path: str | os.PathLike, device: str = "cpu") -> nn.Module:
    """The model of a ``.safetensors`` file of ours: a run's ``last.safetensors`` or what ``save_model`` wrote.

    Authors' checkpoints, and the choice between a run's raw and EMA weights: :func:`load_trained_model`.
    """
    import torch

    from .io import describe_header_data, read_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state, meta = read_safetensors(path, None, device)
    if "timm_model" not in meta:
        from .io import load_model

        return load_model(path, device)
    model = _build_from_header(meta, state, str(path)).to(torch.device(device)).eval()
    describe_header_data(model, meta, str(path))
    return model


def load_trained_model(path: str | os.PathLike, device: str = "cpu", use_ema: bool = True) -> tuple[nn.Module, str]:
    """The model of a run folder, a weights file of ours or an authors' checkpoint, and where its weights came from.

    ``use_ema``: the run's EMA weights (``last_ema.safetensors``) or the authors' ``state_dict_ema``
    when they are there; a file of ours holds one set of weights and is read as it is.
    """
    from .formats import is_torch_checkpoint
    from .official import read_checkpoint

    path = Path(path)
    if path.is_dir():
        path = run_weights_file(path, use_ema)
        return load_weights(path, device), str(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_torch_checkpoint(path):  # an authors' file (load_official refuses anything else clearly)
        checkpoint = read_checkpoint(path)
        ema = use_ema and "state_dict_ema" in checkpoint
        return authors_model(path, checkpoint, device, ema), f"{path} ({'EMA' if ema else 'raw'} weights)"
    return load_weights(path, device), str(path)


def authors_model(path: Path, checkpoint: dict[str, Any], device: torch.device | str, ema: bool) -> nn.Module:
    """The network of an authors' checkpoint read from ``path``: its EMA weights or its raw ones."""
    from .official import load_official

    try:
        return load_official(checkpoint, use_ema=ema).to(device).eval()
    except ValueError as e:  # the message names the key, this the file
        raise ValueError(f"{path}: {e}") from None


def _build_from_header(meta: dict[str, str], state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The model a training run's weights file describes (``_weights_metadata``), with ``state`` loaded,
    strictly: a registered name, architecture keywords only, bounded sizes (:mod:`parnet.weights`)."""
    from .factory import check_model_name, create_classifier
    from .io import header_classes_and_chans, header_flag, header_json
    from .layers import reparameterize
    from .weights import architecture_kwargs, build_checked

    name = check_model_name(meta["timm_model"])
    kwargs = architecture_kwargs(header_json(meta, "model_kwargs", source), f"{source}: model_kwargs")
    num_classes, in_chans = header_classes_and_chans(meta, source)
    fused = header_flag(meta, "fused", source)

    def build() -> Any:
        model = create_classifier(name, num_classes, in_chans, kwargs)
        return reparameterize(model, inplace=True) if fused else model

    return build_checked(build, state, source)
