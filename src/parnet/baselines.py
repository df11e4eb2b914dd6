"""Deep residual baselines for 32x32 images, registered with timm (``import parnet.baselines``).

* ``resnet20_cifar`` / ``resnet56_cifar``: He et al. (2016), Section 4.2: three stages of 16, 32
  and 64 channels with n = 3 / 9 basic blocks each, 6n + 2 layers deep. Unlike the paper, whose
  CIFAR nets use parameter-free zero-padding shortcuts (option A: 0.27 M / 0.85 M params), shortcuts
  that change shape here are 1x1 stride-2 convolutions with BN (option B: 0.27 M / 0.86 M params).
* ``resnet18_cifar``: timm's ResNet-18 with the usual small-input stem: one 3x3 stride-1 convolution
  and no max-pool (11.2 M params).
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import ResNet
from torch import Tensor, nn

from .model import CIFAR_MEAN, CIFAR_STD

__all__ = ["CifarResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut (identity, or 1x1 conv-BN when the shape changes)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act_layer: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))
        self.act2 = act_layer(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al.: 3x3 stem, three stages of ``depth_per_stage`` blocks, pooled linear head.

    Args:
        depth_per_stage: basic blocks per stage (n; depth is 6n + 2).
        widths: channels of the three stages.
        num_classes: classifier outputs.
        in_chans: input image channels.
        drop_rate: dropout before the classifier.
    """

    def __init__(
        self,
        depth_per_stage: int = 3,
        widths: tuple[int, ...] = (16, 32, 64),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        # For timm's features_only (stage modules as named after flatten_sequential).
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module="stem.2")] + [
            dict(num_chs=w, reduction=2**i, module=f"stages.{i}") for i, w in enumerate(widths)
        ]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, prev = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(prev, w, 2 if i > 0 else 1)]
            blocks += [BasicBlock(w, w) for _ in range(depth_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            prev = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "first_conv": "stem.0",
        "classifier": "fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "resnet20_cifar": _cfg(),
        "resnet56_cifar": _cfg(),
        "resnet18_cifar": _cfg(pool_size=(4, 4), first_conv="conv1", classifier="fc"),
    }
)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs
    )


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for 32x32 images (He et al. 2016): 3 x 3 basic blocks, widths 16/32/64, 0.27 M params."""
    return _create("resnet20_cifar", pretrained, depth_per_stage=kwargs.pop("depth_per_stage", 3), **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for 32x32 images (He et al. 2016): 3 x 9 basic blocks, widths 16/32/64, 0.86 M params."""
    return _create("resnet56_cifar", pretrained, depth_per_stage=kwargs.pop("depth_per_stage", 9), **kwargs)


class _CifarResNet18(ResNet):
    """timm's ResNet-18 with the small-input stem, built before timm wraps it (``features_only``)."""

    def __init__(self, in_chans: int = 3, device: Any = None, dtype: Any = None, **kwargs: Any):
        super().__init__(TimmBasicBlock, [2, 2, 2, 2], in_chans=in_chans, device=device, dtype=dtype, **kwargs)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's ResNet
        self.maxpool = nn.Identity()
        # Without the stem's two stride-2 steps every reduction is 4x smaller (act1 and layer1: 1).
        self.feature_info = [{**f, "reduction": max(1, f["reduction"] // 4)} for f in self.feature_info]


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images (11.2 M params)."""
    return build_model_with_cfg(_CifarResNet18, "resnet18_cifar", pretrained, **kwargs)
