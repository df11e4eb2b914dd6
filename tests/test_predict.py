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
from parnet.settings import make_config
from parnet.train import train
from parnet.trained import load_weights

from .conftest import TINY_STEM
from .test_data import make_fashion_mnist
from .test_official import _official_parnet_s_state


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
    alone = predictor.predict(str(images["grey"]))  # one path, not its characters
    assert [(r["image"], [t["label"] for t in r["top"]]) for r in alone] == [
        (r["image"], [t["label"] for t in r["top"]]) for r in results[1:]
    ]
    # batch 1 and batch 3 may run other kernels: the same probabilities to float precision
    assert [t["probability"] for t in alone[0]["top"]] == pytest.approx([t["probability"] for t in results[1]["top"]])
    with pytest.raises(ValueError, match="top_k must be a positive integer, got -1"):
        predictor.predict([images["grey"]], top_k=-1)


def test_predict_command_prints_top5_for_each_image(run, images, capsys):
    assert main(["predict", str(images["rgb"]), str(run), str(images["grey"]), "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("weights: ") and out[1] == str(images["rgb"]) and out[5] == str(images["grey"])
    assert len(out) == 9 and all(line.split()[1] in " ".join(FASHION_MNIST_CLASSES) for line in out[2:5])
    assert main(["predict", str(images["grey"]), str(run), "--json"]) == 0
    assert '"label"' in capsys.readouterr().out
    one_by_one = ["predict", str(images["rgb"]), str(images["grey"]), str(run), "--json"]
    assert main([*one_by_one, "--batch-size", "1"]) == 0
    batched = capsys.readouterr().out
    assert main(one_by_one) == 0
    for a, b in zip(json.loads(capsys.readouterr().out), json.loads(batched), strict=True):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        np.testing.assert_allclose(
            [t["probability"] for t in a["top"]], [t["probability"] for t in b["top"]], atol=1e-5
        )


def test_authors_checkpoint_gets_imagenet_names_and_the_released_preprocessing(images, tmp_path):
    """An authors' ParNet-S file with --model parnet_s_official.in1k (their architecture): that release's
    preprocessing, ImageNet's names, the file's EMA weights."""
    path = tmp_path / "release.pth.tar"
    state = _official_parnet_s_state()
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
        (["{text}", "{run}"], "1 of 1 files are not images Pillow can read"),
        (["{rgb}", "{onnx}"], "is a model file, not an image"),  # weights where images go
        (["{missing}", "{run}"], "no image file"),
        (["{rgb}", "{run}", "{run}"], "one run folder"),
        (["{run}"], "at least one image"),
        (["{empty}", "{run}"], "empty holds no image files"),  # a folder that is no run: its images, and it has none
        (["{rgb}", "--checkpoint", "{text}", "--model", "resnet18"], "cannot read"),  # no weights file for timm either
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
    values["empty"] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden.png").write_bytes(Path(values["rgb"]).read_bytes())  # hidden: not an image
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


# -- --model with weights, timm's own weights files ----------------------------------------------------------


def test_model_is_refused_for_weights_that_name_their_dataset(run, images, capsys):
    """A run and its files say how their images are prepared: --model would only contradict them."""
    for weights in ([str(run)], ["--checkpoint", str(run / "last.safetensors")]):
        assert main(["predict", str(images["grey"]), *weights, "--model", "resnet50"]) == 2
        err = capsys.readouterr().err
        assert "the weights say how their images are prepared (dataset fashion_mnist): leave out --model" in err


def test_model_must_name_the_architecture_of_an_authors_or_bare_file(official_tiny, images, tmp_path):
    """With weights that do not name their dataset, --model sets the preprocessing: it must be their network
    (a fused file: compared with the named model fused), else the images would be prepared for another one."""
    torch.save({"state_dict": official_tiny["state_dict"]}, tmp_path / "tiny.pth.tar")
    with pytest.raises(ValueError, match=r"--model parnet_cifar_s is a ParNet of widths \(24, 48, 96\).*small-input.*"
                       r"tiny.pth.tar holds a ParNet of widths \(16, 32, 64\)"):  # fmt: skip
        load_predictor(checkpoint=tmp_path / "tiny.pth.tar", model_name="parnet_cifar_s")
    with pytest.raises(ValueError, match="--model resnet18 is a ResNet, but .*tiny.pth.tar holds a ParNet"):
        load_predictor(checkpoint=tmp_path / "tiny.pth.tar", model_name="resnet18")
    cifar = timm.create_model("parnet_cifar_s", num_classes=10).eval()
    save_model(cifar, tmp_path / "cifar.safetensors")
    save_model(parnet.reparameterize(cifar), tmp_path / "fused.safetensors")
    save_model(timm.create_model("parnet_cifar_s", num_classes=10, small_input=False), tmp_path / "flat.safetensors")
    with pytest.raises(ValueError, match=r"flat.safetensors holds a ParNet of widths \(24, 48, 96\), .* \(4, 5, 5\):"):
        load_predictor(checkpoint=tmp_path / "flat.safetensors", model_name="parnet_cifar_s")  # the same tensors
    size = timm.models.get_pretrained_cfg("parnet_cifar_s").input_size[1:]
    for name in ("cifar", "fused"):
        predictor = load_predictor(checkpoint=tmp_path / f"{name}.safetensors", model_name="parnet_cifar_s")
        assert predictor.transform(Image.open(images["rgb"]).convert("RGB")).shape[1:] == size == (32, 32)
        with pytest.raises(ValueError, match="--model parnet_s is .* holds a ParNet of widths \\(24, 48, 96\\)"):
            load_predictor(checkpoint=tmp_path / f"{name}.safetensors", model_name="parnet_s")


@pytest.fixture(scope="module")
def timm_model() -> torch.nn.Module:
    """A small timm model with released weights (randomly initialized here: no download)."""
    return timm.create_model("test_resnet.r160_in1k").eval()


def test_timm_weights_file_with_model_is_loaded_as_timm_loads_offline_weights(timm_model, images, tmp_path, capsys):
    """timm's model.safetensors, a pytorch_model.bin and a timm training checkpoint (its EMA weights, and the
    argparse args timm saves) load into --model NAME, prepared as NAME's released weights are."""
    import argparse

    from safetensors.torch import save_file

    state = timm_model.state_dict()
    ema = {k: v + 0.01 if v.is_floating_point() and "running_var" not in k else v for k, v in state.items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.save({"state_dict": state, "state_dict_ema": ema, "args": argparse.Namespace(lr=0.1)}, tmp_path / "t.pth.tar")
    config = resolve_data_config(pretrained_cfg=timm_model.pretrained_cfg)
    x = create_transform(**config)(Image.open(images["rgb"]).convert("RGB"))
    assert x.shape == (3, 160, 160)
    names = ImageNetInfo().label_descriptions()
    ema_model = timm.create_model("test_resnet.r160_in1k").eval()
    ema_model.load_state_dict(ema)
    for file, model in (("model.safetensors", timm_model), ("pytorch_model.bin", timm_model), ("t.pth.tar", ema_model)):
        predictor = load_predictor(checkpoint=tmp_path / file, model_name="test_resnet.r160_in1k")
        assert predictor.source == f"{tmp_path / file} (timm test_resnet.r160_in1k)"
        _assert_top(predictor.predict(images["rgb"])[0], _probabilities(model, x), names)
    assert main(["predict", str(images["rgb"]), "--checkpoint", str(tmp_path / "model.safetensors"),
                 "--model", "test_resnet.r160_in1k", "--top", "1"]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[0].endswith("(timm test_resnet.r160_in1k)")


def test_timm_weights_file_errors_name_the_file_and_run_no_code(timm_model, images, tmp_path):
    torch.save(timm_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"cannot load .*pytorch_model.bin as the weights of test_efficientnet \("):
        load_predictor(checkpoint=tmp_path / "pytorch_model.bin", model_name="test_efficientnet")
    with pytest.raises(ValueError, match="pytorch_model.bin is read as timm reads a pretrained file.*leave out --raw"):
        load_predictor(checkpoint=tmp_path / "pytorch_model.bin", model_name="test_resnet", use_ema=False)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_predictor(checkpoint=tmp_path / "cut.safetensors", model_name="test_resnet")
    marker = tmp_path / "ran"
    torch.save({"state_dict": timm_model.state_dict(), "hook": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth.*could run code"):
        load_predictor(checkpoint=tmp_path / "evil.pth", model_name="test_resnet")
    assert not marker.exists()


class _RunsCode:
    """Unpickled, it would create a file: what loading a checkpoint must never do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_no_released_weights_at_hand_says_which_file_to_pass(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    advice = (
        r"download them \(model.safetensors of https://huggingface.co/timm/test_resnet.r160_in1k\) and pass the "
        "file as --checkpoint FILE with --model test_resnet.r160_in1k"
    )
    with pytest.raises(ValueError, match=advice):
        load_predictor(model_name="test_resnet.r160_in1k")


# -- images: batches, folders, PIL images ---------------------------------------------------------------------


def _many_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(1)
    paths = [folder / f"{i:02d}.png" for i in range(n)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (20 + len(paths), 24, 3), dtype=np.uint8)).save(path)
    return paths


def test_images_run_in_batches_decoded_batch_by_batch(run, tmp_path, monkeypatch):
    """Results and order as one at a time; each batch decoded just before it runs, no image before the headers of
    all are checked."""
    import parnet.predict as predict

    paths = _many_images(tmp_path / "imgs", 5)
    predictor = load_predictor(run=run)
    expected = [predictor.predict(p)[0] for p in paths]
    events = []
    read = predict.read_image
    predictor.model.register_forward_pre_hook(lambda module, args: events.append(len(args[0])))
    monkeypatch.setattr(predict, "read_image", lambda *a: events.append("read") or read(*a))
    got = predictor.predict(paths, batch_size=2)
    assert events == ["read", "read", 2, "read", "read", 2, "read", 1]
    assert [r["image"] for r in got] == [str(p) for p in paths]
    for want, have in zip(expected, got):
        assert [t["index"] for t in have["top"]] == [t["index"] for t in want["top"]]
        np.testing.assert_allclose([t["probability"] for t in have["top"]], [t["probability"] for t in want["top"]],
                                   rtol=1e-5)  # fmt: skip
    (tmp_path / "imgs" / "03.png").write_text("no image")
    (tmp_path / "imgs" / "04.png").write_bytes(b"")
    events.clear()
    with pytest.raises(ValueError, match=r"2 of 5 files are not images Pillow can read: .*03.png .*04.png"):
        predictor.predict(paths, batch_size=2)
    assert events == []  # nothing decoded, nothing run
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        predictor.predict(paths, batch_size=0)


def test_a_folder_of_images_is_its_image_files_sorted(run, images, tmp_path, capsys):
    paths = _many_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image: left out")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(paths[0].read_bytes())  # hidden: left out
    (tmp_path / "imgs" / "sub.png").mkdir()  # a folder, whatever its name: left out
    predictor = load_predictor(run=run)
    expected = predictor.predict([images["grey"], *paths])
    assert [r["image"] for r in predictor.predict([images["grey"], tmp_path / "imgs"])] == [
        r["image"] for r in expected
    ]
    assert main(["predict", str(images["grey"]), str(tmp_path / "imgs"), str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    model = tmp_path / "model.safetensors"
    save_model(timm.create_model("parnet_s", **TINY_STEM, num_classes=3), model)
    assert main(["predict", str(tmp_path / "imgs"), "--checkpoint", str(model), "--top", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1::2] == [str(p) for p in paths]
    with pytest.raises(ValueError, match="holds no image files"):
        predictor.predict(tmp_path / "imgs" / "sub.png")


def test_pil_images_are_read_as_image_files_are(run, images, tmp_path):
    """In memory or on disk, an image gives the same result: upright, 8-bit, transparency on white."""
    rgba = np.random.default_rng(2).integers(0, 256, (30, 30, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(np.arange(30) < 15, 0, 255)[:, None]  # the top half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    predictor = load_predictor(run=run)
    from_files = predictor.predict([tmp_path / "rgba.png", images["rgb"]])
    with Image.open(images["rgb"]) as opened:
        got = predictor.predict([Image.fromarray(rgba), opened])
    assert [r["image"] for r in got] == ["<image 0>", "<image 1>"]
    assert [r["top"] for r in got] == [r["top"] for r in from_files]
    assert predictor.predict(Image.fromarray(rgba))[0]["image"] == "<image 0>"  # one image, alone
    with pytest.raises(ValueError, match="images are files, folders or PIL images, got a ndarray"):
        predictor.predict([rgba])
