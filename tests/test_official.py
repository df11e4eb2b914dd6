"""The authors' checkpoints: exact outputs, key layout, safe loading, timm pretrained configs."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch

import parnet
from parnet.io import load_model
from parnet.official import infer_official_cfg

from .conftest import FIXTURES


def test_matches_official_outputs_eval_train_fused(official_tiny):
    model = parnet.load_official(official_tiny, activation="silu")
    assert model.cfg.widths == (16, 32, 64) and model.cfg.head_width == 128 and model.cfg.blocks == (4, 5, 5)
    x = official_tiny["input"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_tiny["output_eval"], atol=1e-4, rtol=0)
        fused = parnet.reparameterize(model)
        torch.testing.assert_close(fused(x), official_tiny["output_fused"], atol=1e-4, rtol=0)
        model.train()  # batch statistics; this also updates running stats, so it goes last
        torch.testing.assert_close(model(x), official_tiny["output_train"], atol=1e-4, rtol=0)


def test_loaded_models_carry_timm_configs_and_round_trip_through_save_for_hf(official_tiny, tmp_path):
    """load_official and io.load_model build as timm.create_model does: the release's pretrained_cfg (bilinear
    resizing, as their validation) and the arguments timm's save_for_hf needs to rebuild the same network."""
    from timm.data import resolve_model_data_config

    from parnet.io import load_model, save_model

    model = parnet.load_official(official_tiny, activation="silu")
    assert resolve_model_data_config(model)["interpolation"] == "bilinear"
    assert model.default_cfg is model.pretrained_cfg and model.pretrained_cfg["architecture"] == "parnet_s_official"
    assert (
        model.pretrained_cfg["paper_ids"] == "arXiv:2110.07641"
        and "NonDeepNetworks" in model.pretrained_cfg["origin_url"]
    )
    save_model(model, tmp_path / "model.safetensors")  # (a fused model is not rebuilt fused: as timm's RepVGG)
    for i, net in enumerate([model, load_model(tmp_path / "model.safetensors")]):
        timm.models.save_for_hf(net, tmp_path / f"hf{i}")
        again = timm.create_model(f"local-dir:{tmp_path / f'hf{i}'}", pretrained=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(again(official_tiny["input"]), official_tiny["output_eval"], atol=1e-4, rtol=0)


def test_relu_is_the_default_activation(official_tiny):
    """The released networks are ReLU networks, so that is what load_official builds by default."""
    model = parnet.load_official(official_tiny)
    assert model.cfg.act == "relu"
    with torch.no_grad():
        out = model(official_tiny["input"])
    assert not torch.allclose(out, official_tiny["output_eval"], atol=1e-3)


def _official_parnet_s_state() -> dict[str, torch.Tensor]:
    """Random tensors with every key and shape of the authors' ParNet-S checkpoint."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in (FIXTURES / "parnet_s_official_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(10)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.05
    return state


@pytest.fixture(scope="module")
def parnet_s_checkpoint(tmp_path_factory) -> Path:
    """A file laid out like the authors' release: DDP prefixes, EMA weights, argparse args."""
    state = _official_parnet_s_state()
    ema = {k: v + 0.01 if v.is_floating_point() and "running_var" not in k else v for k, v in state.items()}
    path = tmp_path_factory.mktemp("official") / "planes_92_192_384_1280_num_blocks_5_6_6_1_sebv_13.pth.tar"
    torch.save(
        {
            "state_dict": {"module." + k: v for k, v in state.items()},
            "state_dict_ema": ema,
            "args": argparse.Namespace(model="simplenet_repvgg", lr=0.1),
            "epoch": 119,
        },
        path,
    )
    return path


def test_parnet_s_layout_is_inferred_and_loads_strictly(parnet_s_checkpoint):
    model = parnet.load_official(parnet_s_checkpoint)
    assert model.cfg == timm.create_model("parnet_s_official").cfg  # 96, 192, 384, 1280, ReLU
    assert sum(p.numel() for p in model.parameters()) == 20_983_848  # the paper's 20.98 M
    ema = parnet.load_official(parnet_s_checkpoint, use_ema=True)
    delta = ema.head.fc.weight - model.head.fc.weight
    torch.testing.assert_close(delta, torch.full_like(delta, 0.01))


def test_timm_pretrained_cfg_offline_file_converts_on_load(parnet_s_checkpoint):
    reference = parnet.load_official(parnet_s_checkpoint, use_ema=True)  # timm prefers EMA weights
    model = timm.create_model(
        "parnet_s_official.in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(parnet_s_checkpoint))
    )
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert model.pretrained_cfg["url"].endswith("planes_92_192_384_1280_num_blocks_5_6_6_1_sebv_13.pth.tar")
    # The release's terms are those of the authors' repository; variants without weights claim none.
    assert model.pretrained_cfg["license"] == "bsd-3-clause"
    assert "license" not in timm.create_model("parnet_s").pretrained_cfg
    # A new classifier for another task keeps the backbone weights.
    model10 = timm.create_model(
        "parnet_s_official.in1k",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(parnet_s_checkpoint)),
    )
    assert model10.get_classifier().out_features == 10
    assert torch.equal(model10.final_block.dense.conv.weight, reference.final_block.dense.conv.weight)


