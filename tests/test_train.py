"""Training, resumption, NaN handling, checkpoints, evaluation, the CLI and DDP, on tiny data and a tiny ParNet."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import parnet
from parnet import checkpoint, engine
from parnet.cli import main
from parnet.curves import plot
from parnet.data import DATASETS
from parnet.evaluate import evaluate
from parnet.settings import DATASET_DEFAULTS, TrainConfig, check_config, make_config
from parnet.train import train
from parnet.trained import holds_ema_weights, load_weights

from .conftest import TINY_STEM
from .test_data import make_fashion_mnist, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="fashion_mnist",
        data_dir=str(data),
        model="parnet_cifar_s",
        model_kwargs=TINY_STEM,
        epochs=2,
        batch_size=32,
        lr=0.05,
        warmup_epochs=0.5,
        workers=0,
        threads=1,
        progress=False,
        depth=False,
        output=str(out),
        device="cpu",  # the tests' figures are the CPU's, whatever else the machine has
        amp="off",  # `auto` may time a step and pick bf16 on a CPU with native bf16
    )
    return make_config({**base, **kw})


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> Path:
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=128, n_test=64)


@pytest.fixture(scope="module")
def reference_run(fmnist, tmp_path_factory) -> tuple[Path, dict]:
    """Two epochs without interruption."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    return out, train(tiny_config(fmnist, out, depth=True))


def test_a_runs_config_yaml_replays_the_run_not_the_invocation(reference_run, tmp_path):
    """config.yaml holds the run's settings without its folder, --resume or --stop-after: given to --config with
    another --output it starts the same run there. A file that sets --resume or --stop-after (an earlier
    version's config.yaml) has them left out, and says so."""
    out, _ = reference_run
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert not {"output", "resume", "stop_after"} & saved.keys()
    replay = make_config({"output": str(tmp_path / "again")}, str(out / "config.yaml"))
    original = TrainConfig(**checkpoint.read_state(out)["extra"]["config"])
    assert replay.model_dump() == {**original.model_dump(), "output": str(tmp_path / "again")}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump({**saved, "resume": True, "stop_after": 1}))
    with pytest.warns(UserWarning, match="resume: True, stop_after: 1, a setting of one invocation.*left out"):
        again = make_config({"output": str(tmp_path / "again")}, str(tmp_path / "old.yaml"))
    assert again == replay


def test_training_writes_everything_and_fused_model_scores_identically(reference_run):
    out, res = reference_run
    for name in ("last.safetensors", "last_ema.safetensors", "last_state.pt", "metrics.jsonl", "metrics.csv",
                 "config.yaml", "results.json", "fused.safetensors", "ema_fused.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    rows = checkpoint.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert {"train_loss", "test_top1", "test_top5", "ema_top1", "lr", "images_per_s"} <= set(rows[0])
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    assert res["depth"] == 12 and res["epochs_done"] == 2
    # Re-parameterization changes no prediction, so the scores are identical (two tiny epochs learn little,
    # so a predicted class may be the same for every image: the fused files' logits are compared too).
    assert res["fused_prediction_changes"] == 0 and res["fused_top1"] == res["test_top1"]
    assert res["ema_fused_prediction_changes"] == 0 and res["ema_fused_top1"] == res["ema_top1"]
    assert res["fused_params"] < res["params"]
    x = torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for plain, fused in (("last", "fused"), ("last_ema", "ema_fused")):
            want, got = load_weights(out / f"{plain}.safetensors")(x), load_weights(out / f"{fused}.safetensors")(x)
            assert want.std() > 1e-3  # logits that depend on the weights, so a wrong fusion shows
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not list(out.glob("*.tmp")), "temporary files left behind"


def test_lr_base_size_scales_the_rate_to_the_global_batch(fmnist, tmp_path, capsys):
    """--lr-base-size N: --lr is the rate for N images, scaled linearly to the run's batch x processes."""
    from parnet.settings import peak_lr

    train(tiny_config(fmnist, tmp_path / "run", epochs=1, lr=0.1, lr_base_size=64))  # 32 images a step
    assert "--lr 0.1 for 64 images: 0.05 for the global batch of 32" in capsys.readouterr().out
    assert set(checkpoint.read_state(tmp_path / "run")["scheduler"]["base_values"]) == {0.05}
    cfg = make_config({"lr": 0.1, "lr_base_size": 256, "batch_size": 256, "min_lr": 0.02})
    assert peak_lr(cfg, 8) == pytest.approx(0.8) and peak_lr(cfg.model_copy(update={"lr_base_size": None}), 8) == 0.1
    with pytest.raises(ValueError, match="0.1 for 256 images is 0.0097.* for this run's 25, below --min-lr 0.02"):
        peak_lr(cfg.model_copy(update={"batch_size": 25}), 1)


def test_test_data_that_fails_to_load_keeps_the_epochs_training(fmnist, reference_run, tmp_path, monkeypatch, capsys):
    """A test image that fails when decoded (headers are checked up front, not every pixel) stops the run with the
    epoch's training checkpointed; --resume scores that epoch first and ends as an uninterrupted run."""
    from parnet import train as train_module

    ref, _ = reference_run
    out = tmp_path / "run"
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 2's first scoring (epoch 1 scores raw and EMA weights)
            raise OSError("image file is truncated")
        return score(*args, **kwargs)

    score = train_module.evaluate_model
    monkeypatch.setattr(train_module, "evaluate_model", failing)
    with pytest.raises(OSError, match="truncated"):
        train(tiny_config(fmnist, out, depth=True))
    assert f"epoch 2's training is saved in {out}" in capsys.readouterr().err
    state = checkpoint.read_state(out)
    assert state["epoch"] == 1 and "test_top1" not in state["extra"]["metrics"][-1]
    monkeypatch.undo()
    train(tiny_config(fmnist, out, depth=True, resume=True))
    assert "scoring epoch 2, whose test data failed to load" in capsys.readouterr().out
    for name in ("last.safetensors", "last_ema.safetensors", "fused.safetensors"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    timing = ("epoch_seconds", "images_per_s")
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in checkpoint.read_metrics(d)] for d in (out, ref)]
    assert rows[0] == rows[1]


def test_a_run_saved_before_a_setting_existed_resumes_with_its_default(fmnist, tmp_path):
    """A checkpoint written before --lr-base-size and depth-grouped --layer-decay: the run used the defaults, so a
    resume that sets the new flag is refused (it was ignored), and one with --layer-decay, whose optimizer state
    fits the old stream-ordered groups only, is refused with the reason."""
    out = tmp_path / "run"
    train(tiny_config(fmnist, out, epochs=2, stop_after=1, layer_decay=0.8))
    state = checkpoint.read_state(out)
    del state["extra"]["config"]["lr_base_size"], state["extra"]["layer_groups"]  # as an earlier version wrote it
    torch.save(state, out / "last_state.pt")
    with pytest.raises(ValueError, match="lr_base_size was None, now 8"):
        train(tiny_config(fmnist, out, epochs=2, layer_decay=0.8, lr_base_size=8, resume=True))
    with pytest.raises(ValueError, match="started by an earlier version, whose --layer-decay grouped"):
        train(tiny_config(fmnist, out, epochs=2, layer_decay=0.8, resume=True))


