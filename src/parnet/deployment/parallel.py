"""CPU: the streams of a folded ParNet run concurrently (TorchScript ``torch.jit.fork``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .folding import FoldedParNet, merge_after_entry
from .inputs import check_has_values
from .kernels import without_caches


class _StreamTask(nn.Module):
    """One stream, and for the first stream the block that brings it down to the next resolution."""

    def __init__(self, stream: nn.Module, tail: nn.Module):
        super().__init__()
        self.stream = stream
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.stream(x))


class _ParallelCore(nn.Module):
    """TorchScript body: streams 1..n-1 forked onto the inter-op pool, the last one inline.

    Takes the stem's output; returns the stream outputs, the first already brought down by the
    fusion entry block.
    """

    def __init__(self, folded: FoldedParNet):
        super().__init__()
        self.downsample = folded.downsample
        n = len(folded.streams)
        tasks = [_StreamTask(folded.streams[0], folded.fuse_entry)]
        tasks += [_StreamTask(folded.streams[i], nn.Identity()) for i in range(1, n)]
        self.forked = nn.ModuleList(tasks[:-1])
        self.last = tasks[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        futures: list[torch.jit.Future[torch.Tensor]] = []
        for i, task in enumerate(self.forked):
            futures.append(torch.jit.fork(task, x))  # stream i starts as soon as its input exists
            for j, down in enumerate(self.downsample):
                if j == i:
                    x = down(x)
        last = self.last(x)
        outs = [torch.jit.wait(f) for f in futures]
        outs.append(last)
        return outs


def _scripted_core(folded: FoldedParNet) -> torch.jit.ScriptModule:
    """The TorchScript of :class:`_ParallelCore` (``torch.jit.fork`` runs only in TorchScript)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        return torch.jit.script(_ParallelCore(folded))


class StreamParallelParNet(nn.Module):
    """The streams of a folded ParNet run concurrently on CPU (TorchScript ``torch.jit.fork``).

    The stem runs first with all ``threads``; then the first n-1 streams are forked onto
    PyTorch's inter-op thread pool as soon as their inputs exist and the last runs on the calling
    thread, with the intra-op threads split between them (``max(1, threads // n)`` each, so n
    streams on n cores get a core each); then the fusions, final block and head run with all
    ``threads`` again. The thread count is set per call and restored afterwards.

    ``copy.deepcopy``, ``pickle`` and ``torch.save`` leave the TorchScript core out (a scripted module cannot be
    pickled) and script it again from ``folded`` when the copy is made or loaded.
    """

    def __init__(self, folded: FoldedParNet, threads: int | None = None):
        super().__init__()
        self.folded = folded
        self.threads = threads or torch.get_num_threads()
        self.per_stream = max(1, self.threads // len(folded.streams))
        self.core = _scripted_core(folded)

    def __getstate__(self) -> dict[str, Any]:
        return without_caches(self, _modules={k: v for k, v in self._modules.items() if k != "core"})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.core = _scripted_core(self.folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.folded
        f.check_input(x)
        check_has_values(x)
        x = x.detach()  # no autograd graph (see FoldedParNet.forward)
        if f.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(self.threads)
            x = f.stem(x)
            torch.set_num_threads(self.per_stream)  # this thread's, and the pool's on first use
            outs = self.core(x)
            torch.set_num_threads(self.threads)
            return merge_after_entry(f, outs)
        finally:
            torch.set_num_threads(prev)
