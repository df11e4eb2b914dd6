"""Detection: backbone + FPN, torchvision detectors on it, COCO data checks, evaluation, generator."""

from __future__ import annotations

import gzip
import json
import re
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import parnet
from parnet import detection as det
from parnet.detection import data as det_data_module
from parnet.detection.data import (
    CocoDetectionDataset,
    check_coco,
    collate_detection,
    make_fashion_mnist_detection,
    repair_boxes,
)
from parnet.detection.train import DetTrainConfig, _draw_examples, eval_folder
from parnet.layers import is_reparameterized

from .conftest import TINY_STEM, randomize_bn

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tiny_detector(kind: str = "fcos", backbone: str = "parnet_s", size: int = 64, **kw) -> nn.Module:
    kwargs = TINY_STEM if backbone.startswith("parnet") else dict(channels=(8, 16, 32, 64), stem_width=8)
    return det.create_detector(
        kind, backbone, num_classes=4, fpn_channels=64, backbone_kwargs=kwargs, min_size=size, max_size=size, **kw
    )


def tiny_batch(n: int = 2, size: int = 64) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1, 3])}
        for _ in range(n)
    ]
    targets[-1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}  # an empty image
    return images, targets


# -- backbone -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, extra, strides, in_channels",
    [
        ("parnet_s", "p6p7", [8, 16, 32, 64, 128], [16, 32, 64]),
        ("parnet_s", "pool", [4, 8, 16, 32, 64], [8, 16, 32, 64]),
        ("parnet_cifar_s", "p6p7", [2, 4, 8, 16, 32], [16, 32, 64]),
        ("parnet_cifar_s", "pool", [1, 2, 4, 8, 16], [8, 16, 32, 64]),
    ],
)
def test_backbone_shapes_and_strides(name: str, extra: str, strides: list[int], in_channels: list[int]) -> None:
    bb = det.build_backbone(name, out_channels=24, extra=extra, **TINY_STEM).eval()
    assert bb.strides == strides and bb.in_channels_list == in_channels and bb.out_channels == 24
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
    assert list(out) == bb.names
    for (key, f), s in zip(out.items(), strides):
        assert f.shape == (2, 24, -(-64 // s), -(-96 // s)), (key, s)


def test_resnet18_baseline_backbone() -> None:
    bb = det.build_backbone("resnet18", out_channels=16, channels=(8, 16, 32, 64), stem_width=8)
    assert bb.strides == [8, 16, 32, 64, 128] and bb.in_channels_list == [16, 32, 64]
    assert [f.shape[-1] for f in bb(torch.randn(1, 3, 128, 128)).values()] == [16, 8, 4, 2, 1]


def test_backbone_bad_levels() -> None:
    with pytest.raises(ValueError, match="levels"):
        det.build_backbone("parnet_s", levels=[2, 1], **TINY_STEM)
    with pytest.raises(ValueError, match="levels"):
        det.build_backbone("parnet_s", levels=[5], **TINY_STEM)


def test_backbone_refuses_features_of_one_stride() -> None:
    """ParNet has three features at stride 16 (its last stream and two fusions): an FPN on two of them would have
    its strides (and anchors) repeated, and train without a word."""
    kwargs = {**TINY_STEM, "out_indices": (0, 2, 3, 4)}
    with pytest.raises(ValueError, match=r"strictly increasing strides, got features 2 \(stride 16\), 3 \(stride 16\), "
                       r"4 \(stride 16\);.*ParNet's default out_indices \(0, 1, 4, 5\)"):  # fmt: skip
        det.create_detector("fcos", "parnet_s", num_classes=3, fpn_channels=64, backbone_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"got features 1 \(stride 8\), 2 \(stride 16\), 3 \(stride 16\)"):
        det.build_backbone("parnet_s", out_indices=(1, 2, 3), **TINY_STEM)
    with pytest.raises(ValueError, match="strictly increasing strides"):  # chosen by levels
        det.build_backbone("parnet_s", levels=[2, 3], out_indices=tuple(range(6)), **TINY_STEM)
    assert det.build_backbone("parnet_s", out_indices=(0, 2, 5), **TINY_STEM).strides == [4, 16, 32, 64, 128]


def test_freeze_batchnorm_keeps_eval_outputs() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    bb = det.build_backbone("parnet_s", **TINY_STEM)
    randomize_bn(bb.body)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = bb.eval()(x)
        det.freeze_batchnorm(bb)
        bb.train()  # frozen BN ignores the mode
        got = bb(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)


def test_freeze_batchnorm_keeps_timm_bn_with_activation() -> None:
    """timm's BatchNormAct2d (BN + its activation, EfficientNet and MobileNetV3 backbones) stays BN + activation."""
    from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

    bb = det.build_backbone("mobilenetv3_small_050", out_channels=16)
    randomize_bn(bb.body)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = bb.eval()(x)
        det.freeze_batchnorm(bb)
        got = bb(x)
    assert not any(isinstance(m, BatchNormAct2d) for m in bb.modules())
    assert any(isinstance(m, FrozenBatchNormAct2d) for m in bb.modules())
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5)


def test_backbone_weights_from_our_safetensors(tmp_path: Path) -> None:
    from parnet.io import save_model

    clf = parnet.create_model("parnet_s", num_classes=7, **TINY_STEM)
    randomize_bn(clf, seed=3)
    path = save_model(clf, tmp_path / "clf.safetensors")
    bb = det.build_backbone("parnet_s", weights=path, freeze_bn=True, **TINY_STEM).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.body(x)[-1], clf.eval().forward_features(x), rtol=1e-4, atol=1e-5)
    # the training engine's checkpoint: its weights file and its full state (the "model" entry)
    from parnet.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run", 0, clf)
    for weights in (tmp_path / "run" / "last.safetensors", tmp_path / "run" / "last_state.pt"):
        again = det.build_backbone("parnet_s", weights=weights, **TINY_STEM).eval()
        with torch.no_grad():
            torch.testing.assert_close(again.body(x)[-1], bb.body(x)[-1], rtol=1e-4, atol=1e-5)
    # a compiled (and a DDP-wrapped) model's state dict: their key prefixes cleaned as timm cleans them
    compiled = {"_orig_mod." + k: v for k, v in clf.state_dict().items()}
    for state in (compiled, {"module." + k: v for k, v in compiled.items()}):
        again = det.build_backbone("parnet_s", weights=state, **TINY_STEM).eval()
        with torch.no_grad():
            torch.testing.assert_close(again.body(x)[-1], bb.body(x)[-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"another architecture: widths \(8, 16, 32\) \(the model: \(8, 16, 48\)\)"):
        det.build_backbone("parnet_s", weights=path, widths=(8, 16, 48), head_width=64)
    with pytest.raises(ValueError, match="does not fit the backbone"):  # a state dict says no architecture
        det.build_backbone("parnet_s", weights=clf.state_dict(), widths=(8, 16, 48), head_width=64)
    # Same tensor shapes, another network: the file's architecture is checked, not only its shapes.
    with pytest.raises(ValueError, match=r"another architecture: act 'silu' \(the model: 'relu'\).*--backbone-kwargs"):
        det.build_backbone("parnet_s", weights=path, **TINY_STEM, act="relu")
    small = parnet.create_model("parnet_cifar_s", num_classes=7, **TINY_STEM)
    with pytest.raises(ValueError, match="small_input True .the model: False."):
        det.build_backbone("parnet_s", weights=save_model(small, tmp_path / "small.safetensors"), **TINY_STEM)
    with pytest.raises(FileNotFoundError):
        det.build_backbone("parnet_s", weights=tmp_path / "nope.safetensors", **TINY_STEM)


def test_backbone_weights_from_a_grey_run_folder(tmp_path: Path) -> None:
    """A Fashion-MNIST run (1 channel) as an RGB detector's backbone: its folder is given, and the
    convolutions that read the image take its grey filters (timm's adapt_input_conv), so a grey image
    given as RGB has the classifier's own features."""
    from parnet.checkpoint import save_checkpoint

    clf = parnet.create_model("parnet_s", num_classes=10, in_chans=1, **TINY_STEM)
    randomize_bn(clf, seed=4)
    save_checkpoint(tmp_path / "run", 0, clf)
    bb = det.build_backbone("parnet_s", weights=tmp_path / "run", **TINY_STEM).eval()
    grey = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb.body(grey.repeat(1, 3, 1, 1))[-1], clf.eval().forward_features(grey))
    with pytest.raises(FileNotFoundError, match="is it a `parnet train` run folder"):
        det.build_backbone("parnet_s", weights=tmp_path, **TINY_STEM)


