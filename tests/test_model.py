"""The architecture: timm integration, re-parameterization, the paper's table, depth, bad input."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.utils import reparameterize_model

import parnet
from parnet import ParNet, ParNetCfg
from parnet.summary import variant_summary

from .conftest import TINY, randomize_bn

# The specification's table: (params fused M, params training M, GFLOPs at 224).
PAPER_TABLE = {
    "parnet_s": (19.2, 20.98, 9.7),
    "parnet_m": (35.6, 38.95, 17.2),
    "parnet_l": (54.9, 60.18, 26.7),
    "parnet_xl": (85.0, 93.18, 41.5),
}


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_params_and_flops_match_the_paper(name):
    row = variant_summary(name)
    fused, train, gflops = PAPER_TABLE[name]
    assert abs(row["params_fused_m"] - fused) <= 0.05
    assert abs(row["params_train_m"] - train) <= 0.005
    assert abs(row["gflops"] - gflops) <= 0.1
    assert row["depth"] == 12


def test_small_input_variants_hit_the_papers_cifar_sizes():
    sizes = {n: variant_summary(n)["params_fused_m"] for n in ("parnet_cifar_s", "parnet_cifar_m", "parnet_cifar_l")}
    assert abs(sizes["parnet_cifar_s"] - 1.3) < 0.05
    assert abs(sizes["parnet_cifar_m"] - 15.5) < 0.1
    assert abs(sizes["parnet_cifar_l"] - 35.0) < 0.2


@pytest.mark.parametrize("name", parnet.list_models())
def test_every_variant_is_depth_12_fused_or_not(name):
    model = timm.create_model(name, **TINY)  # widths do not change depth; tiny is fast
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    assert parnet.network_depth(model, x) == 12
    assert parnet.network_depth(parnet.reparameterize(model), x) == 12


def test_network_depth_restores_each_modules_mode():
    model = ParNet(ParNetCfg(widths=(8,), head_width=16, blocks=(1,)), num_classes=3).train()
    model.stem.eval()  # e.g. a frozen stem
    assert parnet.network_depth(model, torch.randn(1, 3, 32, 32)) == 2 + 1 + 1 + 1
    assert model.training and model.streams.training and not model.stem.training
    assert not any(m.training for m in model.stem.modules())


@pytest.mark.parametrize(("name", "depth"), [("resnet34", 34), ("resnet50", 50), ("repvgg_b1g4", 29)])
def test_depth_of_deep_baselines(name, depth):
    with torch.device("meta"):
        model = timm.create_model(name)
        assert parnet.network_depth(model, torch.empty(1, 3, 224, 224)) == depth


CONFIGS = [
    dict(),
    dict(small_input=True),
    dict(act="relu"),
    dict(act="hardswish"),
    dict(use_gate=False),
    dict(widths=(8,), blocks=(3,)),
    dict(widths=(8, 16), blocks=(2, 3)),
    dict(widths=(8, 16, 32, 48), blocks=(2, 2, 3, 3)),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fused_model_matches_unfused(overrides):
    torch.manual_seed(0)
    model = timm.create_model("parnet_s", **{**TINY, **overrides}, num_classes=7)
    randomize_bn(model).eval()
    size = model.cfg.input_multiple * 2
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        fused = parnet.reparameterize(model)
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=0)
        # timm's own utility finds the blocks' reparameterize() too.
        torch.testing.assert_close(reparameterize_model(model).eval()(x), expected, atol=1e-4, rtol=0)
    assert fused is not model and model.stem[0].reparam_conv is None  # inplace=False left it alone
    assert fused.stem[0].dense is None and fused.stem[0].reparam_conv is not None
    assert parnet.reparameterize(model, inplace=True) is model


def test_stream_count_and_depth_follow_the_config():
    # 2 stem + (n - 1) downsamples + blocks of the last stream + fusion + final block + classifier
    for widths, blocks, depth in [((8,), (5,), 2 + 5 + 1 + 1), ((8, 16), (4, 5), 2 + 1 + 5 + 1 + 1 + 1)]:
        model = ParNet(ParNetCfg(widths=widths, head_width=16, blocks=blocks), num_classes=3)
        assert parnet.network_depth(model, torch.randn(1, 3, 64, 64)) == depth


@pytest.mark.parametrize("blocks", [(5,), (4, 5), (6, 2), (4, 5, 5), (1, 3, 2), (5, 6, 6, 1)])
def test_readme_depth_formula_and_input_multiple(blocks):
    n = len(blocks)
    widths = tuple(8 * 2**i for i in range(n))
    for small in (True, False):
        cfg = ParNetCfg(widths=widths, head_width=16, blocks=blocks, small_input=small)
        model = ParNet(cfg, num_classes=3).eval()
        # README: multiples of the stem's stride (1 small-input, 4 ImageNet form) times 2 per stream.
        m = cfg.input_multiple
        assert m == (1 if small else 4) * 2**n
        assert model(torch.randn(1, 3, m, 2 * m)).shape == (1, 3)
        with pytest.raises(ValueError, match=f"multiples of {m},"):
            model(torch.randn(1, 3, m, m + m // 2))
    # README: 2 (stem) + (streams - 1) + the most blocks of any stream + 3 (fusion, last downsampling,
    # classifier), one less with a single stream (no fusion).
    readme = 2 + (n - 1) + max(blocks) + 3 - (n == 1)
    assert parnet.network_depth(model, torch.randn(1, 3, m, m)) == readme


def test_timm_create_model_knobs():
    model = timm.create_model("parnet_cifar_s", num_classes=100, in_chans=1, drop_rate=0.2)
    assert isinstance(model, ParNet)
    assert model.get_classifier().out_features == 100 and model.head.drop.p == 0.2
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 100)
    feats = model.forward_features(x)
    assert feats.shape == (2, 512, 4, 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)


def test_pretrained_cfg_is_the_timm_kind():
    cfg = timm.create_model("parnet_s").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875 and cfg["classifier"] == "head.fc"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    small = timm.create_model("parnet_cifar_m").pretrained_cfg
    assert small["input_size"] == (3, 32, 32) and small["num_classes"] == 10
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("parnet_cifar_s"))
    assert data_cfg["input_size"] == (3, 32, 32)
    assert set(parnet.list_models(pretrained=True)) == {
        "parnet_s_official.in1k",
        "parnet_m_official.in1k",
        "parnet_l_official.in1k",
        "parnet_xl_official.in1k",
        "parnet_xl_official.in1k_200ep",
    }


def test_features_only_imagenet_form():
    model = timm.create_model("parnet_s", features_only=True, **TINY)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [8, 16, 32, 64]
    feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 16, 24), (16, 8, 12), (32, 4, 6), (64, 2, 3)]


def test_features_only_every_stream_and_fusion():
    full = timm.create_model("parnet_s", **TINY)
    modules = [f["module"] for f in full.feature_info]
    assert modules == ["streams.0", "streams.1", "streams.2", "fusions.0", "fusions.1", "final_block"]
    model = timm.create_model("parnet_cifar_s", features_only=True, out_indices=(0, 1, 2, 3, 4, 5), **TINY)
    assert model.feature_info.reduction() == [1, 2, 4, 4, 4, 8]
    x = torch.randn(2, 3, 32, 32)
    feats = model(x)
    for f, ch, red in zip(feats, model.feature_info.channels(), model.feature_info.reduction(), strict=True):
        assert f.shape == (2, ch, 32 // red, 32 // red)
    # The last feature is what the classifier pools.
    full = timm.create_model("parnet_cifar_s", **TINY).eval()
    result = model.model.load_state_dict(full.state_dict(), strict=False)
    assert not result.missing_keys  # only the classifier is pruned
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], full.forward_features(x))


def test_features_only_with_four_streams_and_own_stem_width():
    model = timm.create_model(
        "parnet_s", features_only=True, widths=(8, 16, 24, 32), blocks=(1, 1, 1, 2), head_width=16
    ).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32, 64]
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]
    # The stem follows the first stream's width unless stem_width says otherwise.
    assert timm.create_model("parnet_s", widths=(16, 32, 64)).stem[0].out_chs == 16
    assert timm.create_model("parnet_s").stem[0].out_chs == 64
    assert timm.create_model("parnet_s", **TINY, stem_width=12).stem[0].out_chs == 12


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model("parnet_cifar_s", **TINY)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    checkpointed = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(module, *args, **kwargs):
        checkpointed.append(module)
        return checkpoint(module, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    # stem, 2 downsamples, 3 streams, fuse entry, 2 fusions, final block: the checkpoints did run.
    assert len(checkpointed) == 10
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)
    checkpointed.clear()
    with torch.no_grad():
        model(x)
    assert not checkpointed  # nothing to save memory for without gradients


def test_group_matcher_orders_blocks_from_input_to_head():
    """timm's layer-wise LR decay groups parameters with group_matcher: coarse, the stem, the streams with their
    downsampling blocks, the fusions, the final block and the head, in that order."""
    model = timm.create_model("parnet_s", **TINY)
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    tops = [sorted({n.split(".")[0] for n in v}) for v in groups.values()]
    assert tops == [["stem"], ["downsample", "streams"], ["fuse_entry", "fusions"], ["final_block"], ["head"]]


@pytest.mark.parametrize("blocks", [(4, 5, 5), (1, 4, 2), (2, 2, 2, 1), (3,)])
def test_group_matcher_groups_blocks_by_depth(blocks):
    """Fine groups (timm's default) are the layers of depth that network_depth counts: blocks of the parallel
    streams at the same depth share a group and a rate, each group one layer after the one before."""
    model = timm.create_model("parnet_s", **{**TINY, "widths": TINY["widths"][:1] * len(blocks), "blocks": blocks})
    depth = model.block_depths()
    measured = parnet.network_depth(parnet.reparameterize(model), torch.randn(1, 3, 64, 64))
    assert max(depth.values()) + 1 == measured  # the head is the last layer
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) == measured
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scales[id(model.head.fc.weight)] == 1.0
    modules = dict(model.named_modules())
    for name, d in depth.items():  # every block's rate follows its depth, whichever stream it is in
        assert {scales[id(p)] for p in modules[name].parameters()} == {0.5 ** (measured - d)}, name
    if len(blocks) == 3 and blocks[0] == 4:  # the paper's: stream 0's last block and stream 2's first share a layer
        assert depth["streams.0.3"] == depth["streams.2.1"] == depth["downsample.1"] + 2


def test_forward_intermediates_follows_timm_indexing():
    model = timm.create_model("parnet_s", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=2)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in feats] == [32, 64]  # the last two: fusions.1 and final_block
        assert [f.shape[1] for f in model.forward_intermediates(x, [0, -1], intermediates_only=True)] == [8, 64]
        # in model order, each once, as timm's models give them; a features_only backbone's feature_info agrees
        assert [f.shape[1] for f in model.forward_intermediates(x, [5, 0, 0], intermediates_only=True)] == [8, 64]
    backbone = timm.create_model("parnet_s", features_only=True, out_indices=(5, 0), **TINY).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in backbone(x)] == backbone.feature_info.channels() == [8, 64]
        for bad in ([6], [-7], 7, 0):  # 6 features: indices must not wrap around silently
            with pytest.raises(AssertionError, match="out of range"):
                model.forward_intermediates(x, bad)
    with pytest.raises(AssertionError, match="out of range"):
        timm.create_model("parnet_s", features_only=True, out_indices=(1, 6), **TINY)


def test_early_features_run_and_hold_only_the_blocks_they_need():
    """features_only with the early features prunes the later blocks, as timm's backbones do."""
    torch.manual_seed(0)
    full = timm.create_model("parnet_s", **TINY).eval()
    randomize_bn(full)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = full.forward_intermediates(x, [0, 1, 3], intermediates_only=True)  # streams 0, 1, fusions.0
        last, early = full.forward_intermediates(x, [0, 1, 3], stop_early=True)
    for got, ref in zip(early, want):
        torch.testing.assert_close(got, ref)
    assert last.shape[1] == 32  # stop_early: the last block it ran is fusions.0, not the final block

    backbone = timm.create_model("parnet_s", features_only=True, out_indices=(0, 1, 3), **TINY)
    assert not backbone.model.load_state_dict(full.state_dict(), strict=False).missing_keys
    names = {n.split(".")[1] for n, _ in backbone.named_parameters()}
    assert names == {"stem", "downsample", "streams", "fuse_entry", "fusions"}  # no final block, no head
    assert isinstance(backbone.model.streams[2], torch.nn.Identity)  # fusions.0 needs no stream 2
    assert len(backbone.model.downsample) == len(backbone.model.fusions) == 1
    backbone.eval()
    with torch.no_grad():
        for got, ref in zip(backbone(x), want):
            torch.testing.assert_close(got, ref)
    backbone.train()
    sum(f.sum() for f in backbone(x)).backward()
    assert all(p.grad is not None for p in backbone.parameters())  # what DistributedDataParallel needs
    with pytest.raises(ValueError, match="prune_intermediate_layers removed"):
        backbone.model.forward_intermediates(x, [5])
    last, _ = backbone.model.forward_intermediates(x, [0, 1, 3])  # no final block left: the deepest one
    assert last.shape[1] == 32
    # as timm's pruned models: forward runs to the deepest feature kept, the head a pass-through (it no longer fits)
    model = backbone.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_intermediates(x, [3], intermediates_only=True)[0])
    assert model.num_features == model.head_hidden_size == 32 and isinstance(model.get_classifier(), torch.nn.Identity)
    kept_head = timm.create_model("parnet_s", **TINY).eval()
    kept_head.prune_intermediate_layers([0, 5], prune_head=False)  # the final block kept: so is the classifier
    assert kept_head(x).shape == (len(x), 1000) and kept_head.num_features == 64
    with pytest.raises(ValueError, match="pruned"):
        parnet.deploy(backbone.model, "cpu", "folded")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 64, 64), "4-D batch"),
        ((1, 1, 64, 64), "in_chans=1"),
        ((1, 3, 48, 64), "multiples of 32"),
        ((1, 3, 64, 100), "multiples of 32"),
    ],
)
def test_bad_input_is_a_clear_value_error(shape, message):
    model = timm.create_model("parnet_s", **TINY)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_small_form_needs_multiples_of_8():
    model = timm.create_model("parnet_cifar_s", **TINY)
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 10)
    with pytest.raises(ValueError, match="multiples of 8.*40x32"):
        model(torch.randn(1, 3, 36, 28))


