"""CUDA executors: one CUDA stream per ParNet stream, CUDA graphs, and the streams on several devices."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..devices import check_device
from .folding import FoldedParNet, merge_after_entry
from .inputs import check_has_values
from .kernels import ShapeCache, without_caches


class CudaStreamParNet(nn.Module):
    """Each ParNet stream on its own CUDA stream; fusions wait on events of the streams they read.

    Tensors made on one CUDA stream and read on another are marked with ``record_stream`` so the
    caching allocator does not reuse their memory early.
    """

    def __init__(self, folded: FoldedParNet):
        super().__init__()
        self.folded = folded
        self._streams: list[torch.cuda.Stream] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return without_caches(self, _streams=None)  # CUDA streams cannot be pickled: a copy makes its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"CudaStreamParNet needs a CUDA input, got {x.device}")
        f = self.folded
        f.check_input(x)
        x = x.detach()  # no autograd graph (see FoldedParNet.forward)
        if self._streams is None or self._streams[0].device != x.device:
            self._streams = [torch.cuda.Stream(x.device) for _ in f.streams]
        main = torch.cuda.current_stream(x.device)
        if f.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = f.stem(x)
        outs = []
        for i, (stream, cuda_stream) in enumerate(zip(f.streams, self._streams)):
            if i > 0:
                x = f.downsample[i - 1](x)  # the short downsampling chain stays on the main stream
            cuda_stream.wait_stream(main)  # stream i starts as soon as its input is queued
            with torch.cuda.stream(cuda_stream):
                x.record_stream(cuda_stream)  # made on main, read here: keep its memory until done
                y = stream(x)
                if i == 0:
                    y = f.fuse_entry(y)
            outs.append(y)
        streams = self._streams

        def ready(i: int) -> None:  # each fusion (on main) waits only for the stream it reads,
            main.wait_stream(streams[i])  # so it overlaps the later streams
            outs[i].record_stream(main)

        return merge_after_entry(f, outs, ready)


class CudaGraphModule(nn.Module):
    """Replays a CUDA graph of ``module``'s forward; a new input shape is captured anew.

    Each (shape, dtype, device, layout) gets its own graph and static buffers (at most
    ``max_graphs``; the least recently used is dropped), so an input of another shape is never run through a
    graph captured for a different one. The output is a copy, safe to keep across calls. Moving
    or casting the module (``.to``, ``.half``, ...) drops the graphs, which read the old weights; a copy
    (``copy.deepcopy``, ``pickle``, ``torch.save``) captures its own.
    """

    def __init__(self, module: nn.Module, max_graphs: int = 8, warmup: int = 3):
        super().__init__()
        if max_graphs < 1 or warmup < 1:
            # warm-up (at least one call) initializes cuBLAS/cuDNN and the streams outside the capture
            raise ValueError(f"CudaGraphModule needs max_graphs >= 1 and warmup >= 1, got {max_graphs}, {warmup}")
        self.module = module
        self.max_graphs = max_graphs
        self.warmup = warmup
        # (shape, ...) -> (graph, static input, static output, lock); CUDA graphs cannot be pickled: the cache of a
        # copy starts empty and captures its own
        self._graphs = ShapeCache(max_graphs)

    def _apply(self, fn: Callable, recurse: bool = True) -> CudaGraphModule:
        self._graphs.clear()  # the graphs read the parameters' old memory
        return super()._apply(fn, recurse)

    def _capture(self, static_x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then capture on it (on ``static_x``'s device, whichever is current)."""
        with torch.cuda.device(static_x.device):
            side = torch.cuda.Stream(static_x.device)
            side.wait_stream(torch.cuda.current_stream(static_x.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(self.warmup):
                    self.module(static_x)
            torch.cuda.current_stream(static_x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # An explicit stream: torch.cuda.graph's default capture stream is made once, on the
            # device current at its first use, and would capture nothing for another device.
            with torch.inference_mode(), torch.cuda.graph(graph, stream=side):
                static_y = self.module(static_x)
        return graph, static_y

    def _replay(self, x: torch.Tensor) -> torch.Tensor:
        def capture() -> tuple[Any, torch.Tensor, torch.Tensor, threading.Lock]:
            with torch.inference_mode(False):  # a normal tensor, which any later call can copy into
                static_x = x.clone()
            graph, static_y = self._capture(static_x)
            return graph, static_x, static_y, threading.Lock()

        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
        graph, static_x, static_y, lock = self._graphs.get(key, capture)
        with lock:  # one caller at a time through a graph's static buffers
            static_x.copy_(x)
            graph.replay()
            return static_y.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA input, got {x.device}")
        return self._replay(x)


class MultiDeviceParNet(nn.Module):
    """ParNet with stream ``i`` on ``devices[i]`` (as the authors ran ParNet-XL on three GPUs).

    The stem runs on ``devices[0]``; each downsampling block runs where its input is and sends its
    output to the next stream's device; each fusion runs on its stream's device, with the running
    tensor copied there. Copies are ``non_blocking``, so work on the devices overlaps. The output
    is returned on the input's device. All devices may be the same (e.g. ``["cpu"] * 3``).
    """

    def __init__(self, folded: FoldedParNet, devices: Sequence[str | torch.device]):
        super().__init__()
        n = len(folded.streams)
        if len(devices) != n:
            raise ValueError(f"give one device per stream: {n} streams, {len(devices)} devices")
        devs = [check_device(d) for d in devices]
        self.devices = devs
        # not folded.check_input: that bound method would keep the whole folded copy alive
        self.in_chans, self.multiple = folded.in_chans, folded.multiple
        self.channels_last = folded.channels_last
        self.stem = copy.deepcopy(folded.stem).to(devs[0])
        # downsample[i] reads stream i's input and makes stream i+1's: it runs on devices[i].
        self.downsample = nn.ModuleList(copy.deepcopy(d).to(devs[i]) for i, d in enumerate(folded.downsample))
        self.streams = nn.ModuleList(copy.deepcopy(s).to(devs[i]) for i, s in enumerate(folded.streams))
        self.fuse_entry = copy.deepcopy(folded.fuse_entry).to(devs[0])
        self.fusions = nn.ModuleList(copy.deepcopy(f).to(devs[i + 1]) for i, f in enumerate(folded.fusions))
        self.final_block = copy.deepcopy(folded.final_block).to(devs[-1])
        self.head = copy.deepcopy(folded.head).to(devs[-1])

    check_input = FoldedParNet.check_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        check_has_values(x)
        x = x.detach()  # no autograd graph (see FoldedParNet.forward)
        home = x.device
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.stem(_send(x, self.devices[0]))
        inputs = [h]
        for i, down in enumerate(self.downsample):
            inputs.append(_send(down(inputs[-1]), self.devices[i + 1]))
        outs = [stream(xi) for stream, xi in zip(self.streams, inputs)]  # queued on each device
        fused = self.fuse_entry(outs[0])
        for i, fusion in enumerate(self.fusions):
            fused = fusion(outs[i + 1], _send(fused, self.devices[i + 1]))
        return self.head(self.final_block(fused)).to(home)


def _send(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; asynchronous only to a CUDA device.

    PyTorch orders a copy to a GPU (from the host, or from another GPU) on the current streams of
    the devices involved, so it may overlap. A ``non_blocking`` copy from a GPU to the CPU returns
    before the data has arrived, and the CPU would read it too early: that one blocks.
    """
    return t.to(device, non_blocking=device.type == "cuda")