def test_schedule_warmup_cosine_and_weight_decay_exclusions(reference_run):
    """The paper's recipe as run: linear warm-up then cosine to min_lr per step; no decay on biases and norms."""
    out, _ = reference_run
    # 128 images / 32 = 4 steps an epoch, 8 in all; warm-up 0.5 epoch = 2 steps; lr 0.05, min_lr 0.
    lrs = [r["lr"] for r in checkpoint.read_metrics(out)]  # the rate each epoch's last step (3 and 7) used
    assert lrs[0] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 8)))
    assert lrs[1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 7 / 8))) and lrs[1] > 0
    state = checkpoint.read_state(out)
    assert state["scheduler"]["warmup_t"] == 2 and state["scheduler"]["t_initial"] == 8
    groups, buffers = state["optimizer"]["param_groups"], state["optimizer"]["state"]
    decay = [i for g in groups if g["weight_decay"] == 5e-4 for i in g["params"]]
    no_decay = [i for g in groups if g["weight_decay"] == 0 for i in g["params"]]
    n_params = len(list(timm.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **TINY_STEM).parameters()))
    assert sorted(decay + no_decay) == list(range(n_params))
    # A parameter's momentum buffer has its shape: only vectors (biases, BN weights) go undecayed.
    assert all(buffers[i]["momentum_buffer"].ndim > 1 for i in decay)
    assert no_decay and all(buffers[i]["momentum_buffer"].ndim <= 1 for i in no_decay)
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in groups)


def test_resume_ends_bit_identical(fmnist, tmp_path, reference_run, capsys):
    ref_dir, ref = reference_run
    out = tmp_path / "resumed"
    first = train(tiny_config(fmnist, out, stop_after=1))
    assert first["epochs_done"] == 1 and not (out / "results.json").exists()
    # `parnet train --output RUN --resume` takes the run's settings from RUN/config.yaml; a setting given
    # explicitly that the restored state depends on must still match it.
    assert main(["train", "--output", str(out), "--resume", "--lr", "0.2"]) == 2
    assert "lr was 0.05, now 0.2" in capsys.readouterr().err
    # A NaN-free resume from the epoch-1 checkpoint, in a fresh call, without repeating the settings
    # (nor the first call's --stop-after).
    assert main(["train", "--output", str(out), "--resume"]) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["epochs_done"] == 2
    a, b = load_file(ref_dir / "last.safetensors"), load_file(out / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = load_file(ref_dir / "last_ema.safetensors"), load_file(out / "last_ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = checkpoint.read_state(ref_dir), checkpoint.read_state(out)
    for group_a, group_b in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(group_a["momentum_buffer"], group_b["momentum_buffer"])
    strip = ("epoch_seconds", "images_per_s")
    rows_a = [{k: v for k, v in r.items() if k not in strip} for r in checkpoint.read_metrics(ref_dir)]
    rows_b = [{k: v for k, v in r.items() if k not in strip} for r in checkpoint.read_metrics(out)]
    assert rows_a == rows_b
    assert ref["test_top1"] == second["test_top1"] and ref["ema_top1"] == second["ema_top1"]


@pytest.mark.slow
def test_compiled_training_follows_the_eager_run(fmnist, tmp_path):
    """``--compile`` trains the same model: same losses to float rounding, plain checkpoint keys."""
    short = dict(model_kwargs={**TINY_STEM, "blocks": [1, 1, 1]}, epochs=1)  # fewer kernels to compile
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    train(tiny_config(fmnist, eager_dir, **short))
    assert train(tiny_config(fmnist, compiled_dir, compile=True, **short))["epochs_done"] == 1
    eager, compiled = checkpoint.read_metrics(eager_dir)[0], checkpoint.read_metrics(compiled_dir)[0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-3)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], abs=1e-3)
    keys = load_file(eager_dir / "last.safetensors").keys()
    assert load_file(compiled_dir / "last.safetensors").keys() == keys  # no "_orig_mod." prefixes


def test_resume_refuses_a_different_model_and_an_existing_run(fmnist, tmp_path, monkeypatch):
    from parnet import precision

    monkeypatch.setattr(precision, "has_native_bf16", lambda: True)  # bf16 is refused on a CPU without it
    out = tmp_path / "run"
    # Also the options the default CPU run leaves off: bf16 autocast, channels_last, Mixup/CutMix.
    res = train(
        tiny_config(
            fmnist,
            out,
            epochs=1,
            train_subset=32,
            test_subset=16,
            amp="bf16",
            channels_last="on",
            mixup=0.8,
            cutmix=1.0,
        )
    )
    assert 0 <= res["test_top1"] <= 100
    # fusion is checked in float32 (bf16 rounds fused and unfused convs differently), beside the unfused fp32 score
    assert res["fused_prediction_changes"] == 0 and res["fused_top1"] == res["fp32_top1"]
    assert res["ema_fused_prediction_changes"] == 0 and res["ema_fused_top1"] == res["ema_fp32_top1"]
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(fmnist, out, epochs=1, train_subset=32))
    with pytest.raises(ValueError, match="model_kwargs"):
        train(
            tiny_config(
                fmnist, out, epochs=2, train_subset=32, resume=True, model_kwargs={**TINY_STEM, "head_width": 32}
            )
        )
    # Settings the restored optimizer and schedule would silently override: a longer --epochs would go on
    # at the finished cosine's min_lr, a new --lr or --weight-decay would be ignored.
    for change, message in [({"epochs": 2}, "epochs was 1, now 2"), ({"lr": 0.1}, "lr was 0.05, now 0.1"),
                            ({"weight_decay": 0.0}, "weight_decay")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            train(tiny_config(fmnist, out, train_subset=32, resume=True, **{"epochs": 1, **change}))
    # Same settings (a tuple where the file has a list): nothing to do, the run is finished.
    again = train(tiny_config(fmnist, out, epochs=1, train_subset=32, resume=True, amp="bf16",
                              model_kwargs={**TINY_STEM, "widths": (8, 16, 32)}))  # fmt: skip
    assert again["epochs_done"] == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(fmnist, tmp_path / "none", resume=True))


def test_img_size_defaults_to_the_datasets_or_the_models_own(tmp_path):
    """timm's way: an image folder trains at the model's default input size; the 32x32 datasets at 32."""
    assert make_config({"dataset": "fashion_mnist", "model": "parnet_s"}).img_size == 32
    assert make_config({"dataset": "imagefolder"}).img_size == 224  # parnet_s, the folders' default model
    assert make_config({"dataset": "imagefolder", "model": "parnet_cifar_s"}).img_size == 32
    assert make_config({"dataset": "imagefolder", "model": "resnet20_cifar", "img_size": 64}).img_size == 64
    # A run saved before the setting existed resumes at the size it trained at (folders: 224), not the model's.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("dataset: imagefolder\nmodel: parnet_cifar_s\n")
    assert make_config({"output": str(old), "resume": True}).img_size == 224