def test_bad_configs_and_names():
    with pytest.raises(ValueError, match="unknown ParNet variant 'parnet_q'"):
        parnet.create_model("parnet_q")
    with pytest.raises(ValueError, match="parnet_s has no pretrained tag 'bogus'"):
        parnet.create_model("parnet_s.bogus")
    with pytest.raises(ValueError, match="cannot create parnet_cifar_s with .*unexpected keyword argument 'widht'"):
        parnet.create_model("parnet_cifar_s", widht=8)
    with pytest.raises(ValueError, match="1 to 4 streams"):
        ParNetCfg(widths=(8, 8, 8, 8, 8), head_width=8, blocks=(1,) * 5)
    with pytest.raises(ValueError, match="one block count per stream"):
        ParNetCfg(widths=(8, 16), head_width=8)
    with pytest.raises(ValueError, match="act must be one of"):
        ParNetCfg(widths=(8, 16, 32), head_width=8, act="gelu")
    with pytest.raises(ValueError, match="stem_width must be positive"):
        ParNetCfg(widths=(8, 16, 32), head_width=8, stem_width=0)  # was silently min(64, widths[0])
    with pytest.raises(ValueError, match=r"need even widths: \(16, 33\)"):
        timm.create_model("parnet_s", widths=(8, 16, 33), head_width=8)  # was a Conv2d groups error
    with pytest.raises(ValueError, match=r"need even widths: \(15, 32\)"):
        ParNetCfg(widths=(8, 15, 32), head_width=8)  # trained, then an IndexError when folded
    with pytest.raises(ValueError, match=r"need even widths: \(15,\)"):
        ParNetCfg(widths=(8, 15), head_width=8, blocks=(1, 1))
    assert ParNetCfg(widths=(7, 16, 32), head_width=9).widths[0] == 7  # the first stream is never fused
    assert parnet.create_model("parnet_cifar_s", **TINY).cfg.widths == (8, 16, 32)
    assert ParNetCfg(widths=[8, 16, 32], head_width=8).widths == (8, 16, 32)  # a list, as YAML gives it


