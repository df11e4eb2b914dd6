"""Shared fixtures: the reference outputs of the authors' implementation, and random BN statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import parnet  # noqa: F401  (registers the variants with timm)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def official_tiny() -> dict:
    """Inputs and outputs of the authors' own implementation (see fixtures/README.md)."""
    return torch.load(FIXTURES / "official_tiny.pt", weights_only=True)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so that fusion is
    checked on something other than the identity normalisation of a fresh model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model