def test_a_run_at_another_size_is_evaluated_and_quantized_at_it(tmp_path, monkeypatch):
    from PIL import Image

    from parnet import data
    from parnet.deployed import quantize_checkpoint, read_info
    from parnet.predict import load_predictor
    from parnet.trained import TrainedOn, trained_on

    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    out = tmp_path / "run"
    kw = dict(dataset="imagefolder", batch_size=4, epochs=1, img_size=48)
    with pytest.raises(ValueError, match="--img-size 36 does not suit parnet_cifar_s.*multiples of 8"):
        train(tiny_config(folder, tmp_path / "bad", **{**kw, "img_size": 36}))
    res = train(tiny_config(folder, out, **kw))
    assert res["img_size"] == 48 and yaml.safe_load((out / "config.yaml").read_text())["img_size"] == 48
    assert trained_on(out).img_size == trained_on(out / "fused.safetensors").img_size == 48
    config = (out / "config.yaml").read_text()  # a copy for people to read: the weights say what they are
    (out / "config.yaml").write_text(config.replace("img_size: 48", "img_size: 96").replace("imagefolder", "cifar10"))
    assert (trained_on(out).dataset, trained_on(out).img_size) == ("imagefolder", 48)
    (out / "config.yaml").unlink()
    names = ("class0", "class1")  # the weights name their classes and data folder too
    assert trained_on(out) == trained_on(out / "last.safetensors") == TrainedOn("imagefolder", str(folder), 48, names)
    (out / "config.yaml").write_text(config)
    with pytest.raises(ValueError, match="img_size was 48, now 64"):
        train(tiny_config(folder, out, resume=True, **{**kw, "img_size": 64}))
    sizes = []
    build = data.build_datasets
    monkeypatch.setattr(data, "build_datasets", lambda *a, **k: sizes.append(k.get("img_size")) or build(*a, **k))
    assert evaluate(out, workers=0)["raw"]["n"] == 8
    assert evaluate(out / "fused.safetensors", data_dir=str(folder), workers=0)["raw_fused"]["n"] == 8
    written = quantize_checkpoint(out, tmp_path / "q.onnx", "fp32", "onnxruntime", workers=0)
    assert written["prediction_changes"] == 0 and read_info(tmp_path / "q.onnx").height == 48
    assert sizes == [48, 48, 48]
    # another size, asked for: built, calibrated and scored at it (ParNet is convolutional)
    args = ["quantize", str(out), "--precision", "fp32", "--out", str(tmp_path / "q64.onnx"), "--workers", "0"]
    assert main([*args, "--resolution", "64"]) == 0 and read_info(tmp_path / "q64.onnx").height == 64
    assert sizes[3:] == [64]
    for source in ({"run": out}, {"checkpoint": out / "fused.safetensors"}):
        predictor = load_predictor(**source)
        assert predictor.transform(Image.new("RGB", (40, 30))).shape == (3, 48, 48)
    # parnet export: the size the weights trained at, unless told
    import onnx

    for extra, size in (([], 48), (["--resolution", "64"], 64)):
        args = ["export", "--checkpoint", str(out), "--name", "run", "--format", "onnx", "--no-check"]  # a run folder
        assert main([*args, "--out", str(tmp_path / f"onnx{size}"), *extra]) == 0
        graph_input = onnx.load(str(tmp_path / f"onnx{size}" / "run.onnx")).graph.input[0]
        assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [3, size, size]


def test_fine_tuning_keeps_the_weights_restarts_the_classifier_and_adapts_the_input(reference_run):
    """timm's load_pretrained, for --initial-checkpoint: a grey 10-class run into an RGB 2-class model."""
    from parnet.transfer import initialize_from

    out, _ = reference_run
    src = load_weights(out / "last_ema.safetensors").eval()
    model = timm.create_model("parnet_cifar_s", num_classes=2, in_chans=3, **TINY_STEM)
    fresh_classifier = model.head.fc.weight.clone()
    note = initialize_from(model, out)
    assert "classifier restarted for 2 classes (the weights have 10)" in note
    assert "input convolutions adapted from 1 to 3 channels" in note and "last_ema.safetensors" in note
    theirs, ours = src.state_dict(), model.state_dict()
    assert torch.equal(ours["head.fc.weight"], fresh_classifier)
    inputs = [f"stem.0.{branch}.conv.weight" for branch in ("dense", "point", "gate")]
    for key in inputs:
        assert torch.allclose(ours[key], theirs[key].repeat(1, 3, 1, 1) / 3)
    rest = [k for k in ours if not k.startswith("head.fc.") and k not in inputs]
    assert len(rest) > 100 and all(torch.equal(ours[k], theirs[k]) for k in rest)
    # A grey image given as three equal channels: the same features as the source network's
    x = torch.randn(2, 1, 32, 32)
    features = model.eval().forward_head(model.forward_features(x.expand(-1, 3, -1, -1)), pre_logits=True)
    assert torch.allclose(features, src.forward_head(src.forward_features(x), pre_logits=True), atol=1e-5)


def test_fine_tuning_matches_the_classifier_rows_by_class_name(reference_run):
    """Data of the same class count but other names (renamed, reordered): each class keeps its own row, a new
    one starts afresh; rows passed by position would relabel classes silently."""
    from parnet.trained import trained_on
    from parnet.transfer import initialize_from

    out, _ = reference_run
    theirs_names = list(trained_on(out).class_names)
    names = ["a new class", *reversed(theirs_names[1:])]  # 10 classes: one renamed, the rest reversed
    src = load_weights(out / "last_ema.safetensors").state_dict()
    model = timm.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **TINY_STEM)
    fresh = model.head.fc.weight.clone()
    note = initialize_from(model, out, names)
    assert "classifier rows matched by class name: 9 of 10 kept, the others restarted" in note
    ours = model.state_dict()
    assert torch.equal(ours["head.fc.weight"][0], fresh[0])
    for i, name in enumerate(names[1:], start=1):
        j = theirs_names.index(name)
        assert torch.equal(ours["head.fc.weight"][i], src["head.fc.weight"][j])
        assert torch.equal(ours["head.fc.bias"][i], src["head.fc.bias"][j])
    same = timm.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **TINY_STEM)
    assert "classifier" not in initialize_from(same, out, theirs_names)  # the same names: kept as they are
    assert torch.equal(same.state_dict()["head.fc.weight"], src["head.fc.weight"])


def test_fine_tuning_refuses_what_it_cannot_start_from(reference_run, tmp_path):
    from parnet.transfer import initialize_from

    out, _ = reference_run

    def tiny(**kw):
        return timm.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **{**TINY_STEM, **kw})

    with pytest.raises(ValueError, match="fused .* cannot be trained"):
        initialize_from(tiny(), out / "ema_fused.safetensors")
    with pytest.raises(ValueError, match=r"another architecture: act 'silu' \(the model: 'relu'\)"):
        initialize_from(tiny(act="relu"), out)  # the shapes alone would fit
    with pytest.raises(ValueError, match="head_width 64 .the model: 32."):
        initialize_from(tiny(head_width=32), out)
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        initialize_from(timm.create_model("resnet20_cifar", in_chans=1), out)
    with pytest.raises(FileNotFoundError):
        initialize_from(tiny(), tmp_path / "none.safetensors")


def test_fine_tuning_from_the_authors_file_takes_their_ema_weights(official_tiny, tmp_path):
    from parnet import load_official
    from parnet.transfer import initialize_from

    raw = official_tiny["state_dict"]
    ema = {k: v * 0.5 if v.is_floating_point() and k.endswith("conv.weight") else v for k, v in raw.items()}
    torch.save({"state_dict": raw, "state_dict_ema": ema, "epoch": 3}, tmp_path / "authors.pth.tar")
    reference = load_official({"state_dict": ema}, activation="relu")
    model = timm.create_model("parnet_s_official", num_classes=2, **dataclasses.asdict(reference.cfg))
    assert "classifier restarted for 2 classes" in initialize_from(model, tmp_path / "authors.pth.tar")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("head.fc."))


