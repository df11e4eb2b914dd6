"""The shared training machinery (parnet.engine) in isolation: process group set-up, NaN reports."""

from __future__ import annotations

import pytest
import torch

from parnet import engine


def test_cuda_process_group_can_also_reduce_cpu_values(monkeypatch):
    """``reduce_mean(value)`` without a device (as the detection loop calls it) reduces a CPU tensor:
    an nccl-only group refuses that ("No backend type associated with device type cpu")."""
    started = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda backend=None, **kw: started.append(backend))
    info = engine.init_distributed("cuda")
    assert info.device == torch.device("cuda", 1) and info.distributed and not info.is_main
    assert started == ["cpu:gloo,cuda:nccl"]
    started.clear()
    assert engine.init_distributed("cpu").device == torch.device("cpu") and started == ["gloo"]


def test_check_finite_does_not_blame_a_finite_loss(monkeypatch):
    """Under DDP every rank stops when one rank's loss is NaN; the others must not report their own loss."""
    ddp = engine.DistInfo(world_size=2, distributed=True)
    monkeypatch.setattr(engine, "all_reduce_sum", lambda t: t + 1)  # another rank's loss was NaN
    with pytest.raises(engine.NonFiniteLossError, match=r"^another rank's loss is NaN/inf \(here 2.5\) at step 4"):
        engine.check_finite(torch.tensor(2.5), 4, ddp)
    with pytest.raises(engine.NonFiniteLossError, match="^the loss is nan at step 4"):
        engine.check_finite(torch.tensor(float("nan")), 4, ddp)
    monkeypatch.setattr(engine, "all_reduce_sum", lambda t: t)  # every rank finite
    engine.check_finite(torch.tensor(2.5), 4, ddp)
