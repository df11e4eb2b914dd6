"""Datasets read from their files: Fashion-MNIST's IDX files, CIFAR's pickles, image folders.

:data:`DATASETS` lists them; :func:`build_datasets` reads one, checked, with its transforms
(:mod:`parnet.data.transforms`). Missing data raises :class:`DatasetNotFoundError` saying where to
get it; a truncated or corrupt file raises :class:`CorruptDatasetError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder

from ..model import CIFAR_MEAN, CIFAR_STD  # the CIFAR variants' pretrained config normalises as training does
from .transforms import (
    DEFAULT_IMAGE_PREP,
    SMALL_IMG_SIZE,
    AugmentCfg,
    DatasetInfo,
    build_transforms,
    check_image_prep,
)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MIN_IMG_SIZE = 8  # pixels: below this no network here has a feature map left
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# torchvision's CIFAR10.classes (read there from the dataset's meta file, which may not be at hand).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not where it was looked for; the message says how to get it."""


class CorruptDatasetError(ValueError):
    """A dataset file is truncated or not in the expected format; the message names it.

    Raised in a data loader worker, it reaches the main process with its own message: torch wraps
    the worker's traceback around it, which is taken off again here.
    """

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:  # torch's ExceptionWrapper.reraise
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, SMALL_IMG_SIZE, (0.2860,), (0.3530,), FASHION_MNIST_DIR),
    "cifar10": DatasetInfo("cifar10", 10, 3, SMALL_IMG_SIZE, CIFAR_MEAN, CIFAR_STD, "data/cifar10"),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, SMALL_IMG_SIZE, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "data/cifar100"
    ),
    "imagefolder": DatasetInfo("imagefolder", 0, 3, 224, default_dir="data/imagenet", **DEFAULT_IMAGE_PREP),
}


