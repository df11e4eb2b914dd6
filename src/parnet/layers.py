"""Building blocks of ParNet: the RepVGG-style block with its gate, and the fusion of two streams.

One block class plays three roles (see ``reference/ARCHITECTURE.md``):

* the **stream block** (``in_chs == out_chs``, stride 1) adds a BN skip branch whose output is
  scaled by the Skip-Squeeze-Excitation gate: ``y = dense(x) + point(x) + skip(x) * gate(skip(x))``;
* the **downsampling block** (stride 2, or a change of width) has no skip and gates the sum:
  ``y = (dense(x) + point(x)) * 2 * gate(x)``;
* the **fusion block** is the downsampling block with ``groups=2`` after :class:`Fusion` has
  interleaved the channels of two streams; its output channels are shuffled.

After training, :meth:`ParNetBlock.reparameterize` folds the 3x3 and 1x1 branches and their BNs
into one 3x3 convolution with bias, as in RepVGG and timm's MobileOne; :func:`reparameterize` does so
for a whole model (``parnet.reparameterize``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, register_notrace_function
from timm.utils import reparameterize_model
from torch import nn

ActLayer = Callable[..., nn.Module]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal channel groups (ShuffleNet's shuffle)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Channels ``a0, b0, a1, b1, ...`` of two same-shape tensors."""
    return torch.stack((a, b), dim=2).flatten(1, 2)


class ConvNorm(nn.Sequential):
    """Convolution without bias followed by BatchNorm, the unit that re-parameterization folds."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chs)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single convolution equal to conv followed by BN (eval mode)."""
        return fold_bn(self.conv.weight, self.bn)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as a per-channel ``x * scale + shift``, from its running statistics and affine parameters.

    Not ``torch.nn.utils.fusion``: its ``rsqrt`` rounds otherwise than this division by the square root.
    """
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale, bn.bias - bn.running_mean * scale


def fold_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN statistics and affine parameters into the preceding bias-free kernel."""
    scale, shift = bn_affine(bn)
    return kernel * scale.reshape(-1, 1, 1, 1), shift


# From this many elements a bf16 CPU mean runs as a matrix product (see spatial_mean). Measured on an
# AMX CPU, 2 threads: the product won from about 1 M elements in either layout (32x192x28x28: 0.35
# against 1.21 ms) and lost below (1x192x28x28: 0.04 against 0.02 ms, its fixed cost).
MATMUL_MEAN_MIN = 1 << 20


@torch.fx.wrap  # a leaf of FX traces (timm's feature extraction): it branches on dtype and size
@register_notrace_function
def spatial_mean(x: torch.Tensor, matmul_min: int = MATMUL_MEAN_MIN) -> torch.Tensor:
    """The mean of an (N, C, H, W) tensor over H and W, as (N, C).

    A large bf16 tensor on the CPU: a product with a row of ones (oneDNN accumulates in fp32), then
    the division. torch's bf16 reduction converts the whole tensor to fp32 first: on a
    (32, 64, 112, 112) channels_last tensor, ParNet-S's largest gate input, it took 28.7 ms against
    the product's 1.4 (2 threads, an AMX CPU), for the same bf16 rounding. ``matmul_min``: the
    threshold as an argument, because TorchScript (the parallel deploy mode) reads no globals.
    """
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() < matmul_min:
        return x.mean((2, 3))
    n, c, h, w = x.shape
    ones = x.new_ones(1, h * w)
    if x.is_contiguous(memory_format=torch.channels_last):  # (N, H*W, C) is a view
        total = torch.matmul(ones, x.permute(0, 2, 3, 1).reshape(n, h * w, c)).reshape(n, c)
    else:
        total = torch.matmul(x.reshape(n, c, h * w), ones.t()).reshape(n, c)
    return total / (h * w)


class SkipSqueezeExcite(nn.Module):
    """The gate: global average pool, a 1x1 convolution (no bias), sigmoid.

    It returns the per-channel gate, not the gated tensor, because the two block forms apply it
    differently. One layer deep, so it widens the receptive field without adding depth.
    """

    def __init__(self, in_chs: int, out_chs: int, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(spatial_mean(x)[:, :, None, None]))


