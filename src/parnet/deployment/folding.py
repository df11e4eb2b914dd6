"""Exact folding: a ParNet as :class:`FoldedParNet`, the base of every deploy mode (see ``parnet.deploy``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Fusion, ParNetBlock, bn_affine, has_fusable_blocks, reparameterize, spatial_mean
from ..model import ParNet, check_parnet_input
from .inputs import check_has_values, check_image_dtype
from .kernels import PackedConv2d, check_packing


def shuffle_perm(channels: int, groups: int = 2) -> torch.Tensor:
    """``perm`` with ``channel_shuffle(y)[:, j] == y[:, perm[j]]``."""
    j = torch.arange(channels)
    per_group = channels // groups
    return (j % groups) * per_group + j // groups


def _dense_gate(block: ParNetBlock) -> torch.Tensor:
    """The gate's 1x1 conv as a dense (out, in) matrix (block-diagonal for groups > 1)."""
    w = block.gate.conv.weight[:, :, 0, 0]
    return torch.block_diag(*w.chunk(block.groups)) if block.groups > 1 else w.clone()


# Each activation's smallest value, rounded down: ``act(y) + NONNEGATIVE_SHIFT[act]`` is never negative.
# SiLU's minimum: -0.27846 at y = -1.2785; hard-swish's: -0.375 at y = -1.5, exactly (y (y + 3) / 6).
NONNEGATIVE_SHIFT = {"silu": 0.2785, "relu": 0.0, "hardswish": 0.375}
ONEDNN_ACTIVATION = {"silu": "swish", "relu": "relu", "hardswish": "hardswish"}  # its name as a oneDNN post-op


def activate(y: torch.Tensor, act: str, inplace: bool = False) -> torch.Tensor:
    """ParNet's activation ``act`` (``ParNetCfg.act``) of ``y``; scriptable."""
    if act == "relu":
        return F.relu(y, inplace=inplace)
    if act == "hardswish":
        return F.hardswish(y, inplace=inplace)
    return F.silu(y, inplace=inplace)


