"""Strict, bounded loading (parnet.weights): every reader of weights checks names, shapes and dtypes
first, and a file's header may describe an architecture only, within bounds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import parnet
from parnet import detection as det
from parnet.cli import main
from parnet.io import load_model, save_model
from parnet.trained import load_weights
from parnet.weights import MAX_PARAMS, architecture_kwargs, check_state_dict

from .conftest import TINY_STEM


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    return save_model(parnet.create_model("parnet_cifar_s", num_classes=10, **TINY_STEM), tmp_path / "ours.safetensors")


def _rewrite(path: Path, out: Path, change_tensors=None, change_meta=None) -> Path:
    from safetensors import safe_open

    state = load_file(path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    if change_tensors:
        state = change_tensors(state)
    if change_meta:
        meta = change_meta(meta)
    save_file(state, out, metadata=meta)
    return out


def _run_file(tmp_path: Path, name: str, **kw: object) -> Path:
    """A file as `parnet train` writes its weights (timm_model + model_kwargs in the header)."""
    model = parnet.create_model("parnet_cifar_s", num_classes=10, in_chans=1, **TINY_STEM)
    meta = {"timm_model": "parnet_cifar_s", "model_kwargs": json.dumps(TINY_STEM), "num_classes": "10", "in_chans": "1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in kw.items()})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / name, metadata=meta)
    return tmp_path / name


def test_int32_weights_are_refused_by_every_reader(saved: Path, tmp_path: Path, capsys) -> None:
    """A model of zeros scoring 9% with exit 0 was what an int32 file gave: now the first mismatch is named."""
    ints = _rewrite(saved, tmp_path / "ints.safetensors", lambda s: {k: v.to(torch.int32) for k, v in s.items()})
    first = "stem.0.dense.conv.weight"  # the model's first tensor
    with pytest.raises(ValueError, match=rf"ints.safetensors does not fit the model: {first} is torch.int32"):
        load_model(ints)
    with pytest.raises(ValueError, match="torch.int32, the model's is torch.float32"):
        load_weights(ints)
    assert main(["export", "--checkpoint", str(ints), "--out", str(tmp_path / "x"), "--resolution", "32"]) == 2
    assert "torch.int32" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="ints.safetensors does not fit the model: .* is torch.int32"):
        det.build_backbone("parnet_cifar_s", weights=ints, **TINY_STEM)  # read as the file's own network first
    run_ints = _rewrite(_run_file(tmp_path, "run.safetensors"), tmp_path / "run_ints.safetensors",
                        lambda s: {k: v.to(torch.int32) for k, v in s.items()})  # fmt: skip
    with pytest.raises(ValueError, match="torch.int32"):
        load_weights(run_ints)


def test_wrong_shapes_missing_and_extra_keys_are_named(saved: Path, tmp_path: Path) -> None:
    state = load_file(saved)
    key = "head.fc.weight"
    wide = _rewrite(saved, tmp_path / "w.safetensors", lambda s: {**s, key: torch.zeros(11, 64)})
    with pytest.raises(ValueError, match=r"head.fc.weight has shape \(11, 64\), the model \(10, 64\)"):
        load_model(wide)
    gone = _rewrite(saved, tmp_path / "m.safetensors", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(ValueError, match=r"missing head.fc.weight \(10, 64\) torch.float32"):
        load_model(gone)
    extra = _rewrite(saved, tmp_path / "e.safetensors", lambda s: {**s, "spy.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected spy.weight"):
        load_model(extra)
    assert set(state) == set(load_model(saved).state_dict())
    with pytest.raises(ValueError, match=r"x does not fit the model: missing a \(2,\) .*\(and 1 more\)"):
        check_state_dict({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, "x")


def test_a_device_that_is_not_there_is_named_not_the_file(saved: Path, monkeypatch) -> None:
    """safetensors said "cannot read FILE as safetensors (truncated or corrupt?)" for device "gpu"."""
    with pytest.raises(ValueError, match=r"unsupported device 'gpu' \(use cpu or cuda\[:i\]\)"):
        load_model(saved, device="gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device cuda:0 requested but CUDA is not available on this machine"):
        load_model(saved, device="cuda:0")
    assert load_model(saved, device=torch.device("cpu")).head.fc.weight.device.type == "cpu"


def test_header_may_not_load_pretrained_weights_or_files(tmp_path: Path) -> None:
    hostile = {"pretrained": True, "pretrained_cfg_overlay": {"file": "/etc/passwd"}}
    path = _run_file(tmp_path, "p.safetensors", model_kwargs={**TINY_STEM, **hostile})
    with pytest.raises(ValueError, match="'pretrained' is refused: model keywords describe the architecture only"):
        load_weights(path)
    path = _run_file(tmp_path, "u.safetensors", model_kwargs={**TINY_STEM, "drop_path_rate": 0.1})
    with pytest.raises(ValueError, match="unknown model keyword 'drop_path_rate'; allowed: widths, head_width"):
        load_weights(path)
    path = _run_file(tmp_path, "n.safetensors", timm_model="no_such_model")
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        load_weights(path)
    path = _run_file(tmp_path, "c.safetensors", num_classes="-1")
    with pytest.raises(ValueError, match="num_classes must be an integer from 0 to 100000, got -1"):
        load_weights(path)


def test_header_sizes_are_bounded_before_anything_is_allocated(saved: Path, tmp_path: Path, monkeypatch) -> None:
    # One width past the per-key bound: refused from the header alone.
    path = _run_file(tmp_path, "w.safetensors", model_kwargs={**TINY_STEM, "widths": [8, 16, 10**9]})
    with pytest.raises(ValueError, match="widths must be an integer from 1 to 16384, got 1000000000"):
        load_weights(path)
    # Every width within bounds, but terabytes in all: counted on the meta device, never allocated.
    big = {"widths": [16384, 16384, 16384], "head_width": 16384}
    path = _run_file(tmp_path, "b.safetensors", model_kwargs=big)
    built = []
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=f"describes a model of .* parameters, more than the {MAX_PARAMS:,} allowed"):
        load_weights(path)
    assert not built
    # A ParNet file's cfg: ParNetCfg's fields only.
    cfg = _rewrite(saved, tmp_path / "cfg.safetensors", change_meta=lambda m: {**m, "cfg": json.dumps(
        {**json.loads(m["cfg"]), "pretrained_cfg_overlay": {"file": "x"}})})  # fmt: skip
    with pytest.raises(ValueError, match="metadata 'cfg' must hold widths, head_width and only"):
        load_model(cfg)
    bad = _rewrite(saved, tmp_path / "j.safetensors", change_meta=lambda m: {**m, "cfg": "{not json"})
    with pytest.raises(ValueError, match="metadata 'cfg' is not valid JSON"):
        load_model(bad)


def test_detector_header_is_checked(tmp_path: Path) -> None:
    model = det.create_detector("fcos", "parnet_s", num_classes=3, fpn_channels=64, min_size=64, max_size=64,
                                backbone_kwargs=dict(widths=(8, 16, 32), head_width=64))  # fmt: skip
    path = det.save_detector(model, tmp_path / "d.safetensors")

    def config(change):
        def edit(meta):
            return {**meta, "config": json.dumps({**json.loads(meta["config"]), **change})}

        return edit

    bad = _rewrite(path, tmp_path / "p.safetensors", change_meta=config({"backbone_kwargs": {"pretrained": True}}))
    with pytest.raises(ValueError, match="'pretrained' is refused"):
        det.load_detector(bad)
    bad = _rewrite(path, tmp_path / "k.safetensors", change_meta=config({"score_threshold": 0.0}))
    with pytest.raises(ValueError, match="unknown key 'score_threshold'"):
        det.load_detector(bad)
    bad = _rewrite(path, tmp_path / "t.safetensors", change_meta=config({"score_thresh": 2.0}))
    with pytest.raises(ValueError, match=r"score_thresh must be a number in \[0.0, 1.0\], got 2.0"):
        det.load_detector(bad)
    bad = _rewrite(path, tmp_path / "s.safetensors", change_meta=config({"min_size": 10**9}))
    with pytest.raises(ValueError, match="min_size must be an integer from 1 to 8192"):
        det.load_detector(bad)
    ints = _rewrite(path, tmp_path / "i.safetensors", lambda s: {k: v.to(torch.int32) for k, v in s.items()})
    with pytest.raises(ValueError, match="torch.int32"):
        det.load_detector(ints)


def test_our_safetensors_given_as_an_authors_checkpoint_is_not_called_unsafe(saved: Path, tmp_path: Path, capsys):
    for args in (["convert", str(saved), str(tmp_path / "out.safetensors")], ["eval", str(saved), "--official"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "is a safetensors file, not a PyTorch checkpoint: it needs no conversion" in err
        assert "could run code" not in err and "weights_only" not in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(saved.read_bytes())
    assert main(["eval", str(run), "--official"]) == 2  # not ignored: a run folder holds no authors' file
    assert "--official reads an authors' .pth.tar file" in capsys.readouterr().err


def test_hostile_pickle_message_does_not_advise_running_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "payload": os.system}, path)
    with pytest.raises(ValueError) as info:
        parnet.load_official(path)
    assert "could run code" in str(info.value) and "posix.system" in str(info.value)
    assert "weights_only" not in str(info.value)
    # a damaged or foreign file is said to be one, not called dangerous, and is no traceback
    (tmp_path / "notes.pth").write_text("hello, these are notes\n")
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:2] + bytes(range(200, 256)) * 20)
    for name in ("notes.pth", "cut.pth"):
        with pytest.raises(ValueError, match="cannot read .* as a PyTorch checkpoint") as info:
            parnet.load_official(tmp_path / name)
        assert "could run code" not in str(info.value)


def test_architecture_keywords_on_the_command_line(tmp_path: Path, capsys) -> None:
    assert main(["train", "--output", str(tmp_path / "r"), "--model-kwargs", "pretrained=true"]) == 2
    assert "'pretrained' is refused" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert architecture_kwargs({"widths": (8, 16), "act": "relu"}, "x") == {"widths": [8, 16], "act": "relu"}
    with pytest.raises(ValueError, match="x: use_gate must be true or false, got 'yes'"):
        architecture_kwargs({"use_gate": "yes"}, "x")


def test_safetensors_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_model(parnet.create_model("parnet_cifar_s", **TINY_STEM), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_model_the_file_cannot_describe_is_not_saved(tmp_path: Path) -> None:
    """The header records average pooling: a max-pooling model would come back pooling by average."""
    model = parnet.create_model("parnet_cifar_s", **TINY_STEM, global_pool="max")
    with pytest.raises(ValueError, match="this one pools with 'max'"):
        save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_only_a_parnet_is_saved(tmp_path: Path) -> None:
    deployed = parnet.deploy(parnet.create_model("parnet_cifar_s", **TINY_STEM).eval(), "cpu", "folded")
    with pytest.raises(ValueError, match="save_model writes a ParNet .* got FoldedParNet"):
        save_model(deployed, tmp_path / "d.safetensors")
    assert not list(tmp_path.iterdir())


def test_an_engine_file_given_as_weights_says_which_commands_run_it(tmp_path: Path) -> None:
    for name in ("model.onnx", "model.xml"):
        (tmp_path / name).write_bytes(b"\x08\x07")
        with pytest.raises(ValueError, match="is an engine model .*`parnet eval`, `parnet predict --checkpoint`"):
            load_model(tmp_path / name)


def test_a_folder_given_to_load_model_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a folder, not a weights file: give a run's last.safetensors"):
        load_model(tmp_path)


def test_another_librarys_safetensors_says_how_to_read_it(tmp_path: Path) -> None:
    save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")  # timm's: no metadata of ours
    with pytest.raises(ValueError, match="was not written by this project .* `parnet predict --checkpoint FILE"):
        load_weights(tmp_path / "model.safetensors")


def test_an_exported_program_given_as_weights_says_how_to_load_it(tmp_path: Path) -> None:
    """A `parnet export` TorchScript or torch.export file is named for what it is, with its own loader; not sent to
    `parnet convert`, which refuses it."""
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "m.torchscript.pt"))
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), tmp_path / "m.pt2")
    for name, loader in (("m.torchscript.pt", "TorchScript program (load it with torch.jit.load)"),
                         ("m.pt2", "torch.export program (load it with torch.export.load)")):  # fmt: skip
        with pytest.raises(ValueError) as info:
            load_model(tmp_path / name)
        assert f"{name} is a {loader}, an exported model that runs as it is" in str(info.value)
        assert "parnet convert" not in str(info.value)
