"""Scoring classifiers: a model over a loader, a run folder or weights file on a dataset, learning curves.

::

    from parnet.evaluate import evaluate, plot
    evaluate("runs/demo")        # raw, EMA and re-parameterized top-1/top-5 on the run's dataset
    plot("runs/demo")            # runs/demo/curves.png

Weights are read strictly (:mod:`parnet.weights`): the header may describe an architecture only,
and every tensor must fit the model by name, shape and dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "TrainedOn",
    "check_fits_dataset",
    "evaluate",
    "evaluate_model",
    "load_trained_model",
    "load_weights",
    "plot",
    "run_weights_file",
    "run_weights_files",
    "trained_on",
]

RUN_WEIGHTS = ("last_ema.safetensors", "last.safetensors")  # a run folder's weights files, EMA first
# A finished run's re-parameterized weights, EMA first: what is left where the others were pruned to save space.
FUSED_WEIGHTS = ("ema_fused.safetensors", "fused.safetensors")


def run_weights_files(run: str | os.PathLike) -> list[Path]:
    """Run folder ``run``'s weights files, EMA first: ``last*`` where kept, else the fused ones of a finished run."""
    run = Path(run)
    for names in (RUN_WEIGHTS, FUSED_WEIGHTS):
        files = [run / f for f in names if (run / f).is_file()]
        if files:
            return files
    raise FileNotFoundError(
        f"{run} holds no {', '.join(RUN_WEIGHTS + FUSED_WEIGHTS)}: is it a `parnet train` run folder?"
    )


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``parnet train`` run folder (its config, checkpoint, metrics or weights), not a
    folder of images."""
    from .checkpoint import RUN_FILES

    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (*RUN_FILES, *FUSED_WEIGHTS, "config.yaml"))


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
    from .io import header_img_size

    path = Path(path)
    if path.is_dir():
        from .settings import read_yaml

        weights = next((path / f for f in RUN_WEIGHTS + FUSED_WEIGHTS if (path / f).is_file()), None)
        header = trained_on(weights) if weights is not None else TrainedOn()
        cfg = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
        dataset, img_size = header.dataset or cfg.get("dataset"), header.img_size or cfg.get("img_size") or 0
        return TrainedOn(dataset, cfg.get("data_dir") or header.data_dir, img_size, header.class_names)
    meta = _weights_header(path)
    if meta is not None:
        size = header_img_size(meta, str(path))
        return TrainedOn(meta.get("dataset"), meta.get("data_dir"), size, _header_class_names(meta, str(path)))
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
    in_run = path.name in RUN_WEIGHTS + FUSED_WEIGHTS and (path.parent / "config.yaml").is_file()
    ema = meta.get("ema") == "True" or (in_run and "ema" in path.name)
    fused = meta.get("fused") == "True" or (in_run and path.name in FUSED_WEIGHTS)
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


# -- evaluation ---------------------------------------------------------------------------------


def evaluate_model(
    model: Any, loader: Any, device: Any = "cpu", amp_dtype: Any = None, channels_last: bool = False
) -> dict[str, Any]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` over ``loader``, summed over all ranks.

    Also returns ``n`` (images) and ``preds`` (this rank's predicted classes, a tensor).
    """
    import torch

    from .engine import all_reduce_sum

    model.eval()
    device = torch.device(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss sum, count
    preds = []
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
            totals[3] += len(y)
            preds.append(top[:, 0].cpu())
    totals = all_reduce_sum(totals)
    n = max(float(totals[3]), 1.0)
    return {
        "top1": 100 * float(totals[0]) / n,
        "top5": 100 * float(totals[1]) / n,
        "loss": float(totals[2]) / n,
        "n": int(totals[3]),
        "preds": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
    }


def load_weights(path: str | os.PathLike, device: str = "cpu"):
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


def load_trained_model(path: str | os.PathLike, device: str = "cpu", use_ema: bool = True) -> tuple[Any, str]:
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
        return _authors_model(path, checkpoint, device, ema), f"{path} ({'EMA' if ema else 'raw'} weights)"
    return load_weights(path, device), str(path)


def _authors_model(path: Path, checkpoint: dict[str, Any], device: Any, ema: bool) -> Any:
    """The network of an authors' checkpoint read from ``path``: its EMA weights or its raw ones."""
    from .official import load_official

    try:
        return load_official(checkpoint, use_ema=ema).to(device).eval()
    except ValueError as e:  # the message names the key, this the file
        raise ValueError(f"{path}: {e}") from None


def _build_from_header(meta: dict[str, str], state: dict[str, Any], source: str) -> Any:
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
        shown = ", ".join(trained[:10]) + (", ..." if len(trained) > 10 else "")
        data = ", ".join(info.classes[:10]) + (", ..." if len(info.classes) > 10 else "")
        raise ValueError(
            f"{source} was trained on the classes {shown}; the data in {info.default_dir} has {data}: "
            "give the data it was trained on (--data-dir)"
        )


def evaluate(
    checkpoint: str | os.PathLike,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    workers: int = 2,
    test_subset: int = 0,
    device: str | None = None,
    official: bool | None = None,
    progress: bool = False,
    img_size: int = 0,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 of a checkpoint on a dataset's test split, and of its re-parameterized form.

    ``checkpoint`` is a run folder (its raw and EMA weights are both scored), a ``.safetensors``
    file of this project, or an authors' ``.pth.tar`` (``load_official``, EMA weights when present).
    ``dataset`` defaults to the run's, ``img_size`` (0) to the size it trained at (the dataset's
    default where that is not recorded). Returns ``{"raw": {...}, "raw_fused": {...}, "ema": ...}``; a file
    written by ``parnet quantize`` scores as its precision and engine (``{"int8:openvino": {...}}``).
    """
    import torch

    from .data import build_datasets
    from .deployed import is_deployed_file, load_deployed
    from .devices import check_device
    from .formats import is_torch_checkpoint
    from .layers import has_fusable_blocks, reparameterize
    from .loaders import build_loaders

    path = Path(checkpoint)
    nets: dict[str, Any] = {}
    dev = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dataset = None  # the dataset the weights were trained on (their run's config.yaml, or their header)
    trained = trained_on(path)
    asked_size, img_size = img_size, img_size or trained.img_size
    if path.is_dir():
        if official:
            raise ValueError(f"--official reads an authors' .pth.tar file; {path} is a run folder (leave it out)")
        files = run_weights_files(path)  # EMA first; either may be pruned
        nets = {weights_label(f): load_weights(f, str(dev)) for f in reversed(files)}  # raw first
        run_dataset = trained.dataset
    elif official or (official is None and path.is_file() and is_torch_checkpoint(path)):  # by content
        from .official import read_checkpoint

        if is_deployed_file(path):
            raise ValueError(f"--official reads an authors' .pth.tar file; {path.name} is a `parnet quantize` "
                             "engine file (leave --official out)")  # fmt: skip

        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        ckpt = read_checkpoint(path)
        nets["raw"] = _authors_model(path, ckpt, dev, ema=False)
        if "state_dict_ema" in ckpt:
            nets["ema"] = _authors_model(path, ckpt, dev, ema=True)
    elif is_deployed_file(path):  # written by `parnet quantize`: runs on its engine, on the CPU
        if dev.type != "cpu" and device is not None:
            raise ValueError(f"{path.name} runs on its engine on the CPU, not on {device}: leave out --device")
        engine_net = load_deployed(path)
        nets[f"{engine_net.precision}:{engine_net.engine}"] = engine_net  # its rows say what runs, e.g. int8:openvino
        run_dataset = engine_net.dataset
        trained = TrainedOn(run_dataset, engine_net.data_dir, 0, tuple(engine_net.class_names or ()) or None)
        dev = torch.device("cpu")
        built = engine_net.height  # the one size the engine model was built for
        if asked_size and asked_size != built:
            raise ValueError(
                f"{path} was built for {built}x{engine_net.width} images, not {asked_size}: leave out the image "
                f"size, or quantize again at that size (`parnet quantize ... --resolution {asked_size}`)"
            )
        img_size = built
    else:
        nets[weights_label(path)] = load_weights(path, str(dev))
        run_dataset = trained.dataset  # from the weights file's header
    dataset = dataset or run_dataset or "fashion_mnist"
    if dataset == run_dataset:  # the data the weights were trained on: where it was, unless told otherwise
        data_dir = data_dir or trained.data_dir
    first = next(iter(nets.values()))
    check_fits_dataset(first, path, dataset, run_dataset)  # before looking for the data, which may not be there
    _, test_set, info = build_datasets(dataset, data_dir, test_subset=test_subset, test_only=True, img_size=img_size)
    if run_dataset is None and dataset == "imagefolder":  # weights that say nothing of their data (an authors'
        # file): their images prepared as `parnet predict` prepares them, from their release's pretrained config
        authors = path.is_file() and is_torch_checkpoint(path)
        base = test_set.dataset if isinstance(test_set, torch.utils.data.Subset) else test_set
        from .preprocessing import pretrained_transform

        base.transform = pretrained_transform(first, None, img_size, authors)[0]
    _, loader, _ = build_loaders(test_set, test_set, 1, workers, eval_batch_size=batch_size)
    check_fits_dataset(first, path, dataset, run_dataset, info.num_classes)
    check_same_classes(trained.class_names, info, path)
    out: dict[str, dict[str, float]] = {}
    for name, net in nets.items():
        res = evaluate_model(net, loader, dev)
        out[name] = {k: v for k, v in res.items() if k != "preds"}
        if has_fusable_blocks(net):
            fused = reparameterize(net)
            res_f = evaluate_model(fused, loader, dev)
            out[f"{name}_fused"] = {k: v for k, v in res_f.items() if k != "preds"}
            out[f"{name}_fused"]["prediction_changes"] = int((res_f["preds"] != res["preds"]).sum())
        if progress:
            print(f"{name}: " + json.dumps(out[name]), flush=True)
    return out


# -- plots --------------------------------------------------------------------------------------


def plot(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Draw the learning curves of a run (loss, accuracy, learning rate per epoch) to ``output`` (default: the run's
    ``curves.png``), in the format its suffix names (``.png``, ``.svg``, ``.pdf``...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .engine import read_metrics
    from .io import atomic_write, image_format

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a run folder: give the folder `parnet train --output` wrote")
    out = Path(output or run_dir / "curves.png")
    figure_format = image_format(out)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no epochs yet")
    epochs = [r["epoch"] + 1 for r in rows]

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(epochs, series("train_loss"), "o-", label="train")
    axes[0].plot(epochs, series("test_loss"), "o-", label="test")
    if "ema_loss" in rows[0]:
        axes[0].plot(epochs, series("ema_loss"), "o-", label="test (EMA)")
    axes[0].set(title="loss", xlabel="epoch")
    axes[1].plot(epochs, series("train_acc"), "o-", label="train (augmented)")
    axes[1].plot(epochs, series("test_top1"), "o-", label="test top-1")
    if "ema_top1" in rows[0]:
        axes[1].plot(epochs, series("ema_top1"), "o-", label="test top-1 (EMA)")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[2].plot(epochs, series("lr"), "o-")
    axes[2].set(title="learning rate (last step of the epoch)", xlabel="epoch")
    for ax in axes[:2]:
        ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    try:
        with atomic_write(out) as tmp:
            fig.savefig(tmp, format=figure_format, dpi=100)
    finally:  # a failed write must not leave the figure open in a library user's process
        plt.close(fig)
    return out
