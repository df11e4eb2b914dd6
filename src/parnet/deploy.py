"""Low-latency inference: exact weight folding, deployment modes and stream-parallel executors.

:func:`deploy` turns a ParNet (training form or fused) into the fastest equivalent inference
model for a device. Every mode computes the plain model's eval-mode outputs (float32, to about
1e-5); none changes precision.

Folding (:class:`FoldedParNet`, the base of every mode) goes beyond re-parameterization:

* the skip BN of a stream block folds into its gate (``mean(BN(x)) = a * mean(x) + b``), and the
  gated skip becomes one fused multiply-add on the conv output: ``y += x * (a g) + b g``;
* the fusion's two BNs fold into the fusion conv: the scales into its input channels exactly, the
  shifts into its bias, with the zero-padded border rows and columns corrected (a shift folded
  into a zero-padded conv is otherwise wrong at the border);
* the fusion's channel interleave becomes a plain concatenation of channel slices, the conv's
  input channels permuted to match (one copy, as before, but no BN passes);
* the channel shuffle after each fusion block disappears: its consumer (the next fusion's
  concatenation, or the final block's conv and gate) reads the channels in the unshuffled order.

Modes (``deploy(model, device, mode)``):

========== ============================================================================
fused      ``parnet.reparameterize`` (one 3x3 conv per block), eval
folded     :class:`FoldedParNet`, NCHW
channels_last  folded, channels_last weights and activations
packed     CPU only: channels_last, every conv weight pre-packed once in oneDNN's layout (per
           input shape), the bias (and the activation of ungated blocks) fused into the conv call
winograd   CPU only: packed, but each stride-1 conv runs NNPACK's fast (Winograd / FFT)
           convolution instead for the input shapes where that measured faster: decided on the
           first call with each shape (:func:`nnpack_is_faster`); large batches gain, batch 1 not
frozen     CPU only: channels_last, TorchScript frozen and ``torch.jit.optimize_for_inference``
           (PyTorch's generic oneDNN path: weights pre-packed, conv + ReLU/add fused)
compiled   channels_last + ``torch.compile`` (inductor)
parallel   CPU: the streams run concurrently (TorchScript ``torch.jit.fork`` on the inter-op
           pool, the intra-op threads split between them); CUDA: one CUDA stream per ParNet stream
cuda_graph CUDA only: ``parallel`` captured in a CUDA graph (re-captured for a new input shape)
multi_device  the streams on separate devices (``devices=``), asynchronous copies at the fusions
auto       the fastest for the device: given an ``example`` input, the candidate modes are timed
           on it and the fastest is returned; otherwise a rule (:func:`auto_mode`)
========== ============================================================================
"""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Fusion, ParNetBlock
from .model import ParNet

__all__ = [
    "MODES",
    "CPU_MODES",
    "FoldedBlock",
    "FoldedFusion",
    "FoldedParNet",
    "StreamParallelParNet",
    "CudaStreamParNet",
    "CudaGraphModule",
    "MultiDeviceParNet",
    "PackedConv2d",
    "deploy",
    "nnpack_is_faster",
    "pack_convs",
    "fold",
    "shuffle_perm",
]

MODES = (
    "fused", "folded", "channels_last", "packed", "winograd", "frozen", "compiled", "parallel", "cuda_graph",
    "multi_device", "auto",
)  # fmt: skip
CPU_MODES = (
    "fused", "folded", "channels_last", "packed", "winograd", "frozen", "compiled", "parallel", "multi_device"
)  # fmt: skip
CUDA_ONLY_MODES = ("cuda_graph",)
CPU_ONLY_MODES = ("packed", "winograd", "frozen")
PACKED_SHAPES = 4  # input shapes whose packed weights (and NNPACK choices) a block keeps
NNPACK_TIMING_REPS = 3  # calls of each convolution timed to choose between oneDNN and NNPACK
NNPACK_RTOL = 1e-4  # largest NNPACK error accepted, relative to the largest output of the conv


