"""A practitioner's own data: image files of every kind, image folders as people make them, the class names kept
with a run wherever it is used from, and settings files read strictly."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parnet.cli import main
from parnet.data import CorruptDatasetError, DatasetNotFoundError, build_datasets, class_names
from parnet.images import ImageReadError, is_image_file, open_image
from parnet.settings import make_config

from .conftest import TINY_STEM


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int64)


# -- reading one image ------------------------------------------------------------------------------


def test_16_bit_and_float_images_keep_their_brightness(tmp_path):
    """Pillow's plain convert("RGB") turns a dark 16-bit scan all white and a 0..1 float image all black."""
    dark = np.full((6, 5), 1000, np.uint16)  # 1000/65535: nearly black
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode == "I;16"
    assert _pixels(open_image(tmp_path / "dark16.png")).max() == round(1000 / 257)
    ramp = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    Image.fromarray(ramp).save(tmp_path / "ramp.tiff")
    grey = _pixels(open_image(tmp_path / "ramp.tiff", "L"))
    assert grey.min() == 0 and grey.max() == 255 and grey.shape == (5, 6)
    Image.fromarray(np.full((4, 4), 7.5e4, np.float32)).save(tmp_path / "wild.tiff")
    with pytest.raises(ImageReadError, match="values run from 75000 to 75000.*0..1"):
        open_image(tmp_path / "wild.tiff")