def test_a_fine_tuning_run_starts_from_the_weights_once(reference_run, tmp_path, capsys):
    """The initial weights are read at the start only: a resumed run continues from its own checkpoint."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("last.safetensors", "last_ema.safetensors"):
        (source / name).write_bytes((reference_run[0] / name).read_bytes())
    folder = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    kw = dict(dataset="imagefolder", batch_size=4, epochs=2, initial_checkpoint=str(source))
    train(tiny_config(folder, tmp_path / "run", stop_after=1, **kw))
    assert f"initialized from {source / 'last_ema.safetensors'}" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["initial_checkpoint"] == str(source)
    (source / "last.safetensors").unlink()
    (source / "last_ema.safetensors").unlink()
    assert train(tiny_config(folder, tmp_path / "run", resume=True, **kw))["epochs_done"] == 2
    assert "initialized from" not in capsys.readouterr().out


def test_a_finished_run_without_its_checkpoint_is_not_overwritten(fmnist, tmp_path):
    """Deleting last_state.pt (the biggest file) to save space must not let a new run replace the results."""
    out = tmp_path / "run"
    train(tiny_config(fmnist, out, epochs=1, train_subset=32, test_subset=16, ema=False))
    (out / "last_state.pt").unlink()
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds a run \(last.safetensors, metrics.jsonl, results.json"):
        train(tiny_config(fmnist, out, epochs=1, train_subset=32, test_subset=16, ema=False))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == kept
    # A folder holding only the config.yaml and lock file of a run killed in its first epoch may be reused;
    # a config.yaml or metrics.csv of the user's is never replaced.
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / "config.yaml").write_text("epochs: 1\n")
    (tmp_path / "killed" / ".lock").write_text("")
    train(tiny_config(fmnist, tmp_path / "killed", epochs=1, train_subset=32, test_subset=16, ema=False))
    for name in ("config.yaml", "metrics.csv"):
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_text("the user's own\n")
        with pytest.raises(ValueError, match=f"holds {name}, which a new run would replace"):
            train(tiny_config(fmnist, mine, epochs=1, train_subset=32, test_subset=16, ema=False))
        assert [p.name for p in mine.iterdir()] == [name] and (mine / name).read_text() == "the user's own\n"


def test_more_threads_than_cpus_is_warned(fmnist, tmp_path, capsys, monkeypatch):
    """Oversubscribed threads make training many times slower (175 s for two steps once): said at the start."""
    import parnet.loaders

    threads = torch.get_num_threads()
    monkeypatch.setattr(parnet.loaders, "available_cpus", lambda: 1)
    try:
        train(tiny_config(fmnist, tmp_path / "t", epochs=1, train_subset=32, test_subset=16, ema=False, threads=2))
    finally:
        torch.set_num_threads(threads)
    assert "--threads 2 is more than the CPUs this process may use (1): slower" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fmnist, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    args = ["train", "--data-dir", str(fmnist), "--output", str(out), "--model-kwargs", "widths=[8,16,32]",
            "head_width=64", "stem_width=8", "--batch-size", "32", "--train-subset", "64", "--workers", "0",
            "--threads", "1", "--no-progress", "--warmup-epochs", "0", "--no-depth", "--test-subset", "16"]  # fmt: skip
    assert main(args + ["--epochs", "2", "--stop-after", "1"]) == 0
    before = (out / "last_state.pt").read_bytes(), (out / "last.safetensors").read_bytes()
    # Continue, with a loss that turns NaN on the second step of the second epoch.
    from timm.loss import LabelSmoothingCrossEntropy

    calls, forward = [], LabelSmoothingCrossEntropy.forward

    def poisoned(self, x, target):
        calls.append(1)
        loss = forward(self, x, target)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(LabelSmoothingCrossEntropy, "forward", poisoned)
    code = main(args + ["--epochs", "2", "--resume"])
    err = capsys.readouterr().err
    assert code == 3 and "loss is nan at step 3" in err and "last checkpoint" in err
    assert (out / "last_state.pt").read_bytes() == before[0]
    assert (out / "last.safetensors").read_bytes() == before[1]
    assert checkpoint.read_state(out)["epoch"] == 0
    assert not list(out.glob("*.tmp"))


def test_check_finite():
    engine.check_finite(torch.tensor(1.0), 0)
    with pytest.raises(engine.NonFiniteLossError, match="step 7"):
        engine.check_finite(torch.tensor(float("inf")), 7)


def test_eval_and_plot_of_a_run(reference_run, capsys):
    out, res = reference_run
    scores = evaluate(out, workers=0)
    assert set(scores) == {"raw", "raw_fused", "ema", "ema_fused"}
    assert scores["raw"]["top1"] == pytest.approx(res["test_top1"])
    assert scores["ema"]["top1"] == pytest.approx(res["ema_top1"])
    assert scores["raw_fused"]["top1"] == scores["raw"]["top1"] and scores["raw_fused"]["prediction_changes"] == 0
    last = checkpoint.read_metrics(out)[-1]  # the losses depend on every logit, not only on the predicted class
    assert scores["raw"]["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    assert scores["ema"]["loss"] == pytest.approx(last["ema_loss"], rel=1e-5)
    assert scores["raw_fused"]["loss"] == pytest.approx(scores["raw"]["loss"], rel=1e-5)
    assert scores["raw"]["n"] == 64
    assert main(["eval", str(out), "--workers", "0", "--json", "--test-subset", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ema_fused"]["n"] == 16 and printed["ema_fused"]["prediction_changes"] == 0
    png = plot(out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out)]) == 0
    assert main(["plot", str(out / "last.safetensors")]) == 2  # a file: said so, not its bytes read as JSON rows
    assert "last.safetensors is not a run folder" in capsys.readouterr().err


def test_eval_of_a_pruned_run_folder_and_of_a_device_not_there(reference_run, tmp_path, capsys):
    """A run folder kept with its EMA weights only (as results/ keeps them) is scored on those, one with its
    fused weights only on those; a device this machine lacks is a clear error before any work."""
    import shutil

    out, res = reference_run
    pruned = tmp_path / "pruned"
    shutil.copytree(out, pruned)
    (pruned / "last.safetensors").unlink()
    scores = evaluate(pruned, workers=0)
    assert set(scores) == {"ema", "ema_fused"} and scores["ema"]["top1"] == pytest.approx(res["ema_top1"])
    (pruned / "last_ema.safetensors").unlink()
    # a finished run's fused weights are what is left: scored as such, not fused again
    fused = sorted(f.name for f in pruned.glob("*fused.safetensors"))
    assert fused == ["ema_fused.safetensors", "fused.safetensors"]
    from_fused = evaluate(pruned, workers=0)
    assert set(from_fused) == {"raw_fused", "ema_fused"}
    assert from_fused["ema_fused"]["top1"] == pytest.approx(scores["ema_fused"]["top1"])
    # the fused EMA file alone says it holds EMA weights (its header), as predict --raw needs to know
    assert set(evaluate(out / "ema_fused.safetensors", workers=0)) == {"ema_fused"}
    assert holds_ema_weights(out / "ema_fused.safetensors") and not holds_ema_weights(out / "fused.safetensors")
    for name in fused:
        (pruned / name).unlink()
    with pytest.raises(FileNotFoundError, match="holds no last_ema.safetensors, last.safetensors, ema_fused"):
        evaluate(pruned, workers=0)
    (pruned / "last_state.pt").unlink()  # a finished run kept without weights or state (as results/ keeps some)
    with pytest.raises(FileNotFoundError, match="holds no last_ema.safetensors, last.safetensors, ema_fused"):
        evaluate(pruned, workers=0)
    for name in ("metrics.jsonl", "results.json"):  # as a run stopped in its first epoch leaves its folder
        (pruned / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no weights yet: no epoch of its run has finished .*--resume"):
        evaluate(pruned, workers=0)
    for device, message in (("gpu", "unsupported device 'gpu'"), ("cuda:99", "device cuda:99 requested but")):
        with pytest.raises(ValueError, match=message):
            evaluate(out, workers=0, device=device)


def test_eval_on_data_with_other_channels_names_the_runs_dataset(reference_run, tmp_path, capsys):
    """A 1-channel Fashion-MNIST run scored on 3-channel CIFAR: said before looking for the data."""
    out, _ = reference_run
    assert main(["eval", str(out), "--dataset", "cifar10", "--data-dir", str(tmp_path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "trained on 1-channel data (fashion_mnist), cifar10 has 3-channel images" in err
    assert "use it on fashion_mnist" in err and "in_chans" not in err


def test_eval_fused_safetensors_alone(reference_run, fmnist):
    out, res = reference_run
    scores = evaluate(out / "fused.safetensors", dataset="fashion_mnist", data_dir=str(fmnist), workers=0)
    assert set(scores) == {"raw_fused"} and scores["raw_fused"]["top1"] == res["fused_top1"]
    assert scores["raw_fused"]["loss"] == pytest.approx(checkpoint.read_metrics(out)[-1]["test_loss"], rel=1e-5)


def test_eval_accepts_the_authors_checkpoints(tmp_path, monkeypatch):
    """A tiny checkpoint in the authors' layout (2 classes), scored on a 224 image folder, its images prepared as
    `parnet predict` prepares them (their release's bilinear resizing, not our image folders' bicubic)."""
    from parnet import evaluate as evaluate_module
    from parnet.predict import load_predictor

    tiny = torch.load(ROOT / "tests" / "fixtures" / "official_tiny.pt", weights_only=True)
    sd = dict(tiny["state_dict"])
    for k in [k for k in sd if k.endswith(("fc.weight", "fc.bias")) and sd[k].shape[0] == 1000]:
        sd[k] = sd[k][:2].clone()
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": sd, "state_dict_ema": sd, "epoch": 3}, path)
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=2)
    transforms = []
    score = evaluate_module.evaluate_model
    monkeypatch.setattr(
        evaluate_module,
        "evaluate_model",
        lambda net, loader, *a, **k: transforms.append(loader.dataset.transform) or score(net, loader, *a, **k),
    )
    scores = evaluate(path, dataset="imagefolder", data_dir=str(data), workers=0, batch_size=4)
    assert set(scores) == {"raw", "raw_fused", "ema", "ema_fused"}
    assert scores["raw"]["n"] == 4 and scores["raw_fused"]["prediction_changes"] == 0
    predicted = repr(load_predictor(checkpoint=path).transform)
    assert "interpolation=bilinear" in predicted and {repr(t) for t in transforms} == {predicted}
    # `parnet quantize` prepares them alike (calibration and scoring), and its file says how: an fp32 engine
    # file reproduces the weights' own scores
    monkeypatch.undo()
    from parnet.deployed import quantize_checkpoint

    quantize_checkpoint(path, tmp_path / "official.onnx", "fp32", dataset="imagefolder", data_dir=str(data), workers=0)
    assert repr(load_predictor(checkpoint=tmp_path / "official.onnx").transform) == predicted
    engine_scores = evaluate(tmp_path / "official.onnx", workers=0, batch_size=4)["fp32:onnxruntime"]
    assert engine_scores["loss"] == pytest.approx(scores["ema"]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lr", "-1"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--model", "no_such_model"], "unknown model"),
        (["--dataset", "mnist2"], "unknown dataset"),
        (["--re-prob", "1.5"], "--re-prob"),
        (["--ema-decay", "1"], "--ema-decay"),
        (["--model-kwargs", "widths"], "KEY=VALUE"),
        (["--sched", "plateau"], "--sched"),
        (["--img-size", "4"], "at least 8 pixels"),  # timm's plateau steps per epoch on a metric; the loop per update
        (["--model-kwargs", "in_chans=3"], "in_chans is not accepted here: set by the dataset's images"),
        (["--threads", "100000"], "--threads: Input should be less than or equal to 1024"),
        (["--lr", "nan"], "--lr: Input should be a finite number"),
        (["--amp", "bf32"], "--amp: Input should be 'auto', 'bf16', 'fp16' or 'off'"),
        (["--auto-augment", "trivialaugment"], "not a timm auto-augment spec (Unknown AA policy"),
        (["--auto-augment", "rand-m9-bogus"], "sections timm would ignore (bogus)"),
        (["--decay-milestones", "20,10"], "must be one or more increasing epochs"),
        (["--decay-milestones", "a,b"], "must be epochs separated by commas"),
    ],
)
def test_parser_refuses_impossible_settings(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--output", str(tmp_path / "x")] + flags)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_yaml_config_and_precedence(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("dataset: cifar10\nepochs: 7\nlr: 0.05\nmodel_kwargs: {widths: [8, 16, 32]}\n")
    cfg = make_config({"lr": 0.02}, str(cfg_file))
    assert (cfg.dataset, cfg.epochs, cfg.lr, cfg.warmup_epochs) == ("cifar10", 7, 0.02, 5)  # warm-up: cifar default
    assert cfg.model_kwargs == {"widths": [8, 16, 32]}
    # a flag's architecture keyword joins the file's rather than dropping them
    merged = make_config({"model_kwargs": {"head_width": 64, "widths": [4, 8, 16]}, "epochs": 2}, str(cfg_file))
    assert merged.model_kwargs == {"widths": [4, 8, 16], "head_width": 64} and merged.epochs == 2
    assert make_config({}).epochs == 30  # fashion_mnist default
    cfg_file.write_text("model_kwargs: {num_classes: 5}\n")
    with pytest.raises(ValueError, match="num_classes is not accepted here: set by the dataset"):
        make_config({}, str(cfg_file))
    cfg_file.write_text("epochs: -3\n")
    with pytest.raises(ValueError, match="epochs"):
        make_config({}, str(cfg_file))
    cfg_file.write_text("epochs:\n")  # left empty: an error naming it, not a TypeError mid-run
    with pytest.raises(ValueError, match="epochs: needs a value"):
        make_config({}, str(cfg_file))
    cfg_file.write_text("model_kwargs: null\n")
    with pytest.raises(ValueError, match="model_kwargs: needs a value"):
        make_config({}, str(cfg_file))
    cfg_file.write_text("data_dir: null\ndevice:\n")
    assert make_config({}, str(cfg_file)).data_dir == "/usr/share/datasets/fashion-mnist"  # the usual place
    cfg_file.write_text("dataset: cifar10\ndata_dir: null\n")  # saved as an absolute path: found from anywhere
    assert make_config({}, str(cfg_file)).data_dir == str(Path("data/cifar10").absolute())
    # Checked together, not flag by flag: smoothing 1 is refused alone, accepted with Mixup softening the labels.
    with pytest.raises(ValueError, match="label_smoothing must be below 1"):
        make_config({"label_smoothing": 1})
    assert make_config({"label_smoothing": 1, "mixup": 0.8}).label_smoothing == 1
    with pytest.raises(ValueError, match="need an even --batch-size, got 33"):  # timm's Mixup pairs images
        make_config({"cutmix": 1.0, "batch_size": 33})
    cfg_file.write_text("epochz: 3\n")
    assert main(["train", "--config", str(cfg_file)]) == 2
    assert "unknown setting 'epochz'" in capsys.readouterr().err


CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
RECIPES = {"fashion_mnist_results.yaml"}  # README: a recipe; every other file writes out a dataset's defaults


def _config_file_name(dataset: str) -> str:
    return {"imagefolder": "imagenet"}.get(dataset, dataset) + ".yaml"


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid_and_are_the_datasets_defaults(name):
    """README: settings come from the defaults, then the dataset's (DATASET_DEFAULTS, which
    configs/<dataset>.yaml writes out), then --config FILE, then flags."""
    path = ROOT / "configs" / name
    loaded = yaml.safe_load(path.read_text())
    assert check_config(loaded, name).keys() == loaded.keys()
    cfg = make_config({}, str(path))
    assert cfg.epochs > 0 and cfg.lr > 0
    if name not in RECIPES:
        assert name == _config_file_name(cfg.dataset)
        assert cfg == make_config({"dataset": cfg.dataset}), f"{name} differs from the built-in defaults"


def test_every_dataset_has_its_defaults_written_out_and_the_recipe_gives_the_recorded_run():
    assert {_config_file_name(d) for d in DATASET_DEFAULTS} == set(CONFIGS) - RECIPES
    recorded = yaml.safe_load((ROOT / "results" / "fmnist-parnet-e8" / "config.yaml").read_text())
    cfg = make_config({}, str(ROOT / "configs" / "fashion_mnist_results.yaml")).model_dump()
    added_since = {"img_size": 32, "initial_checkpoint": None, "drop_path_rate": 0.0, "pretrained": False,
                   "warmup_prefix": False, "decay_epochs": None, "decay_milestones": None, "decay_rate": 0.1,
                   "layer_decay": None, "lr_base_size": None}  # settings added since the run  # fmt: skip
    assert recorded["data_dir"] is None  # the usual place, saved since as its absolute path
    recorded["data_dir"] = "/usr/share/datasets/fashion-mnist"
    assert recorded["amp"] == "auto" and recorded.get("threads") == 1  # float32 then: `auto` chose bf16 nowhere yet
    recorded["amp"] = "off"  # the recipe pins it: `auto` now picks bf16 where a CPU runs it faster
    assert {**cfg, "output": recorded["output"]} == {**added_since, **recorded}


def test_imagenet_config_leaves_precision_and_layout_to_the_machine():
    """configs/imagenet.yaml pins neither bf16 nor channels_last: ``auto`` settles them per machine (bf16 on
    CUDA, on a CPU only where native and faster: ``test_auto_amp_is_settled_once_per_run``)."""
    cfg = make_config({}, str(ROOT / "configs" / "imagenet.yaml"))
    assert cfg.amp == "auto" and cfg.channels_last == "auto"


def test_missing_or_corrupt_dataset_exits_non_zero_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path / "none"), "--output", str(out)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--output", str(out)]) == 2
    assert "--download" in capsys.readouterr().err
    bad = make_fashion_mnist(tmp_path / "bad", 16, 8)
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert main(["train", "--data-dir", str(bad), "--output", str(out)]) == 2
    assert "t10k-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert not out.exists()


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(5)
    state = checkpoint.rng_state({"g": g})
    import random

    import numpy as np

    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    checkpoint.set_rng_state(state, {"g": g})
    second = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


def test_baselines_are_timm_models():
    import timm

    import parnet
    import parnet.baselines  # noqa: F401 - registers them (importing parnet alone does not)

    for name, params in [("resnet20_cifar", 272_186), ("resnet56_cifar", 855_482)]:
        m = timm.create_model(name, num_classes=10, in_chans=1).eval()
        assert sum(p.numel() for p in m.parameters()) == params
    assert parnet.network_depth(m, torch.randn(1, 1, 32, 32)) == 56
    m = timm.create_model("resnet18_cifar", num_classes=10)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.slow
def test_two_process_ddp_trains_and_agrees(fmnist, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "parnet",
           "train", "--data-dir", str(fmnist), "--output", str(out), "--model-kwargs", "widths=[8,16,32]",
           "head_width=64", "stem_width=8", "--batch-size", "16", "--epochs", "1", "--train-subset", "64",
           "--workers", "0", "--threads", "1", "--no-progress", "--device", "cpu", "--no-depth"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    # Parameters, BN running statistics (each rank's saw only its own batches) and the EMA all agree.
    assert res["world_size"] == 2 and res["ranks_agree"] is True
    assert evaluate(out, workers=0)["raw"]["top1"] == pytest.approx(res["test_top1"])  # all 64 test images, once
    state = checkpoint.read_state(out)
    assert len(state["extra"]["rng_ranks"]) == 2
    assert not torch.equal(state["extra"]["rng_ranks"][0]["torch"], state["extra"]["rng_ranks"][1]["torch"])


def test_auto_amp_is_settled_once_per_run(monkeypatch):
    """`--amp auto` is decided at a run's start (on a CPU by timing a step) and a resume keeps that decision."""
    import torch

    from parnet import precision
    from parnet.train import _settle_amp

    d = SimpleNamespace(device=torch.device("cpu"), distributed=False)
    info = SimpleNamespace(in_chans=1, img_size=32)
    model = timm.create_model("parnet_cifar_s", in_chans=1, **TINY_STEM)
    probed = []  # the probe's batch: the run's, at most PROBE_BATCH (8 images hid bf16's gain)

    def bf16_wins(device, model, example):
        probed.append(len(example))
        return torch.bfloat16

    monkeypatch.setattr(precision, "auto_amp", bf16_wins)
    assert _settle_amp("auto", None, d, model, info, 128) == "bf16"
    assert _settle_amp("auto", None, d, model, info, 4) == "bf16"
    assert probed == [precision.PROBE_BATCH, 4] and precision.PROBE_BATCH >= 32
    assert _settle_amp("off", None, d, model, info, 128) == "off"
    assert [precision.autocast_dtype(a) for a in ("bf16", "fp16", "off")] == [torch.bfloat16, torch.float16, None]
    with pytest.raises(ValueError, match="once settled, got 'auto'"):
        precision.autocast_dtype("auto")
    monkeypatch.setattr(precision, "auto_amp", lambda device, model, example: None)
    assert _settle_amp("auto", None, d, model, info, 128) == "off"
    recorded = {"extra": {"amp": "bf16"}}  # the checkpoint of a run that started in bf16
    monkeypatch.setattr(precision, "has_native_bf16", lambda: True)
    assert _settle_amp("auto", recorded, d, model, info, 128) == "bf16"
    assert _settle_amp("bf16", recorded, d, model, info, 128) == "bf16"
    with pytest.raises(ValueError, match="trains with --amp bf16 .* --amp off would change its precision midway"):
        _settle_amp("off", recorded, d, model, info, 128)
    # bf16 where the CPU would emulate it: refused, for a new run and for a resumed one
    monkeypatch.setattr(precision, "has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match=r"no native bf16 .* use --amp off"):
        _settle_amp("bf16", None, d, model, info, 128)
    with pytest.raises(ValueError, match="checkpoint says so.*resume it on a CPU with native bf16"):
        _settle_amp("off", recorded, d, model, info, 128)
    assert _settle_amp("off", None, d, model, info, 128) == "off"


def test_eval_given_the_runs_own_dataset_still_reads_the_runs_data_folder(reference_run):
    """--dataset naming the run's own dataset keeps the run's data folder (it used to fall back to the default)."""
    out, _ = reference_run
    by_default = evaluate(out, workers=0)
    assert evaluate(out, dataset="fashion_mnist", workers=0) == by_default
    assert evaluate(out / "last.safetensors", dataset="fashion_mnist", workers=0)["raw"] == by_default["raw"]


def test_loaded_run_weights_carry_their_training_datas_timm_config(reference_run, tmp_path):
    """timm's own recipe (resolve_data_config(model=...)) prepares images as `parnet eval` does, for every reader
    of a run's weights: grey 32x32 with Fashion-MNIST's statistics here, not the variant's CIFAR RGB defaults."""
    from parnet.io import load_model, save_model

    out, _ = reference_run
    for model in (load_weights(out / "last.safetensors"), load_model(out / "fused.safetensors")):
        config = timm.data.resolve_data_config(model=model)
        assert config["input_size"] == (1, 32, 32) and config["mean"] == DATASETS["fashion_mnist"].mean
        assert config["crop_pct"] == 1.0 and model.pretrained_cfg["num_classes"] == 10
    unrun = parnet.create_model("parnet_cifar_s", num_classes=10, **TINY_STEM)  # no data recorded: its own cfg
    plain = load_model(save_model(unrun, tmp_path / "plain.safetensors"))
    assert plain.pretrained_cfg == unrun.pretrained_cfg  # its variant's, as timm.create_model gives it


def test_eval_of_an_rgb_file_without_a_dataset_names_the_rgb_datasets(tmp_path, capsys):
    """Weights that record no dataset default to Fashion-MNIST (grey): the refusal names the RGB choices."""
    from parnet.io import save_model

    path = save_model(parnet.create_model("parnet_cifar_s", num_classes=10, **TINY_STEM), tmp_path / "rgb.safetensors")
    assert main(["eval", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert (
        "use it on a 3-channel dataset (--dataset cifar10, --dataset cifar100, --dataset imagefolder --data-dir DIR)"
        in err
    )


def test_a_run_says_what_amp_auto_chose(fmnist, tmp_path, monkeypatch, capsys):
    from parnet import precision

    monkeypatch.setattr(precision, "auto_amp", lambda device, model, example: None)  # float32 measured faster
    train(tiny_config(fmnist, tmp_path / "run", epochs=1, train_subset=32, test_subset=8, amp="auto"))
    assert "--amp auto: float32" in capsys.readouterr().out


def test_timm_reads_the_ema_weights_of_a_runs_state_file(reference_run):
    """last_state.pt keeps the EMA weights under timm's key: timm's load_checkpoint(use_ema=True) takes them."""
    from timm.models import load_checkpoint

    out, _ = reference_run
    for use_ema, weights in ((True, "last_ema.safetensors"), (False, "last.safetensors")):
        model = timm.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **TINY_STEM)
        load_checkpoint(model, str(out / "last_state.pt"), use_ema=use_ema, weights_only=False)
        expected = load_file(out / weights)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    # a state file written before the key was timm's ("ema") still resumes with its EMA weights
    from timm.utils import ModelEmaV3

    from parnet.checkpoint import load_checkpoint as restore
    from parnet.checkpoint import read_state

    state = read_state(out)
    state["ema"] = state.pop("model_ema")
    model = timm.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **TINY_STEM)
    ema = ModelEmaV3(model)
    restore(out, model, ema, restore_rng=False, state=state)
    expected = load_file(out / "last_ema.safetensors")
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in expected.items())


