"""Dataset readers on tiny files written in the real formats: IDX (Fashion-MNIST), CIFAR pickles, image folders."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from parnet.data import AugmentCfg, CorruptDatasetError, DatasetNotFoundError, build_datasets, read_idx
from parnet.loaders import ShardSampler, available_cpus, build_loaders


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped like the distributed files."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_fashion_mnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A Fashion-MNIST folder with ``n_train``/``n_test`` images whose class is learnable (a bright band per class)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, :] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def make_cifar(root: Path, name: str = "cifar10", per_batch: int = 8) -> Path:
    """A CIFAR python-pickle folder (cifar-10-batches-py / cifar-100-python) with tiny batches."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key, meta = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            "labels",
            "batches.meta",
        )
        files += ["test_batch"]
        meta_content = {"label_names": [f"c{i}" for i in range(10)]}
        classes = 10
    else:
        folder, files, key, meta = "cifar-100-python", ["train", "test"], "fine_labels", "meta"
        meta_content = {"fine_label_names": [f"c{i}" for i in range(100)]}
        classes = 100
    (root / folder).mkdir(parents=True, exist_ok=True)
    for f in files:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
            key: rng.integers(0, classes, per_batch).tolist(),
        }
        with open(root / folder / f, "wb") as fh:
            pickle.dump(entry, fh)
    with open(root / folder / meta, "wb") as fh:
        pickle.dump(meta_content, fh)
    return root


def make_image_folder(root: Path, classes: int = 2, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(np.full((40, 48, 3), 40 * c + i, np.uint8)).save(d / f"{i}.png")
    return root


# -- Fashion-MNIST --------------------------------------------------------------------------------


def test_fashion_mnist_reads_idx_and_pads_to_32(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm")
    train, test, info = build_datasets("fashion_mnist", root)
    assert (len(train), len(test), info.num_classes, info.in_chans) == (64, 32, 10, 1)
    x, y = test[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    # Test images are padded, not augmented: the same every time, borders at the padded value.
    assert torch.equal(test[0][0], x)
    assert torch.allclose(x[:, :2, :], torch.full((1, 2, 32), -0.2860 / 0.3530), atol=1e-5)
    xt, _ = train[0]
    assert xt.shape == (1, 32, 32)


def test_fashion_mnist_uncompressed_files_work(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), compress=False)
    write_idx(root / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8), compress=False)
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), compress=False)
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(2, dtype=np.uint8), compress=False)
    train, test, _ = build_datasets("fashion_mnist", root)
    assert [train[i][1] for i in range(4)] == [0, 1, 2, 3] and len(test) == 2


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_datasets("fashion_mnist", tmp_path / "nowhere")


def test_truncated_idx_names_the_file(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm")
    target = root / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:100])  # a cut-off download
    with pytest.raises(CorruptDatasetError, match="train-images-idx3-ubyte.gz"):
        build_datasets("fashion_mnist", root)