def test_backbone_weights_read_by_content(official_tiny: dict, tmp_path: Path) -> None:
    """A torch checkpoint named .safetensors, and plain safetensors state dicts (no or another format)."""
    from safetensors.torch import save_file

    kwargs = dict(widths=(16, 32, 64), head_width=128, stem_width=16, act="silu")  # the fixture's network
    reference = parnet.load_official(official_tiny["state_dict"], activation="silu").eval()
    torch.save({"state_dict": official_tiny["state_dict"]}, tmp_path / "authors.safetensors")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, tmp_path / "plain.safetensors")
    save_file(state, tmp_path / "hub.safetensors", metadata={"format": "pt"})
    x = official_tiny["input"]
    for name in ("plain.safetensors", "hub.safetensors"):
        bb = det.build_backbone("parnet_s", weights=tmp_path / name, **kwargs).eval()
        with torch.no_grad():
            torch.testing.assert_close(bb.body(x)[-1], reference.forward_features(x))
    # an authors' file is read as the released networks' ReLU (it does not say): a ReLU backbone takes it
    bb = det.build_backbone("parnet_s", weights=tmp_path / "authors.safetensors", **{**kwargs, "act": "relu"}).eval()
    relu = parnet.load_official(official_tiny["state_dict"], activation="relu").eval()
    with torch.no_grad():
        torch.testing.assert_close(bb.body(x)[-1], relu.forward_features(x))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "plain.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read .*cut.safetensors as safetensors"):
        det.build_backbone("parnet_s", weights=tmp_path / "cut.safetensors", **kwargs)


def test_backbone_weights_from_official_checkpoint(official_tiny: dict) -> None:
    kwargs = dict(
        widths=(16, 32, 64), head_width=128, stem_width=16, act="silu"
    )  # the fixture's network (fixtures/README.md)
    reference = parnet.load_official(official_tiny["state_dict"], activation="silu").eval()
    # The authors' layout does not say its activation: read as the released networks' ReLU, it does not fit a
    # SiLU backbone (the features would be wrong), and the message says how to load a SiLU one.
    with pytest.raises(ValueError, match=r"act 'relu' \(the model: 'silu'\).*--activation silu"):
        det.build_backbone("parnet_s", weights={"state_dict": official_tiny["state_dict"]}, **kwargs)
    bb = det.build_backbone("parnet_s", weights=reference.state_dict(), **kwargs).eval()  # converted: as it says
    x = official_tiny["input"]
    with torch.no_grad():
        torch.testing.assert_close(bb.body(x)[-1], reference.forward_features(x))
        torch.testing.assert_close(reference(x), official_tiny["output_eval"], rtol=1e-4, atol=1e-4)


def test_backbone_weights_from_a_detector_refused_from_a_fused_file(tmp_path: Path) -> None:
    """A trained detector's backbone starts another (other classes); a fused file is refused for what it is."""
    from parnet.io import save_model

    trained = tiny_detector("fcos", freeze_bn=True)
    randomize_bn(trained.backbone.body, seed=5)
    path = det.save_detector(trained, tmp_path / "det.safetensors")
    other = det.create_detector("retinanet", "parnet_s", num_classes=9, fpn_channels=64, backbone_kwargs=TINY_STEM,
                                backbone_weights=path)  # fmt: skip
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(other.backbone.body.eval()(x), trained.backbone.body.eval()(x)):
            torch.testing.assert_close(a, b)
    clf = parnet.create_model("parnet_s", num_classes=7, **TINY_STEM)
    fused = save_model(parnet.reparameterize(clf), tmp_path / "ema_fused.safetensors")
    with pytest.raises(ValueError, match="re-parameterized .fused. weights.*last.safetensors"):
        det.build_backbone("parnet_s", weights=fused, **TINY_STEM)


def test_detector_normalises_images_as_its_backbone_weights_were_trained(tmp_path: Path) -> None:
    """Weights trained on Fashion-MNIST expect its statistics, for every RGB channel; a saved detector keeps them."""
    from parnet.data import DATASETS
    from parnet.io import save_model

    grey = DATASETS["fashion_mnist"]
    clf = parnet.create_model("parnet_s", num_classes=10, in_chans=1, **TINY_STEM)
    path = save_model(clf, tmp_path / "clf.safetensors", {"dataset": "fashion_mnist"})
    model = det.create_detector("fcos", "parnet_s", num_classes=3, fpn_channels=64, backbone_kwargs=TINY_STEM,
                                backbone_weights=path, min_size=64, max_size=64)  # fmt: skip
    assert model.transform.image_mean == pytest.approx(list(grey.mean) * 3)
    assert model.transform.image_std == pytest.approx(list(grey.std) * 3)
    again, _ = det.load_detector(det.save_detector(model, tmp_path / "det.safetensors"))
    assert (again.transform.image_mean, again.transform.image_std) == (model.transform.image_mean,
                                                                       model.transform.image_std)  # fmt: skip
    # a grey image given as RGB, normalised as the classifier's was, meets the classifier's own features
    image = torch.rand(1, 64, 64)
    with torch.no_grad():
        batch, _ = model.eval().transform([image.repeat(3, 1, 1)])
        inside = model.backbone.body(batch.tensors)[-1]
        alone = clf.eval().forward_features((image[None] - grey.mean[0]) / grey.std[0])
    torch.testing.assert_close(inside, alone, rtol=1e-4, atol=1e-4)
    plain = tiny_detector()  # no weights: the ImageNet statistics torchvision uses
    assert plain.transform.image_mean == pytest.approx([0.485, 0.456, 0.406])
    assert tiny_detector(image_mean=(0.5, 0.5, 0.5)).transform.image_mean == [0.5, 0.5, 0.5]
    for bad in ((0.5,), "0.5", (0.5, 0.5, float("nan"))):
        with pytest.raises(ValueError, match="image_mean must be three numbers"):
            tiny_detector(image_mean=bad)
    with pytest.raises(ValueError, match="image_std must be three positive numbers"):
        tiny_detector(image_std=(0.2, 0.0, 0.2))


def test_detector_backbone_kwargs_that_load_or_train_act_once(official_tiny: dict, tmp_path: Path) -> None:
    """timm's pretrained=True (offline: its file) and drop_path_rate build the detector; the saved one rebuilds
    without them (it holds its weights); a keyword a saved detector could not rebuild from is refused."""
    authors = tmp_path / "authors.pth.tar"
    torch.save({"state_dict": official_tiny["state_dict"]}, authors)
    kwargs = dict(widths=[16, 32, 64], head_width=128, stem_width=16)  # the fixture's network
    model = det.create_detector(
        "fcos", "parnet_s_official", num_classes=3, fpn_channels=64, min_size=64, max_size=64,
        backbone_kwargs={**kwargs, "pretrained": True, "pretrained_cfg_overlay": {"file": str(authors)},
                         "drop_path_rate": 0.1},
    )  # fmt: skip
    assert model.detector_config["backbone_kwargs"] == kwargs
    reference = parnet.load_official(official_tiny["state_dict"]).eval()
    x = official_tiny["input"]
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.body.eval()(x)[-1], reference.forward_features(x))
    again, _ = det.load_detector(det.save_detector(model, tmp_path / "det.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again.backbone.body(x)[-1], reference.forward_features(x))
    with pytest.raises(ValueError, match="unknown model keyword 'act_layer'"):
        det.create_detector("fcos", "parnet_s", num_classes=3, backbone_kwargs={**TINY_STEM, "act_layer": "gelu"})


# -- detectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, backbone",
    [("fcos", "parnet_s"), ("retinanet", "parnet_s"), ("fasterrcnn", "parnet_s"), ("fcos", "parnet_cifar_s"),
     ("fcos", "resnet18")],
)  # fmt: skip
def test_detector_forward_backward(kind: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = tiny_detector(kind, backbone)
    images, targets = tiny_batch()
    model.train()
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads[:5])
    assert any(g.abs().sum() > 0 for g in grads if g is not None)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape[1] == 4


def test_detector_pads_to_parnet_multiple_and_bad_args() -> None:
    model = tiny_detector("fcos").eval()
    assert model.transform.size_divisible % model.backbone.input_multiple == 0
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])  # padded inside torchvision's transform, boxes in input pixels
    assert out[0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="unknown detector"):
        det.create_detector("yolo", "parnet_s", num_classes=3)
    for width in (48, 32):
        with pytest.raises(ValueError, match="multiple of 32 and at least 64"):
            det.create_detector("fcos", "parnet_s", num_classes=3, fpn_channels=width, backbone_kwargs=TINY_STEM)
    with pytest.raises(ValueError, match="background"):
        det.create_detector("fcos", "parnet_s", num_classes=1, backbone_kwargs=TINY_STEM)
    # each built a detector that trained to NaN, resized to nothing, or recorded other levels than it used
    for kwargs, error, message in (
        ({"anchor_scale": -1.0}, ValueError, "anchor_scale must be a positive number"),
        ({"min_size": 0, "max_size": -5}, ValueError, "need 1 <= min_size <= max_size"),
        ({"levels": [1.9, 2.9, 3.9]}, TypeError, "levels must be integer positions"),
        ({"num_classes": 3.5}, TypeError, "num_classes must be an integer"),
    ):
        with pytest.raises(error, match=message):
            det.create_detector("retinanet", "parnet_s", **{"num_classes": 3, **kwargs}, backbone_kwargs=TINY_STEM)


