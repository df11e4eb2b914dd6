"""CPU kernels: convolutions with pre-packed oneDNN weights, NNPACK where it is faster, and PyTorch's
generic compiled (inductor) and frozen (TorchScript) CPU paths. Nothing here knows ParNet."""

from __future__ import annotations

import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PACKED_SHAPES = 4  # input shapes whose packed weights (and NNPACK choices) a block keeps
NNPACK_TIMING_REPS = 3  # calls of each convolution timed to choose between oneDNN and NNPACK
NNPACK_RTOL = 1e-4  # largest NNPACK error accepted, relative to the largest output of the conv


class ShapeCache:
    """What was built for each of the last ``limit`` keys (input shapes), the least recently used forgotten first.

    Shared safely by threads that call one deployed model at once: :meth:`get` builds a key's value once, however
    many threads ask for it together, and never loses or corrupts another's entry. Built for this process (packed
    weights, CUDA graphs): a copy or an unpickled one starts empty.
    """

    def __init__(self, limit: int = PACKED_SHAPES):
        self.limit = limit
        self._values: dict[Hashable, Any] = {}  # insertion order: least recently used first
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value under ``key``, now the most recently used; ``build()`` makes it if there is none."""
        with self._lock:
            value = self._values.pop(key, None)
            if value is None:
                value = build()
                while len(self._values) >= self.limit:
                    del self._values[next(iter(self._values))]
            self._values[key] = value
            return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._values))

    def values(self) -> list[Any]:
        return list(self._values.values())

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return type(self), (self.limit,)


def without_caches(module: nn.Module, **fresh: Any) -> dict[str, Any]:
    """``module``'s pickling state (``copy.deepcopy``, ``pickle``, ``torch.save``) with its caches set to ``fresh``.

    What a module builds for this process (oneDNN's packed weights, engine sessions, CUDA streams and graphs)
    cannot be copied or pickled, and would be stale elsewhere: a copy builds its own on its first call.
    """
    return {**nn.Module.__getstate__(module), **fresh}


def nnpack_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: Sequence[int]
) -> torch.Tensor:
    """A stride-1, ungrouped convolution by NNPACK (NCHW in and out)."""
    return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, list(padding), [1, 1])


def _time_pair(first: Callable[[], torch.Tensor], second: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Best-of-NNPACK_TIMING_REPS seconds of each call (the caller has already run both once)."""
    best = [float("inf"), float("inf")]
    for _ in range(NNPACK_TIMING_REPS):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


@torch.no_grad()
def nnpack_is_faster(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: Sequence[int],
    onednn: Callable[[torch.Tensor], torch.Tensor],
) -> bool:
    """Whether NNPACK's convolution of ``x`` beats ``onednn(x)`` (the same convolution) on this machine.

    NNPACK picks a fast algorithm (Winograd F(6x6, 3x3) or FFT), which does fewer multiplications
    than oneDNN's direct convolution but rounds differently: its output must also agree with
    oneDNN's to NNPACK_RTOL of the largest output, else it is not used. Shapes NNPACK refuses
    count as slower.
    """
    reference = onednn(x)  # these two calls also warm up both backends for the timing below
    try:
        fast = nnpack_conv(x, weight, bias, padding)
    except RuntimeError:  # NNPACK does not take every shape
        return False
    if (fast - reference).abs().max() > NNPACK_RTOL * reference.abs().max():
        return False
    # Each is timed on the input in the layout it reads: in a chain of convs that make the same
    # choice the layout changes once, so conversions are left out of the comparison.
    x_nchw, x_nhwc = x.contiguous(), x.contiguous(memory_format=torch.channels_last)
    nnpack_s, onednn_s = _time_pair(lambda: nnpack_conv(x_nchw, weight, bias, padding), lambda: onednn(x_nhwc))
    return nnpack_s < onednn_s


def check_packing(winograd: bool) -> None:
    mode = "winograd" if winograd else "packed"
    if not torch.backends.mkldnn.is_available():
        raise ValueError(f"mode {mode!r} needs PyTorch built with oneDNN (mkldnn), which this one is not")
    # torch.backends.nnpack.is_available() also initializes NNPACK: its convolution fails before.
    if winograd and not torch.backends.nnpack.is_available():
        raise ValueError(f"mode {mode!r} needs PyTorch built with NNPACK on a CPU it supports; use mode 'packed'")


class PackedConv2d(nn.Module):
    """``conv`` on the CPU with its weight pre-packed in oneDNN's layout; with ``winograd``, NNPACK where faster.

    Eager ``F.conv2d`` (and, in this torch version, inductor too, whose freezing does not reach
    the weights) reorders every weight into oneDNN's blocked layout on every call. That layout
    depends on the input shape, so the weight is packed on the first call with each input shape
    and kept (PACKED_SHAPES shapes at most). ``forward(x, activation)`` fuses the bias and an
    optional activation (``"relu"``, ``"swish"``, ``"hardswish"``) into the oneDNN call; its output is channels_last.

    The packed copy is of the weight at the first call: a weight changed in place afterwards is not seen
    (deploy again); moving the module (``.to``) drops the copies, and so do ``copy.deepcopy``, ``pickle`` and
    ``torch.save`` (oneDNN's packed tensors are opaque: they cannot be copied); they are packed again on the next call.

    ``winograd``: a stride-1, ungrouped conv also tries NNPACK's convolution on the first call with
    each input shape and runs it for that shape where it is faster (:func:`nnpack_is_faster`); its
    output is then NCHW, which the next layer takes as it is. NNPACK's thread pool is sized by
    ``torch.get_num_threads()`` at its first use in the process: set the threads before the first call.
    """

    def __init__(self, conv: nn.Conv2d, winograd: bool = False):
        super().__init__()
        if not self.takes(conv):
            raise ValueError("PackedConv2d takes an nn.Conv2d with numeric zero padding")
        self.conv = conv
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.packed_weights = ShapeCache()  # input shape -> the weight packed for it
        stride_1 = conv.stride == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
        self.use_nnpack = ShapeCache() if winograd and stride_1 else None  # input shape -> NNPACK is faster

    def _apply(self, fn: Any, recurse: bool = True) -> PackedConv2d:
        # .to(dtype), .cuda(), ...: the packed copies (and NNPACK's timings) were of the old weights
        self.packed_weights.clear()
        if self.use_nnpack is not None:
            self.use_nnpack.clear()
        return super()._apply(fn, recurse)

    @staticmethod
    def takes(module: nn.Module) -> bool:
        """Whether ``module`` is a conv this class can run (a plain ``nn.Conv2d``, numeric zero padding)."""
        return type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros"

    def _onednn(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        shape = list(x.shape)

        def pack() -> torch.Tensor:
            weight = self.conv.weight.detach().contiguous(memory_format=torch.channels_last)
            return torch.ops.mkldnn._reorder_convolution_weight(weight, *self.geometry, shape)

        packed = self.packed_weights.get(tuple(shape), pack)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.conv.bias, *self.geometry, activation, [], "")

    def nnpack_wins(self, x: torch.Tensor) -> bool:
        """Whether this conv runs NNPACK for inputs of ``x``'s shape (timed on the first such input)."""
        if self.use_nnpack is None:
            return False

        def time_both() -> bool:
            return nnpack_is_faster(x, self.conv.weight, self.conv.bias, self.conv.padding, self._onednn)

        return self.use_nnpack.get(tuple(x.shape), time_both)

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        if not self.nnpack_wins(x):
            return self._onednn(x, activation)
        y = nnpack_conv(x, self.conv.weight, self.conv.bias, self.conv.padding)
        if activation == "relu":
            return y.relu_()
        if activation == "hardswish":
            return F.hardswish(y, inplace=True)
        return F.silu(y, inplace=True) if activation == "swish" else y


def pack_convs(model: nn.Module, winograd: bool = False) -> nn.Module:
    """Run every conv of ``model`` (any CPU model, in place) as a :class:`PackedConv2d`; returns ``model``.

    The generic form of modes ``packed`` and ``winograd``, which the benchmark gives to the deep
    baselines too (after folding their BNs with ``torch.fx.experimental.optimization.fuse``).
    """
    check_packing(winograd)
    for name, child in list(model.named_children()):
        if PackedConv2d.takes(child):
            setattr(model, name, PackedConv2d(child, winograd))
        else:
            pack_convs(child, winograd)
    return model


def has_cpp_compiler() -> bool:
    """Whether inductor can build CPU kernels here (a C++ compiler on PATH or in ``CXX``)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def compile_cpu(module: nn.Module, dynamic: bool = False) -> nn.Module:
    """``torch.compile`` with inductor and its ``freezing`` option.

    Measured with torch 2.14.1: inductor's freezing pass receives no parameters (they reach the
    graph as inputs), so no weight is constant-folded or pre-packed and each conv still reorders
    its weight on every call; the ``packed`` mode does that packing itself.
    """
    return torch.compile(module, backend="inductor", dynamic=dynamic, options={"freezing": True})


class NoAutograd(nn.Module):
    """``module`` called under ``torch.no_grad()``: no autograd graph in or out of inference mode. Scriptable, and
    frozen with the module inside it (``freeze_cpu(NoAutograd(net))``: freezing drops an input's ``detach`` as a
    no-op, but keeps ``no_grad``; weights frozen under inference mode cannot be saved for backward)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module(x)


def freeze_cpu(module: nn.Module) -> nn.Module:
    """TorchScript, frozen and optimized for inference: PyTorch's generic oneDNN CPU path.

    Works for any scriptable model (ParNet's folded form, timm's ResNets and RepVGGs); weights and
    activations should be channels_last. Returns a ``torch.jit.ScriptModule``.
    """
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.compile, whose freezing does not pre-pack
        # weights here (see compile_cpu): this is still the generic path that does.
        warnings.filterwarnings("ignore", message=".*deprecated", category=FutureWarning, module=r"torch\.jit")
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(module.eval())))
