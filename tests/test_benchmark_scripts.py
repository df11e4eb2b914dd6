"""The benchmark scripts behind RESULTS.md run and write what they say (their figures are not checked here)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from parnet.deployment import fold

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = BENCHMARKS.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))  # the ablation grid, as benchmarks/ablation_latency.py imports it
from ablation.grid import ABLATION_CONFIGS  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_profile = _load("train_profile")


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        ("aten::convolution_backward", "conv"),
        ("aten::mkldnn_convolution", "conv"),
        ("aten::native_batch_norm_backward", "batch norm"),
        ("aten::silu_backward", "activation"),
        ("aten::avg_pool2d", "pooling, gates"),
        ("aten::mul", "pooling, gates"),
        ("aten::add_", "adds, sums"),
        ("aten::_foreach_add_", "adds, sums"),
        ("aten::copy_", "copies, casts"),
        ("aten::empty", "other"),
    ],
)
def test_kind_of(op, kind):
    assert train_profile.kind_of(op) == kind


def test_profile_of_one_step():
    row = train_profile.profile_model("resnet20_cifar", batch=4, steps=1)
    assert row["model"] == "resnet20_cifar" and row["params"] == 272186
    assert row["macs_per_image"] == pytest.approx(40.5e6, rel=0.01)  # the figure of RESULTS.md's table
    by_kind = row["profiled_ms_by_kind"]
    assert all(by_kind[k] > 0 for k in ("conv", "batch norm", "activation"))  # ResNet's forward and backward ops
    assert "pooling, gates" not in by_kind or by_kind["pooling, gates"] < by_kind["conv"]
    assert row["images_per_s"] > 0 and row["conv_gmacs_per_s"] > 0


def test_ablation_latency_times_every_config(tmp_path):
    out = tmp_path / "latency"
    cmd = [sys.executable, str(BENCHMARKS / "ablation_latency.py"), "--modes", "packed", "--batch", "2", "--reps", "1"]
    cmd += ["--reps-large", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = doc["rows"]
    assert [r["config"] for r in rows] == [c.name for c in ABLATION_CONFIGS]  # each once, in the grid's order
    assert {"base", "relu", "resnet20n"} <= {r["config"] for r in rows}
    # its own arguments, as parnet bench stores them: what to run again
    assert doc["args"] == {"modes": "packed", "batch": 2, "reps": 1, "reps_large": 1, "threads": 1, "out": str(out)}
    assert doc["command"][1:] == cmd[2:] and doc["machine"]["code"]["parnet"]
    assert all(r["packed"]["b1_ms"] > 0 and r["packed"]["b2_images_per_s"] > 0 for r in rows)
    assert len(out.with_suffix(".md").read_text().splitlines()) == 2 + len(rows)


def test_int8_activation_stores_its_arguments(tmp_path, monkeypatch):
    """The JSON holds the script's arguments and command line (its timing, faked here, is not the point)."""
    int8_activation = _load("int8_activation")
    built = []

    def build_entries(name, modes, device, threads, kwargs):
        built.append((name, tuple(modes)))
        return None, {mode: (lambda x: x) for mode in modes}

    def time_interleaved(entries, x, reps, warmup, device, settle_s):
        return {key: [2.0 if "int8" in key else 4.0] * reps for key in entries}

    monkeypatch.setattr(int8_activation, "build_entries", build_entries)
    monkeypatch.setattr(int8_activation, "time_interleaved", time_interleaved)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)  # the script's, not this process's
    out = tmp_path / "act"
    argv = ["int8_activation.py", "--int8-mode", "int8:compiled", "--batch", "2", "--reps", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    int8_activation.main()
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["args"] == {
        "fp32_mode": "openvino", "int8_mode": "int8:compiled", "batch": 2, "reps": 1, "reps_large": 5, "threads": 2,
        "out": str(out),
    }  # fmt: skip
    assert doc["command"] == argv and {row["b1"]["gain"] for row in doc["rows"]} == {2.0}
    assert built[0] == ("parnet_s", ("openvino", "int8:compiled"))


def test_openvino_layers_groups_the_layer_counters_by_kind(tmp_path):
    pytest.importorskip("openvino")  # the script reads OpenVINO's own per-layer counters
    out = tmp_path / "layers"
    cmd = [sys.executable, str(BENCHMARKS / "openvino_layers.py"), "--models", "parnet_cifar_s", "--precisions", "fp32"]
    cmd += ["--batches", "2", "--reps", "1", "--resolution", "32", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    (profile,) = json.loads(out.with_suffix(".json").read_text())["profiles"]
    assert (profile["model"], profile["mode"], profile["batch"]) == ("parnet_cifar_s", "openvino", 2)
    kinds = profile["kinds"]
    # every stream block, downsampling and fusion is one convolution; the gates' means stay separate
    assert sum(k["layers"] for kind, k in kinds.items() if kind.startswith(("Convolution", "GroupConvolution"))) >= 20
    assert any(kind.startswith("ReduceMean") for kind in kinds)
    assert profile["counted_ms"] == pytest.approx(sum(k["ms"] for k in kinds.values()))
    assert profile["wall_ms"] > 0 and sum(n["kind"].startswith("ReduceMean") for n in profile["nodes"].values()) >= 10
    assert "| layer kind" in out.with_suffix(".md").read_text()


def _profile(model: str, mode: str, convs: dict[str, float], wall: float) -> dict:
    nodes = {
        f"__module.{name}/aten::_convolution/Convolution": {"kind": "Convolution x", "ms": ms}
        for name, ms in convs.items()
    }
    nodes["__module.stem.0/aten::silu/Swish"] = {"kind": "Subgraph x", "ms": 1.0}  # not a conv: left out
    return {"model": model, "mode": mode, "batch": 2, "wall_ms": wall, "nodes": nodes}


def test_openvino_conv_gains_joins_each_convs_time_with_its_flops(tmp_path):
    flops = _load("openvino_conv_gains").conv_flops("parnet_cifar_s", 32)
    assert len(flops) >= 20 and "stem.0.conv" in flops and "final_block.conv" in flops  # the folded model's convs
    counter = FlopCounterMode(display=False)  # torch's own count of the same network's convolutions
    with counter, torch.no_grad():
        fold(timm.create_model("parnet_cifar_s").eval())(torch.zeros(1, 3, 32, 32))
    assert sum(flops.values()) == counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    fp32 = {name: 4.0 for name in flops}
    int8 = {name: (2.0 if name == "stem.0.conv" else 1.0) for name in flops}
    record = {
        "profiles": [
            _profile("parnet_cifar_s", "openvino", fp32, 100.0),
            _profile("parnet_cifar_s", "int8:openvino", int8, 40.0),
        ]
    }
    (tmp_path / "layers.json").write_text(json.dumps(record))
    out = tmp_path / "gains"
    cmd = [sys.executable, str(BENCHMARKS / "openvino_conv_gains.py"), str(tmp_path / "layers.json")]
    cmd += ["--resolution", "32", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["total"]["gflop"] == pytest.approx(2 * sum(flops.values()) / 1e9)  # batch 2
    assert row["total"]["fp32_ms"] == 4.0 * len(flops) and row["total"]["int8_ms"] == len(flops) + 1.0
    stem = next(c for c in row["convs"] if c["conv"] == "stem.0.conv")
    assert (stem["fp32_ms"], stem["int8_ms"]) == (4.0, 2.0)
    assert "| `stem.0.conv` |" in out.with_suffix(".md").read_text() and "2.00x" in out.with_suffix(".md").read_text()
    # a convolution without a counter (fused away, or a different model) is refused, not summed short
    del record["profiles"][1]["nodes"]["__module.stem.0.conv/aten::_convolution/Convolution"]
    (tmp_path / "layers.json").write_text(json.dumps(record))
    failed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert failed.returncode != 0 and "convolutions" in failed.stderr