class ParNetBlock(nn.Module):
    """RepVGG-style block with a 3x3 branch, a 1x1 branch, an optional BN skip and a gate.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: 1 or 2. With stride 2 the 1x1 branch average-pools 2x2 first (it then fuses into
            the 3x3 kernel exactly for even input sizes).
        groups: 1, or 2 for the fusion block (whose output channels are then shuffled).
        act_layer: activation after the branches are summed (SiLU in the paper).
        use_gate: the (Skip-)Squeeze-Excitation gate; off for the paper's ablation.
        drop_path: stochastic depth rate of the 3x3 + 1x1 branches (training only), for a block with the BN
            skip, which is then the identity path (as in timm's RepVGG blocks); refused for another block.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        groups: int = 1,
        act_layer: ActLayer = nn.SiLU,
        use_gate: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if drop_path and not (in_chs == out_chs and stride == 1):
            raise ValueError("drop_path needs the BN skip (in_chs == out_chs, stride 1) as the identity path")
        self.in_chs, self.out_chs, self.stride, self.groups = in_chs, out_chs, stride, groups
        self.dense: ConvNorm | None = ConvNorm(in_chs, out_chs, 3, stride, groups)
        self.pool: nn.Module | None = nn.AvgPool2d(2, 2) if stride == 2 else None
        self.point: ConvNorm | None = ConvNorm(in_chs, out_chs, 1, 1, groups)
        self.skip = nn.BatchNorm2d(in_chs) if in_chs == out_chs and stride == 1 else None
        self.gate = SkipSqueezeExcite(in_chs, out_chs, groups) if use_gate else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.act = act_layer()
        self.reparam_conv: nn.Conv2d | None = None

    def _branches(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        point_in = self.pool(x) if self.pool is not None else x
        return self.dense(x) + self.point(point_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._branches(x)
        if self.skip is not None:
            s = self.skip(x)
            y = self.drop_path(y) + (s * self.gate(s) if self.gate is not None else s)
        elif self.gate is not None:
            # sigmoid is about 0.5 at initialization; the factor 2 keeps the scale of the sum.
            y = y * (2.0 * self.gate(x))
        y = self.act(y)
        if self.groups > 1:
            y = channel_shuffle(y, self.groups)
        return y

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the 3x3 and 1x1 branches and their BNs into ``reparam_conv`` (inference only)."""
        if self.reparam_conv is not None:
            return
        kernel, bias = self.dense.fused_kernel_bias()
        point_kernel, point_bias = self.point.fused_kernel_bias()
        if self.stride == 1:
            kernel = kernel + F.pad(point_kernel, (1, 1, 1, 1))
        else:
            # 2x2 average pool then 1x1 == a 3x3 stride-2 kernel holding w/4 at rows and columns 1-2.
            kernel = kernel + F.pad(point_kernel.expand(-1, -1, 2, 2) / 4, (1, 0, 1, 0))
        conv = self.dense.conv
        self.reparam_conv = nn.Conv2d(
            self.in_chs, self.out_chs, 3, stride=self.stride, padding=1, groups=self.groups, bias=True
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)  # the layer it replaces, not BN's (fp32) dtype
        self.reparam_conv.weight.copy_(kernel)
        self.reparam_conv.bias.copy_(bias + point_bias)
        self.reparam_conv.weight.requires_grad_(conv.weight.requires_grad)
        self.reparam_conv.bias.requires_grad_(conv.weight.requires_grad)
        self.dense = self.point = self.pool = None


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The fused inference model: every block's 3x3 and 1x1 branches and BNs in one 3x3 conv.

    This is ``timm.utils.reparameterize_model`` (each block's ``reparameterize()``), so it also
    fuses timm's RepVGG and MobileOne. The result is in eval mode: fusion uses the BN running
    statistics, so only the eval-mode outputs are preserved.
    """
    return reparameterize_model(model, inplace=inplace).eval()


def is_reparameterized(model: nn.Module) -> bool:
    """Whether ``model`` holds re-parameterized (fused) blocks: a ``reparam_conv`` built by ``reparameterize()``."""
    return any(getattr(m, "reparam_conv", None) is not None for m in model.modules())


def has_fusable_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has blocks still to re-parameterize (a ParNet in training form; not a fused one, not a
    ResNet): a block with ``reparameterize()`` whose ``reparam_conv`` is not built yet."""
    return any(hasattr(m, "reparameterize") and getattr(m, "reparam_conv", None) is None for m in model.modules())


class Fusion(nn.Module):
    """Fuse a new (lower-resolution) stream's output ``stream`` into the running tensor ``fused``.

    Each input gets its own BN, their channels are interleaved (``stream0, fused0, stream1, fused1, ...``), and a
    ``groups=2`` :class:`ParNetBlock` maps the ``2 * chs`` channels to ``out_chs``.
    """

    def __init__(self, chs: int, out_chs: int, stride: int, act_layer: ActLayer = nn.SiLU, use_gate: bool = True):
        super().__init__()
        self.norm_stream = nn.BatchNorm2d(chs)
        self.norm_fused = nn.BatchNorm2d(chs)
        self.block = ParNetBlock(2 * chs, out_chs, stride, groups=2, act_layer=act_layer, use_gate=use_gate)

    def forward(self, stream: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        return self.block(interleave(self.norm_stream(stream), self.norm_fused(fused)))