# -- Fashion-MNIST (IDX files) ------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not), checking its header against its size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise CorruptDatasetError(f"{path} is truncated or not a gzip file ({e}); download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise CorruptDatasetError(f"{path} is truncated (header cut short)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise CorruptDatasetError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), file has {len(body)}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the dataset with "
        "`sudo apt-get install dataset-fashion-mnist` (it goes to /usr/share/datasets/fashion-mnist), "
        "or download the four IDX files from https://github.com/zalandoresearch/fashion-mnist and give their folder "
        "(--data-dir; for make-det-dataset, --source)."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files; items are ``(PIL image 'L' 28x28, label)`` before ``transform``.

    Args:
        root: folder with the IDX files.
        train: the 60k training split (else the 10k test split).
        transform: applied to each PIL image.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Any = None):
        root = Path(root)
        if not root.is_dir():
            _find_idx(root, "train-images-idx3-ubyte")  # raises the "how to get it" error
        prefix = "train" if train else "t10k"
        images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        self.images = read_idx(images_path)
        self.targets = read_idx(labels_path).astype(np.int64)
        if self.images.ndim != 3 or self.targets.ndim != 1 or len(self.images) != len(self.targets):
            raise CorruptDatasetError(
                f"{images_path} and {labels_path} do not match: images {self.images.shape}, labels {self.targets.shape}"
            )
        if self.targets.size and (self.targets.min() < 0 or self.targets.max() >= len(self.classes)):
            raise CorruptDatasetError(f"{labels_path} has labels outside 0..{len(self.classes) - 1}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img = Image.fromarray(np.asarray(self.images[i]), mode="L")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


# -- CIFAR (python pickles) ---------------------------------------------------------------------


class _CheckedCifar:
    """torchvision's CIFAR, with clear errors instead of a bare md5 failure or pickle error. At module level:
    loader workers started by spawn (the default on macOS, and on Linux from Python 3.14) unpickle it."""

    root: str
    base_folder: str
    train_list: list
    test_list: list
    meta: dict

    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        try:
            with open(path, "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, KeyError...
            raise CorruptDatasetError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CheckedCIFAR10(_CheckedCifar, CIFAR10):
    pass


class _CheckedCIFAR100(_CheckedCifar, CIFAR100):
    pass


def _cifar(name: str, root: Path, train: bool, transform: Any, download: bool) -> Dataset:
    base_cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder = base_cls.base_folder
    # Accept both the parent folder and the pickle folder itself.
    if root.name == folder and not (root / folder).exists():
        root = root.parent

    if download:
        try:
            base_cls(str(root), train=train, download=True)
        except Exception as e:  # noqa: BLE001 - URLError, timeouts...
            raise DatasetNotFoundError(f"could not download {name} into {root}: {e}") from None
    files = base_cls.train_list + base_cls.test_list + [(base_cls.meta["filename"], None)]
    missing = [f for f, _ in files if not (root / folder / f).is_file()]
    if missing:
        url = CIFAR10_URL if name == "cifar10" else CIFAR100_URL
        raise DatasetNotFoundError(
            f"{name} not found: {root / folder} lacks {', '.join(missing)}. Download and unpack {url} "
            f"into {root} (it makes {folder}/), or fetch it with torchvision: `parnet train --dataset {name} "
            "--download` (or build_datasets(..., download=True))."
        )
    for f, _ in base_cls.train_list if train else base_cls.test_list:
        path = root / folder / f
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            data = np.asarray(entry["data"])
            labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
            if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
                raise ValueError(f"data {data.shape}, {len(labels)} labels; expected (N, 3072) and N labels")
            classes = 10 if name == "cifar10" else 100
            if len(labels) and not 0 <= min(labels) <= max(labels) < classes:
                raise ValueError(f"labels outside 0..{classes - 1}")
        except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, KeyError...
            raise CorruptDatasetError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from None
    checked = _CheckedCIFAR10 if name == "cifar10" else _CheckedCIFAR100
    return checked(str(root), train=train, transform=transform, download=False)


# -- image folders ------------------------------------------------------------------------------

VAL_SPLIT_NAMES = ("validation", "valid", "test", "dev")  # other names of a validation folder, for the message


def _read_image(path: str) -> Image.Image:
    from ..images import ImageReadError, open_image

    try:
        return open_image(path, "RGB")
    except (ImageReadError, OSError) as e:
        raise CorruptDatasetError(str(e)) from None


def _visible_image(split: Path, path: str) -> bool:
    """An image file of ``split`` that no hidden folder holds (``cat/.ipynb_checkpoints/x.jpg`` is left out)."""
    from ..images import is_hidden, is_image_file

    return is_image_file(path) and not any(is_hidden(part) for part in Path(path).relative_to(split).parts)


def _class_folders(split: Path) -> list[str]:
    """The class folders of an image folder split, sorted as ``ImageFolder`` numbers them; hidden ones left out."""
    from ..images import is_hidden

    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not is_hidden(e.name))


class ImageFolderDataset(ImageFolder):
    """torchvision's ``ImageFolder``, leaving out hidden class folders (``.ipynb_checkpoints``)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))
        if not classes:
            raise FileNotFoundError(f"no class folders: expected {directory}/<class>/*.jpg")
        return classes, {c: i for i, c in enumerate(classes)}


def check_image_files(split: Path, samples: list[tuple[str, int]]) -> None:
    """Refuse a split holding files that are no image (empty, not an image Pillow knows), listing them, before
    training starts: read at random, a bad file would stop a run at whichever epoch first drew it."""
    bad = []
    for path, _ in samples:
        try:
            with Image.open(path):  # the header only: fast
                pass
        except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError...
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CorruptDatasetError(
            f"{split}: {len(bad)} of {len(samples)} files are not images Pillow can read: {listed}. "
            "Remove or replace them and run again"
        )


def _imagefolder(root: Path, train: bool, transform: Any) -> Dataset:
    split = root / ("train" if train else "val")
    if not split.is_dir():
        others = [name for name in VAL_SPLIT_NAMES if (root / name).is_dir()] if not train else []
        hint = f" ({root} has {others[0]}/: link it as val, e.g. `ln -s {others[0]} {root}/val`)" if others else ""
        raise DatasetNotFoundError(
            f"image folder dataset not found: {split} does not exist{hint}. Expected {root}/train/<class>/*.jpg and "
            f"{root}/val/<class>/*.jpg (e.g. ImageNet from https://image-net.org, val sorted into class folders)."
        )
    from functools import partial

    try:
        visible = partial(_visible_image, split)
        dataset = ImageFolderDataset(str(split), transform, loader=_read_image, is_valid_file=visible)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"{split}: {e}") from None
    check_image_files(split, dataset.samples)
    return dataset


def class_difference(first: Sequence[str], second: Sequence[str], first_only: str, second_only: str) -> str:
    """How two class lists differ, for a message: ``"<first_only>: a, b; <second_only>: c"``, or that they hold
    the same names in another order (a new label for each moved class)."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")

    only_first, only_second = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    parts = [f"{first_only}: {listed(only_first)}" if only_first else "",
             f"{second_only}: {listed(only_second)}" if only_second else ""]  # fmt: skip
    return "; ".join(part for part in parts if part) or "the same names in another order"