def test_drop_path_rate_trains_a_parnet_and_is_refused_by_a_model_without_it(fmnist, tmp_path):
    """--drop-path-rate: timm's stochastic depth, given to the model (a ParNet's stream blocks)."""
    from timm.layers import DropPath

    train(tiny_config(fmnist, tmp_path / "run", epochs=1, train_subset=32, test_subset=8, drop_path_rate=0.2))
    model = timm.create_model("parnet_cifar_s", drop_path_rate=0.2, **TINY_STEM)
    assert any(isinstance(m, DropPath) for m in model.modules())
    with pytest.raises(ValueError, match="unexpected keyword argument 'drop_path_rate'"):
        train(tiny_config(fmnist, tmp_path / "r20", epochs=1, model="resnet20_cifar", model_kwargs={},
                          train_subset=32, drop_path_rate=0.2))  # fmt: skip
    with pytest.raises(ValueError, match="drop_path_rate is not accepted here: use --drop-path-rate"):
        make_config({"model_kwargs": {"drop_path_rate": 0.1}})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"epochs": 2, "warmup_epochs": 2}, "--warmup-epochs 2 is not shorter than --epochs 2: the rate would never"),
        ({"epochs": 5, "warmup_epochs": 5.5}, "give --warmup-epochs below 5 (e.g. 0.5)"),
        ({"min_lr": 0.5}, "--min-lr 0.5 is above the peak --lr 0.1"),
        ({"warmup_lr": 1.0}, "--warmup-lr 1 is above the peak --lr 0.1"),
        ({"sched": "multistep", "decay_milestones": [10, 40]}, "[40.0] fall after the run's 30 epochs"),
        ({"sched": "step", "decay_epochs": 30}, "--decay-epochs 30 is not shorter than --epochs 30"),
        ({"pretrained": True, "initial_checkpoint": "x.safetensors"}, "not both"),
    ],
)
def test_settings_refuse_a_schedule_that_would_not_anneal(settings, message):
    with pytest.raises(ValueError) as error:
        make_config(settings)
    assert message in str(error.value)


