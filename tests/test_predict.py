"""`parnet predict`: top-k classes of images from a run, our files, the authors' files; clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform, resolve_data_config
from torchvision import transforms as T

import parnet
from parnet.cli import main
from parnet.data import DATASETS, FASHION_MNIST_CLASSES, class_names
from parnet.io import save_model
from parnet.predict import load_predictor
from parnet.train import load_weights, make_config, train

from .conftest import TINY_STEM
from .test_data import make_fashion_mnist


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {"rgb": root / "photo.png", "grey": root / "grey.png", "text": root / "notes.png"}
    Image.fromarray(rng.integers(0, 256, (45, 30, 3), dtype=np.uint8)).save(paths["rgb"])
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(paths["grey"])
    paths["text"].write_text("not an image, whatever its name says")
    return paths


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A Fashion-MNIST run of one tiny epoch, written by `parnet train` itself."""
    root = tmp_path_factory.mktemp("predict_run")
    data = make_fashion_mnist(root / "fm", n_train=32, n_test=16)
    settings = dict(dataset="fashion_mnist", data_dir=str(data), model="parnet_cifar_s", model_kwargs=TINY_STEM,
                    epochs=1, batch_size=16, workers=0, threads=1, progress=False, depth=False,
                    output=str(root / "run"))  # fmt: skip
    train(make_config(settings))
    return root / "run"


def _probabilities(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x.unsqueeze(0)).softmax(-1)[0]


def _assert_top(result: dict, probs: torch.Tensor, names: list[str], k: int = 5) -> None:
    top = probs.topk(k)
    assert [t["index"] for t in result["top"]] == top.indices.tolist()
    assert [t["label"] for t in result["top"]] == [names[i] for i in top.indices]
    np.testing.assert_allclose([t["probability"] for t in result["top"]], top.values.numpy(), rtol=1e-5)


def test_run_folder_uses_its_dataset_transform_names_and_ema_weights(run, images):
    predictor = load_predictor(run=run)
    assert predictor.source.endswith("last_ema.safetensors") and predictor.image_mode == "L"
    results = predictor.predict([images["rgb"], images["grey"]])
    model = load_weights(run / "last_ema.safetensors")
    info = DATASETS["fashion_mnist"]
    # As in training: 28x28 grey, padded to 32 with black, normalized with the dataset's statistics.
    by_hand = T.Compose([T.Resize((28, 28)), T.Pad(2), T.ToTensor(), T.Normalize(info.mean, info.std)])
    for result, key in zip(results, ("rgb", "grey")):
        assert result["image"] == str(images[key])
        probs = _probabilities(model, by_hand(Image.open(images[key]).convert("L")))
        _assert_top(result, probs, list(FASHION_MNIST_CLASSES))
    assert load_predictor(run=run, use_ema=False).source.endswith("/last.safetensors")
    assert predictor.predict(str(images["grey"])) == results[1:]  # one path, not its characters
    with pytest.raises(ValueError, match="top_k must be a positive integer, got -1"):
        predictor.predict([images["grey"]], top_k=-1)