def shuffle_perm(channels: int, groups: int = 2) -> torch.Tensor:
    """``perm`` with ``channel_shuffle(y)[:, j] == y[:, perm[j]]``."""
    j = torch.arange(channels)
    per_group = channels // groups
    return (j % groups) * per_group + j // groups


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``x * scale + shift``."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def _dense_gate(block: ParNetBlock) -> torch.Tensor:
    """The gate's 1x1 conv as a dense (out, in) matrix (block-diagonal for groups > 1)."""
    w = block.gate.conv.weight[:, :, 0, 0]
    if block.groups == 1:
        return w.clone()
    out_g, in_g = block.out_chs // block.groups, block.in_chs // block.groups
    dense = w.new_zeros(block.out_chs, block.in_chs)
    for g in range(block.groups):
        dense[g * out_g : (g + 1) * out_g, g * in_g : (g + 1) * in_g] = w[g * out_g : (g + 1) * out_g]
    return dense


def _recall(cache: dict, key: tuple) -> Any:
    """The entry under ``key`` (``None`` if there is none), now the most recently used."""
    value = cache.pop(key, None)
    if value is not None:
        cache[key] = value  # a dict keeps insertion order: least recently used first
    return value


def _remember(cache: dict, key: tuple, value: object, limit: int = PACKED_SHAPES) -> None:
    """Store ``value`` under ``key``, forgetting the least recently used entries beyond ``limit`` (bounded memory)."""
    while len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


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


def _check_packing(winograd: bool) -> None:
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
    optional activation (``"relu"``, ``"swish"``) into the oneDNN call; its output is channels_last.

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
        self.packed_weights: dict[tuple[int, ...], torch.Tensor] = {}
        stride_1 = conv.stride == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
        self.use_nnpack: dict[tuple[int, ...], bool] | None = {} if winograd and stride_1 else None

    @staticmethod
    def takes(module: nn.Module) -> bool:
        """Whether ``module`` is a conv this class can run (a plain ``nn.Conv2d``, numeric zero padding)."""
        return type(module) is nn.Conv2d and not isinstance(module.padding, str) and module.padding_mode == "zeros"

    def _onednn(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        key = tuple(x.shape)
        packed = _recall(self.packed_weights, key)
        if packed is None:
            weight = self.conv.weight.detach().contiguous(memory_format=torch.channels_last)
            packed = torch.ops.mkldnn._reorder_convolution_weight(weight, *self.geometry, list(key))
            _remember(self.packed_weights, key, packed)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.conv.bias, *self.geometry, activation, [], "")

    def nnpack_wins(self, x: torch.Tensor) -> bool:
        """Whether this conv runs NNPACK for inputs of ``x``'s shape (timed on the first such input)."""
        if self.use_nnpack is None:
            return False
        key = tuple(x.shape)
        wins = _recall(self.use_nnpack, key)
        if wins is None:
            c = self.conv
            wins = nnpack_is_faster(x, c.weight, c.bias, c.padding, self._onednn)
            _remember(self.use_nnpack, key, wins)
        return wins

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        if not self.nnpack_wins(x):
            return self._onednn(x, activation)
        y = nnpack_conv(x, self.conv.weight, self.conv.bias, self.conv.padding)
        if activation == "relu":
            return y.relu_()
        return F.silu(y, inplace=True) if activation == "swish" else y


def pack_convs(model: nn.Module, winograd: bool = False) -> nn.Module:
    """Run every conv of ``model`` (any CPU model, in place) as a :class:`PackedConv2d`; returns ``model``.

    The generic form of modes ``packed`` and ``winograd``, which the benchmark gives to the deep
    baselines too (after folding their BNs with ``torch.fx.experimental.optimization.fuse``).
    """
    _check_packing(winograd)
    for name, child in list(model.named_children()):
        if PackedConv2d.takes(child):
            setattr(model, name, PackedConv2d(child, winograd))
        else:
            pack_convs(child, winograd)
    return model