def test_save_load_detector_round_trip(tmp_path: Path) -> None:
    model = tiny_detector("retinanet", freeze_bn=True, score_thresh=0.2, detections_per_img=50).eval()
    path = det.save_detector(model, tmp_path / "det.safetensors", {"names": {"1": "a"}})
    again, extra = det.load_detector(path)  # the post-processing keywords come back with it
    assert extra == {"names": {"1": "a"}} and (again.score_thresh, again.detections_per_img) == (0.2, 50)
    with pytest.raises(ValueError, match=r"fcos takes none of \['score_threshold'\].*its keywords: .*score_thresh"):
        tiny_detector("fcos", score_threshold=0.2)
    with pytest.raises(ValueError, match=r"nms_thresh must be a number in \[0.0, 1.0\], got 2"):
        tiny_detector("fcos", nms_thresh=2)
    # each detector's own keywords: another's would be passed on to torchvision's transform and ignored
    with pytest.raises(ValueError, match=r"fasterrcnn takes none of \['score_thresh'\].*box_score_thresh"):
        tiny_detector("fasterrcnn", score_thresh=0.9)
    with pytest.raises(ValueError, match=r"fcos takes none of \['box_score_thresh'\]"):
        tiny_detector("fcos", box_score_thresh=0.9)
    assert tiny_detector("fasterrcnn", box_score_thresh=0.9).roi_heads.score_thresh == 0.9
    assert set().union(*det.KWARGS_OF.values()) == set(det.DETECTOR_KWARGS)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    images, _ = tiny_batch()
    for net in (model, again):  # an untrained detector keeps nothing above 0.2: compare every candidate
        net.score_thresh = 0.0
    with torch.no_grad():
        a, b = model(images), again(images)
    for x, y in zip(a, b):
        assert len(x["boxes"]) == 50
        torch.testing.assert_close(x["boxes"], y["boxes"])
        torch.testing.assert_close(x["scores"], y["scores"])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read"):
        det.load_detector(tmp_path / "bad.safetensors")


def test_train_config_offers_the_detectors_there_are() -> None:
    """DetTrainConfig.detector's Literal (kept for the settings' flags) names the detectors, in their order."""
    assert typing.get_args(DetTrainConfig.model_fields["detector"].annotation) == det.DETECTORS


def test_detector_takes_the_torchvision_detectors_number_keywords(tmp_path: Path) -> None:
    """Every number keyword of the torchvision detector's signature, bounded, and kept by a saved detector."""
    model = tiny_detector("fasterrcnn", rpn_post_nms_top_n_test=300, box_fg_iou_thresh=0.6)
    again, _ = det.load_detector(det.save_detector(model, tmp_path / "det.safetensors"))
    assert again.rpn._post_nms_top_n["testing"] == 300 and again.roi_heads.proposal_matcher.high_threshold == 0.6
    assert tiny_detector("fcos", center_sampling_radius=2.5).center_sampling_radius == 2.5
    with pytest.raises(ValueError, match="rpn_post_nms_top_n_test must be an integer from 1 to 100000, got 0"):
        tiny_detector("fasterrcnn", rpn_post_nms_top_n_test=0)
    with pytest.raises(ValueError, match=r"fcos takes none of \['rpn_post_nms_top_n_test'\]"):
        tiny_detector("fcos", rpn_post_nms_top_n_test=300)
    with pytest.raises(ValueError, match="retinanet refused its keywords .*low_threshold should be <= high"):
        tiny_detector("retinanet", fg_iou_thresh=0.3, bg_iou_thresh=0.6)


def test_fused_detector_is_saved_and_loaded_fused(tmp_path: Path) -> None:
    """A detector whose backbone was re-parameterized comes back fused, as parnet.io.load_model's classifiers do;
    it cannot start another detector's backbone (no training from fused weights)."""
    model = tiny_detector("fcos", score_thresh=0.0).eval()
    randomize_bn(model.backbone.body, seed=6)
    model.backbone.body = parnet.reparameterize(model.backbone.body)
    path = det.save_detector(model, tmp_path / "fused.safetensors", {"names": {"1": "a"}})
    again, extra = det.load_detector(path)
    assert extra == {"names": {"1": "a"}} and is_reparameterized(again.backbone.body)
    images, _ = tiny_batch()
    with torch.no_grad():
        for a, b in zip(model(images), again(images)):
            torch.testing.assert_close(a["scores"], b["scores"])
            torch.testing.assert_close(a["boxes"], b["boxes"])
    with pytest.raises(ValueError, match="re-parameterized .fused. weights"):
        det.build_backbone("parnet_s", weights=path, **TINY_STEM)


@pytest.mark.parametrize("kind", ["fcos", "fasterrcnn"])
def test_detector_with_parnet_backbone_scripts(kind: str, fast_torchscript) -> None:
    """torchvision's detectors are deployed scripted; one on a ParNet backbone scripts too, with equal outputs."""
    model = tiny_detector(kind, score_thresh=0.0) if kind == "fcos" else tiny_detector(kind, box_score_thresh=0.0)
    model.eval()
    scripted = torch.jit.script(model)
    images, _ = tiny_batch()
    with torch.no_grad():
        eager = model(images)
        _, scripted_out = scripted(images)  # scripted detectors return (losses, detections)
    for a, b in zip(eager, scripted_out):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["scores"], b["scores"])


class Fixed(nn.Module):
    """A detector that finds the same two boxes, label 2 and label 0 (background), on every image."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = torch.tensor([[1.0, 2.0, 11.0, 22.0], [0.0, 0.0, 5.0, 5.0]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([2, 0])} for _ in images]


def test_predict_maps_labels_to_categories_and_boxes_to_xywh() -> None:
    # two images whose outputs share one boxes tensor: converting to xywh must not do it twice
    loader = [([torch.zeros(3, 8, 8)] * 2, [{"image_id": torch.tensor(7)}, {"image_id": torch.tensor(8)}])]
    results = det.predict(Fixed(), loader, {1: 5, 2: 9})  # label 0 is background: no category, left out
    assert results == [{"image_id": i, "category_id": 9, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.9} for i in (7, 8)]


def test_detect_names_the_coco_category_ids() -> None:
    """predict-det's detections carry the training annotations' category ids, as eval-det's detections.json."""
    from PIL import Image

    image = Image.new("RGB", (16, 16))
    found = det.detect(Fixed(), [image], {"2": "b"}, score_thresh=0.0, label_to_cat={"1": 4, "2": 7})
    assert [(d["label"], d["category_id"], d["name"]) for d in found[0]["detections"]] == [
        (2, 7, "b"), (0, None, "class 0")  # background 0 is no category
    ]  # fmt: skip
    assert "category_id" not in det.detect(Fixed(), [image], {"2": "b"})[0]["detections"][0]  # no mapping: none