def test_the_datasets_default_warmup_shrinks_to_a_tenth_of_a_shorter_run(tmp_path):
    assert make_config({"epochs": 2}).warmup_epochs == pytest.approx(0.2)  # Fashion-MNIST's 2 would fill it
    assert make_config({"epochs": 3}).warmup_epochs == 2  # shorter than the run: kept
    (tmp_path / "c.yaml").write_text("warmup_epochs: 2\n")  # given, in a file as by a flag: refused, not changed
    with pytest.raises(ValueError, match="--warmup-epochs 2 is not shorter than --epochs 1"):
        make_config({"epochs": 1}, str(tmp_path / "c.yaml"))


def test_step_schedules_decay_within_the_run_and_warmup_prefix_shifts_the_schedule():
    """timm's defaults (decay every 90 epochs, milestones 90/180/270) never act in a 30-epoch run: a third of
    the run, and half and three quarters of it, do; --warmup-prefix starts the schedule after the warm-up."""
    from timm.scheduler import create_scheduler_v2

    from parnet.train import _decay_arguments

    def rates(**settings) -> list[float]:
        cfg = make_config({"epochs": 12, "warmup_epochs": 0, "lr": 1.0, **settings})
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
        sched, _ = create_scheduler_v2(opt, cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=cfg.warmup_lr, warmup_prefix=cfg.warmup_prefix, min_lr=cfg.min_lr,
                                       **_decay_arguments(cfg), step_on_epochs=False, updates_per_epoch=10)  # fmt: skip
        out = []
        for epoch in range(12):
            sched.step_update(epoch * 10)
            out.append(round(opt.param_groups[0]["lr"], 6))
        return out

    assert rates(sched="step") == [1.0] * 4 + [0.1] * 4 + [0.01] * 4
    assert rates(sched="step", decay_epochs=6, decay_rate=0.5) == [1.0] * 6 + [0.5] * 6
    assert rates(sched="multistep") == [1.0] * 6 + [0.1] * 3 + [0.01] * 3
    assert rates(sched="multistep", decay_milestones=[2, 10]) == [1.0] * 2 + [0.1] * 8 + [0.01] * 2
    # warm-up over 2 epochs: without the prefix the cosine has run on meanwhile, with it it starts at its peak
    plain, prefixed = rates(warmup_epochs=2), rates(warmup_epochs=2, warmup_prefix=True)
    assert prefixed[2] == 1.0 and plain[2] < 1.0 and plain[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 12)))