@pytest.mark.parametrize(
    "kwargs,error,message",
    [  # each was built as another network than the one asked for, or failed deep in torch or timm
        ({"widths": (8.7, 16.2, 32.9)}, TypeError, "widths must be a list or tuple of integers"),
        ({"blocks": (1.5, 1, 1)}, TypeError, "blocks must be a list or tuple of integers"),
        ({"widths": "81632"}, TypeError, "widths must be a list or tuple of integers"),
        ({"head_width": 32.5}, TypeError, "head_width must be an integer"),
        ({"stem_width": "8"}, TypeError, "stem_width must be an integer"),
        ({"use_gate": "false"}, TypeError, "use_gate must be True or False"),
        ({"small_input": "False"}, TypeError, "small_input must be True or False"),
        ({"num_classes": -1}, ValueError, "num_classes must be an integer >= 0"),
        ({"num_classes": 10.0}, ValueError, "num_classes must be an integer >= 0"),
        ({"in_chans": 0}, ValueError, "in_chans must be a positive integer"),
        ({"drop_path_rate": 1.5}, ValueError, r"drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_wrong_types_are_refused_not_coerced(kwargs, error, message):
    with pytest.raises(error, match=message):
        parnet.create_model("parnet_cifar_s", **{**TINY, **kwargs})


def test_inputs_that_are_not_float_image_batches_are_clear_errors():
    model = parnet.create_model("parnet_cifar_s", **TINY).eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="expects floating-point images, got torch.uint8"):
        model((x * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="expects a torch.Tensor batch"):
        model(x.numpy())
    folded = parnet.deploy(model, "cpu", "folded")
    with pytest.raises(ValueError, match="expected floating-point images, got torch.uint8"):
        folded((x * 255).to(torch.uint8))


@pytest.mark.parametrize("mode", ["folded", "parallel", "multi_device", "frozen"])
def test_deployed_models_refuse_a_size_with_the_plain_models_message(mode):
    """Every mode on the folded model checks its input with the plain model's check: one message for a size it
    cannot take (TorchScript's frozen mode raises it as its own error type)."""
    model = parnet.create_model("parnet_cifar_s", **TINY).eval()
    x = torch.randn(1, 3, 30, 32)
    with pytest.raises(ValueError) as plain:
        model(x)
    message = str(plain.value)
    assert "the small-input form of ParNet needs height and width that are multiples of 8, got 30x32" in message
    net = parnet.deploy(model, "cpu", mode, devices=["cpu"] * 3 if mode == "multi_device" else None)
    with pytest.raises((ValueError, torch.jit.Error), match=re.escape(message)):
        net(x)


def test_cifar_baselines_are_timm_feature_extractors_and_refuse_unknown_knobs():
    import parnet.baselines  # noqa: F401  (registers them)

    x = torch.randn(1, 3, 32, 32)
    for name, reductions in [("resnet20_cifar", [1, 1, 2, 4]), ("resnet18_cifar", [1, 1, 2, 4, 8])]:
        model = timm.create_model(name, features_only=True)
        assert model.feature_info.reduction() == reductions, name
        shapes = [(c, 32 // r, 32 // r) for c, r in zip(model.feature_info.channels(), reductions, strict=True)]
        assert [tuple(f.shape[1:]) for f in model(x)] == shapes, name
    with pytest.raises(TypeError, match="widht"):  # was silently ignored
        timm.create_model("resnet20_cifar", widht=(8, 16, 32))
    # resnet18_cifar's own stem conv: timm's ResNet init (kaiming, fan_out) and the device asked for.
    std = timm.create_model("resnet18_cifar").conv1.weight.std().item()
    assert std == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.1)
    assert all(p.is_meta for p in timm.create_model("resnet18_cifar", device="meta").parameters())


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_block_keeps_the_convolutions_dtype_under_fp32_batchnorm(stride):
    """Half-precision convolutions with fp32 BNs (apex O2's keep_batchnorm_fp32) run, and must still run fused."""
    block = randomize_bn(parnet.ParNetBlock(8, 16, stride, groups=2)).eval()
    for m in block.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.to(torch.bfloat16)
    x = torch.randn(2, 8, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        assert block.reparam_conv.weight.dtype == torch.bfloat16
        torch.testing.assert_close(block(x), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("widths", [(16,), (8, 16), (8, 16, 32)])
def test_every_single_feature_prunes_to_the_same_tensor(widths):
    full = ParNet(ParNetCfg(widths=widths, blocks=(1,) * len(widths), head_width=32)).eval()
    randomize_bn(full)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = full.forward_intermediates(x, intermediates_only=False)[1]
    for index, ref in enumerate(want):
        backbone = ParNet(ParNetCfg(widths=widths, blocks=(1,) * len(widths), head_width=32))
        backbone.load_state_dict(full.state_dict())
        backbone.prune_intermediate_layers([index])
        backbone.eval()
        with torch.no_grad():
            (got,) = backbone.forward_intermediates(x, [index], intermediates_only=True)
        torch.testing.assert_close(got, ref)
        backbone.train()
        backbone.forward_intermediates(x, [index], intermediates_only=True)[0].sum().backward()
        assert all(p.grad is not None for p in backbone.parameters()), (widths, index)


def _train_early_backbone(rank: int, init_file: str) -> None:
    """One rank of test_ddp_trains_a_backbone_of_early_features: two steps of DDP's default form."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same weights on both ranks
        backbone = DistributedDataParallel(
            timm.create_model("parnet_s", features_only=True, out_indices=(0, 1), **TINY)
        )
        optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # each rank its own batch
        for _ in range(2):  # DDP finds a parameter without gradient at the second step
            optimizer.zero_grad()
            sum(f.square().mean() for f in backbone(torch.randn(2, 3, 64, 64))).backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


def test_ddp_trains_a_backbone_of_early_features(tmp_path):
    """DistributedDataParallel as it is by default (find_unused_parameters=False) takes a features_only ParNet."""
    torch.multiprocessing.spawn(_train_early_backbone, args=(str(tmp_path / "init"),), nprocs=2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_spatial_mean_of_a_large_bf16_tensor_is_a_matrix_product_as_exact_as_torchs(channels_last: bool) -> None:
    """The gates' mean: from MATMUL_MEAN_MIN elements a bf16 CPU tensor's mean is a product with ones
    (torch's bf16 reduction was up to 20x slower), within bf16 rounding of the fp32 mean, and differentiable."""
    from parnet.layers import MATMUL_MEAN_MIN, spatial_mean

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 8, 256, 256, generator=g) + 0.5).bfloat16()  # 2 x 8 x 256 x 256 = 1 M elements
    assert x.numel() == MATMUL_MEAN_MIN
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with torch.profiler.profile() as prof:
        mean = spatial_mean(x)
    assert any("mm" in event.name for event in prof.events())  # the product, not a reduction
    assert mean.shape == (2, 8) and mean.dtype == torch.bfloat16
    exact = x.detach().float().mean((2, 3))
    torch.testing.assert_close(mean.float(), exact, rtol=2**-7, atol=0)  # bf16 keeps 8 bits
    mean.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), torch.full(x.shape, 1 / 256**2))
    small = x.detach()[:, :, :16, :16]
    assert torch.equal(spatial_mean(small), small.mean((2, 3)))  # below the threshold: torch's own


def test_summary_takes_a_variant_by_its_pretrained_name():
    """`parnet summary parnet_s_official.in1k`: the name predict --model and timm.create_model take."""
    from parnet.summary import summary

    [row] = summary(["parnet_cifar_s.any_tag"])
    assert row == variant_summary("parnet_cifar_s")
    with pytest.raises(ValueError, match="unknown ParNet variant 'resnet50'"):
        summary(["resnet50.a1_in1k"])


def test_drop_path_on_the_stream_blocks_as_timms_repvgg_blocks():
    """timm's stochastic depth: on the stream blocks' 3x3 + 1x1 branches (their BN skip the identity path), rising
    with depth in a stream; training only: the eval model, fused or not, is the rate-0 model's."""
    from timm.layers import DropPath

    model = timm.create_model("parnet_s", drop_path_rate=0.3, **TINY)
    plain = timm.create_model("parnet_s", **TINY)
    plain.load_state_dict(model.state_dict())  # no parameters of its own
    rates = [[getattr(b.drop_path, "drop_prob", 0.0) for b in stream] for stream in model.streams]
    deepest = max(model.cfg.blocks)
    for stream in rates:
        assert stream == pytest.approx([0.3 * j / (deepest - 1) for j in range(len(stream))])
    others = [m for name, m in model.named_modules() if isinstance(m, DropPath) and not name.startswith("streams.")]
    assert others == []  # the stem, downsampling, fusion and final blocks have no identity path
    x = torch.randn(2, 3, 64, 64)
    randomize_bn(model)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain.eval()(x))
        torch.testing.assert_close(parnet.reparameterize(model)(x), plain(x), rtol=1e-4, atol=1e-4)
        torch.manual_seed(0)
        a = model.train()(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, model(x))  # dropped paths differ between draws
    torch.jit.script(model.eval())
    with pytest.raises(ValueError, match="needs the BN skip"):
        parnet.layers.ParNetBlock(8, 16, 2, drop_path=0.1)