# -- COCO evaluation ----------------------------------------------------------------------------


def coco_gt(boxes_per_image: list[list[list[float]]], size: int = 100) -> dict:
    images = [
        {"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size} for i in range(len(boxes_per_image))
    ]
    anns = []
    for i, boxes in enumerate(boxes_per_image):
        for b in boxes:
            ann = {"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": b, "area": b[2] * b[3]}
            anns.append({**ann, "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_coco_perfect_predictions_ap_1() -> None:
    gt = coco_gt([[[10, 10, 40, 40]], [[5, 5, 20, 30], [50, 50, 45, 45]]])
    results = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]
    ]
    stats = det.coco_evaluate(gt, results)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["APs"] == pytest.approx(1.0) and stats["APm"] == pytest.approx(1.0) and stats["APl"] == -1.0


def test_coco_half_matching() -> None:
    # Two objects; the best-scored detection is exact, the other misses its object entirely.
    # Precision is 1 up to recall 0.5 and recall never goes higher: 51 of COCO's 101 recall
    # points (0, 0.01, ..., 0.50) have precision 1, at every IoU threshold.
    gt = coco_gt([[[10, 10, 40, 40]], [[10, 10, 40, 40]]])
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.8},
    ]
    stats = det.coco_evaluate(gt, results)
    assert stats["AP"] == pytest.approx(51 / 101) and stats["AP50"] == pytest.approx(51 / 101)
    assert stats["AR100"] == pytest.approx(0.5)


def test_coco_iou_thresholds() -> None:
    # One box of IoU 0.62 with its object: a match at IoU thresholds 0.50, 0.55, 0.60 of ten.
    gt = coco_gt([[[0, 0, 10, 10]]])
    stats = det.coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6.2], "score": 0.5}])
    assert stats["AP"] == pytest.approx(0.3) and stats["AP50"] == pytest.approx(1.0) and stats["AP75"] == 0.0