def test_idx_with_wrong_size_or_magic_is_refused(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.zeros((3, 28, 28), np.uint8))
    raw = gzip.decompress(path.read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(CorruptDatasetError, match="short.gz.*truncated"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03\x04" + raw[4:])
    with pytest.raises(CorruptDatasetError, match="magic"):
        read_idx(tmp_path / "magic")
    assert read_idx(path).shape == (3, 28, 28)


def test_idx_with_a_damaged_gzip_body_names_the_file(tmp_path):
    """Bytes flipped inside the compressed stream (zlib.error, not a truncation): a clear error, not a traceback."""
    root = make_fashion_mnist(tmp_path / "fm")
    target = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(target.read_bytes())
    raw[40:80] = b"\xff" * 40
    target.write_bytes(bytes(raw))
    with pytest.raises(CorruptDatasetError, match="train-images-idx3-ubyte.gz.*download it again"):
        build_datasets("fashion_mnist", root)


def test_labels_must_match_images(tmp_path):
    root = make_fashion_mnist(tmp_path / "fm")
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(CorruptDatasetError, match="do not match"):
        build_datasets("fashion_mnist", root)


# -- CIFAR ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,classes,n_train", [("cifar10", 10, 40), ("cifar100", 100, 8)])
def test_cifar_pickles(tmp_path, name, classes, n_train):
    root = make_cifar(tmp_path / name, name)
    train, test, info = build_datasets(name, root)
    assert (len(train), len(test), info.num_classes) == (n_train, 8, classes)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < classes
    # The pickle folder itself is accepted too.
    folder = next(p for p in root.iterdir() if p.is_dir())
    assert len(build_datasets(name, folder)[1]) == 8
    # loader workers started by spawn (macOS; Linux from Python 3.14) receive the dataset pickled
    copy = pickle.loads(pickle.dumps(test))
    assert torch.equal(copy[0][0], test[0][0]) and copy[0][1] == test[0][1]


def test_download_is_asked_for_by_the_first_split_read(tmp_path, monkeypatch):
    """--download fetches CIFAR when training too (the test split is read first, and must ask for it)."""
    from parnet.data import datasets

    asked = []
    monkeypatch.setattr(
        datasets, "_cifar", lambda name, root, train, tf, download: asked.append((train, download)) or [0]
    )
    build_datasets("cifar10", tmp_path, download=True)
    build_datasets("cifar10", tmp_path, download=True, test_only=True)
    assert asked == [(False, True), (True, True), (False, True)]


def test_missing_cifar_gives_url_and_download_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-python.tar.gz.*--download"):
        build_datasets("cifar10", tmp_path)


def test_corrupt_cifar_batch_names_the_file(tmp_path):
    root = make_cifar(tmp_path / "c10")
    bad = root / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(CorruptDatasetError, match="data_batch_3"):
        build_datasets("cifar10", root)


@pytest.mark.parametrize("label", [10, -1])
def test_cifar_labels_out_of_range_name_the_file(tmp_path, label):
    root = make_cifar(tmp_path / "c10")
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as fh:
        entry = pickle.load(fh)
    entry["labels"][3] = label  # e.g. a CIFAR-100 batch in a CIFAR-10 folder
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)
    with pytest.raises(CorruptDatasetError, match=r"test_batch.*labels outside 0\.\.9"):
        build_datasets("cifar10", root)


# -- image folders ----------------------------------------------------------------------------------


def test_image_folder_at_224(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    train, test, info = build_datasets("imagefolder", root, train_subset=3)
    assert info.num_classes == 2 and len(train) == 3 and len(test) == 4
    assert train[0][0].shape == (3, 224, 224) and test[0][0].shape == (3, 224, 224)


def test_image_folder_at_the_size_asked_for(tmp_path):
    root = make_image_folder(tmp_path / "imgs")
    train, test, info = build_datasets("imagefolder", root, img_size=48)
    assert info.img_size == 48 and train[0][0].shape == (3, 48, 48) and test[0][0].shape == (3, 48, 48)


def test_small_datasets_are_augmented_at_32_then_resized(tmp_path):
    """--img-size on a 32x32 dataset: the pipeline runs at 32 (the pad-and-crop assumes it), then resizes."""
    root = make_cifar(tmp_path / "c10")
    train, test, info = build_datasets("cifar10", root, img_size=64)
    assert info.img_size == 64 and train[0][0].shape == (3, 64, 64) and test[0][0].shape == (3, 64, 64)
    _, plain, _ = build_datasets("cifar10", root)
    up = torch.nn.functional.interpolate(plain[0][0][None], size=64, mode="bicubic", align_corners=False)[0]
    # the same image, resized (PIL's bicubic against torch's: 0.07 apart; another image: 1.1)
    assert (up - test[0][0]).abs().mean() < 0.15 < (up - test[1][0]).abs().mean()
    with pytest.raises(ValueError, match="at least 8 pixels"):
        build_datasets("cifar10", root, img_size=4)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5", "augmix-m5-w4-d2", "original-mstd0.5", "v0"])
def test_every_kind_of_timm_auto_augment_runs_on_the_small_datasets(tmp_path, spec):
    """RandAugment, AugMix and AutoAugment policies, chosen by the spec as timm's create_transform does."""
    root = make_cifar(tmp_path / "c10")
    train, _, _ = build_datasets("cifar10", root, aug=AugmentCfg(auto_augment=spec))
    kinds = {"rand": "RandAugment", "augmix": "AugMixAugment", "original": "AutoAugment", "v0": "AutoAugment"}
    assert kinds[spec.split("-")[0]] in [type(t).__name__ for t in train.transform.transforms]
    assert train[0][0].shape == (3, 32, 32)


def test_image_folder_missing_split_and_corrupt_image(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train"):
        build_datasets("imagefolder", tmp_path)
    root = make_image_folder(tmp_path / "imgs")
    bad = root / "val" / "class1" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])  # its header reads, its pixels are cut off
    _, test, _ = build_datasets("imagefolder", root)
    idx = [i for i, (p, _) in enumerate(test.samples) if p.endswith("class1/0.png")][0]
    with pytest.raises(CorruptDatasetError, match="class1/0.png"):
        test[idx]


# -- loaders ----------------------------------------------------------------------------------------


def test_shard_sampler_covers_each_item_once():
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_train_loader_is_reproducible_and_sharded(tmp_path):
    train, test, _ = build_datasets("fashion_mnist", make_fashion_mnist(tmp_path / "fm"))

    calls = iter(range(100, 200))

    def order(seed: int, epoch: int) -> list[int]:
        torch.manual_seed(next(calls))  # the global RNG must not matter, only (seed, epoch)
        loader, _, _ = build_loaders(train, test, 8, workers=0, seed=seed)
        loader.sampler.set_epoch(epoch)
        return list(loader.sampler)

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(64))
    assert order(0, 1) != order(0, 0), "set_epoch must reshuffle"
    assert order(1, 0) != order(0, 0), "the seed must change the order"
    loaders = [build_loaders(train, test, 8, 0, 0, r, 2)[0] for r in range(2)]
    for ld in loaders:
        ld.sampler.set_epoch(0)
    idx = [set(iter(ld.sampler)) for ld in loaders]
    assert not idx[0] & idx[1] and len(idx[0]) == 32
    with pytest.raises(ValueError, match="larger than the training set"):
        build_loaders(train, test, 1000)