def test_transparency_is_shown_on_white_and_photos_are_turned_upright(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent but for one pixel
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    px = _pixels(open_image(tmp_path / "clear.png"))
    assert (px[0, 0] == [255, 0, 0]).all() and (px[1:, 1:] == 255).all()

    wide = Image.new("RGB", (8, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to view
    wide.save(tmp_path / "turned.jpg", exif=exif)
    assert open_image(tmp_path / "turned.jpg").size == (2, 8)


def test_an_image_over_pillows_size_limit_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("1", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # its error is at twice the limit
    with pytest.raises(ImageReadError, match="big.png: Image size .10000 pixels. exceeds limit .*MAX_IMAGE_PIXELS"):
        open_image(tmp_path / "big.png")
    code = main(["predict", str(tmp_path / "big.png"), "--model", "parnet_s"])
    assert code == 2  # the CLI's error, not a traceback (here before the weights are even looked at)


def test_which_files_an_image_folder_reads():
    assert is_image_file("a/b.JPG") and is_image_file("x.gif") and is_image_file("x.jfif") and is_image_file("x.webp")
    assert not is_image_file("a/._b.jpg") and not is_image_file("notes.txt") and not is_image_file("x.pdf")


# -- image folders ----------------------------------------------------------------------------------


def _folder(root: Path, classes: dict[str, int], splits: tuple[str, ...] = ("train", "val")) -> Path:
    for split in splits:
        for c, (name, n) in enumerate(classes.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((10, 12, 3), 20 * c + i, np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_hidden_folders_and_files_are_not_data(tmp_path):
    root = _folder(tmp_path / "d", {"cat": 2, "dog": 2})
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        Image.new("RGB", (4, 4)).save(root / split / ".ipynb_checkpoints" / "x.png")
        (root / split / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
        Image.new("RGB", (4, 4)).save(root / split / "dog" / "moving.gif")
    train, test, info = build_datasets("imagefolder", root, img_size=16)
    assert info.classes == ("cat", "dog") and info.num_classes == 2
    assert len(train) == len(test) == 5  # the .gif counted, the hidden files not
    assert class_names("imagefolder", root) == ["cat", "dog"]


def test_files_that_are_no_images_are_listed_before_any_training(tmp_path):
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    (root / "train" / "a" / "empty.jpg").write_bytes(b"")
    (root / "train" / "b" / "notes.jpg").write_text("not a picture")
    with pytest.raises(CorruptDatasetError, match=r"2 of 8 files are not images .*empty.jpg.*notes.jpg.*Remove"):
        build_datasets("imagefolder", root)


def test_different_classes_in_train_and_val_are_named(tmp_path):
    root = _folder(tmp_path / "d", {"Cat": 1, "dog": 1, "owl": 1}, ("train",))
    _folder(root, {"cat": 1, "dog": 1}, ("val",))
    with pytest.raises(CorruptDatasetError, match="only in train/: Cat, owl; only in val/: cat.*letter case"):
        build_datasets("imagefolder", root)


def test_a_validation_folder_under_another_name_is_pointed_at(tmp_path):
    root = _folder(tmp_path / "d", {"a": 1, "b": 1}, ("train", "validation"))
    with pytest.raises(DatasetNotFoundError, match=r"has validation/: link it as val, e.g. `ln -s validation"):
        build_datasets("imagefolder", root)


def test_a_subset_of_an_image_folder_holds_every_class(tmp_path):
    """ImageFolder lists files class by class: its first 8 of 4 x 5 would be classes 0 and 1 only."""
    root = _folder(tmp_path / "d", {c: 5 for c in "abcd"})
    train, test, _ = build_datasets("imagefolder", root, train_subset=8, test_subset=4, img_size=16)
    assert sorted(train.dataset.targets[i] for i in train.indices) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert sorted(test.dataset.targets[i] for i in test.indices) == [0, 1, 2, 3]


# -- settings files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochs: true\n", "epochs: needs a number, got True"),
        ("lr: on\n", "lr: needs a number"),
        ("ema: 'yes'\n", "ema: needs true or false, got 'yes'"),
        ("epochs: 1\nepochs: 5\n", "'epochs' is given twice (line 2"),
    ],
)
def test_a_settings_file_is_read_strictly(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_config(config_file=str(tmp_path / "c.yaml"))


# -- a run on an image folder, used from anywhere ---------------------------------------------------


def _train(root: Path, out: Path, *extra: str) -> int:
    kwargs = [f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in TINY_STEM.items()]
    return main([
        "train", "--dataset", "imagefolder", "--data-dir", str(root), "--model", "parnet_cifar_s",
        "--model-kwargs", *kwargs,
        "--img-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--threads", "1", "--no-progress",
        "--no-depth", "--warmup-epochs", "0", "--amp", "off", "--output", str(out), *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """A run stopped after its first epoch, trained on a relative --data-dir (classes cat, dog, owl)."""
    base = tmp_path_factory.mktemp("own")
    _folder(base / "pets", {"cat": 4, "dog": 4, "owl": 4})
    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert _train(Path("pets"), base / "run", "--stop-after", "1") == 0
    finally:
        os.chdir(cwd)
    return base / "pets", base / "run"


def test_a_run_keeps_its_class_names_and_an_absolute_data_folder(folder_run, tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    pets, run = folder_run
    with safe_open(str(run / "last_ema.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == ["cat", "dog", "owl"]
    assert (run / "config.yaml").read_text().count(f"data_dir: {pets}\n") == 1
    monkeypatch.chdir(tmp_path)  # elsewhere, and without the data: the names come from the weights
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes((run / "last_ema.safetensors").read_bytes())
    Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "red.jpg")
    capsys.readouterr()
    assert main(["predict", "red.jpg", "--checkpoint", str(weights), "--json"]) == 0
    labels = {t["label"] for t in json.loads(capsys.readouterr().out)[0]["top"]}
    assert labels == {"cat", "dog", "owl"}
    assert main(["eval", str(run), "--workers", "0"]) == 0  # finds its data from another directory


def test_resuming_on_renamed_or_added_classes_is_refused(folder_run, tmp_path, capsys):
    import shutil

    pets, run = folder_run
    moved, copy = tmp_path / "pets", tmp_path / "run"
    shutil.copytree(pets, moved)
    shutil.copytree(run, copy)
    for split in ("train", "val"):
        (moved / split / "owl").rename(moved / split / "ant")  # still 3 classes, but label 0 is now ant
    capsys.readouterr()
    assert main(["train", "--output", str(copy), "--resume", "--data-dir", str(moved)]) == 2
    err = capsys.readouterr().err
    assert "trained on other classes" in err and "no longer there: owl; new: ant" in err
    assert main(["eval", str(copy), "--data-dir", str(moved), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "only in the weights: owl; only in the data: ant" in err and "give the data it was trained on" in err


def test_curves_are_drawn_in_the_format_the_file_names(folder_run, tmp_path):
    _, run = folder_run
    assert main(["plot", str(run), "--output", str(tmp_path / "curves.svg")]) == 0
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    assert main(["plot", str(run), "--output", str(tmp_path / "curves.xyz")]) == 2
    assert not (tmp_path / "curves.xyz").exists()


def test_a_runs_ema_weights_file_is_scored_as_ema(folder_run):
    from parnet.evaluate import evaluate

    _, run = folder_run
    assert set(evaluate(run / "last_ema.safetensors", workers=0)) == {"ema", "ema_fused"}
    assert set(evaluate(run / "last.safetensors", workers=0)) == {"raw", "raw_fused"}


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_a_quantized_file_of_an_unfinished_run_keeps_its_data_and_says_so(folder_run, tmp_path, monkeypatch, capsys):
    _, run = folder_run
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["quantize", str(run), "--precision", "fp32", "--out", "q.onnx", "--workers", "0"]) == 0
    assert f"note: {run} has not finished training (epoch 1 of 2)" in capsys.readouterr().err
    assert main(["eval", "q.onnx", "--workers", "0"]) == 0  # its data folder is in the file


def test_every_command_on_an_unfinished_run_says_so(folder_run, tmp_path, capsys):
    """eval, export and predict read an unfinished run's last epoch, as quantize does: each says so."""
    pets, run = folder_run
    image = next(f for f in sorted((pets / "val").rglob("*")) if f.is_file())
    note = f"note: {run} has not finished training (epoch 1 of 2)"
    for command in (["eval", str(run), "--workers", "0", "--test-subset", "2"],
                    ["export", "--checkpoint", str(run), "--out", str(tmp_path), "--format", "torchscript"],
                    ["predict", str(image), str(run)]):  # fmt: skip
        capsys.readouterr()
        assert main(command) == 0
        assert note in capsys.readouterr().err, command
