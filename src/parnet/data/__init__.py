"""Datasets and transforms for classification training: Fashion-MNIST, CIFAR-10/100, image folders.

``build_datasets(name, data_dir, ...)`` returns the train and test datasets with the paper's
augmentation (RandAugment ``rand-m9-mstd0.5`` and random erasing, from timm) on the train split;
:func:`parnet.loaders.build_loaders` wraps them in loaders.

Formats read:

* ``fashion_mnist``: the four IDX files (``train-images-idx3-ubyte[.gz]`` ...) in one folder
  (Debian: ``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
  28x28 grayscale images are padded to 32x32 for the small-input ParNet.
* ``cifar10`` / ``cifar100``: torchvision's python-pickle folders (``cifar-10-batches-py``,
  ``cifar-100-python``), in ``data_dir`` or ``data_dir`` itself; ``download=True`` fetches them.
* ``imagefolder``: ``data_dir/train/<class>/*.jpg`` and ``data_dir/val/<class>/*.jpg``, at any
  resolution (timm's transforms; 224 unless told).

``img_size`` sets the resolution the model sees (the paper scales ParNet by resolution too): the
small datasets are augmented at their own 32x32 and then resized to it.

Missing data raises :class:`DatasetNotFoundError` saying where to get it; a truncated or corrupt
file raises :class:`CorruptDatasetError` naming the file.

One module per concern, as torchvision has them, imports flowing down this list (every public name
is here too, ``parnet.data.X``):

* :mod:`.transforms`: :class:`DatasetInfo` (what a model sees of a dataset), the augmentation and
  test transform of a split, an image folder's image preparation;
* :mod:`.datasets`: :data:`DATASETS`, the files read and checked, their errors, ``build_datasets``.
"""

from .datasets import (
    CIFAR10_CLASSES,
    CIFAR10_URL,
    CIFAR100_URL,
    DATASETS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    MIN_IMG_SIZE,
    VAL_SPLIT_NAMES,
    CorruptDatasetError,
    DatasetNotFoundError,
    FashionMNIST,
    ImageFolderDataset,
    build_datasets,
    check_image_files,
    class_difference,
    class_names,
    dataset_info,
    describe_training_data,
    read_idx,
)
from .transforms import (
    AUTO_AUGMENT_EXAMPLES,
    IMAGE_PREP_KEYS,
    INTERPOLATIONS,
    AugmentCfg,
    DatasetInfo,
    auto_augment_transform,
    build_transforms,
    check_image_prep,
    image_prep_of,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_URL",
    "CIFAR100_URL",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MIN_IMG_SIZE",
    "VAL_SPLIT_NAMES",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "FashionMNIST",
    "ImageFolderDataset",
    "build_datasets",
    "check_image_files",
    "class_difference",
    "class_names",
    "dataset_info",
    "describe_training_data",
    "read_idx",
    "AUTO_AUGMENT_EXAMPLES",
    "IMAGE_PREP_KEYS",
    "INTERPOLATIONS",
    "AugmentCfg",
    "DatasetInfo",
    "auto_augment_transform",
    "build_transforms",
    "check_image_prep",
    "image_prep_of",
]