def test_a_killed_trainings_loader_workers_do_not_hold_its_run_lock(tmp_path, monkeypatch):
    """Forked children (DataLoader workers) close their copy of the lock, so that a --resume right after a kill -9
    of the training finds the folder free though a worker lives on. Checked in this process: the fork handler
    run on a second descriptor of the lock, as a child holds one (a test that forked a worker process crashed
    pytest-xdist workers now and then)."""

    lock = checkpoint.RunLock(tmp_path / "run")
    assert lock._fd in checkpoint._HELD_LOCKS
    child_copy = os.dup(lock._fd)  # what a forked worker holds: another descriptor of the same open file
    monkeypatch.setattr(checkpoint, "_HELD_LOCKS", {child_copy})
    checkpoint._close_held_locks_in_child()  # the handler os.register_at_fork runs in every forked child
    with pytest.raises(OSError):
        os.fstat(child_copy)  # closed
    with pytest.raises(ValueError, match="in use by another training"):
        checkpoint.RunLock(tmp_path / "run")  # the training's own descriptor still holds the lock
    monkeypatch.undo()
    held = lock._fd
    lock.release()
    assert lock._fd == -1 and held not in checkpoint._HELD_LOCKS
    checkpoint.RunLock(tmp_path / "run").release()  # free once the training's descriptor is closed