def _check_same_classes(root: Path, train: list[str], test: list[str]) -> None:
    if train == test:
        return
    raise CorruptDatasetError(
        f"{root}/train and {root}/val have different class folders "
        f"({class_difference(train, test, 'only in train/', 'only in val/')}): "
        "the two splits need the same classes, spelt alike (letter case counts)"
    )


def class_names(name: str, data_dir: str | os.PathLike | None = None) -> list[str] | None:
    """The class names of dataset ``name`` in label order, or ``None`` where its files are needed and absent.

    Fashion-MNIST and CIFAR-10 names are known; CIFAR-100's come from its ``meta`` file, an image
    folder's from its ``train`` subfolders (sorted, as ``ImageFolder`` numbers them, hidden ones left out).
    """
    if name == "fashion_mnist":
        return list(FASHION_MNIST_CLASSES)
    if name == "cifar10":
        return list(CIFAR10_CLASSES)
    if name not in DATASETS:
        return None
    root = Path(data_dir or DATASETS[name].default_dir).expanduser()
    if name == "cifar100":
        for meta in (root / "cifar-100-python" / "meta", root / "meta"):
            if meta.is_file():
                try:
                    with open(meta, "rb") as fh:
                        return list(pickle.load(fh, encoding="latin1")["fine_label_names"])
                except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, KeyError...
                    raise CorruptDatasetError(f"{meta} is truncated or corrupt: {type(e).__name__}: {e}") from None
        return None
    train = root / "train"
    return _class_folders(train) if train.is_dir() else None