def test_coco_no_detections_and_bad_results() -> None:
    gt = coco_gt([[[0, 0, 10, 10]]])
    assert det.coco_evaluate(gt, [])["AP"] == 0.0
    for a in gt["annotations"]:  # area and iscrowd are optional in the ground truth
        del a["area"], a["iscrowd"]
    assert det.coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 1}])[
        "AP"
    ] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in the ground truth"):
        det.coco_evaluate(gt, [{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    # a detection without a score, or holding tensors: said so, not a KeyError or "not in the ground truth"
    with pytest.raises(ValueError, match=r"lacks \['score'\]"):
        det.coco_evaluate(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="plain Python numbers: call .tolist"):
        det.coco_evaluate(gt, [{"image_id": torch.tensor(1), "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    np_result = {"image_id": np.int64(1), "category_id": 1, "bbox": np.array([0.0, 0, 10, 10]).tolist(), "score": 1}
    assert det.coco_evaluate(gt, [np_result])["AP"] == pytest.approx(1.0)  # NumPy's integers are numbers
    # ground truth with an unknown category: refused, or with strict=False (the --lenient of the commands) dropped
    gt["annotations"].append({"id": 9, "image_id": 1, "category_id": 7, "bbox": [50, 50, 10, 10]})
    with pytest.raises(ValueError, match="pass strict=False"):
        det.coco_evaluate(gt, [np_result])
    with pytest.warns(UserWarning, match="dropped"):
        assert det.coco_evaluate(gt, [np_result], strict=False)["AP"] == pytest.approx(1.0)


def test_evaluation_scores_the_ground_truth_as_written(tmp_path: Path) -> None:
    """pycocotools' own numbers on the file as written: a box reaching outside its image is scored as it is (the
    training targets alone are clipped), with its area as written."""
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = coco_gt([[[80, 60, 40, 40], [10, 10, 20, 20]]], size=96)
    gt["images"][0]["height"] = 80
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    Image.new("L", (96, 80)).save(tmp_path / "0.png")
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    coco = COCO(str(tmp_path / "ann.json"))
    plain = COCOeval(coco, coco.loadRes([dict(r) for r in results]), "bbox")
    plain.evaluate(), plain.accumulate(), plain.summarize()
    ds = CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    stats = det.coco_evaluate(ds.coco_dict, results)
    assert list(stats.values()) == pytest.approx(list(plain.stats)) and stats["AP"] == pytest.approx(1.0)
    assert ds[0][1]["boxes"].tolist()[0] == [80, 60, 96, 80]  # the target: clipped to the image


def test_evaluation_refuses_ground_truth_without_images_or_boxes() -> None:
    """pycocotools gives -1 for every metric then, which reads as a score."""
    with pytest.raises(ValueError, match="the given dataset lists no images: nothing to evaluate"):
        det.coco_evaluate(coco_gt([]), [])
    with pytest.raises(ValueError, match="has no boxes to score detections against"):
        det.coco_evaluate(coco_gt([[], []]), [])
    crowd = coco_gt([[[0, 0, 10, 10]]])
    crowd["annotations"][0]["iscrowd"] = 1  # a crowd region is not scored
    with pytest.raises(ValueError, match="has no boxes to score detections against .crowd regions aside."):
        det.coco_evaluate(crowd, [])


# -- bad annotations ----------------------------------------------------------------------------


def test_iscrowd_must_say_yes_or_no() -> None:
    """bool("0") is True: a string or another number is refused, not read as a crowd region."""
    for bad in ("0", "no", 2, None, 0.5):
        gt = coco_gt([[[0, 0, 10, 10]]])
        gt["annotations"][0]["iscrowd"] = bad
        with pytest.raises(ValueError, match=rf"annotation 1 has iscrowd {re.escape(repr(bad))}; it must be 0 or 1"):
            check_coco(gt)
    for given, read in ((0, 0), (1, 1), (True, 1), (False, 0), (1.0, 1)):
        gt = coco_gt([[[0, 0, 10, 10]]])
        gt["annotations"][0]["iscrowd"] = given
        assert check_coco(gt).data["annotations"][0]["iscrowd"] == read


def test_area_must_be_a_number_of_pixels() -> None:
    """pycocotools sorts boxes into small/medium/large by ``area``: one that is no number is refused, not replaced."""
    for bad in ("big", -1, float("nan"), True, [100]):
        gt = coco_gt([[[0, 0, 10, 10]]])
        gt["annotations"][0]["area"] = bad
        with pytest.raises(ValueError, match=r"annotation 1 has area .*; it must be a number of pixels"):
            check_coco(gt)
    for given, read in ((None, 100.0), (42, 42), (0.5, 0.5)):  # missing: the box's, as written
        gt = coco_gt([[[0, 0, 10, 10]]])
        gt["annotations"][0]["area"] = given
        assert check_coco(gt).data["annotations"][0]["area"] == read
    gt = coco_gt([[[10, 10, -5, 8]]])  # no area inside the box: none filled in below 0 (pycocotools would drop it)
    del gt["annotations"][0]["area"]
    check = check_coco(gt)
    assert check.data["annotations"][0]["area"] == 0.0
    with pytest.raises(ValueError, match="no boxes to score detections against"):  # not every metric -1
        check.require_ground_truth()


def test_bad_annotations_repaired_with_warning() -> None:
    """Training targets are repaired (clipped, empty boxes dropped), said; the checked data keeps them as written."""
    written = [[-5, 10, 30, 20], [90, 90, 30, 30], [10, 10, 0, 5], [200, 200, 10, 10], [1, 1, 5, 5]]
    gt = coco_gt([written, []])
    check = check_coco(gt)
    assert [a["bbox"] for a in check.data["annotations"]] == written and not check.clipped
    with pytest.warns(UserWarning, match="2 boxes clipped.*2 boxes dropped as degenerate.*in the training targets"):
        targets = repair_boxes(check)
    boxes = {a["id"]: a["bbox"] for a in targets}
    assert boxes == {1: [0.0, 10.0, 25.0, 20.0], 2: [90.0, 90.0, 10.0, 10.0], 5: [1, 1, 5, 5]}
    assert check.clipped == [1, 2] and check.dropped_degenerate == [3, 4]
    assert [a["bbox"] for a in check.data["annotations"]] == written  # the ground truth is left as written


def test_bad_annotations_refused_clearly() -> None:
    gt = coco_gt([[[0, 0, 10, 10]]])
    gt["annotations"][0]["category_id"] = 7
    with pytest.raises(ValueError, match=r"category ids not in 'categories' \[1, 2\]: 1 \(category 7\)"):
        check_coco(gt)
    with pytest.warns(UserWarning, match="unknown category"):
        assert check_coco(gt, strict=False).data["annotations"] == []
    for bad in ([0, 0, 10], [0, 0, "a", 3], [0, float("nan"), 1, 1], None):
        gt = coco_gt([[[0, 0, 10, 10]]])
        gt["annotations"][0]["bbox"] = bad
        with pytest.raises(ValueError, match="bbox is not"):
            check_coco(gt)
    gt = coco_gt([[[0, 0, 10, 10]]])
    gt["annotations"][0]["image_id"] = 5
    with pytest.raises(ValueError, match="refer to image ids"):
        check_coco(gt)
    gt = coco_gt([[[0, 0, 10, 10]], []])
    gt["images"][1]["id"] = 1
    with pytest.raises(ValueError, match="duplicate image id"):
        check_coco(gt)
    with pytest.raises(ValueError, match="missing or non-list"):
        check_coco({"images": []})
    gt = coco_gt([[]])
    del gt["images"][0]["width"]
    with pytest.raises(ValueError, match="width"):
        check_coco(gt)
    gt["images"][0]["width"] = 64.0  # some exporters write whole sizes as floats, pycocotools takes them
    assert check_coco(gt).data["images"][0]["width"] == 64
    for bad in (64.5, True, float("nan")):
        gt["images"][0]["width"] = bad
        with pytest.raises(ValueError, match="needs a positive integer 'width'"):
            check_coco(gt)
    for key, message in (("image_id", "refer to image ids that are not in"), ("category_id", "category")):
        gt = coco_gt([[[1, 1, 2, 2]]])
        gt["annotations"][0][key] = [1]  # not hashable: a lookup would be a TypeError
        with pytest.raises(ValueError, match=message):
            check_coco(gt)
    for key, bad in (("id", "a.jpg"), ("id", 1.0), ("file_name", 3)):  # ids end up in tensors, names in paths
        gt = coco_gt([[]])
        gt["images"][0][key] = bad
        with pytest.raises(ValueError, match="integer 'id' and a string 'file_name'"):
            check_coco(gt)


def test_dataset_files_and_empty_images(tmp_path: Path) -> None:
    from PIL import Image

    gt = coco_gt([[[10, 20, 30, 40]], []], size=64)
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    with pytest.raises(FileNotFoundError, match="2 images listed"):
        CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    for im in gt["images"]:
        Image.new("L", (64, 64)).save(tmp_path / im["file_name"])
    ds = CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert target["boxes"].tolist() == [[10, 20, 40, 60]] and target["labels"].tolist() == [1]
    assert ds[1][1]["boxes"].shape == (0, 4) and ds.num_classes == 3
    model = tiny_detector("fcos").train()
    images, targets = collate_detection([ds[1], ds[1]])  # a batch of empty images still trains
    assert torch.isfinite(sum(model(images, targets).values()))
    gt["images"][0]["width"] = 32  # the box, 10 to 40 wide, now leaves the image: clipped in training, and said
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    # found when the dataset is made, before any training: a file of another size, one that is no image
    (tmp_path / "1.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="1 box clipped"), pytest.raises(ValueError) as error:
        CocoDetectionDataset(tmp_path, tmp_path / "ann.json", train=True)
    assert "2 of 2 images do not fit the annotations: 0.png is 64x64, the annotations say 32x64, 1.png (not an " \
        "image Pillow can read" in str(error.value)  # fmt: skip
    (tmp_path / "ann.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetectionDataset(tmp_path, tmp_path / "ann.json")


def test_crowd_boxes_out_of_targets_but_ignored_by_evaluation(tmp_path: Path) -> None:
    from PIL import Image

    gt = coco_gt([[[10, 10, 20, 20], [40, 40, 20, 20]]], size=64)
    gt["annotations"][1]["iscrowd"] = 1
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    Image.new("L", (64, 64)).save(tmp_path / "0.png")
    ds = CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    assert ds[0][1]["boxes"].tolist() == [[10, 10, 30, 30]] and ds[0][1]["iscrowd"].tolist() == [0]
    assert [a["iscrowd"] for a in ds.coco_dict["annotations"]] == [0, 1]
    # a detection on the crowd region is neither a true nor a false positive
    exact = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}
    on_crowd = {"image_id": 1, "category_id": 1, "bbox": [40, 40, 20, 20], "score": 0.9}
    assert det.coco_evaluate(ds.coco_dict, [exact, on_crowd])["AP"] == pytest.approx(1.0)


def test_train_flip_moves_boxes_with_pixels(tmp_path: Path) -> None:
    from PIL import Image

    gt = coco_gt([[[5, 10, 20, 30]]], size=64)
    gt["images"][0]["width"] = 48
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    pixels = np.zeros((64, 48), np.uint8)
    pixels[10:40, 5:25] = 255  # the object fills exactly its box
    Image.fromarray(pixels).save(tmp_path / "0.png")
    ds = CocoDetectionDataset(tmp_path, tmp_path / "ann.json", train=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        image, target = ds[0]
        x0, y0, x1, y1 = (int(v) for v in target["boxes"][0].tolist())
        seen.add(x0)
        mask = torch.zeros(64, 48, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        assert bool((image[:, mask] == 1).all()) and bool((image[:, ~mask] == 0).all())
    assert seen == {5, 48 - 25}  # both the plain and the flipped image came up


def test_eval_det_refuses_other_categories(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from parnet.cli import main

    model = tiny_detector("fcos")  # 3 categories, trained as ids 1, 2, 3
    weights = det.save_detector(model, tmp_path / "det.safetensors", {"label_to_cat": {"1": 1, "2": 2, "3": 3}})
    gt = coco_gt([[[10, 10, 20, 20]]], size=64)
    gt["categories"] = [{"id": 5, "name": "x"}, {"id": 6, "name": "y"}, {"id": 7, "name": "z"}]
    gt["annotations"][0]["category_id"] = 5
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    Image.new("L", (64, 64)).save(tmp_path / "0.png")
    args = ["eval-det", str(weights), "--val-images", str(tmp_path), "--val-ann", str(tmp_path / "ann.json"),
            "--no-progress", "--draw", "1", "--output", str(tmp_path / "ev")]  # fmt: skip
    assert main(args) == 2
    assert "trained on category ids [1, 2, 3], the data has [5, 6, 7]" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
    if not torch.cuda.is_available():  # a device the machine lacks: said, no traceback
        assert main([*args, "--device", "cuda"]) == 2
        assert "device cuda requested but CUDA is not available" in capsys.readouterr().err


def test_draw_examples_nothing_to_draw(tmp_path: Path) -> None:
    from PIL import Image

    gt = coco_gt([[[10, 10, 20, 20]]], size=64)
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    Image.new("L", (64, 64)).save(tmp_path / "0.png")
    ds = CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    model = tiny_detector("fcos")
    assert _draw_examples(model, ds, tmp_path / "p.png", 0, 0.3, torch.device("cpu")) is None  # --draw 0
    assert not (tmp_path / "p.png").exists()
    assert _draw_examples(model, ds, tmp_path / "p.png", 4, 0.3, torch.device("cpu")) == tmp_path / "p.png"


def test_draw_predictions_of_images_of_different_sizes() -> None:
    """COCO's images differ in size: the picture pads them to the largest (make_grid alone refuses them)."""
    images = [torch.rand(3, 80, 54), torch.rand(3, 70, 44), torch.rand(1, 40, 90)]
    preds = [{"boxes": torch.tensor([[2.0, 2.0, 20.0, 30.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])} for _ in images]  # fmt: skip
    grid = det.draw_predictions(images, preds, {1: "a"}, nrow=3)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 + 80 + 2, 2 + 3 * (90 + 2))
    assert bool((grid[:, 2 + 75, 2 + 92 + 10] == 255).all())  # below the 70-pixel-high image: white padding


def test_train_det_refuses_to_overwrite_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from parnet.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "last_state.pt").write_bytes(b"an earlier run")
    assert main(["train-det", "--data", str(tmp_path / "data"), "--output", str(run), "--device", "cpu"]) == 2
    assert "already holds a run (last_state.pt); pass --resume" in capsys.readouterr().err
    assert (run / "last_state.pt").read_bytes() == b"an earlier run"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "parnet_ss"], "unknown model 'parnet_ss'; similar: parnet_s"),
        (["--backbone-kwargs", "widths=8,16,32", "in_chans=1"], "in_chans is not accepted here: the detector"),
        (["--backbone-kwargs", "num_classes=3"], "num_classes is not accepted here: set by the dataset"),
    ],
)
def test_train_det_checks_backbone_arguments(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    from parnet.cli import main

    with pytest.raises(SystemExit):
        main(["train-det", "--data", str(tmp_path), "--output", str(tmp_path / "run"), *args])
    assert message in capsys.readouterr().err


def test_train_detection_script_fails_when_a_run_fails(tmp_path: Path) -> None:
    import shutil
    import subprocess

    (tmp_path / "scripts").mkdir()
    shutil.copy(Path(__file__).parents[1] / "scripts" / "train_detection.sh", tmp_path / "scripts")
    stub = tmp_path / ".venv" / "bin" / "parnet"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 3\n")  # every parnet command fails
    stub.chmod(0o755)
    (tmp_path / "data" / "fmnist_det" / "annotations").mkdir(parents=True)
    (tmp_path / "data" / "fmnist_det" / "annotations" / "instances_val.json").write_text("{}")
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "train_detection.sh"), "1"], capture_output=True)
    assert done.returncode != 0 and b"det_parnet failed" in done.stderr


# -- the synthetic Fashion-MNIST set -------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Path:
    """A tiny IDX set: 20 items per split, blobs of different shapes, labels 0..9."""
    rng = np.random.default_rng(1)
    src = tmp_path / "fmnist"
    src.mkdir()
    for prefix in ("train", "t10k"):
        items = np.zeros((20, 28, 28), np.uint8)
        for i in range(20):
            y0, x0 = rng.integers(0, 10, 2)
            items[i, y0 : y0 + rng.integers(8, 18), x0 : x0 + rng.integers(8, 18)] = rng.integers(120, 255)
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", items)
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return src


def generated(out: Path, source: Path, seed: int) -> dict[str, bytes]:
    make_fashion_mnist_detection(
        out, num_train=12, num_val=4, canvas=64, object_size=(16, 40), seed=seed, source=source
    )
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_generator_seeded(tmp_path: Path, fake_fashion_mnist: Path) -> None:
    a = generated(tmp_path / "a", fake_fashion_mnist, seed=3)
    b = generated(tmp_path / "b", fake_fashion_mnist, seed=3)
    c = generated(tmp_path / "c", fake_fashion_mnist, seed=4)
    assert len(a) == 12 + 4 + 2 and a == b
    assert a["annotations/instances_train.json"] != c["annotations/instances_train.json"]


def test_generator_boxes_and_categories(tmp_path: Path, fake_fashion_mnist: Path) -> None:
    from PIL import Image

    generated(tmp_path, fake_fashion_mnist, seed=0)
    for split, n in (("train", 12), ("val", 4)):
        data = json.loads((tmp_path / "annotations" / f"instances_{split}.json").read_text())
        assert len(data["images"]) == n and [c["id"] for c in data["categories"]] == list(range(1, 11))
        per_image = {im["id"]: 0 for im in data["images"]}
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            assert 1 <= a["category_id"] <= 10 and a["area"] == w * h
            per_image[a["image_id"]] += 1
            image = np.asarray(Image.open(tmp_path / split / f"{a['image_id'] - 1:06d}.png"))
            inside = image[int(y) : int(y + h), int(x) : int(x + w)]
            assert inside.max() > 40  # the box holds its item (its tightness: the test below)
        assert all(0 < k <= 4 for k in per_image.values())
        assert check_coco(data).summary() == ""  # nothing to repair


def test_generator_box_is_the_extent_of_the_items_bright_pixels() -> None:
    """A bright rectangle inside a 28x28 item, pasted at its own size: its box is exactly the rectangle,
    wherever the canvas puts it (the background, under 48 plus noise, never reaches 100)."""
    item = np.zeros((1, 28, 28), np.uint8)
    item[0, 5:21, 8:16] = 200  # rows 5..20, columns 8..15
    for seed in range(5):
        image, objects = det_data_module._render_canvas(
            np.random.default_rng(seed), item, np.array([3]), 64, (1, 1), (28, 28), 0.2
        )
        ((box, label),) = objects
        ys, xs = np.nonzero(image >= 100)
        assert label == 3 and box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert (box[2] - box[0], box[3] - box[1]) == (8, 16)


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(), reason="Fashion-MNIST IDX files not on this machine")
def test_generator_on_real_fashion_mnist(tmp_path: Path) -> None:
    make_fashion_mnist_detection(tmp_path, num_train=3, num_val=3, canvas=96, seed=0)
    ds = CocoDetectionDataset(tmp_path / "val", tmp_path / "annotations" / "instances_val.json")
    assert len(ds) == 3 and ds.names[10] == "Ankle boot"
    assert all(len(ds[i][1]["boxes"]) >= 1 for i in range(3))


def test_generator_keeps_existing_data(tmp_path: Path, fake_fashion_mnist: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    before = generated(out, fake_fashion_mnist, seed=3)
    with pytest.raises(ValueError, match="already holds a dataset"):
        generated(out, fake_fashion_mnist, seed=4)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # nothing was touched by the refused call
    photos = tmp_path / "photos"  # a folder of the user's images, no annotations: not written over either
    (photos / "train").mkdir(parents=True)
    (photos / "train" / "000000.png").write_bytes(b"the user's photo")
    with pytest.raises(ValueError, match="already holds a dataset or images"):
        generated(photos, fake_fashion_mnist, seed=3)
    assert (photos / "train" / "000000.png").read_bytes() == b"the user's photo"
    assert not (photos / "annotations").exists() and not (photos / "val").exists()
    for iou in (-1.0, float("nan"), 1.5):  # no item could find a place: a dataset without boxes
        with pytest.raises(ValueError, match="max_iou must be a number from 0 to 1"):
            make_fashion_mnist_detection(tmp_path / "iou", 1, 1, max_iou=iou, source=fake_fashion_mnist)
    assert not (tmp_path / "iou").exists()
    with pytest.raises(ValueError, match=r"object_size \(--min-size, --max-size\) .* canvas side 20 \(--canvas\)"):
        make_fashion_mnist_detection(tmp_path / "big", 1, 1, canvas=20, object_size=(8, 28), source=fake_fashion_mnist)
    make_fashion_mnist_detection(out, num_train=2, num_val=1, canvas=64, object_size=(16, 40), seed=4,
                                 source=fake_fashion_mnist, overwrite=True)  # fmt: skip
    assert len(json.loads((out / "annotations" / "instances_val.json").read_text())["images"]) == 1
    # the old set's images the new one does not write again are gone; a file of the user's there is kept
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000000.png", "000001.png"]
    (out / "train" / "notes.txt").write_text("mine")
    make_fashion_mnist_detection(out, num_train=1, num_val=1, canvas=64, object_size=(16, 40), seed=4,
                                 source=fake_fashion_mnist, overwrite=True)  # fmt: skip
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000000.png", "notes.txt"]
    # an overwrite cut short: the old annotations are gone before any new image is written
    monkeypatch.setattr(det_data_module, "_render_canvas", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        make_fashion_mnist_detection(out, num_train=2, num_val=1, canvas=64, object_size=(16, 40), seed=5,
                                     source=fake_fashion_mnist, overwrite=True)  # fmt: skip
    assert not list((out / "annotations").iterdir())
    monkeypatch.undo()
    # plain (not gzipped) IDX files are read too, as training reads them
    for f in fake_fashion_mnist.iterdir():
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
        f.unlink()
    assert generated(tmp_path / "plain", fake_fashion_mnist, seed=3) == before
    # a missing split in the source: nothing is written, not half a dataset
    (fake_fashion_mnist / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        make_fashion_mnist_detection(tmp_path / "half", num_train=2, num_val=1, source=fake_fashion_mnist)
    assert not (tmp_path / "half").exists()


# -- the commands, end to end -------------------------------------------------------------------


def test_cli_train_resume_eval(tmp_path: Path, fake_fashion_mnist: Path, capsys) -> None:
    from parnet.cli import main

    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["make-det-dataset", str(data), "--train", "6", "--val", "3", "--canvas", "64",
                 "--min-size", "16", "--max-size", "40", "--source", str(fake_fashion_mnist)]) == 0  # fmt: skip
    train = ["train-det", "--data", str(data), "--output", str(run), "--backbone", "parnet_s",
             "--backbone-kwargs", "widths=[8,16,32]", "head_width=64", "stem_width=8", "--fpn-channels", "64",
             "--batch-size", "3", "--warmup-steps", "1", "--no-progress", "--draw", "2", "--device", "cpu"]  # fmt: skip
    assert main(train + ["--epochs", "2", "--stop-after", "1"]) == 0  # a time-limited piece, then the rest
    assert not (run / "eval.json").exists()
    assert main(train + ["--epochs", "3", "--resume"]) == 2  # the schedule runs over the epochs: fixed
    # Resumed with nothing but its folder: the run's own settings (not parnet_s's defaults, 12 epochs, FPN 256).
    assert main(["train-det", "--output", str(run), "--resume", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and "val_AP" in rows[1]
    assert (run / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    trained = json.loads((run / "eval.json").read_text())["stats"]
    assert main(["eval-det", str(run), "--data", str(data), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())["stats"]
    assert again == pytest.approx(trained)
    # Two epochs on six images score zero and detect nothing above the detector's threshold either way. With
    # every candidate kept, eval-det's detections show that the run's own weights were scored.
    model, extra = det.load_detector(run / "last.safetensors")
    model.detector_config = {**model.detector_config, "score_thresh": 0.0}
    det.save_detector(model, run / "last.safetensors", extra)
    model, _ = det.load_detector(run / "last.safetensors")
    assert main(["eval-det", str(run), "--data", str(data), "--output", str(tmp_path / "ev0"), "--no-progress"]) == 0
    written = json.loads((tmp_path / "ev0" / "detections.json").read_text())
    dataset = CocoDetectionDataset(data / "val", data / "annotations" / "instances_val.json", train=False)
    _, expected = det.evaluate_dataset(model, dataset, 4, 0, torch.device("cpu"), progress=False)
    assert len(written) == len(expected) > 0
    for w, e in zip(written, expected):
        assert (w["image_id"], w["category_id"]) == (e["image_id"], e["category_id"])
        assert w["bbox"] == pytest.approx(e["bbox"], abs=1e-3) and w["score"] == pytest.approx(e["score"], abs=1e-5)
    assert f"{tmp_path / 'ev' / 'predictions.png'}" in capsys.readouterr().out
    # New images, no annotations: every candidate the detector keeps, as its own outputs say
    out = tmp_path / "found"
    assert main(["predict-det", str(run), str(data / "val"), "--score-thresh", "0", "--json-out",
                 str(out / "found.json"), "--draw", str(out / "found.png")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    found = json.loads((out / "found.json").read_text())
    files = sorted((data / "val").iterdir())
    assert [r["image"] for r in found] == [str(f) for f in files] and f"{files[0]}: " in printed
    assert (out / "found.png").read_bytes()[:4] == b"\x89PNG"
    with torch.no_grad():
        own = model([dataset[i][0] for i in range(len(dataset))])  # the val images, in id order = file order
    for result, expected in zip(found, own):
        assert [d["score"] for d in result["detections"]] == pytest.approx(expected["scores"].tolist(), abs=1e-5)
        xyxy = [v for x, y, w, h in (d["bbox"] for d in result["detections"]) for v in (x, y, x + w, y + h)]
        assert xyxy == pytest.approx(expected["boxes"].flatten().tolist(), abs=0.02)
        assert {d["name"] for d in result["detections"]} <= set(dataset.names.values())
        assert all(d["category_id"] == extra["label_to_cat"].get(str(d["label"])) for d in result["detections"])
    for given in (["--checkpoint", str(run / "last.safetensors")], [str(run)]):  # classification's command
        assert main(["predict", str(files[0]), *given]) == 2
        assert "a detector (`parnet predict-det`" in capsys.readouterr().err
    # --draw 0: the picture left by the first evaluation is neither claimed as written nor left beside the numbers
    assert main(["eval-det", str(run), "--data", str(data), "--output", str(tmp_path / "ev"), "--no-progress",
                 "--draw", "0"]) == 0  # fmt: skip
    wrote = capsys.readouterr().out.splitlines()[-1]
    assert "eval.json" in wrote and "predictions.png" not in wrote
    assert not (tmp_path / "ev" / "predictions.png").exists()
    # By default beside the weights, named after them: the run's and its best.safetensors' do not meet
    for weights, folder in ((run, "eval_val"), (run / "best.safetensors", "eval_val_best")):
        assert eval_folder(weights, "val") == run / folder
        assert main(["eval-det", str(weights), "--data", str(data), "--no-progress", "--draw", "0"]) == 0
        said = json.loads((run / folder / "eval.json").read_text())["weights"]
        assert Path(said).name == ("last.safetensors" if folder == "eval_val" else "best.safetensors")
    # no ground truth to score against: refused before the detector runs, nothing written
    empty = json.loads((data / "annotations" / "instances_val.json").read_text()) | {"images": [], "annotations": []}
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    assert main(["eval-det", str(run), "--val-images", str(data / "val"), "--val-ann", str(tmp_path / "empty.json"),
                 "--output", str(tmp_path / "ev_empty")]) == 2  # fmt: skip
    assert "empty.json lists no images: nothing to evaluate" in capsys.readouterr().err
    assert not (tmp_path / "ev_empty").exists()
    assert main(["eval-det", str(tmp_path / "none"), "--data", str(data)]) == 2  # a clear error, exit code 2
    # A new run never replaces files of the user's that it would write: nothing is touched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "predictions.png").write_bytes(b"the user's picture")
    assert main([*train[:4], str(mine), *train[5:], "--epochs", "1"]) == 2
    assert "holds predictions.png, which a new run would replace" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["predictions.png"]


def test_train_det_resume_refuses_other_data_and_an_empty_set(tmp_path: Path, fake_fashion_mnist: Path, capsys) -> None:
    from parnet.cli import main

    def dataset(name: str, count: int) -> Path:
        assert main(["make-det-dataset", str(tmp_path / name), "--train", str(count), "--val", "2", "--canvas", "64",
                     "--min-size", "16", "--max-size", "40", "--source", str(fake_fashion_mnist)]) == 0  # fmt: skip
        return tmp_path / name

    data, other, run = dataset("data", 4), dataset("other", 3), tmp_path / "run"
    train = ["train-det", "--output", str(run), "--backbone-kwargs", "widths=[8,16,32]", "head_width=32",
             "stem_width=8", "--fpn-channels", "64", "--batch-size", "2", "--max-steps", "1", "--no-progress",
             "--draw", "0", "--device", "cpu", "--epochs", "2"]  # fmt: skip
    assert main([*train, "--data", str(data), "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert main(["train-det", "--output", str(run), "--resume", "--data", str(other), "--no-progress"]) == 2
    assert "trained with other settings or data: data train_images was 4, now 3" in capsys.readouterr().err
    moved = tmp_path / "moved"  # the same data in another folder is the same data
    data.rename(moved)
    assert main(["train-det", "--output", str(run), "--resume", "--data", str(moved), "--no-progress"]) == 0
    # a set without training images (make-det-dataset --train 0 writes one): said so before any work
    assert main([*train, "--data", str(dataset("empty", 0)), "--output", str(tmp_path / "run0")]) == 2
    assert "instances_train.json lists no images: a detector needs training images" in capsys.readouterr().err


def test_commands_refuse_data_without_boxes(tmp_path: Path, fake_fashion_mnist: Path, capsys, monkeypatch) -> None:
    """No boxes to train on or to score against is said before any work (exit 2), not trained or scored as -1;
    a generated set without boxes is not written."""
    from parnet.cli import main

    make = ["make-det-dataset", "--canvas", "64", "--min-size", "16", "--max-size", "40", "--source",
            str(fake_fashion_mnist)]  # fmt: skip
    assert main([*make, str(tmp_path / "none"), "--train", "2", "--val", "1", "--max-objects", "0"]) == 2
    assert "hi >= 1" in capsys.readouterr().err and not (tmp_path / "none").exists()
    render = det_data_module._render_canvas
    monkeypatch.setattr(det_data_module, "_render_canvas", lambda *a: (render(*a)[0], []))  # no item placed
    assert main([*make, str(tmp_path / "unlucky"), "--train", "2", "--val", "1", "--min-objects", "0"]) == 2
    assert "the generated train and val images hold no boxes" in capsys.readouterr().err
    assert not [p for p in (tmp_path / "unlucky").rglob("*") if p.is_file()]
    monkeypatch.undo()
    (tmp_path / "file").write_text("mine")
    assert main([*make, str(tmp_path / "file"), "--train", "1", "--val", "1"]) == 2
    assert "the output " + str(tmp_path / "file") + " is a file: give a folder" in capsys.readouterr().err
    data = tmp_path / "data"
    assert main([*make, str(data), "--train", "2", "--val", "0"]) == 0
    train = ["train-det", "--data", str(data), "--backbone-kwargs", "widths=[8,16,32]", "head_width=32",
             "stem_width=8", "--fpn-channels", "64", "--no-progress", "--device", "cpu", "--epochs", "1"]  # fmt: skip
    assert main([*train, "--output", str(tmp_path / "run")]) == 2  # nothing to evaluate on
    assert "instances_val.json lists no images: nothing to evaluate" in capsys.readouterr().err
    no_boxes = json.loads((data / "annotations" / "instances_train.json").read_text()) | {"annotations": []}
    (tmp_path / "no_boxes.json").write_text(json.dumps(no_boxes))
    assert main([*train, "--train-ann", str(tmp_path / "no_boxes.json"), "--output", str(tmp_path / "run2")]) == 2
    assert "no_boxes.json has no boxes to train on" in capsys.readouterr().err
    assert not (tmp_path / "run2" / "last_state.pt").exists()


def test_train_det_resume_of_a_run_without_checkpoint_and_help(tmp_path: Path, capsys) -> None:
    """A run killed in its first epoch saved no settings: --resume alone says so and what to do."""
    from parnet.checkpoint import LOCK_FILE
    from parnet.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text("")  # left by a run killed in its first epoch
    assert main(["train-det", "--output", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no checkpoint yet (its run stopped before the first epoch finished)" in err
    assert "run the original command again, with its --data and other flags" in err
    with pytest.raises(SystemExit):
        main(["train-det", "--help"])
    assert "--detector {fcos,retinanet,fasterrcnn}" in capsys.readouterr().out


def test_train_det_with_loader_workers_resumes_as_if_never_stopped(tmp_path: Path, fake_fashion_mnist: Path) -> None:
    """The workers' random flips are seeded from the saved generator each epoch: stopped after one epoch and
    resumed, the run ends with the weights of one that never stopped."""
    from parnet.cli import main

    data = tmp_path / "data"
    assert main(["make-det-dataset", str(data), "--train", "4", "--val", "2", "--canvas", "64",
                 "--min-size", "16", "--max-size", "40", "--source", str(fake_fashion_mnist)]) == 0  # fmt: skip

    def train(out: Path, *extra: str) -> int:
        return main(["train-det", "--data", str(data), "--output", str(out), "--backbone", "parnet_s",
                     "--backbone-kwargs", "widths=[8,16,32]", "head_width=64", "stem_width=8", "--fpn-channels",
                     "64", "--batch-size", "2", "--warmup-steps", "1", "--no-progress", "--draw", "0", "--device",
                     "cpu", "--epochs", "2", "--workers", "1", *extra])  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums in the same order in both runs
    try:
        assert train(tmp_path / "whole") == 0
        assert train(tmp_path / "parts", "--stop-after", "1") == 0
        assert train(tmp_path / "parts", "--resume") == 0
    finally:
        torch.set_num_threads(threads)
    whole, parts = ((tmp_path / d / "last.safetensors").read_bytes() for d in ("whole", "parts"))
    assert whole == parts


def test_nan_in_train_det_exits_3_without_a_traceback(tmp_path: Path, fake_fashion_mnist: Path, capsys) -> None:
    """As `parnet train` does; and the message does not claim a checkpoint that was never written."""
    from parnet.cli import main

    data = tmp_path / "data"
    assert main(["make-det-dataset", str(data), "--train", "3", "--val", "2", "--canvas", "64",
                 "--min-size", "16", "--max-size", "40", "--source", str(fake_fashion_mnist)]) == 0  # fmt: skip
    capsys.readouterr()
    original = torch.nn.Module.__call__

    def poisoned(self, *args, **kwargs):  # every detector loss NaN
        out = original(self, *args, **kwargs)
        if self.training and isinstance(out, dict) and out and all(torch.is_tensor(v) for v in out.values()):
            return {k: v * float("nan") for k, v in out.items()}
        return out

    torch.nn.Module.__call__ = poisoned
    try:
        code = main(["train-det", "--data", str(data), "--output", str(tmp_path / "run"), "--backbone", "parnet_s",
                     "--backbone-kwargs", "widths=[8,16,32]", "head_width=64", "stem_width=8", "--fpn-channels",
                     "64", "--batch-size", "3", "--no-progress", "--device", "cpu", "--epochs", "1"])  # fmt: skip
    finally:
        torch.nn.Module.__call__ = original
    err = capsys.readouterr().err
    assert code == 3 and "loss is nan" in err and "No checkpoint was written" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last_state.pt").exists()


def test_train_det_keeps_an_epoch_whose_evaluation_failed(tmp_path: Path, fake_fashion_mnist: Path, capsys,
                                                           monkeypatch) -> None:  # fmt: skip
    """A validation image that only fails when decoded: the epoch's training is saved and the evaluation owed;
    the resume needs neither the starting weights (the checkpoint holds them) nor the folder it was started in."""
    from parnet.cli import main
    from parnet.io import save_model

    monkeypatch.chdir(tmp_path)  # relative paths, as typed
    assert main(["make-det-dataset", "data", "--train", "4", "--val", "2", "--canvas", "64",
                 "--min-size", "16", "--max-size", "40", "--source", str(fake_fashion_mnist)]) == 0  # fmt: skip
    save_model(parnet.create_model("parnet_s", num_classes=10, **TINY_STEM), "clf.safetensors")
    image = Path("data/val/000000.png")
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])  # its header is whole: only decoding finds it cut
    capsys.readouterr()
    assert main(["train-det", "--data", "data", "--output", "run", "--backbone-weights", "clf.safetensors",
                 "--freeze-bn", "--backbone-kwargs", "widths=[8,16,32]", "head_width=64", "stem_width=8",
                 "--fpn-channels", "64", "--batch-size", "2", "--no-progress", "--draw", "0", "--device", "cpu",
                 "--epochs", "1"]) == 2  # fmt: skip
    assert "epoch 1's training is saved in run: fix the validation data and continue with --resume" in (
        capsys.readouterr().err
    )
    assert Path("run/last_state.pt").is_file() and not Path("run/eval.json").exists()
    image.write_bytes(whole)
    Path("clf.safetensors").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train-det", "--output", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    assert "AP" in json.loads((tmp_path / "run" / "eval.json").read_text())["stats"]
    # without starting weights, --freeze-bn freezes untrained statistics: said so
    assert main(["train-det", "--data", str(tmp_path / "data"), "--output", "run2", "--freeze-bn", "--max-steps",
                 "1", "--backbone-kwargs", "widths=[8,16,32]", "head_width=64", "stem_width=8", "--fpn-channels",
                 "64", "--no-progress", "--draw", "0", "--device", "cpu", "--epochs", "1"]) == 0  # fmt: skip
    assert "--freeze-bn without --backbone-weights freezes untrained batch norms" in capsys.readouterr().err
