"""Shared fixtures: the reference outputs of the authors' implementation, and random BN statistics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import parnet  # noqa: F401  (registers the variants with timm)
from parnet.bench import randomize_statistics

FIXTURES = Path(__file__).parent / "fixtures"

# The small ParNet most tests build (narrow streams: milliseconds a call), and one with a narrow stem too.
TINY = dict(widths=(8, 16, 32), head_width=64)
TINY_STEM = {**TINY, "stem_width": 8}


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets one core's worth of
    # threads: torch's default of every core per process would oversubscribe them. Tests that need a
    # thread count set it themselves.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The slow tests first (a stable sort keeps every other order): under xdist a 2-minute test collected
    # last (the inductor compiles in test_train.py) would run alone on one worker while the others idle.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def official_tiny() -> dict:
    """Inputs and outputs of the authors' own implementation (see fixtures/README.md)."""
    return torch.load(FIXTURES / "official_tiny.pt", weights_only=True)


# Random BN statistics, so that fusion and folding are checked on more than identity BNs.
randomize_bn = randomize_statistics


@pytest.fixture(scope="module")
def fast_torchscript():
    """TorchScript's profiling executor optimizes on the first calls (seconds); timm's tests turn that off too."""
    old = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_mode(old)