class FoldedBlock(nn.Module):
    """A fused ParNet block with its skip BN folded into the gate and the gated skip into one FMA.

    ``forward``: ``y = conv(x)`` (+ border correction for a folded input shift); then
    ``y += x * (a g) + b g`` (skip block) or ``y *= 2 g`` (other blocks), ``g`` the gate; then
    the activation. No channel shuffle: consumers read unshuffled channels.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        act: str,
        gate_w: torch.Tensor | None = None,
        gate_b: torch.Tensor | None = None,
        skip_scale: torch.Tensor | None = None,
        skip_shift: torch.Tensor | None = None,
        border: torch.Tensor | None = None,
    ):
        super().__init__()
        self.conv = conv
        self.stride = int(conv.stride[0])
        self.relu = act == "relu"
        self.has_gate = gate_w is not None
        self.has_skip = skip_scale is not None
        self.has_border = border is not None
        for name, value in (
            ("gate_w", gate_w),
            ("gate_b", gate_b),
            ("skip_scale", skip_scale),
            ("skip_shift", skip_shift),
        ):
            self.register_buffer(name, value if value is not None else conv.weight.new_zeros(0))
        # border: (out, 3, 3) contribution of each tap of a folded input shift; precomputed sums.
        t = border if border is not None else conv.weight.new_zeros(conv.out_channels, 3, 3)
        self.register_buffer("border_taps", t)
        self.register_buffer("border_top", t[:, 0, :].sum(1))
        self.register_buffer("border_bottom", t[:, 2, :].sum(1))
        self.register_buffer("border_left", t[:, :, 0].sum(1))
        self.register_buffer("border_right", t[:, :, 2].sum(1))
        self.packed: PackedConv2d | None = None  # see pack()

    def _fix_border(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Remove the folded shift's contribution from the taps that fell on the zero padding."""
        t = self.border_taps
        ho, wo = y.shape[-2], y.shape[-1]
        bottom = (ho - 1) * self.stride + 1 >= h  # the last output row's lowest tap is padding
        right = (wo - 1) * self.stride + 1 >= w
        y[:, :, 0, :] -= self.border_top[:, None]
        y[:, :, :, 0] -= self.border_left[:, None]
        y[:, :, 0, 0] += t[:, 0, 0]
        if bottom:
            y[:, :, ho - 1, :] -= self.border_bottom[:, None]
            y[:, :, ho - 1, 0] += t[:, 2, 0]
        if right:
            y[:, :, :, wo - 1] -= self.border_right[:, None]
            y[:, :, 0, wo - 1] += t[:, 0, 2]
        if bottom and right:
            y[:, :, ho - 1, wo - 1] += t[:, 2, 2]
        return y

    def pack(self, winograd: bool = False) -> None:
        """CPU: run the conv as a :class:`PackedConv2d` (weights pre-packed; NNPACK with ``winograd``)."""
        self.packed = PackedConv2d(self.conv, winograd)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x.mean((2, 3)), self.gate_w, self.gate_b))

    @torch.jit.unused  # eager CPU only; the TorchScript of the parallel mode never packs
    def _packed_forward(self, packed: PackedConv2d, x: torch.Tensor) -> torch.Tensor:
        # x in the layout the conv reads, so that the gated skip adds tensors of one layout
        x = x.contiguous() if packed.nnpack_wins(x) else x.contiguous(memory_format=torch.channels_last)
        if not self.has_gate and not self.has_border:  # conv, bias and activation in one call
            return packed(x, "relu" if self.relu else "swish")
        # The gated skip is not fused as a binary post-op: measured slower at batch 32, no faster at 1.
        return self._after_conv(x, packed(x))

    def _after_conv(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.has_border:
            y = self._fix_border(y, x.shape[-2], x.shape[-1])
        if self.has_gate:
            g = self._gate(x)
            if self.has_skip:
                y = y.addcmul_(x, (g * self.skip_scale)[:, :, None, None]).add_((g * self.skip_shift)[:, :, None, None])
            else:
                y = y.mul_((2.0 * g)[:, :, None, None])
        if self.relu:
            return y.relu_()
        return F.silu(y, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self._packed_forward(self.packed, x)
        return self._after_conv(x, self.conv(x))


class FoldedFusion(nn.Module):
    """Fusion with its BNs folded into the block's conv and gate, and the interleave a concat.

    ``pieces`` lists ``(source, start, end)`` channel slices (source 0: the stream, 1: the running
    tensor) in the order the conv's input channels were permuted to.
    """

    def __init__(self, block: FoldedBlock, pieces: list[tuple[int, int, int]]):
        super().__init__()
        self.block = block
        self.pieces: list[tuple[int, int, int]] = pieces

    def forward(self, stream: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        for src, start, end in self.pieces:
            parts.append((stream if src == 0 else fused)[:, start:end])
        return self.block(torch.cat(parts, 1))


class PooledHead(nn.Module):
    """Global average pool and linear classifier (timm's ClassifierHead with ``avg`` pooling, eval)."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def _fold_block(
    block: ParNetBlock, act: str, in_perm: torch.Tensor | None = None, bias_only: bool = False
) -> FoldedBlock:
    """:class:`FoldedBlock` of a fused, ungrouped block; ``in_perm``: input arrives unshuffled."""
    if block.reparam_conv is None:
        raise ValueError("fold a re-parameterized model (parnet.reparameterize first)")
    if block.groups != 1:
        raise ValueError("grouped blocks fold only inside a fusion")
    src = block.reparam_conv
    conv = nn.Conv2d(src.in_channels, src.out_channels, 3, stride=src.stride, padding=1, bias=True)
    conv = conv.to(src.weight.device, src.weight.dtype)
    weight, bias = src.weight.detach().clone(), src.bias.detach().clone()
    gate_w = _dense_gate(block).detach() if block.gate is not None else None
    gate_b = None
    skip_scale = skip_shift = None
    if block.skip is not None:
        a, b = (t.detach() for t in _bn_affine(block.skip))
        if gate_w is not None:
            gate_b = gate_w @ b
            gate_w = gate_w * a[None, :]
            skip_scale, skip_shift = a.clone(), b.clone()
        else:  # ungated skip: the identity BN goes into the kernel's centre tap (RepVGG)
            idx = torch.arange(weight.shape[0])
            weight[idx, idx, 1, 1] += a
            bias = bias + b
    if in_perm is not None:
        if block.skip is not None:
            raise ValueError("a skip block cannot read permuted channels")
        w = torch.empty_like(weight)
        w[:, in_perm] = weight
        weight = w
        if gate_w is not None:
            gw = torch.empty_like(gate_w)
            gw[:, in_perm] = gate_w
            gate_w = gw
    if gate_w is not None and gate_b is None:
        gate_b = gate_w.new_zeros(gate_w.shape[0])
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return FoldedBlock(conv, act, gate_w, gate_b, skip_scale, skip_shift)


def _fold_fusion(fusion: Fusion, act: str, fused_perm: torch.Tensor | None) -> FoldedFusion:
    """Fold a fusion; ``fused_perm``: the running tensor arrives unshuffled (``fused[perm]`` is logical)."""
    block = fusion.block
    if block.reparam_conv is None:
        raise ValueError("fold a re-parameterized model (parnet.reparameterize first)")
    if block.skip is not None or block.groups != 2:
        raise ValueError("unexpected fusion block (expected groups=2 without skip)")
    c = fusion.norm_stream.num_features
    half = c // 2
    perm = fused_perm if fused_perm is not None else torch.arange(c)
    sa, ta = (t.detach() for t in _bn_affine(fusion.norm_stream))
    sb, tb = (t.detach() for t in _bn_affine(fusion.norm_fused))
    # Per group g: the stream's channels g*half.. (physical = logical), then the running tensor's
    # channels of the group, taken in physical order. Original in-group column of stream channel
    # k: 2 (k - g half); of running-tensor logical channel j: 2 (j - g half) + 1.
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(c)
    cols, scale, shift, pieces = [], [], [], []
    for g in range(2):
        lo, hi = g * half, (g + 1) * half
        for k in range(lo, hi):
            cols.append(g * c + 2 * (k - lo))
            scale.append(sa[k])
            shift.append(ta[k])
        pieces.append((0, lo, hi))
        phys = sorted(int(perm[j]) for j in range(lo, hi))
        for p in phys:
            j = int(inv[p])
            cols.append(g * c + 2 * (j - lo) + 1)
            scale.append(sb[j])
            shift.append(tb[j])
        start = prev = phys[0]
        for p in phys[1:] + [None]:
            if p is None or p != prev + 1:
                pieces.append((1, start, prev + 1))
                start = p
            if p is not None:
                prev = p
    scale_t, shift_t = torch.stack(scale), torch.stack(shift)
    src = block.reparam_conv
    w = src.weight.detach()  # (out, c, 3, 3): group g's outputs read cat channels [g c, (g+1) c)
    out = w.shape[0]
    out_g = out // 2
    local = torch.tensor(cols)
    w_perm = torch.empty_like(w)
    shift_out = torch.empty(out, c, dtype=w.dtype, device=w.device)  # each output's group shifts
    scale_out = torch.empty_like(shift_out)
    for g in range(2):
        rows = slice(g * out_g, (g + 1) * out_g)
        idx = local[g * c : (g + 1) * c] - g * c  # new column i <- original column idx[i]
        w_perm[rows] = w[rows][:, idx]
        shift_out[rows] = shift_t[g * c : (g + 1) * c]
        scale_out[rows] = scale_t[g * c : (g + 1) * c]
    taps = torch.einsum("ocyx,oc->oyx", w_perm, shift_out)
    conv = nn.Conv2d(2 * c, out, 3, stride=src.stride, padding=1, groups=2, bias=True).to(w.device, w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w_perm * scale_out[:, :, None, None])
        conv.bias.copy_(src.bias.detach() + taps.sum((1, 2)))
    gate_w = gate_b = None
    if block.gate is not None:
        dense = _dense_gate(block).detach()[:, local]  # columns in the new cat order
        gate_b = dense @ shift_t
        gate_w = dense * scale_t[None, :]
    return FoldedFusion(FoldedBlock(conv, act, gate_w, gate_b, border=taps), pieces)


class FoldedParNet(nn.Module):
    """A ParNet with every exact fold applied (see the module docstring); eval only.

    ``forward`` gives the logits (or pooled features when the model has no classifier); the
    input is checked like ``ParNet.check_input``. ``channels_last=True`` converts the input.
    """

    def __init__(self, model: ParNet):
        super().__init__()
        if any(isinstance(m, ParNetBlock) and m.reparam_conv is None for m in model.modules()):
            model = _reparameterized(model)
        cfg = model.cfg
        act = cfg.act
        self.in_chans = model.in_chans
        self.multiple = cfg.input_multiple
        self.channels_last = False
        self.stem = nn.Sequential(*(_fold_block(b, act) for b in model.stem))
        self.downsample = nn.ModuleList(_fold_block(b, act) for b in model.downsample)
        self.streams = nn.ModuleList(nn.Sequential(*(_fold_block(b, act) for b in s)) for s in model.streams)
        self.fuse_entry = _fold_block(model.fuse_entry, act) if model.fuse_entry is not None else nn.Identity()
        fusions, perm = [], None
        for fusion in model.fusions:
            fusions.append(_fold_fusion(fusion, act, perm))
            perm = shuffle_perm(fusion.block.out_chs, 2)
        self.fusions = nn.ModuleList(fusions)
        self.final_block = _fold_block(model.final_block, act, in_perm=perm)
        head = model.head
        if getattr(head.global_pool, "pool_type", "avg") == "avg" and not getattr(head, "use_conv", False):
            self.head: nn.Module = PooledHead(copy.deepcopy(head.fc))
        else:  # another pooling: timm's head as it is
            self.head = copy.deepcopy(head)
        self.eval().requires_grad_(False)

    def pack(self, winograd: bool = False) -> FoldedParNet:
        """Pre-pack every conv weight for oneDNN (CPU; see :meth:`FoldedBlock.pack`); channels_last.

        ``winograd``: stride-1 blocks use NNPACK's convolution for the input shapes where it is faster.
        """
        _check_packing(winograd)
        self.channels_last = True
        for module in self.modules():
            if isinstance(module, FoldedBlock):
                module.pack(winograd)
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the network cannot take (as ``ParNet.check_input``)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a batch (N, {self.in_chans}, H, W), got shape {list(x.shape)}")
        if x.shape[-2] % self.multiple or x.shape[-1] % self.multiple:
            raise ValueError(f"height and width must be multiples of {self.multiple}, got {x.shape[-2]}x{x.shape[-1]}")

    def stream_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        inputs = [x]
        for down in self.downsample:
            inputs.append(down(inputs[-1]))
        return inputs

    def merge(self, outs: list[torch.Tensor]) -> torch.Tensor:
        fused = self.fuse_entry(outs[0])
        i = 1
        for fusion in self.fusions:
            fused = fusion(outs[i], fused)
            i += 1
        return self.head(self.final_block(fused))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        inputs = self.stream_inputs(x)
        outs: list[torch.Tensor] = []
        i = 0
        for stream in self.streams:
            outs.append(stream(inputs[i]))
            i += 1
        return self.merge(outs)


def _reparameterized(model: nn.Module) -> nn.Module:
    from . import reparameterize

    return reparameterize(model)


def fold(model: ParNet, channels_last: bool = False) -> FoldedParNet:
    """The folded inference model of ``model`` (training form or fused)."""
    folded = FoldedParNet(model)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
        folded.channels_last = True
    return folded


# -- CPU: streams concurrently -------------------------------------------------------------------


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


class StreamParallelParNet(nn.Module):
    """The streams of a folded ParNet run concurrently on CPU (TorchScript ``torch.jit.fork``).

    The stem runs first with all ``threads``; then the first n-1 streams are forked onto
    PyTorch's inter-op thread pool as soon as their inputs exist and the last runs on the calling
    thread, with the intra-op threads split between them (``max(1, threads // n)`` each, so n
    streams on n cores get a core each); then the fusions, final block and head run with all
    ``threads`` again. The thread count is set per call and restored afterwards.
    """

    def __init__(self, folded: FoldedParNet, threads: int | None = None):
        super().__init__()
        self.folded = folded
        self.threads = threads or torch.get_num_threads()
        self.per_stream = max(1, self.threads // len(folded.streams))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.core = torch.jit.script(_ParallelCore(folded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.folded
        f.check_input(x)
        if f.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        prev = torch.get_num_threads()
        try:
            torch.set_num_threads(self.threads)
            x = f.stem(x)
            torch.set_num_threads(self.per_stream)  # this thread's, and the pool's on first use
            outs = self.core(x)
            torch.set_num_threads(self.threads)
            return _merge_after_entry(f, outs)
        finally:
            torch.set_num_threads(prev)


# -- CUDA: one CUDA stream per ParNet stream, CUDA graphs, several devices --------------------


class CudaStreamParNet(nn.Module):
    """Each ParNet stream on its own CUDA stream; fusions wait on events of the streams they read.

    Tensors made on one CUDA stream and read on another are marked with ``record_stream`` so the
    caching allocator does not reuse their memory early.
    """

    def __init__(self, folded: FoldedParNet):
        super().__init__()
        self.folded = folded
        self._streams: list[torch.cuda.Stream] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"CudaStreamParNet needs a CUDA input, got {x.device}")
        f = self.folded
        f.check_input(x)
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

        return _merge_after_entry(f, outs, ready)


def _merge_after_entry(
    f: FoldedParNet, outs: list[torch.Tensor], ready: Callable[[int], None] | None = None
) -> torch.Tensor:
    """Fusions, final block and head, given stream outputs with the first already brought down;
    ``ready(i)``, if given, is called before stream ``i``'s output is read."""
    if ready is not None:
        ready(0)
    fused = outs[0]
    for i, (fusion, y) in enumerate(zip(f.fusions, outs[1:]), start=1):
        if ready is not None:
            ready(i)
        fused = fusion(y, fused)
    return f.head(f.final_block(fused))


class CudaGraphModule(nn.Module):
    """Replays a CUDA graph of ``module``'s forward; a new input shape is captured anew.

    Each (shape, dtype, device, layout) gets its own graph and static buffers (at most
    ``max_graphs``; the least recently used is dropped), so an input of another shape is never run through a
    graph captured for a different one. The output is a copy, safe to keep across calls. Moving
    or casting the module (``.to``, ``.half``, ...) drops the graphs, which read the old weights.
    """

    def __init__(self, module: nn.Module, max_graphs: int = 8, warmup: int = 3):
        super().__init__()
        if max_graphs < 1 or warmup < 1:
            # warm-up (at least one call) initializes cuBLAS/cuDNN and the streams outside the capture
            raise ValueError(f"CudaGraphModule needs max_graphs >= 1 and warmup >= 1, got {max_graphs}, {warmup}")
        self.module = module
        self.max_graphs = max_graphs
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

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
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
        entry = _recall(self._graphs, key)
        if entry is None:
            with torch.inference_mode(False):  # a normal tensor, which any later call can copy into
                static_x = x.clone()
            graph, static_y = self._capture(static_x)
            entry = (graph, static_x, static_y)
            _remember(self._graphs, key, entry, self.max_graphs)
        graph, static_x, static_y = entry
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
        devs = [torch.device(d) for d in devices]
        if len(devs) != n:
            raise ValueError(f"give one device per stream: {n} streams, {len(devs)} devices")
        for d in devs:
            _check_device(d)
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


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available on this machine")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device} (use cpu or cuda[:i])")


def has_cpp_compiler() -> bool:
    """Whether inductor can build CPU kernels here (a C++ compiler on PATH or in ``CXX``)."""
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` (inductor) can build kernels for ``device``: C++ on CPU, Triton on CUDA."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return has_cpp_compiler()


def auto_candidates(device: torch.device) -> tuple[str, ...]:
    """The modes ``auto`` times when given an example: every mode of the device but ``fused``."""
    if device.type == "cuda":
        names: tuple[str, ...] = ("channels_last", "parallel", "cuda_graph")
    else:
        names = ("channels_last", "packed", "winograd", "parallel")
    return names + (("compiled",) if can_compile(device) else ())


def auto_mode(device: str | torch.device) -> str:
    """The fastest mode for ``device``: see ``RESULTS.md`` ("Inference latency and throughput")."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda_graph"
    # CPU: packed had the lowest batch-1 latency and needs no compilation; winograd is faster at
    # batch 32 but times its convolutions on the first call with each input shape.
    return "packed" if torch.backends.mkldnn.is_available() else "channels_last"


def compile_cpu(module: nn.Module, dynamic: bool = False) -> nn.Module:
    """``torch.compile`` with inductor and its ``freezing`` option.

    Measured with torch 2.14.1: inductor's freezing pass receives no parameters (they reach the
    graph as inputs), so no weight is constant-folded or pre-packed and each conv still reorders
    its weight on every call; the ``packed`` mode does that packing itself.
    """
    return torch.compile(module, backend="inductor", dynamic=dynamic, options={"freezing": True})


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


@torch.inference_mode()
def fastest(candidates: dict[str, nn.Module], example: torch.Tensor, reps: int = 5) -> str:
    """Name of the candidate with the lowest median time on ``example`` (interleaved, after warm-up)."""
    import statistics
    import time

    device = example.device
    # the example's device: torch.cuda.synchronize() alone waits only for the current one
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for net in candidates.values():
        net(example)  # warm-up (and compilation)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, net in candidates.items():
            sync()
            start = time.perf_counter()
            net(example)
            sync()
            times[name].append(time.perf_counter() - start)
    return min(times, key=lambda name: statistics.median(times[name]))


def deploy(
    model: nn.Module,
    device: str | torch.device = "cpu",
    mode: str = "auto",
    devices: Sequence[str | torch.device] | None = None,
    threads: int | None = None,
    example: torch.Tensor | None = None,
    candidates: Sequence[str] | None = None,
) -> nn.Module:
    """The fastest equivalent inference model of ``model`` for ``device`` (see the module docstring).

    Args:
        model: a ParNet in training form or fused (it is not modified).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        mode: one of :data:`MODES`; ``"auto"`` picks the fastest for the device.
        devices: for ``multi_device``: one device per stream.
        threads: for ``parallel`` on CPU: intra-op threads to split between the streams.
        example: with ``mode="auto"``, an input batch: the ``candidates`` modes (default:
            :func:`auto_candidates`) are built, timed on it, and the fastest returned.
            Without it, ``auto`` follows the rule of :func:`auto_mode` (from our measurements).
        candidates: the modes ``auto`` chooses among when ``example`` is given.

    Returns an eval-mode module; call it under ``torch.inference_mode()``. Raises ``ValueError``
    for a mode the device cannot run.
    """
    if mode not in MODES:
        raise ValueError(f"unknown deploy mode {mode!r}; choose one of {MODES}")
    device = torch.device(device)
    _check_device(device)
    if not isinstance(model, ParNet):
        raise ValueError(f"deploy takes a ParNet, got {type(model).__name__}")
    if mode == "auto" and example is not None:
        names = candidates or auto_candidates(device)
        built = {name: deploy(model, device, name, devices, threads) for name in names}
        return built[fastest(built, example.to(device))]
    if mode == "auto":
        mode = auto_mode(device)
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise ValueError(f"mode {mode!r} needs a CUDA device, got {device}")
    if mode in CPU_ONLY_MODES and device.type != "cpu":
        raise ValueError(f"mode {mode!r} runs on the CPU only, got {device}; on CUDA use cuda_graph or compiled")
    if mode == "fused":
        return _reparameterized(model).to(device)
    if mode == "multi_device":
        if devices is None:
            raise ValueError("mode 'multi_device' needs devices=[one device per stream]")
        return MultiDeviceParNet(fold(model, channels_last=device.type == "cpu"), devices).eval()
    folded = fold(model, channels_last=mode != "folded").to(device)
    if mode in ("folded", "channels_last"):
        return folded
    if mode in ("packed", "winograd"):
        return folded.pack(winograd=mode == "winograd")
    if mode == "frozen":
        return freeze_cpu(folded)
    if mode == "compiled":
        return compile_cpu(folded) if device.type == "cpu" else torch.compile(folded)
    if device.type == "cuda":
        parallel = CudaStreamParNet(folded).eval()
        return parallel if mode == "parallel" else CudaGraphModule(parallel).eval()
    return StreamParallelParNet(folded, threads=threads).eval()
