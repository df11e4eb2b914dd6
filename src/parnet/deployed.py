"""Deployable model files: a trained model quantized (or converted) for an engine, written, read back, scored.

``parnet quantize`` writes one: an ONNX Runtime model (``.onnx``, int8 QDQ or fp32) or an OpenVINO
model (``.xml`` with its ``.bin``), with what it takes to use it (dataset, input size, precision)
in the file's own metadata. :func:`load_deployed` reads either back as a torch module (float32
tensors in and out), which ``parnet eval`` and ``parnet bench`` accept.

Calibration images come from the training split with the test transforms (no augmentation), the
training subset of N images (``build_datasets``: the first N, or for an image folder N spread over
its classes), so calibration never sees the test images it is scored on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .deployment.engines import (
    EngineModule,
    OnnxRuntimeModule,
    OpenVinoModule,
    engine_module,
    openvino_core,
    openvino_ir,
    ort_max_weight_level,
    require,
)
from .deployment.quantize import CALIBRATION_IMAGES, calibration_batches, check_calibration_size, check_precision
from .io import atomic_write, remove_temporaries
from .precision import int8_pairs_saturate

if TYPE_CHECKING:
    from .trained import TrainedOn

SUFFIX = {"onnxruntime": ".onnx", "openvino": ".xml"}
META_KEY = "parnet_deployed"
BIN_HASH_KEY = "parnet_bin_sha256"  # an OpenVINO .xml's record of its .bin (see save_deployed)


@dataclass
class DeployedInfo:
    """What a deployable file says about itself."""

    engine: str
    precision: str
    dataset: str
    in_chans: int
    height: int
    width: int
    num_classes: int
    source: str
    data_dir: str | None = None  # where the data it was scored on is (files written before: None)
    class_names: list[str] | None = None  # in label order (files written before they were saved: None)
    image_prep: dict[str, Any] | None = None  # an image folder's, where not ImageNet's (parnet.data.image_prep_of)
    calibration_images: int | None = None  # int8: the training images it was calibrated on (else, or before: None)


def is_deployed_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a deployable file by its suffix (``.onnx`` or OpenVINO's ``.xml``)."""
    return Path(path).suffix.lower() in SUFFIX.values()


def calibration_loader(
    dataset: str,
    data_dir: str | None,
    images: int,
    batch_size: int = 32,
    img_size: int = 0,
    image_prep: dict[str, Any] | None = None,
) -> Any:
    """``images`` training images (``build_datasets``' training subset), test transforms, in batches (for
    calibration), at ``img_size``, an image folder's prepared as ``image_prep`` says."""
    from .data import build_datasets, build_transforms

    if images < 1:
        raise ValueError(f"--calibration-images must be at least 1, got {images}")
    train, _, info = build_datasets(dataset, data_dir, train_subset=images, img_size=img_size, image_prep=image_prep)
    base = train.dataset if isinstance(train, torch.utils.data.Subset) else train
    base.transform = build_transforms(info, False)  # no augmentation: the images as the model will see them
    return torch.utils.data.DataLoader(train, batch_size=min(batch_size, images), shuffle=False)


def fold_for_engine(model: nn.Module) -> nn.Module:
    """The network an engine converts: ParNet folded; another model re-parameterized (BNs folded by the exporters)."""
    from timm.utils import reparameterize_model

    from .deployment import fold
    from .model import ParNet

    return fold(model).cpu() if isinstance(model, ParNet) else reparameterize_model(model).cpu().eval()