def test_pretrained_with_one_input_channel_adapts_every_stem_conv(parnet_s_checkpoint):
    """timm sums the RGB weights of each ``first_conv`` (the stem block's three convs) for in_chans=1."""
    reference = parnet.load_official(parnet_s_checkpoint, use_ema=True)
    overlay = dict(file=str(parnet_s_checkpoint))
    model = timm.create_model("parnet_s_official.in1k", pretrained=True, in_chans=1, pretrained_cfg_overlay=overlay)
    for name in model.pretrained_cfg["first_conv"]:
        weight = reference.get_submodule(name).weight
        torch.testing.assert_close(model.get_submodule(name).weight, weight.sum(1, keepdim=True))
    assert torch.equal(model.stem[1].dense.conv.weight, reference.stem[1].dense.conv.weight)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_convert_command_writes_loadable_safetensors(parnet_s_checkpoint, tmp_path):
    from parnet.cli import main
    from parnet.trained import holds_ema_weights

    out = tmp_path / "parnet_s.safetensors"
    x = torch.randn(1, 3, 64, 64)
    # the EMA weights by default, as eval, predict and export read the file; --raw for the others
    for flags, ema in (([], True), (["--ema"], True), (["--raw"], False)):
        assert main(["convert", str(parnet_s_checkpoint), str(out), *flags]) == 0
        converted = load_model(out)
        reference = parnet.load_official(parnet_s_checkpoint, use_ema=ema)
        with torch.no_grad():
            torch.testing.assert_close(converted(x), reference(x))
        assert holds_ema_weights(out) == ema
    assert [p.name for p in tmp_path.iterdir()] == ["parnet_s.safetensors"]  # no temporary file left
    raw_only = tmp_path / "raw_only.pth.tar"
    torch.save({"state_dict": torch.load(parnet_s_checkpoint, weights_only=False)["state_dict"]}, raw_only)
    assert main(["convert", str(raw_only), str(out)]) == 0 and not holds_ema_weights(out)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="evil.pth.tar") as info:
        parnet.load_official(path)
    assert "refused" in str(info.value)
    assert not marker.exists()
    # The same file with plain pickle would run the payload: the test's exploit is real.
    with open(path, "rb") as f:
        assert f.read(2) == b"PK"  # torch's zip container; the payload sits in data.pkl inside
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"system" in data and pickle.PROTO in data[:1]


def test_missing_and_unexpected_keys_are_clear_errors(official_tiny):
    state = dict(official_tiny["state_dict"])
    del state["streams.1.2.block.rbr_dense.conv.weight"]
    with pytest.raises(ValueError, match=r"fit the model: missing streams.1.2.dense.conv.weight \(32, 32, 3, 3\)"):
        parnet.load_official(state, activation="silu")
    state = dict(official_tiny["state_dict"])
    state["streams.0.0.block.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected streams.0.0.extra.weight"):
        parnet.load_official(state, activation="silu")
    extra = {**official_tiny["state_dict"], "foo.bar": torch.zeros(1)}
    with pytest.raises(ValueError, match="not keys of the authors' ParNet layout"):
        parnet.load_official(extra, activation="silu")
    # strict=False loads what fits, a key of no ParNet included, as its docstring says
    model = parnet.load_official(extra, activation="silu", strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model(official_tiny["input"]), official_tiny["output_eval"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"parnet.load_official\(..., strict=False\) loads what matches"):
        parnet.load_official(state, activation="silu")
    with pytest.raises(ValueError, match="use_ema"):
        parnet.load_official({"state_dict": official_tiny["state_dict"]}, use_ema=True)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        parnet.load_official(tmp_path / "nothere.pth")
    bad = tmp_path / "truncated.pth.tar"
    bad.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="truncated.pth.tar"):
        parnet.load_official(bad)