def test_loader_workers_are_capped_at_the_cpus(tmp_path):
    """A config written for a big machine (configs/imagenet.yaml: 8 workers) runs on a small one, unwarned."""
    train, test, _ = build_datasets("fashion_mnist", make_fashion_mnist(tmp_path / "fm", 16, 8))
    train_loader, test_loader, _ = build_loaders(train, test, 4, workers=available_cpus() + 6)
    assert train_loader.num_workers == test_loader.num_workers == available_cpus()
    assert build_loaders(train, test, 4, workers=0)[0].num_workers == 0


def test_a_corrupt_image_read_by_a_loader_worker_is_named_without_the_workers_traceback(tmp_path):
    """The error reaches the user as `cannot read image PATH`, not at the end of a worker traceback."""
    root = make_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    bad = root / "val" / "class1" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    _, test, _ = build_datasets("imagefolder", root, test_only=True)
    loader = torch.utils.data.DataLoader(test, batch_size=4, num_workers=1)
    with pytest.raises(CorruptDatasetError) as info:
        next(iter(loader))
    assert str(info.value).startswith(f"cannot read image {bad}: not an image Pillow can read, or truncated")
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("dataset", ["imagefolder", "fashion_mnist", "cifar10"])
def test_random_erasing_fills_with_noise_on_every_dataset(dataset):
    """timm's train.py erases with per-pixel noise (--remode pixel); its create_transform defaults to a
    constant fill, which image folders got while the 32x32 datasets had noise."""
    from timm.data.random_erasing import RandomErasing

    from parnet.data import DATASETS, AugmentCfg, build_transforms

    ops = build_transforms(DATASETS[dataset], train=True, aug=AugmentCfg(re_prob=0.25)).transforms
    erasing = [op for op in ops if isinstance(op, RandomErasing)]
    assert len(erasing) == 1 and erasing[0].mode == "pixel" and erasing[0].probability == 0.25


def test_image_prep_is_checked_and_shapes_an_image_folders_transforms():
    """An image folder's preparation from a pretrained config (timm's resolve_data_config), checked where it is
    read from a file; the 32x32 datasets keep their own."""
    from parnet.data import build_transforms, check_image_prep, dataset_info, image_prep_of

    prep = image_prep_of({"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 0.95})
    assert prep == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 0.95}
    assert image_prep_of(None)["interpolation"] == "bicubic"  # timm's defaults: ImageNet's
    described = repr(build_transforms(dataset_info("imagefolder", 64, prep), train=False))
    assert "Resize(size=67, interpolation=bilinear" in described and "0.5000, 0.5000, 0.5000" in described
    assert "bicubic" in repr(build_transforms(dataset_info("imagefolder", 64), train=True))
    assert check_image_prep({**prep, "crop_pct": 1.15}, "volo_d4_448")["crop_pct"] == 1.15  # timm's largest
    for bad, message in [({**prep, "std": [0.5, 0.0, 0.5]}, "std 0.001 to 10"),
                         ({**prep, "crop_pct": 1e-7}, "0.25 to 2"),
                         ({**prep, "mean": [1e308, 0, 0]}, r"\|mean\| <= 10"),
                         ({**prep, "interpolation": "cubic"}, "interpolation must be one of"),
                         ({"mean": prep["mean"]}, "must hold exactly"),
                         ({**prep, "mean": [0.5]}, "3 numbers each")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            check_image_prep(bad, "file.safetensors")
    with pytest.raises(ValueError, match="applies to image folders, not to fashion_mnist"):
        dataset_info("fashion_mnist", 0, prep)


def test_class_difference_names_what_each_list_lacks_or_their_order():
    from parnet.data import class_difference

    assert class_difference(["a", "b"], ["b", "c"], "old", "new") == "old: a; new: c"
    assert class_difference(["a", "b"], ["b", "a"], "old", "new") == "the same names in another order"
    many = class_difference([f"c{i:02d}" for i in range(12)], [], "gone", "new")
    assert many == "gone: " + ", ".join(f"c{i:02d}" for i in range(10)) + " and 2 more"
