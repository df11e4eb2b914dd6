"""Transforms and image preparation: what a model sees of a dataset's images.

:class:`DatasetInfo` (size, channels, statistics, an image folder's resize and crop) is what
:func:`build_transforms` builds a split's transform from: the paper's augmentation (RandAugment
``rand-m9-mstd0.5`` and random erasing, from timm) to train, a resize and normalisation to test.
An image folder's images are prepared as ImageNet's unless weights fine-tuned from timm's released
ones ask otherwise (:func:`image_prep_of`, :func:`check_image_prep`).

Nothing here reads a dataset: :mod:`parnet.data.datasets` imports this module, not the reverse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

SMALL_IMG_SIZE = 32  # the side of CIFAR's images, and of Fashion-MNIST's padded from 28: they are augmented at it


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: input size and channels, classes, normalisation.

    ``img_size`` is the side of the images the model sees (in :data:`parnet.data.DATASETS`: the dataset's own).
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_dir: str  # in build_datasets' result: the folder it read
    classes: tuple[str, ...] = ()  # in label order; filled in by build_datasets
    interpolation: str = "bicubic"  # image folders: the resize before the center crop
    crop_pct: float = 0.875  # image folders: the center crop's share of the resized image (timm's DEFAULT_CROP_PCT)


# -- transforms ---------------------------------------------------------------------------------


@dataclass
class AugmentCfg:
    """Training augmentation.

    Attributes:
        auto_augment: timm auto-augment spec (the paper's RandAugment: ``rand-m9-mstd0.5``; also AugMix
            ``augmix-...`` and AutoAugment policies such as ``original``); ``""`` for none.
        re_prob: probability of random erasing per image (0 for none).
        hflip: probability of a horizontal flip.
    """

    auto_augment: str = "rand-m9-mstd0.5"
    re_prob: float = 0.25
    hflip: float = 0.5


AUTO_AUGMENT_EXAMPLES = "rand-m9-mstd0.5 (RandAugment), augmix-m5-w4-d2 (AugMix), original or v0 (AutoAugment)"


def auto_augment_transform(spec: str, hparams: dict[str, Any] | None = None) -> Any:
    """timm's transform for an auto-augment ``spec``, chosen by its first section as timm's
    ``create_transform`` chooses (``rand``, ``augmix``, else an AutoAugment policy).

    timm asserts on a bad spec and skips sections without a number (``rand-m9-bogus`` is ``rand-m9``);
    here both are a ``ValueError`` that says what a spec looks like.
    """
    from timm.data import auto_augment as aa

    kind = spec.split("-")[0]
    ignored = [part for part in spec.split("-")[1:] if not (kind == "rand" and part.startswith("t"))]
    ignored = [part for part in ignored if len(re.split(r"(\d.*)", part)) < 2]
    if ignored:
        raise ValueError(
            f"auto-augment spec {spec!r} has sections timm would ignore ({', '.join(ignored)}): "
            f"each section after the first is a key and a number; e.g. {AUTO_AUGMENT_EXAMPLES}, or '' for none"
        )
    build = {"rand": aa.rand_augment_transform, "augmix": aa.augment_and_mix_transform}.get(
        kind, aa.auto_augment_transform
    )
    hparams = dict(hparams or {})
    if kind == "augmix":
        hparams.setdefault("translate_pct", 0.3)  # as timm's create_transform
    try:
        return build(spec, hparams)
    except (AssertionError, KeyError, ValueError) as e:
        raise ValueError(
            f"{spec!r} is not a timm auto-augment spec ({e}); e.g. {AUTO_AUGMENT_EXAMPLES}, or '' for none"
        ) from None


def build_transforms(info: DatasetInfo, train: bool, aug: AugmentCfg | None = None) -> Any:
    """The transform of one split, to ``info.img_size`` pixels.

    Image folders: timm's (random resized crop, flip, RandAugment, erasing; resize and center crop
    to test). The 32x32 datasets: pad-and-crop, flip, RandAugment at their own size, then a resize
    if ``info.img_size`` differs, then erasing.
    """
    from torchvision import transforms as T

    aug = aug or AugmentCfg()
    if info.name == "imagefolder":
        from timm.data import create_transform

        return create_transform(
            info.img_size,
            is_training=train,
            auto_augment=(aug.auto_augment or None) if train else None,
            re_prob=aug.re_prob if train else 0.0,
            re_mode="pixel",  # timm's train.py default (create_transform's is "const"), as the 32x32 datasets erase
            hflip=aug.hflip,
            interpolation=info.interpolation,
            crop_pct=info.crop_pct,
            mean=info.mean,
            std=info.std,
        )
    from timm.data.random_erasing import RandomErasing

    native = SMALL_IMG_SIZE
    pad = [T.Pad(2)] if info.name == "fashion_mnist" else []  # 28x28 -> 32x32
    resize = []
    if info.img_size != native:
        resize = [T.Resize((info.img_size, info.img_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    tail = resize + [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if not train:
        return T.Compose(pad + tail)
    ops: list[Any] = pad + [T.RandomCrop(native, padding=4)]
    if aug.hflip > 0:
        ops.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment:
        fill = tuple(round(255 * m) for m in info.mean)
        ops.append(auto_augment_transform(aug.auto_augment, dict(translate_const=int(native * 0.45), img_mean=fill)))
    ops += tail
    if aug.re_prob > 0:
        ops.append(RandomErasing(aug.re_prob, mode="pixel", device="cpu"))
    return T.Compose(ops)


# -- image preparation of image folders ----------------------------------------------------------

IMAGE_PREP_KEYS = ("mean", "std", "interpolation", "crop_pct")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
# An image folder's own way, where no pretrained config says otherwise: ImageNet's statistics, DatasetInfo's defaults.
DEFAULT_IMAGE_PREP: dict[str, Any] = {
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "interpolation": DatasetInfo.interpolation,
    "crop_pct": DatasetInfo.crop_pct,
}


def image_prep_of(pretrained_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """How an image folder's images are prepared for weights released with ``pretrained_cfg`` (timm's): its
    statistics, resize interpolation and crop, as timm's data config resolves them (timm's train.py
    ``--pretrained``). Keys: :data:`IMAGE_PREP_KEYS`."""
    from timm.data import resolve_data_config

    if not pretrained_cfg:  # none: an image folder's own way (ImageNet's)
        return dict(DEFAULT_IMAGE_PREP)
    config = resolve_data_config(pretrained_cfg=dict(pretrained_cfg))
    return check_image_prep({k: config[k] for k in IMAGE_PREP_KEYS}, "the pretrained config")


def check_image_prep(prep: Any, source: str) -> dict[str, Any]:
    """``prep`` (an image folder's ``mean``, ``std``, ``interpolation``, ``crop_pct``) checked and normalised
    (tuples of floats); ``ValueError`` naming ``source`` for anything else."""
    import math

    def floats(value: Any) -> tuple[float, ...] | None:
        ok = isinstance(value, (list, tuple)) and len(value) == 3
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        return tuple(float(v) for v in value) if ok else None

    if not isinstance(prep, dict) or set(prep) != set(IMAGE_PREP_KEYS):
        raise ValueError(f"{source}: image_prep must hold exactly {', '.join(IMAGE_PREP_KEYS)}, got {prep!r:.200}")
    mean, std, crop = floats(prep["mean"]), floats(prep["std"]), prep["crop_pct"]
    # Bounds that hold every timm pretrained config (crop_pct 0.8 to 1.15) and keep a hostile file from asking
    # for a resize to millions of pixels or for statistics that turn every score into nan.
    if mean is None or std is None or max(map(abs, mean)) > 10 or not all(1e-3 <= s <= 10 for s in std):
        raise ValueError(f"{source}: image_prep mean and std must be 3 numbers each (|mean| <= 10, std 0.001 to 10), "
                         f"got {prep!r:.200}")  # fmt: skip
    if prep["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"{source}: image_prep interpolation must be one of {INTERPOLATIONS}, got {prep!r:.200}")
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0.25 <= crop <= 2:
        raise ValueError(f"{source}: image_prep crop_pct must be from 0.25 to 2, got {prep!r:.200}")
    return {"mean": mean, "std": std, "interpolation": prep["interpolation"], "crop_pct": float(crop)}