def dataset_info(name: str, img_size: int = 0, image_prep: dict[str, Any] | None = None) -> DatasetInfo:
    """:data:`DATASETS`' entry for ``name`` at ``img_size`` (0: its own), an image folder's images prepared as
    ``image_prep`` says (weights fine-tuned from timm's released ones: theirs; ``None``: ImageNet's)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    info = replace(DATASETS[name], img_size=img_size or DATASETS[name].img_size)
    if image_prep is not None:
        if name != "imagefolder":  # the 32x32 datasets keep their own statistics and sizes
            raise ValueError(f"image_prep applies to image folders, not to {name}")
        info = replace(info, **check_image_prep(dict(image_prep), "image_prep"))
    return info


def describe_training_data(
    model: torch.nn.Module, dataset: str | None, img_size: int = 0, image_prep: dict[str, Any] | None = None
) -> None:
    """Give ``model`` (in place) the ``pretrained_cfg`` of the data it was trained on, at ``img_size`` (0: the
    dataset's own), so that timm's ``resolve_data_config(model=model)`` / ``create_transform`` prepare images
    as ``parnet eval`` does: an image folder's exactly (by default bicubic resize, 0.875 center crop, ImageNet
    statistics; ``image_prep``: the run's own); the 32x32 datasets' with their statistics and size (a resize
    where an image's size differs; Fashion-MNIST's 28x28 images, which ``parnet eval`` pads to 32, timm's
    transform can only resize). Another dataset: unchanged.
    """
    if dataset not in DATASETS:
        return
    info = dataset_info(dataset, img_size, image_prep)
    folder = dataset == "imagefolder"
    model.pretrained_cfg = model.default_cfg = {  # timm keeps default_cfg as the same dict
        **(getattr(model, "pretrained_cfg", None) or {}),
        "input_size": (info.in_chans, info.img_size, info.img_size),
        "test_input_size": None,  # a variant's own test size would override input_size in resolve_data_config
        "mean": info.mean,
        "std": info.std,
        "interpolation": info.interpolation if folder else "bicubic",
        "crop_pct": info.crop_pct if folder else 1.0,
        "test_crop_pct": None,
        "crop_mode": "center",
        "num_classes": getattr(model, "num_classes", info.num_classes),
    }


def build_datasets(
    name: str,
    data_dir: str | os.PathLike | None = None,
    aug: AugmentCfg | None = None,
    download: bool = False,
    train_subset: int = 0,
    test_subset: int = 0,
    test_only: bool = False,
    img_size: int = 0,
    image_prep: dict[str, Any] | None = None,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Train and test datasets of ``name`` with their transforms, and the dataset's info.

    Args:
        name: one of ``DATASETS``.
        data_dir: where the files are (default: the dataset's usual place).
        aug: training augmentation.
        download: CIFAR only: fetch the files with torchvision if missing.
        train_subset / test_subset: if > 0, use only N images of a split (tests, demos): the first N of
            Fashion-MNIST and CIFAR, whose files come shuffled; N spread evenly over an image folder, whose
            files come class by class, so that every class is in it.
        test_only: read the test split only (evaluation): the first result is then the test set too.
        img_size: the side of the images the model sees, pixels (0: the dataset's own, 224 for folders).
        image_prep: an image folder's statistics, interpolation and crop (:func:`image_prep_of`; ``None``:
            ImageNet's statistics, bicubic, 0.875).
    """
    if img_size < 0 or 0 < img_size < MIN_IMG_SIZE:
        raise ValueError(f"img_size must be at least {MIN_IMG_SIZE} pixels (or 0 for the dataset's), got {img_size}")
    info = dataset_info(name, img_size, image_prep)
    root = Path(data_dir or info.default_dir).expanduser()
    train_tf, test_tf = build_transforms(info, True, aug), build_transforms(info, False, aug)
    if name == "fashion_mnist":
        test = FashionMNIST(root, False, test_tf)
        train = test if test_only else FashionMNIST(root, True, train_tf)
    elif name in ("cifar10", "cifar100"):
        test = _cifar(name, root, False, test_tf, download)  # the first split read fetches both
        train = test if test_only else _cifar(name, root, True, train_tf, download)
    else:
        if download:
            raise ValueError("--download works for cifar10/cifar100 only")
        test = _imagefolder(root, False, test_tf)
        train = test if test_only else _imagefolder(root, True, train_tf)
        _check_same_classes(root, train.classes, test.classes)
        info = replace(info, num_classes=len(train.classes))
    # As read: the folder it came from and its class names (what a run saves with its weights).
    info = replace(info, default_dir=str(root.absolute()), classes=tuple(str(c) for c in getattr(test, "classes", ())))
    # An image folder lists its files class by class: a subset there is spread over the whole split, so that it
    # holds every class in proportion; the other datasets' files come shuffled, and a subset is their first N.
    spread = name == "imagefolder"
    train = _subset(train, train_subset, spread)
    test = _subset(test, test_subset, spread)
    if len(train) == 0 or len(test) == 0:
        raise CorruptDatasetError(f"{name} in {root} has an empty split (train {len(train)}, test {len(test)} images)")
    return train, test, info


def _subset(dataset: Dataset, size: int, spread: bool) -> Dataset:
    """``size`` images of ``dataset`` (all if 0 or more than it has): its first ones, or, ``spread``, evenly spaced."""
    if size <= 0 or size >= len(dataset):
        return dataset
    if spread:
        return torch.utils.data.Subset(dataset, np.linspace(0, len(dataset), size, endpoint=False).astype(int).tolist())
    return torch.utils.data.Subset(dataset, range(size))