def build(
    model: nn.Module,
    engine: str,
    precision: str,
    calibration: Any,
    example: torch.Tensor,
    threads: int | None = None,
    method: str = "minmax",
    calibration_images: int | None = None,
) -> EngineModule:
    """``model`` (any image classifier; ParNet is folded first) for ``engine`` in ``precision``.

    int8 reads at most ``calibration_images`` of ``calibration`` (default
    :data:`parnet.deployment.quantize.CALIBRATION_IMAGES`, as :func:`parnet.deploy`), so a training loader may be
    given as it is.

    The example and the first calibration batch go through the model's own input check first (ParNet's
    ``check_input``; other timm models have none), whose message says what to pass, not an exporter's.
    """
    check_precision(precision, torch.device("cpu"))
    batches = None
    if precision == "int8":
        cap = CALIBRATION_IMAGES if calibration_images is None else calibration_images
        batches = calibration_batches(calibration, example.shape[1], max_images=cap)
    _check_takes(model, example)
    if batches:
        _check_takes(model, batches[0])
        check_calibration_size(example, batches)
    net = fold_for_engine(model)
    return engine_module(engine, net, example, precision, batches, threads or torch.get_num_threads(), method)


def _check_takes(model: nn.Module, batch: torch.Tensor) -> None:
    """The model's own check of an input batch, where it has one (ParNet's ``check_input``): a ``ValueError``."""
    check = getattr(model, "check_input", None)
    if check is not None:
        check(batch)


def check_resolution(model: nn.Module, img_size: int) -> None:
    """Refuse an image size the model cannot take (its own check, as ``parnet export`` and ``parnet train`` do),
    before any data is read or converted."""
    if img_size and hasattr(model, "in_chans"):
        try:
            _check_takes(model, torch.empty(1, model.in_chans, img_size, img_size, device="meta"))
        except ValueError as e:
            raise ValueError(f"cannot quantize at image size {img_size} (--resolution): {e}") from None


def input_metadata(info: DeployedInfo) -> dict[str, str]:
    """How to prepare an image file for the model ``info`` describes, for runtimes other than this project's: the
    keys ``parnet export`` writes (:func:`parnet.predict.describe_preparation`), as ``parnet predict`` prepares it."""
    from .predict import dataset_transform, describe_preparation

    transform, mode = dataset_transform(info.dataset, info.height, info.image_prep)
    return describe_preparation(transform, list(info.class_names or ()), mode)