def test_predict_command_prints_top5_for_each_image(run, images, capsys):
    assert main(["predict", str(images["rgb"]), str(run), str(images["grey"]), "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("weights: ") and out[1] == str(images["rgb"]) and out[5] == str(images["grey"])
    assert len(out) == 9 and all(line.split()[1] in " ".join(FASHION_MNIST_CLASSES) for line in out[2:5])
    assert main(["predict", str(images["grey"]), str(run), "--json"]) == 0
    assert '"label"' in capsys.readouterr().out


def test_authors_checkpoint_gets_imagenet_names_and_the_released_preprocessing(official_tiny, images, tmp_path):
    path = tmp_path / "release.pth.tar"
    state = official_tiny["state_dict"]
    ema = {k: v + 0.01 if v.is_floating_point() and "running_var" not in k else v for k, v in state.items()}
    torch.save({"state_dict": state, "state_dict_ema": ema}, path)
    predictor = load_predictor(checkpoint=path, model_name="parnet_s_official.in1k")
    assert "EMA" in predictor.source
    [result] = predictor.predict([images["rgb"]])
    config = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("parnet_s_official.in1k").to_dict())
    assert config["interpolation"] == "bilinear" and config["crop_pct"] == 0.875
    x = create_transform(**config)(Image.open(images["rgb"]).convert("RGB"))
    names = ImageNetInfo().label_descriptions()
    _assert_top(result, _probabilities(parnet.load_official(path, use_ema=True), x), names)
    assert "great grey owl" in names[24]


def test_authors_file_of_no_released_architecture_gets_the_releases_preprocessing(official_tiny, tmp_path):
    """The fixture's network (widths 16/32/64) is none of the released ones: it is still an authors' file,
    prepared as their validation did (bilinear), not as our variants (bicubic)."""
    torch.save({"state_dict": official_tiny["state_dict"]}, tmp_path / "tiny.pth.tar")
    transform = load_predictor(checkpoint=tmp_path / "tiny.pth.tar").transform
    assert "interpolation=bilinear" in repr(transform) and "bicubic" not in repr(transform)


def test_our_safetensors_without_a_dataset(images, tmp_path):
    """A 1000-class file gets ImageNet's names, another class count numbers; timm's ImageNet preprocessing."""
    for classes in (1000, 7):
        model = timm.create_model("parnet_s", **TINY_STEM, num_classes=classes).eval()
        path = save_model(model, tmp_path / f"model{classes}.safetensors")
        predictor = load_predictor(checkpoint=path)
        [result] = predictor.predict([images["rgb"]], top_k=9)
        assert len(result["top"]) == min(9, classes)
        x = create_transform(**resolve_data_config(pretrained_cfg=model.pretrained_cfg))(
            Image.open(images["rgb"]).convert("RGB")
        )
        names = ImageNetInfo().label_descriptions() if classes == 1000 else [f"class {i}" for i in range(7)]
        _assert_top(result, _probabilities(model, x), names, k=min(9, classes))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{text}", "{run}"], "not an image Pillow can read"),
        (["{rgb}", "{onnx}"], "is a model file, not an image"),  # weights where images go
        (["{missing}", "{run}"], "no image file"),
        (["{rgb}", "{run}", "{run}"], "one run folder"),
        (["{run}"], "at least one image"),
        (["{rgb}"], "give the weights"),
        (["{rgb}", "{missing}"], "no image file or run folder at"),  # a mistyped run folder: not "give the weights"
        (["{rgb}", "--model", "parnet_s_official.fake"], "no pretrained tag 'fake' (its tags: in1k)"),
        (["{rgb}", "--model", "parnet_s"], "no released weights"),
        (["{rgb}", "{run}", "--checkpoint", "{rgb}"], "not both"),
        (["{rgb}", "--checkpoint", "{missing}"], "no checkpoint"),
        (["{rgb}", "--checkpoint", "{text}"], "cannot read"),
        (["{rgb}", "--checkpoint", "{onnx}"], "m.onnx was not written by `parnet quantize`"),
        (["{rgb}", "{run}", "--device", "gpu"], "unsupported device 'gpu' (use cpu or cuda[:i])"),
        (["{rgb}", "{run}", "--device", "cuda:99"], "device cuda:99 requested but"),
    ],
)
def test_bad_input_is_a_clear_error_without_traceback(run, images, tmp_path, capsys, args, message):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")  # what `parnet quantize` writes is not trained weights
    values = {k: str(v) for k, v in images.items()} | {"run": str(run), "missing": str(tmp_path / "nothing.png")}
    values["onnx"] = str(tmp_path / "m.onnx")
    try:
        code = main(["predict", *(a.format(**values) for a in args)])
    except SystemExit as e:  # argparse's own refusal of a flag's value
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engine_file_predicts_as_the_run_it_was_written_from(run, images, tmp_path, capsys, engine):
    """A `parnet quantize` file (fp32, so the probabilities are the run's) runs on its engine: the run's
    preprocessing, size and class names come from its metadata."""
    from parnet.deployed import SUFFIX, quantize_checkpoint

    pytest.importorskip(engine)
    path = tmp_path / f"model{SUFFIX[engine]}"
    quantize_checkpoint(run, path, precision="fp32", engine=engine, workers=0)
    predictor = load_predictor(checkpoint=path)
    assert predictor.image_mode == "L" and predictor.source == f"{path} (fp32:{engine})"
    expected = load_predictor(run=run).predict([images["rgb"], images["grey"]])
    got = predictor.predict([images["rgb"], images["grey"]])
    for want, have in zip(expected, got):
        assert [t["label"] for t in have["top"]] == [t["label"] for t in want["top"]]
        np.testing.assert_allclose(
            [t["probability"] for t in have["top"]], [t["probability"] for t in want["top"]], atol=1e-5
        )
    assert main(["predict", str(images["grey"]), "--checkpoint", str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"weights: {path} (fp32:{engine})" and len(out) == 4
    for flags, message in ((["--raw"], "leave out --raw"), (["--model", "parnet_s"], "leave out --model")):
        assert main(["predict", str(images["grey"]), "--checkpoint", str(path), *flags]) == 2
        assert message in capsys.readouterr().err


def test_raw_weights_asked_of_a_file_of_ema_weights_are_refused(run, images, capsys):
    assert main(["predict", str(images["grey"]), "--checkpoint", str(run / "last_ema.safetensors"), "--raw"]) == 2
    assert "holds a run's EMA weights only: leave out --raw" in capsys.readouterr().err
    assert main(["predict", str(images["grey"]), "--checkpoint", str(run / "last.safetensors"), "--raw"]) == 0


def test_image_folder_run_is_prepared_as_it_was_evaluated(images, tmp_path):
    """An image-folder run: the folder's evaluation transform (ImageNet statistics, resize and center crop at
    the trained size), not the model's own pretrained config (CIFAR statistics for parnet_cifar_s)."""
    from dataclasses import replace

    from parnet.checkpoint import write_run_weights
    from parnet.data import build_transforms

    for name in ("b", "a"):
        (tmp_path / "folder" / "train" / name).mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    model = timm.create_model("parnet_cifar_s", num_classes=2, **TINY_STEM)
    meta = {"timm_model": "parnet_cifar_s", "model_kwargs": json.dumps(TINY_STEM), "num_classes": "2", "in_chans": "3",
            "dataset": "imagefolder", "img_size": "48"}  # fmt: skip
    write_run_weights(run, 1, model, metadata=meta)
    (run / "config.yaml").write_text(f"dataset: imagefolder\ndata_dir: {tmp_path / 'folder'}\nimg_size: 48\n")
    result = load_predictor(run=run).predict([images["rgb"]])[0]
    expected = build_transforms(replace(DATASETS["imagefolder"], img_size=48), train=False)
    x = expected(Image.open(images["rgb"]).convert("RGB"))
    assert x.shape == (3, 48, 48)
    _assert_top(result, _probabilities(load_weights(run / "last.safetensors"), x), ["a", "b"], k=2)


def test_class_names_of_each_dataset(tmp_path):
    assert class_names("fashion_mnist")[9] == "Ankle boot" and class_names("cifar10")[0] == "airplane"
    meta = tmp_path / "cifar-100-python" / "meta"
    meta.parent.mkdir()
    meta.write_bytes(pickle.dumps({"fine_label_names": [f"n{i}" for i in range(100)]}))
    assert class_names("cifar100", tmp_path)[42] == "n42"
    assert class_names("cifar100", tmp_path / "elsewhere") is None  # the files are not there: numbers instead
    for name in ("b", "a"):
        (tmp_path / "folder" / "train" / name).mkdir(parents=True)
    assert class_names("imagefolder", tmp_path / "folder") == ["a", "b"]