def test_starting_from_timms_own_weights_file(fmnist, tmp_path, capsys):
    """A timm weights file (no metadata of ours) as --initial-checkpoint is read as timm reads --model's released
    weights: every weight taken (its 10 classes are the data's; another count would restart the classifier, as
    timm does), the input convolution adapted to grey images."""
    from safetensors.torch import save_file

    source = timm.create_model("parnet_cifar_s", num_classes=10, **TINY_STEM)
    torch.nn.init.normal_(source.stem[0].dense.conv.weight)  # unlike a fresh model's
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    cfg = tiny_config(
        fmnist,
        tmp_path / "run",
        epochs=1,
        warmup_epochs=0,
        lr=1e-9,
        warmup_lr=0.0,
        initial_checkpoint=str(tmp_path / "model.safetensors"),
        ema=False,
    )
    train(cfg)
    assert "read as timm reads parnet_cifar_s's released weights" in capsys.readouterr().out
    trained = load_weights(tmp_path / "run" / "last.safetensors")
    grey = source.stem[0].dense.conv.weight.sum(1, keepdim=True)  # timm's adapt_input_conv, 3 -> 1 channel
    torch.testing.assert_close(trained.stem[0].dense.conv.weight, grey, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(trained.get_classifier().weight, source.get_classifier().weight, rtol=1e-3, atol=1e-6)


def test_fine_tuning_timms_weights_prepares_images_as_they_were_trained(tmp_path, capsys):
    """An image folder run from timm's released weights (here their file as --initial-checkpoint) normalises,
    resizes and crops as those weights were trained (timm's train.py --pretrained): test_resnet's mean/std 0.5,
    bilinear, 0.95 crop, not ImageNet's; its files say so, and eval, predict and quantize prepare images alike."""
    from safetensors.torch import save_file

    from parnet.deployed import quantize_checkpoint, read_info
    from parnet.predict import load_predictor
    from parnet.trained import trained_on

    source = timm.create_model("test_resnet.r160_in1k", num_classes=2)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=4)
    cfg = dict(dataset="imagefolder", data_dir=str(data), model="test_resnet.r160_in1k", img_size=64, epochs=1,
               batch_size=4, warmup_epochs=0, workers=0, threads=1, progress=False, depth=False, device="cpu",
               initial_checkpoint=str(tmp_path / "model.safetensors"), output=str(tmp_path / "run"))  # fmt: skip
    train(make_config(cfg))
    prep = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear", "crop_pct": 0.95}
    assert f"as test_resnet.r160_in1k's released weights were trained: {prep}" in capsys.readouterr().out
    assert trained_on(tmp_path / "run").image_prep == prep
    assert trained_on(tmp_path / "run" / "last.safetensors").image_prep == prep
    model = load_weights(tmp_path / "run" / "last.safetensors")
    assert timm.data.resolve_data_config(model=model) | prep == timm.data.resolve_data_config(model=model)
    described = repr(load_predictor(run=tmp_path / "run").transform)
    assert "bilinear" in described and "mean=tensor([0.5000, 0.5000, 0.5000])" in described
    assert "Resize(size=67, interpolation=bilinear" in described  # 64 / 0.95
    out = quantize_checkpoint(tmp_path / "run", tmp_path / "run.onnx", precision="fp32", workers=0)
    assert read_info(out["file"]).image_prep == prep and out["prediction_changes"] == 0
    assert repr(load_predictor(checkpoint=tmp_path / "run.onnx").transform) == described


def test_pretrained_offline_says_how_to_give_the_file(fmnist, tmp_path, monkeypatch):
    import timm.models

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match=r"cannot get the pretrained weights of parnet_s_official.in1k \(no network\)"
                       r".*give the file as --initial-checkpoint FILE"):  # fmt: skip
        parnet.factory.create_pretrained("parnet_s_official.in1k", offline="give the file as --initial-checkpoint FILE")
    with pytest.raises(ValueError, match="parnet_cifar_s has no released weights"):
        parnet.factory.create_pretrained("parnet_cifar_s")


def test_layer_decay_gives_each_parnet_block_group_its_rate():
    """timm's layer-wise decay over ParNet's group_matcher: the classifier at the full rate, earlier groups less."""
    from timm.optim import create_optimizer_v2

    model = timm.create_model("parnet_cifar_s", num_classes=10, **TINY_STEM)
    cfg = make_config({"layer_decay": 0.5})
    opt = create_optimizer_v2(model, cfg.opt, lr=1.0, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert scales[-1] == 1.0 and len(scales) > 3 and scales[0] == pytest.approx(0.5 ** (len(scales) - 1))


def test_a_hand_built_config_trains_as_the_command_line_would(monkeypatch, tmp_path):
    """``train(TrainConfig(...))`` (the module's documented use) gets the dataset's defaults, the image size and
    data folder resolved and the checks across settings, as ``parnet train`` does; a ``make_config`` result
    goes through unchanged."""
    import parnet.train as train_module

    seen = []
    monkeypatch.setattr(train_module, "_train", lambda cfg, d, held: seen.append(cfg) or {})
    by_hand = dict(dataset="cifar10", epochs=3, output=str(tmp_path / "run"))
    train(TrainConfig(**by_hand))
    made = make_config(by_hand)
    assert seen[-1] == made and made.img_size == 32 and made.warmup_epochs < 3 and Path(made.data_dir).is_absolute()
    assert made.ema_decay == DATASET_DEFAULTS["cifar10"]["ema_decay"] != TrainConfig().ema_decay
    train(made)
    assert seen[-1] == made
    with pytest.raises(ValueError, match="even --batch-size"):
        train(TrainConfig(mixup=0.2, batch_size=7, output=str(tmp_path / "odd")))
