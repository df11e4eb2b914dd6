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


def test_tensorboard_gets_back_the_epoch_a_kill_kept_from_it(tmp_path) -> None:
    """Killed after epoch 1's checkpoint but before its TensorBoard write: the resumed run writes it again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from parnet.checkpoint import MetricLogger

    first = MetricLogger(tmp_path)
    first.log(0, {"loss": 2.0})
    rows = [first.row(0, {"loss": 2.0}), first.row(1, {"loss": 1.5})]  # epoch 1: in the checkpoint only
    first.close()
    resumed = MetricLogger(tmp_path, start_epoch=2, rows=rows)
    resumed.log(2, {"loss": 1.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 2.0), (1, 1.5), (2, 1.0)]


def test_scores_and_prediction_changes_are_summed_over_ranks(monkeypatch):
    """evaluate_model's counts, the predictions changed against a reference included, go through the one
    all-reduce: two ranks holding the same shard count every image and every change twice."""
    from parnet import scoring

    model = torch.nn.Linear(4, 3)
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    loader = [(x[:6], torch.zeros(6, dtype=torch.long)), (x[6:], torch.zeros(4, dtype=torch.long))]
    alone = scoring.evaluate_model(model, loader)
    flipped = alone["preds"].clone()
    flipped[[1, 7]] = (flipped[[1, 7]] + 1) % 3  # a reference that differs on two images, one in each batch
    assert scoring.evaluate_model(model, loader, reference=flipped)["changes"] == 2
    monkeypatch.setattr(engine, "all_reduce_sum", lambda t: t * 2)  # as two ranks with the same shard
    doubled = scoring.evaluate_model(model, loader, reference=flipped)
    assert doubled["n"] == 20 and doubled["changes"] == 4 and doubled["top1"] == alone["top1"]
