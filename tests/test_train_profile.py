"""benchmarks/train_profile.py: operators sorted into the right kinds, and one profiled step of a small model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_profile.py"
spec = importlib.util.spec_from_file_location("train_profile", SCRIPT)
train_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_profile)


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