def test_infer_cfg_reads_shapes(official_tiny):
    cfg, num_classes, in_chans = infer_official_cfg(official_tiny["state_dict"], "silu")
    assert (cfg.widths, cfg.head_width, cfg.blocks, num_classes, in_chans) == ((16, 32, 64), 128, (4, 5, 5), 1000, 3)


@pytest.fixture
def release_in_hub_cache(parnet_s_checkpoint, tmp_path):
    """torch.hub's cache holding the release file under its released name, so no network is needed."""
    cache = tmp_path / "hub"
    (cache / "checkpoints").mkdir(parents=True)
    (cache / "checkpoints" / parnet_s_checkpoint.name).symlink_to(parnet_s_checkpoint)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(cache))
    yield parnet_s_checkpoint
    torch.hub.set_dir(old)


def test_timm_pretrained_url_path_reads_the_release_file(release_in_hub_cache, parnet_s_checkpoint):
    """``pretrained=True`` goes through torch.hub's cache; the pickle's Namespace is accepted."""
    model = timm.create_model("parnet_s_official.in1k", pretrained=True)
    reference = parnet.load_official(parnet_s_checkpoint, use_ema=True)
    assert torch.equal(model.head.fc.weight, reference.head.fc.weight)
    assert torch.equal(model.stem[0].gate.conv.weight, reference.stem[0].gate.conv.weight)


def test_atomic_write_leaves_the_usual_permissions_and_no_temporary_on_error(tmp_path):
    from parnet.io import atomic_write

    target = tmp_path / "out.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_follows_the_umask_without_changing_it(tmp_path, monkeypatch):
    """Reading the umask means setting it, which races with other threads creating files: never done."""
    from parnet.io import atomic_write

    old = os.umask(0o027)
    try:

        def no_umask(mask: int) -> int:
            raise AssertionError("atomic_write changed the process umask")

        monkeypatch.setattr(os, "umask", no_umask)
        with atomic_write(tmp_path / "private.bin") as tmp:
            tmp.write_bytes(b"x")
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o640


def test_training_state_is_pointed_to_the_run_files(tmp_path, capsys):
    from parnet.checkpoint import save_checkpoint
    from parnet.cli import main

    model = timm.create_model("parnet_cifar_s", widths=(8, 16, 32), head_width=64)
    state = save_checkpoint(tmp_path / "run", 0, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="training state.*the run folder, or its last.safetensors / last_ema"):
        parnet.load_official(state)
    assert main(["convert", str(state), str(tmp_path / "out.safetensors")]) == 2
    assert "give the run folder, or its last.safetensors / last_ema.safetensors, instead" in capsys.readouterr().err
    # where a safetensors file is read (eval-det's weights, a detector's): the run folder, not `parnet convert`
    from parnet.io import read_safetensors

    with pytest.raises(ValueError, match="is the training state of a run, not its weights: give the run folder"):
        read_safetensors(state, None)


def test_torch_checkpoint_named_safetensors_is_read_by_content(official_tiny, tmp_path):
    from parnet.formats import is_torch_checkpoint
    from parnet.io import save_model

    path = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": official_tiny["state_dict"]}, path)
    assert is_torch_checkpoint(path) and is_torch_checkpoint(FIXTURES / "official_tiny.pt")
    model = parnet.load_official(path, activation="silu")
    assert torch.equal(model.head.fc.weight, official_tiny["state_dict"]["head.fc.weight"])
    assert not is_torch_checkpoint(save_model(model, tmp_path / "ours.pth"))


def test_torch_hub_pretrained_reads_the_release_file(release_in_hub_cache, parnet_s_checkpoint):
    """``torch.hub.load(..., "parnet_s_official", pretrained=True)`` gives the authors' EMA weights, as timm does."""
    model = torch.hub.load(str(Path(__file__).parents[1]), "parnet_s_official", source="local", pretrained=True)
    reference = parnet.load_official(parnet_s_checkpoint, use_ema=True)
    assert torch.equal(model.head.fc.weight, reference.head.fc.weight)
    assert torch.equal(model.stem[0].gate.conv.weight, reference.stem[0].gate.conv.weight)