def save_deployed(module: EngineModule, path: str | os.PathLike, info: DeployedInfo) -> Path:
    """Write ``module``'s engine model to ``path`` (``.onnx`` or ``.xml`` + ``.bin``), atomically, with ``info``
    (:data:`META_KEY`) and how its inputs are prepared (:func:`input_metadata`) in the file's metadata: ONNX's
    ``metadata_props`` (onnxruntime's ``custom_metadata_map``), OpenVINO's ``rt_info``."""
    path = Path(path)
    want = SUFFIX[info.engine]
    if path.suffix.lower() != want:
        raise ValueError(f"an {info.engine} model is written to a {want} file, got {path.name}")
    meta = {META_KEY: json.dumps(info.__dict__), **input_metadata(info)}
    if isinstance(module, OnnxRuntimeModule):
        import onnx

        model = onnx.load_from_string(module.model)
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, meta)
        remove_temporaries(path.parent, [path.name])  # left by a killed write of this file
        with atomic_write(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    ov_model = module.model.clone()
    for key, value in meta.items():
        ov_model.set_rt_info(value, [key])
    # The .xml records its .bin's hash (a second serialization: the weights' bytes do not change), so that a
    # pair replaced only in part (stopped between the two files) is refused when read, not misread.
    ov_model.set_rt_info(hashlib.sha256(openvino_ir(ov_model)[1]).hexdigest(), [BIN_HASH_KEY])
    graph, weights_bytes = openvino_ir(ov_model)
    if hashlib.sha256(weights_bytes).hexdigest() != ov_model.get_rt_info([BIN_HASH_KEY]).astype(str):
        raise RuntimeError("OpenVINO wrote the same weights differently twice; the file was not written")
    weights = path.with_suffix(".bin")
    remove_temporaries(path.parent, [path.name, weights.name])  # left by a killed write of this pair
    # the weights first, then the graph that names them: a reader never finds an .xml without its .bin
    for data, target in ((weights_bytes, weights), (graph, path)):
        with atomic_write(target) as tmp:
            tmp.write_bytes(data)
    return path


def _recorded_bin_hash(xml_path: Path) -> str | None:
    """The .bin hash an OpenVINO .xml of ours records (``None``: none recorded, or not XML)."""
    import xml.etree.ElementTree as ElementTree

    try:
        node = ElementTree.parse(xml_path).getroot().find(f"rt_info/{BIN_HASH_KEY}")
    except ElementTree.ParseError:
        return None
    return node.get("value") if node is not None else None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_info(path: str | os.PathLike) -> DeployedInfo:
    """The metadata of a deployable file; a clear error for a file that is not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    if not is_deployed_file(path):  # before an engine's parser, whose errors about another format name no file
        raise ValueError(
            f"{path} is not a `parnet quantize` file (an .onnx, or an OpenVINO .xml beside its .bin): write one with "
            "`parnet quantize CHECKPOINT --precision fp32 (or int8) --engine onnxruntime (or openvino)`"
        )
    onnx_file = path.suffix.lower() == ".onnx"
    require("onnxruntime" if onnx_file else "openvino")
    if not onnx_file:  # before OpenVINO reads the pair: a mismatched .bin can make it fail obscurely
        recorded, weights = _recorded_bin_hash(path), path.with_suffix(".bin")
        if recorded is not None and (not weights.is_file() or _sha256(weights) != recorded):
            raise ValueError(
                f"{weights.name} is not the weights file {path.name} was written with (was a write stopped "
                "between the two?): write the model again with `parnet quantize`"
            )
    try:
        if onnx_file:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            text = {p.key: p.value for p in model.metadata_props}.get(META_KEY)
        else:
            ov_model = openvino_core().read_model(str(path))
            text = ov_model.get_rt_info([META_KEY]).astype(str) if ov_model.has_rt_info([META_KEY]) else None
    except Exception as e:  # noqa: BLE001 - the parsers' own errors (protobuf's, OpenVINO's) name no file
        kind = "an ONNX" if onnx_file else "an OpenVINO"
        raise ValueError(f"{path} is not {kind} model that can be read ({type(e).__name__}: {e})") from None
    if text is None:
        raise ValueError(
            f"{path} was not written by `parnet quantize` (no {META_KEY} metadata; a `parnet export` file is for "
            "your own runtime): to run a model here, write it with `parnet quantize CHECKPOINT --precision fp32 "
            "(or int8) --engine onnxruntime (or openvino)`"
        )
    try:
        info = DeployedInfo(**json.loads(text))
        if info.image_prep is not None:
            from .data import check_image_prep

            info.image_prep = check_image_prep(info.image_prep, str(path))
        return info
    except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: its {META_KEY} metadata is not what `parnet quantize` writes ({e})") from None


def load_deployed(path: str | os.PathLike, threads: int | None = None) -> EngineModule:
    """A file written by :func:`save_deployed` as a torch module (float32 NCHW in, logits out)."""
    info = read_info(path)
    threads = threads or torch.get_num_threads()
    shape = (info.in_chans, info.height, info.width)
    if info.engine == "onnxruntime":
        model_bytes = Path(path).read_bytes()
        if info.precision == "int8" and int8_pairs_saturate() and ort_max_weight_level(model_bytes) > 64:
            warnings.warn(
                f"{path} holds 8-bit int8 weights; on this CPU (x86 without VNNI or AMX) ONNX Runtime's int8 "
                "kernels can saturate on them and lose accuracy: quantize the model again on this CPU "
                "(`parnet quantize`), which gives 7-bit weights",
                stacklevel=2,
            )
        module: EngineModule = OnnxRuntimeModule(model_bytes, *shape, info.precision, threads)
    else:
        module = OpenVinoModule(openvino_core().read_model(str(path)), *shape, info.precision, threads)
    module.num_classes = info.num_classes
    module.dataset = info.dataset
    module.data_dir = info.data_dir
    module.class_names = info.class_names
    module.image_prep = info.image_prep
    return module.eval()


def load_trained(checkpoint: str | os.PathLike) -> tuple[nn.Module, TrainedOn]:
    """The model of a run folder or a checkpoint file (EMA weights where kept), and the data it was trained on."""
    from .trained import load_trained_model, trained_on

    return load_trained_model(checkpoint)[0], trained_on(checkpoint)


def quantize_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    precision: str = "int8",
    engine: str = "onnxruntime",
    calibration_images: int = CALIBRATION_IMAGES,
    dataset: str | None = None,
    data_dir: str | None = None,
    method: str = "minmax",
    batch_size: int = 256,
    test_subset: int = 0,
    workers: int = 2,
    img_size: int = 0,
) -> dict[str, Any]:
    """Quantize (or convert) a trained model for ``engine``, write it to ``out`` and score both on the test split.

    ``img_size``: the image side the engine model is built, calibrated and scored at (0: the size the weights
    trained at; an engine model runs at one size). Returns the file, and the fp32 model's and the written
    model's top-1 (percent) on the same images.
    """
    from .checkpoint import unfinished_run
    from .data import build_datasets
    from .loaders import build_loaders
    from .scoring import check_fits_dataset, check_same_classes, evaluate_model

    if Path(out).suffix.lower() != SUFFIX.get(engine):
        raise ValueError(f"an {engine} model is written to a {SUFFIX.get(engine)} file, got {Path(out).name}")
    model, trained = load_trained(checkpoint)
    dataset = dataset or trained.dataset or "fashion_mnist"
    if dataset == trained.dataset:  # another dataset's images are not in the folder of the run's
        data_dir = data_dir or trained.data_dir
    check_fits_dataset(model, checkpoint, dataset, trained.dataset)
    img_size = img_size or trained.img_size
    check_resolution(model, img_size)  # before the datasets are read: a one-line error, not an exporter's
    image_prep = trained.image_prep_on(dataset, model)  # as `parnet eval` prepares them for these weights
    _, test_set, info = build_datasets(
        dataset, data_dir, test_subset=test_subset, img_size=img_size, image_prep=image_prep
    )
    _, test_loader, _ = build_loaders(test_set, test_set, 1, workers, eval_batch_size=batch_size)
    check_fits_dataset(model, checkpoint, dataset, trained.dataset, info.num_classes)
    check_same_classes(trained.class_names, info, checkpoint)
    calibration, calibrated_on = None, None
    if precision == "int8":
        calibration = calibration_loader(
            dataset, data_dir, calibration_images, img_size=img_size, image_prep=image_prep
        )
        calibrated_on = len(calibration.dataset)
        if calibrated_on < calibration_images:  # the training split is smaller than asked for
            warnings.warn(
                f"--calibration-images {calibration_images}: the training split has {calibrated_on} images, "
                f"calibrating on those {calibrated_on}",
                stacklevel=2,
            )
    example = next(iter(test_loader))[0][:1]
    deployed = build(
        model, engine, precision, calibration, example, method=method, calibration_images=calibrated_on or None
    )
    c, h, w = example.shape[1:]
    source = Path(checkpoint).name
    file_info = DeployedInfo(
        engine,
        precision,
        dataset,
        c,
        h,
        w,
        info.num_classes,
        source,
        info.default_dir,
        list(info.classes),
        image_prep,
        calibrated_on,
    )
    path = save_deployed(deployed, out, file_info)
    reference = evaluate_model(model, test_loader)
    written = evaluate_model(load_deployed(path), test_loader, reference=reference["preds"])  # as written, read back
    changed = written["changes"]
    return {
        "file": str(path), "engine": engine, "precision": precision, "dataset": dataset, "images": written["n"],
        "calibration_images": calibrated_on, "fp32_top1": reference["top1"], "top1": written["top1"],
        "prediction_changes": changed,
        "unfinished": unfinished_run(checkpoint),
    }  # fmt: skip
