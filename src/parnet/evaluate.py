"""Scoring a run folder, a weights file or a ``parnet quantize`` file on a dataset's test split.

::

    from parnet.evaluate import evaluate
    evaluate("runs/demo")        # raw, EMA and re-parameterized top-1/top-5 on the run's dataset

What the files hold and how they are read: :mod:`parnet.trained`; the scoring itself:
:mod:`parnet.scoring`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .scoring import check_fits_dataset, check_same_classes, evaluate_model
from .trained import TrainedOn, authors_model, load_weights, run_weights_files, trained_on, weights_label

__all__ = ["evaluate"]


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
        nets["raw"] = authors_model(path, ckpt, dev, ema=False)
        if "state_dict_ema" in ckpt:
            nets["ema"] = authors_model(path, ckpt, dev, ema=True)
    elif is_deployed_file(path):  # written by `parnet quantize`: runs on its engine, on the CPU
        if dev.type != "cpu" and device is not None:
            raise ValueError(f"{path.name} runs on its engine on the CPU, not on {device}: leave out --device")
        engine_net = load_deployed(path)
        nets[f"{engine_net.precision}:{engine_net.engine}"] = engine_net  # its rows say what runs, e.g. int8:openvino
        run_dataset = engine_net.dataset
        names = tuple(engine_net.class_names or ()) or None
        trained = TrainedOn(run_dataset, engine_net.data_dir, 0, names, engine_net.image_prep)
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
    image_prep = trained.image_prep_on(dataset, first)
    _, test_set, info = build_datasets(
        dataset, data_dir, test_subset=test_subset, test_only=True, img_size=img_size, image_prep=image_prep
    )
    _, loader, _ = build_loaders(test_set, test_set, 1, workers, eval_batch_size=batch_size)
    check_fits_dataset(first, path, dataset, run_dataset, info.num_classes)
    check_same_classes(trained.class_names, info, path)
    out: dict[str, dict[str, float]] = {}
    for name, net in nets.items():
        res = evaluate_model(net, loader, dev)
        out[name] = {k: v for k, v in res.items() if k != "preds"}
        if has_fusable_blocks(net):
            fused = reparameterize(net)
            res_f = evaluate_model(fused, loader, dev, reference=res["preds"])
            out[f"{name}_fused"] = {k: v for k, v in res_f.items() if k not in ("preds", "changes")}
            out[f"{name}_fused"]["prediction_changes"] = res_f["changes"]
        if progress:
            print(f"{name}: " + json.dumps(out[name]), flush=True)
    return out