class FoldedBlock(nn.Module):
    """A fused ParNet block with its skip BN folded into the gate and the gated skip into one FMA.

    ``forward``: ``y = conv(x)`` (+ border correction for a folded input shift); then
    ``y + (x * (a g) + b g)`` (skip block) or ``y * 2 g`` (other blocks), ``g`` the gate; then
    the activation. No channel shuffle: consumers read unshuffled channels.

    Two forms of the steps after the conv: the packed CPU path updates the conv's output in place
    (eager, fewest passes over memory); every other path is out of place, written for graph
    compilers (inductor, PT2E, ONNX Runtime, OpenVINO): the gated skip is computed from ``x`` alone
    and added to the conv output in one ``add``, which they fuse into the conv as a sum post-op
    followed by the activation (and, in int8, the requantization), as in a ResNet block; the
    border correction is a constant map for the input size, added once, not slice updates.

    ``out_shift`` (0 unless set by :meth:`FoldedParNet.shift_activations`) is added after the
    activation; the consumers' :meth:`take_shifted_input` compensates it exactly.
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
        self.act = act
        self.out_shift = 0.0
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
        for name, edge in self._border_edges(t).items():
            self.register_buffer(name, edge)
        self.packed: PackedConv2d | None = None  # see pack()

    def _border_map(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The border correction of an output like ``y`` (input ``h`` x ``w``) as one (1, C, Ho, Wo) map.

        Built from plain ints, so that an exporter tracing at a fixed resolution (ONNX) folds it to a
        constant; under ``torch.export``, whose programs take any size, from the symbolic sizes.
        """
        ho, wo = y.shape[2], y.shape[3]
        exporting = False
        if not torch.jit.is_scripting():  # TorchScript skips this block; it cannot compile is_exporting
            exporting = torch.compiler.is_exporting()
        if not exporting:
            ho, wo = int(ho), int(wo)
        # The map _fix_border makes by slice updates of zeros, as sums of products with 0/1 row and column masks:
        # torch.export records the updates as mutations of a zeros tensor, and PT2E observed that tensor before
        # them, so int8 rounded the whole correction away.
        t, dtype = self.border_taps[:, :, :, None, None], y.dtype  # (C, 3, 3, 1, 1): per channel, on rows x columns
        i = torch.arange(ho, device=y.device)[:, None]
        j = torch.arange(wo, device=y.device)
        bottom, right = self._last_taps_on_padding(ho, wo, h, w)
        first_row = (i == 0).to(dtype)
        last_row = (i == ho - 1).to(dtype) * float(bottom)
        first_col = (j == 0).to(dtype)
        last_col = (j == wo - 1).to(dtype) * float(right)
        # Each row's correction along its columns: an edge's summed taps off, the corners' taps back.
        top = t[:, 0, 0] * first_col + t[:, 0, 2] * last_col - self.border_top[:, None, None]
        low = t[:, 2, 0] * first_col + t[:, 2, 2] * last_col - self.border_bottom[:, None, None]
        sides = -self.border_left[:, None, None] * first_col - self.border_right[:, None, None] * last_col
        return (top * first_row + low * last_row + sides)[None]

    def _last_taps_on_padding(self, ho: int, wo: int, h: int, w: int) -> tuple[bool, bool]:
        """Whether the last output row's lowest taps and the last column's rightmost ones fall on the padding."""
        return bool((ho - 1) * self.stride + 1 >= h), bool((wo - 1) * self.stride + 1 >= w)

    def _fix_border(self, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Remove the folded shift's contribution from the taps that fell on the zero padding."""
        t = self.border_taps
        bottom, right = self._last_taps_on_padding(y.shape[-2], y.shape[-1], h, w)
        y[:, :, 0, :] -= self.border_top[:, None]
        y[:, :, :, 0] -= self.border_left[:, None]
        y[:, :, 0, 0] += t[:, 0, 0]
        # The last row and column as -1, not ho - 1: a symbolic index would fix torch.export's program to one size.
        if bottom:
            y[:, :, -1, :] -= self.border_bottom[:, None]
            y[:, :, -1, 0] += t[:, 2, 0]
        if right:
            y[:, :, :, -1] -= self.border_right[:, None]
            y[:, :, 0, -1] += t[:, 0, 2]
        if bottom and right:
            y[:, :, -1, -1] += t[:, 2, 2]
        return y

    @staticmethod
    def _border_edges(t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each output channel's summed taps along each edge of the 3x3 kernel (precomputed for _fix_border)."""
        return {
            "border_top": t[:, 0, :].sum(1),
            "border_bottom": t[:, 2, :].sum(1),
            "border_left": t[:, :, 0].sum(1),
            "border_right": t[:, :, 2].sum(1),
        }

    @torch.no_grad()
    def take_shifted_input(self, shift: float) -> None:
        """Compute the same output from an input that arrives as ``x + shift`` (every channel), exactly.

        The conv's bias loses what the shift adds through its taps; where a tap falls on the zero
        padding the shift was not there to add, which the border correction restores. The gate
        (a linear map of the input's mean) and the skip term (``x * (a g) + b g``) lose it likewise.
        """
        taps = -shift * self.conv.weight.sum(1)  # (out, 3, 3): what the shift adds through each tap
        self.conv.bias += taps.sum((1, 2))
        self.border_taps += taps
        for name, edge in self._border_edges(self.border_taps).items():
            getattr(self, name).copy_(edge)
        self.has_border = True
        if self.has_gate:
            self.gate_b -= shift * self.gate_w.sum(1)
        if self.has_skip:
            self.skip_shift -= shift * self.skip_scale

    def pack(self, winograd: bool = False) -> None:
        """CPU: run the conv as a :class:`PackedConv2d` (weights pre-packed; NNPACK with ``winograd``)."""
        self.packed = PackedConv2d(self.conv, winograd)

    def _gate(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(spatial_mean(x), self.gate_w, self.gate_b))

    @torch.jit.unused  # eager CPU only; the TorchScript of the parallel mode never packs
    def _packed_forward(self, packed: PackedConv2d, x: torch.Tensor) -> torch.Tensor:
        # x in the layout the conv reads, so that the gated skip adds tensors of one layout
        x = x.contiguous() if packed.nnpack_wins(x) else x.contiguous(memory_format=torch.channels_last)
        if not self.has_gate and not self.has_border:  # conv, bias and activation in one call
            y = packed(x, ONEDNN_ACTIVATION[self.act])
            return y.add_(self.out_shift) if self.out_shift != 0.0 else y
        # The gated skip is not fused as a binary post-op: measured slower at batch 32, no faster at 1.
        y = packed(x)
        if self.has_border:
            y = self._fix_border(y, x.shape[-2], x.shape[-1])
        if self.has_gate:
            g = self._gate(x)
            if self.has_skip:
                y = y.addcmul_(x, (g * self.skip_scale)[:, :, None, None]).add_((g * self.skip_shift)[:, :, None, None])
            else:
                y = y.mul_((2.0 * g)[:, :, None, None])
        y = activate(y, self.act, inplace=True)
        return y.add_(self.out_shift) if self.out_shift != 0.0 else y

    def _after_conv(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The steps after the conv, out of place (see the class docstring)."""
        if self.has_skip:  # one Add onto the conv output, the border map inside it (a sum post-op)
            g = self._gate(x)
            skip = x * (g * self.skip_scale)[:, :, None, None] + (g * self.skip_shift)[:, :, None, None]
            y = y + (skip + self._border_map(y, x.shape[-2], x.shape[-1]) if self.has_border else skip)
        else:
            if self.has_border:
                y = y + self._border_map(y, x.shape[-2], x.shape[-1])
            if self.has_gate:
                y = y * (2.0 * self._gate(x))[:, :, None, None]
        y = activate(y, self.act)
        return y + self.out_shift if self.out_shift != 0.0 else y

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
        return self.fc(spatial_mean(x))


def _fold_block(block: ParNetBlock, act: str, in_perm: torch.Tensor | None = None) -> FoldedBlock:
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
        a, b = (t.detach() for t in bn_affine(block.skip))
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
    sa, ta = (t.detach() for t in bn_affine(fusion.norm_stream))
    sb, tb = (t.detach() for t in bn_affine(fusion.norm_fused))
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
        if has_fusable_blocks(model):
            model = reparameterize(model)
        cfg = model.cfg
        act = cfg.act
        self.act = act
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

    def shift_activations(self) -> FoldedParNet:
        """Make every block's output non-negative, the network's output unchanged; returns ``self``.

        Each block but the last adds ``-min(act)`` after its activation (SiLU's outputs reach down to
        -0.28, hard-swish's to -0.375) and each consumer subtracts it again, exactly
        (:meth:`FoldedBlock.take_shifted_input`).
        For int8: a quantizer that sees a non-negative tensor gives it unsigned 8 bits, the form the
        int8 convolution kernels (u8 x s8) take directly, and all 256 levels for its range (OpenVINO).
        A no-op for ReLU.
        """
        shift = NONNEGATIVE_SHIFT[self.act]
        if shift == 0.0:
            return self
        blocks = [m for m in self.modules() if isinstance(m, FoldedBlock)]
        for block in blocks:
            if block is not self.final_block:  # the head reads the last block's output unshifted
                block.out_shift = shift
            if block is not self.stem[0]:  # every other block reads another block's output
                block.take_shifted_input(shift)
        return self

    def pack(self, winograd: bool = False) -> FoldedParNet:
        """Pre-pack every conv weight for oneDNN (CPU; see :meth:`FoldedBlock.pack`); channels_last.

        ``winograd``: stride-1 blocks use NNPACK's convolution for the input shapes where it is faster.
        """
        check_packing(winograd)
        self.channels_last = True
        for module in self.modules():
            if isinstance(module, FoldedBlock):
                module.pack(winograd)
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs the network cannot take with the plain model's messages (``ParNet.check_input``), and
        images of another floating type than its weights' with every deployed mode's (``check_image_dtype``):
        oneDNN's packed and frozen paths fail on those obscurely (or crash)."""
        # The dtype first: integer pixels get the deployed modes' one message, which TorchScript's names too.
        check_image_dtype(x, self.stem[0].conv.weight.dtype)
        # The small-input form's stem keeps stride 1; read from the stem, which MultiDeviceParNet (sharing this
        # method) copies too.
        check_parnet_input(x, self.in_chans, self.multiple, self.stem[0].stride == 1)

    def stream_inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        inputs = [x]
        for down in self.downsample:
            inputs.append(down(inputs[-1]))
        return inputs

    def merge(self, outs: list[torch.Tensor]) -> torch.Tensor:
        # Not merge_after_entry: the frozen mode's TorchScript compiles this, and could not take its ready callback.
        fused = self.fuse_entry(outs[0])
        i = 1
        for fusion in self.fusions:
            fused = fusion(outs[i], fused)
            i += 1
        return self.head(self.final_block(fused))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        check_has_values(x)
        # No autograd graph, in or out of inference mode: weights made under it cannot be saved for backward.
        inputs = self.stream_inputs(x.detach())
        outs: list[torch.Tensor] = []
        i = 0
        for stream in self.streams:
            outs.append(stream(inputs[i]))
            i += 1
        return self.merge(outs)


def fold(model: ParNet, channels_last: bool = False) -> FoldedParNet:
    """The folded inference model of ``model`` (training form or fused)."""
    folded = FoldedParNet(model)
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
        folded.channels_last = True
    return folded


def merge_after_entry(
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
