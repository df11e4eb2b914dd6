"""Loaders for classification training and evaluation: a sampler that shards across ranks and a seeded
generator, so a run is reproducible and resumable (the datasets: :mod:`parnet.data`)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ShardSampler", "available_cpus", "build_loaders"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, as the DataLoader counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: every item seen by exactly one rank, none repeated (evaluation)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(
    train: Dataset,
    test: Dataset,
    batch_size: int,
    workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    eval_batch_size: int | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader, torch.Generator]:
    """Loaders for training (shuffled per epoch, sharded over ranks, last partial batch dropped) and testing.

    Call ``train_loader.sampler.set_epoch(epoch)`` each epoch. The returned generator seeds the
    workers' RNGs; save it with the checkpoint (``checkpoint.save_checkpoint(..., generators=...)``).
    ``workers`` is capped at the CPUs this process may use (more only compete for them, and the
    DataLoader warns), so a config written for a big machine also runs on a small one.
    """
    from torch.utils.data import DistributedSampler

    workers = min(workers, available_cpus())
    if len(train) < batch_size * world_size:
        raise ValueError(
            f"batch size {batch_size} x {world_size} rank(s) is larger than the training set ({len(train)} images)"
        )
    gen = torch.Generator().manual_seed(int(seed) * 1000 + rank)
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=False)
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True, generator=gen, **common)
    test_loader = DataLoader(
        test,
        batch_size=eval_batch_size or batch_size,
        sampler=ShardSampler(len(test), rank, world_size),
        shuffle=False,
        **common,
    )
    return train_loader, test_loader, gen
