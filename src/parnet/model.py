"""ParNet ("Non-deep Networks", Goyal et al., NeurIPS 2022): the network and its timm variants.

The network is a stem, parallel streams at different resolutions, a chain of fusions that merges
them from the highest resolution to the lowest, one last downsampling block and a linear
classifier: 12 layers on its longest path. Variants are data (:class:`ParNetCfg`) in
``model_cfgs``; each is registered with timm, so after ``import parnet``::

    timm.create_model("parnet_s", num_classes=10)
    timm.create_model("parnet_cifar_m", num_classes=100)         # small-input form, 32x32 images
    timm.create_model("parnet_s_official.in1k", pretrained=True)   # the authors' released weights

Paper variants (``parnet_s/m/l/xl``) use SiLU and the paper's widths. The ``*_official`` variants
are the networks of the authors' released checkpoints: the same widths with ReLU, because their
configs never switch SiLU on (see ``reference/ARCHITECTURE.md``). Their architectures are in
``model_cfgs`` like the others; their weights, file layout and timm registration are in
:mod:`parnet.official`.

This module has no ``from __future__ import annotations``: FX writes the forward's annotations
into the code of a traced graph, and TorchScript cannot read a string annotation there.
"""

import contextlib
import dataclasses
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, register_notrace_function
from timm.models import build_model_with_cfg, checkpoint, create_model, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from .layers import Fusion, ParNetBlock

__all__ = ["ParNet", "ParNetCfg", "model_cfgs"]

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "hardswish": nn.Hardswish}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_tuple(values: Any, name: str) -> tuple[int, ...]:
    """``values`` (a list or tuple of integers) as a tuple of ints; ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(values, (list, tuple)) or not all(_is_int(v) for v in values):
        raise TypeError(f"{name} must be a list or tuple of integers, one per stream, got {values!r}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class ParNetCfg:
    """Architecture of one ParNet variant.

    Args:
        widths: channels of each stream, highest resolution first; its length (1 to 4) is the
            number of streams (3 in the paper).
        head_width: channels of the last downsampling block, which feeds the classifier.
        blocks: stream blocks per stream (the paper's (4, 5, 5) keeps the depth at 12).
        small_input: the small-input form for 32x32 images: the stem keeps stride 1, so the
            streams run at full, 1/2 and 1/4 resolution instead of 1/4, 1/8 and 1/16.
        act: ``"silu"`` (the paper), ``"relu"`` (the authors' released weights, and an ablation) or
            ``"hardswish"`` (MobileNetV3's piecewise-linear SiLU: cheaper after int8 convolutions).
        use_gate: the Skip-Squeeze-Excitation gate of every block; off for the paper's ablation.
        stem_width: width of the first stem block; ``None`` means ``min(64, widths[0])``.
    """

    widths: tuple[int, ...]
    head_width: int
    blocks: tuple[int, ...] = (4, 5, 5)
    small_input: bool = False
    act: str = "silu"
    use_gate: bool = True
    stem_width: int | None = None

    def __post_init__(self) -> None:
        # Types first: int() would turn 8.7 into 8 and "false" is true, each a network other than the one asked for.
        object.__setattr__(self, "widths", _int_tuple(self.widths, "widths"))
        object.__setattr__(self, "blocks", _int_tuple(self.blocks, "blocks"))
        for name in ("head_width", "stem_width"):
            value = getattr(self, name)
            if not (value is None and name == "stem_width") and not _is_int(value):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        for name in ("small_input", "use_gate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 1 <= len(self.widths) <= 4:
            raise ValueError(f"ParNet takes 1 to 4 streams, got widths {self.widths}")
        if len(self.blocks) != len(self.widths):
            raise ValueError(f"give one block count per stream: widths {self.widths}, blocks {self.blocks}")
        if min(self.widths) < 1 or self.head_width < 1 or min(self.blocks) < 1:
            raise ValueError("widths, head_width and blocks must be positive")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.stem_width is not None and self.stem_width < 1:
            raise ValueError(f"stem_width must be positive (or None for min(64, widths[0])), got {self.stem_width}")
        # Fusion blocks read streams 2..n and write widths[2:] with groups=2, each group half of each input
        # and half of the output (the shuffle, and the folding in deploy, split them so): even widths.
        fused = self.widths[1:]  # 1 stream: none
        if any(w % 2 for w in fused):
            raise ValueError(f"fusion blocks (groups=2) need even widths: {fused} of widths {self.widths}")

    @property
    def num_streams(self) -> int:
        return len(self.widths)

    @property
    def stem_chs(self) -> int:
        """Width of the first stem block."""
        return self.stem_width or min(64, self.widths[0])

    @property
    def stem_stride(self) -> int:
        """The whole stem's reduction: its two blocks stride 2 each (1 each for 32x32 inputs)."""
        return 1 if self.small_input else 4

    @property
    def input_multiple(self) -> int:
        """Height and width must be multiples of this: every stride-2 block needs an even input."""
        return self.stem_stride * 2**self.num_streams


# Paper: Table 1 and Section 4.1 (ImageNet); the CIFAR widths are this project's own choice, made
# to land on the paper's parameter counts (1.3 M, 15.5 M, 35 M fused) at depth 12.
model_cfgs: dict[str, ParNetCfg] = {
    "parnet_s": ParNetCfg(widths=(96, 192, 384), head_width=1280),
    "parnet_m": ParNetCfg(widths=(128, 256, 512), head_width=2048),
    "parnet_l": ParNetCfg(widths=(160, 320, 640), head_width=2560),
    "parnet_xl": ParNetCfg(widths=(200, 400, 800), head_width=3200),
    "parnet_s_official": ParNetCfg(widths=(96, 192, 384), head_width=1280, act="relu"),
    "parnet_m_official": ParNetCfg(widths=(128, 256, 512), head_width=2048, act="relu"),
    "parnet_l_official": ParNetCfg(widths=(160, 320, 640), head_width=2560, act="relu"),
    "parnet_xl_official": ParNetCfg(widths=(200, 400, 800), head_width=3200, act="relu"),
    "parnet_cifar_s": ParNetCfg(widths=(24, 48, 96), head_width=512, small_input=True),
    "parnet_cifar_m": ParNetCfg(widths=(96, 192, 384), head_width=640, small_input=True),
    "parnet_cifar_l": ParNetCfg(widths=(128, 256, 512), head_width=2304, small_input=True),
}


def _features_by_module(cfg: ParNetCfg) -> list[dict[str, Any]]:
    """Every feature ParNet computes: stream outputs, fusion outputs, the final block's."""
    s, widths, n = cfg.stem_stride, cfg.widths, cfg.num_streams
    info = [dict(num_chs=w, reduction=s * 2**i, module=f"streams.{i}") for i, w in enumerate(widths)]
    for i in range(1, n):  # fusion of stream i; all but the last halve the resolution
        last = i == n - 1
        info.append(
            dict(
                num_chs=widths[i if last else i + 1],
                reduction=s * 2 ** (i if last else i + 1),
                module=f"fusions.{i - 1}",
            )
        )
    info.append(dict(num_chs=cfg.head_width, reduction=s * 2**n, module="final_block"))
    return info


def feature_info(cfg: ParNetCfg) -> list[dict[str, Any]]:
    """timm ``feature_info``: stream outputs, fusion outputs and the final block, by stride."""
    return sorted(_features_by_module(cfg), key=lambda f: f["reduction"])  # stable: streams first


def default_out_indices(cfg: ParNetCfg) -> tuple[int, ...]:
    """One feature per resolution, the last computed there: strides 4, 8, 16, 32 for ParNet-S."""
    last = {f["reduction"]: i for i, f in enumerate(feature_info(cfg))}
    return tuple(sorted(last.values()))


@torch.fx.wrap  # a leaf of every FX trace (timm's own and plain ones), run on the real input
@register_notrace_function  # the same for timm's tracers, which take their list of leaves
def check_parnet_input(x: torch.Tensor, in_chans: int, multiple: int, small_input: bool) -> torch.Tensor:
    """``x`` itself if a ParNet can take it, else a ``ValueError`` whose message says what to pass.

    The network computes on the returned tensor, so that a traced graph keeps the check (torchvision's
    feature extractor drops calls whose result is unused). Scriptable, so a scripted model checks too.
    ``torch.compile`` and ``torch.export`` see only shape tests: with height and width declared as
    multiples of ``multiple`` they never fail.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ParNet expects a torch.Tensor batch (N, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"ParNet expects a 4-D batch (N, C, H, W), got a tensor of shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"ParNet expects floating-point images, got {x.dtype}: convert them (e.g. x.float() / 255, then normalize)"
        )
    if x.shape[1] != in_chans:
        raise ValueError(
            f"ParNet was built for {in_chans} input channels, got {x.shape[1]} (shape {list(x.shape)}); "
            f"give it {in_chans}-channel images, or create the model with in_chans={x.shape[1]}"
        )
    h, w = x.shape[2], x.shape[3]
    if h % multiple != 0 or w % multiple != 0:
        form = "small-input" if small_input else "ImageNet"
        raise ValueError(
            f"the {form} form of ParNet needs height and width that are multiples of {multiple}, got {h}x{w}; "
            f"resize or pad the input (e.g. to {(h + multiple - 1) // multiple * multiple}x"
            f"{(w + multiple - 1) // multiple * multiple})"
        )
    return x


class ParNet(nn.Module):
    """ParNet: parallel streams of RepVGG-SSE blocks, fused into a classifier, depth 12.

    Args:
        cfg: the architecture (see :class:`ParNetCfg` and ``model_cfgs``).
        num_classes: classifier outputs; 0 gives pooled features from ``forward``.
        in_chans: input image channels.
        drop_rate: dropout before the classifier.
        global_pool: timm pooling type of the head (``"avg"`` in the paper).
        drop_path_rate: timm's stochastic depth, on the stream blocks (whose BN skip is the identity path,
            as in timm's RepVGG blocks): the rate rises linearly from 0 at each stream's first block to this at
            the deepest block of the longest stream (the paper uses none).
        output_stride: timm's knob for dilated backbones; ParNet has no dilation, so only its own stride
            (``input_multiple``: 32 for the ImageNet form with three streams) is accepted.
        device, dtype: where and in what dtype the parameters are created, as in timm's models
            (``device="meta"`` builds shapes without memory).
    """

    def __init__(
        self,
        cfg: ParNetCfg,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
        output_stride: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if output_stride is not None and output_stride != cfg.input_multiple:
            raise ValueError(
                f"output_stride={output_stride}: ParNet's last feature map has stride {cfg.input_multiple} and it has "
                f"no dilation to give another; leave output_stride out (or pass {cfg.input_multiple})"
            )
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: features from forward), got {num_classes!r}")
        if not _is_int(in_chans) or in_chans < 1:
            raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.input_multiple = cfg.input_multiple  # plain attributes: TorchScript cannot read cfg
        self.small_input = cfg.small_input
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = cfg.head_width
        self.grad_checkpointing = False
        with torch.device(device) if device is not None else contextlib.nullcontext():  # parameters made there
            self._build(cfg, num_classes, in_chans, drop_rate, global_pool, drop_path_rate)
        if dtype is not None:
            self.to(dtype=dtype)
        self.feature_info = feature_info(cfg)
        self.num_streams = cfg.num_streams
        # What forward_features runs and returns: everything and the final block's output, until
        # prune_intermediate_layers keeps less (then the deepest feature kept, as timm's pruned models do).
        self.run_streams = [True] * cfg.num_streams
        self.run_fusions = cfg.num_streams - 1
        self.run_final = True
        self.output_feature = "final_block"
        # Plain lists of names: TorchScript can read neither feature_info's dicts nor sets.
        self.feature_modules = [f["module"] for f in self.feature_info]
        self.available = list(self.feature_modules)  # fewer after prune_intermediate_layers

    def _build(
        self, cfg: ParNetCfg, num_classes: int, in_chans: int, drop_rate: float, global_pool: str, drop_path_rate: float
    ) -> None:
        """The layers (on the default device: ``__init__`` sets it)."""
        block = dict(act_layer=ACTIVATIONS[cfg.act], use_gate=cfg.use_gate)
        widths, n = cfg.widths, cfg.num_streams
        block_stride = 1 if cfg.small_input else 2  # each stem block's; cfg.stem_stride is the two's

        self.stem = nn.Sequential(
            ParNetBlock(in_chans, cfg.stem_chs, block_stride, **block),
            ParNetBlock(cfg.stem_chs, widths[0], block_stride, **block),
        )
        # Inputs of streams 2..n: each one a stride-2 block from the previous stream's input.
        self.downsample = nn.ModuleList(ParNetBlock(widths[i], widths[i + 1], 2, **block) for i in range(n - 1))
        deepest = max(cfg.blocks)  # rates by depth in a stream, linear as timm's (plain floats: no meta tensors)
        rates = [drop_path_rate * j / max(deepest - 1, 1) for j in range(deepest)]
        self.streams = nn.ModuleList(
            nn.Sequential(*(ParNetBlock(w, w, 1, drop_path=rates[j], **block) for j in range(num)))
            for w, num in zip(widths, cfg.blocks)
        )
        # Stream 1 is brought down to stream 2's resolution, then each further stream is fused in;
        # every fusion but the last also halves the resolution.
        self.fuse_entry = ParNetBlock(widths[0], widths[1], 2, **block) if n > 1 else None
        self.fusions = nn.ModuleList(
            Fusion(widths[i], widths[i + 1], 2, **block) if i < n - 1 else Fusion(widths[i], widths[i], 1, **block)
            for i in range(1, n)
        )
        self.final_block = ParNetBlock(widths[-1], cfg.head_width, 2, **block)
        self.head = ClassifierHead(cfg.head_width, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    # -- structure -------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Callable[[str], float]:
        """The group of each parameter name, in input-to-output order (timm's layer-wise LR decay); the head last.

        Fine (timm's default): one group per layer of depth, as :func:`parnet.network_depth` counts them, so the
        parallel streams' blocks and the downsampling blocks at the same depth share a group (as timm groups
        HRNet's branches): a block's rate follows how deep it is, not which stream it is in. ``coarse``: the
        stem, the streams with their downsampling blocks, the fusions, the final block.
        """
        depth = self.block_depths()

        def group(name: str) -> float:
            parts = name.split(".")
            key = ".".join(parts[: {"streams": 3, "stem": 2, "downsample": 2, "fusions": 2}.get(parts[0], 1)])
            if coarse:
                kind = ("stem", "streams", "fusions", "final_block")
                top = {"downsample": "streams", "fuse_entry": "fusions"}.get(parts[0], parts[0])
                return float(kind.index(top)) if top in kind else float("inf")
            return float(depth.get(key, float("inf")))

        return group

    @torch.jit.ignore
    def block_depths(self) -> dict[str, int]:
        """The layer of depth (1 = the stem's first block) of each block, by module name (``streams.i.j``,
        ``downsample.i``, ``fusions.k``...): the longest path from the input through it, in layers."""
        n = len(self.cfg.blocks)
        depth = {"stem.0": 1, "stem.1": 2}
        depth.update({f"downsample.{i}": 3 + i for i in range(n - 1)})
        for i, count in enumerate(self.cfg.blocks):
            depth.update({f"streams.{i}.{j}": 3 + i + j for j in range(count)})
        ends = [2 + i + count for i, count in enumerate(self.cfg.blocks)]  # each stream's last block
        last = ends[0]
        if n > 1:
            depth["fuse_entry"] = last = ends[0] + 1
            for k in range(n - 1):  # fusion k takes the previous fusion and stream k + 1
                depth[f"fusions.{k}"] = last = max(last, ends[k + 1]) + 1
        depth["final_block"] = last + 1
        return depth

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    # -- forward ---------------------------------------------------------------------------------

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse inputs this network cannot take, with a message that says what to pass."""
        check_parnet_input(x, self.in_chans, self.input_multiple, self.small_input)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the features of ``feature_info`` selected by ``indices``.

        ``indices`` is a list of positions in ``feature_info`` (negative ones count from the end),
        or an int ``k`` for the last k; the features come in ``feature_info``'s order, each once, as timm's models
        give them. With ``stop_early`` (or ``intermediates_only``) only the
        blocks the selected features need are run, and the first tensor returned is the deepest
        selected feature rather than the final block's output. ``norm`` has no effect: there is no
        final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError("ParNet gives NCHW features only")
        take = self._in_model_order(feature_take_indices(len(self.feature_modules), indices)[0])
        names = [self.feature_modules[i] for i in take]
        for name in names:
            if name not in self.available:
                raise ValueError(
                    "feature indices " + str(take) + " need blocks that prune_intermediate_layers removed; "
                    "create the model again to take them"
                )
        early = stop_early or intermediates_only or "final_block" not in self.available
        last = self.feature_modules[max(take)] if early else "final_block"
        streams, fusions, final = self._blocks_for(names + [last])
        feats = self._run_blocks(x, streams, fusions, final)
        intermediates = [feats[name] for name in names]
        if intermediates_only:
            return intermediates
        return feats[last], intermediates

    def _in_model_order(self, indices: list[int]) -> list[int]:
        """``indices`` of ``feature_info`` in its order, each once: the order timm's models give features in."""
        ordered: list[int] = []
        for i in range(len(self.feature_modules)):
            if i in indices:
                ordered.append(i)
        return ordered

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Remove the blocks the features ``indices`` do not need, and the classifier (timm's API).

        A backbone of some features then neither runs nor holds the other blocks, so it has no
        parameters that get no gradient (which DistributedDataParallel refuses). Removed streams
        become ``nn.Identity`` so that the kept ones keep their names in the state dict. As in timm's
        models, ``forward_features`` then returns the deepest feature kept, ``num_features`` is its
        channel count, and the classifier, which no longer fits once the final block is gone, becomes
        a pass-through whatever ``prune_head`` says.
        """
        take = self._in_model_order(feature_take_indices(len(self.feature_modules), indices)[0])
        names = [self.feature_modules[i] for i in take]
        streams, fusions, final = self._blocks_for(names)
        self.run_streams, self.run_fusions, self.run_final = streams, fusions, final
        self.output_feature = self.feature_modules[max(take)]
        self.num_features = self.head_hidden_size = self.feature_info[max(take)]["num_chs"]
        for i, wanted in enumerate(streams):
            if not wanted:
                self.streams[i] = nn.Identity()
        self.downsample = self.downsample[: max(i for i, wanted in enumerate(streams) if wanted)]
        self.fusions = self.fusions[:fusions]
        if fusions == 0:
            self.fuse_entry = None
        if not final:
            self.final_block = None
        self.available = names
        if prune_head or not final:
            self.reset_classifier(0, "")
        return take

    @property
    @torch.jit.unused
    def pruned(self) -> bool:
        """Whether :meth:`prune_intermediate_layers` removed blocks: a features backbone, no classifier."""
        return len(self.available) < len(self.feature_info)

    def _blocks_for(self, names: list[str]) -> tuple[list[bool], int, bool]:
        """What computes the features ``names``: which streams, how many fusions, the final block or not."""
        final = "final_block" in names
        num_fusions = self.num_streams - 1 if final else 0
        for name in names:
            if name.startswith("fusions."):
                num_fusions = max(num_fusions, int(name.split(".")[1]) + 1)
        # Fusion k takes stream k + 1 in (the entry block takes stream 0); the final block takes them all.
        streams: list[bool] = []
        for i in range(self.num_streams):
            streams.append(final or (num_fusions > 0 and i <= num_fusions) or "streams." + str(i) in names)
        return streams, num_fusions, final

    def _run_blocks(self, x: torch.Tensor, streams: list[bool], fusions: int, final: bool) -> dict[str, torch.Tensor]:
        """The outputs of the streams marked in ``streams``, of the first ``fusions`` fusions and, if
        ``final``, of the final block, by module name; only the blocks they need are run.

        Each block is one gradient checkpoint when checkpointing is on; ``torch.jit.is_scripting()``
        stands first in each test so that TorchScript never compiles ``checkpoint``.
        """
        x = check_parnet_input(x, self.in_chans, self.input_multiple, self.small_input)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        x = checkpoint(self.stem, x) if not torch.jit.is_scripting() and ckpt else self.stem(x)
        deepest = 0
        for i, wanted in enumerate(streams):
            if wanted:
                deepest = i
        stream_inputs = [x]
        for i, down in enumerate(self.downsample):
            if i < deepest:  # the input of stream i + 1
                x = checkpoint(down, x) if not torch.jit.is_scripting() and ckpt else down(x)
                stream_inputs.append(x)
        feats: dict[str, torch.Tensor] = {}
        for i, stream in enumerate(self.streams):
            if streams[i]:
                xi = stream_inputs[i]
                feats["streams." + str(i)] = (
                    checkpoint(stream, xi) if not torch.jit.is_scripting() and ckpt else stream(xi)
                )
        fused = x  # typed for TorchScript; the fusions start from stream 0
        if fusions > 0 or final:
            fused = feats["streams.0"]
        if fusions > 0 and self.fuse_entry is not None:
            entry = self.fuse_entry
            fused = checkpoint(entry, fused) if not torch.jit.is_scripting() and ckpt else entry(fused)
        for i, fusion in enumerate(self.fusions):
            if i < fusions:
                stream_out = feats["streams." + str(i + 1)]
                fused = (
                    checkpoint(fusion, stream_out, fused)
                    if not torch.jit.is_scripting() and ckpt
                    else fusion(stream_out, fused)
                )
                feats["fusions." + str(i)] = fused
        if final and self.final_block is not None:
            block = self.final_block
            feats["final_block"] = checkpoint(block, fused) if not torch.jit.is_scripting() and ckpt else block(fused)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_blocks(x, self.run_streams, self.run_fusions, self.run_final)[self.output_feature]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- timm registration --------------------------------------------------------------------------

CFG_FIELDS = {f.name for f in dataclasses.fields(ParNetCfg)}


def create_parnet(
    variant: str,
    pretrained: bool = False,
    pretrained_filter_fn: Callable[[dict[str, Any], nn.Module], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> ParNet:
    """Build a registered variant with timm's builder; architecture knobs (widths, blocks, act, ...) override its cfg.

    ``pretrained_filter_fn`` (timm's hook) converts a pretrained file of another layout to this
    network's keys: modules that register variants with released weights pass theirs.
    """
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in CFG_FIELDS}
    cfg = dataclasses.replace(model_cfgs[variant], **overrides)
    if kwargs.get("features_only") and kwargs.get("feature_cls") in ("dict", "list"):
        raise ValueError(  # timm's would fail on an assertion: its dict/list wrappers run the children in order
            f"feature_cls={kwargs['feature_cls']!r} needs a model whose children run one after another; ParNet's "
            "streams run side by side: leave feature_cls out (timm's 'getter', ParNet's forward_intermediates), "
            "or give 'hook' or 'fx'"
        )
    return build_model_with_cfg(
        ParNet,
        variant,
        pretrained,
        cfg=cfg,
        pretrained_filter_fn=pretrained_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=default_out_indices(cfg)),
        **kwargs,
    )


def build_parnet(cfg: ParNetCfg, variant: str | None = None, **kwargs: Any) -> ParNet:
    """A ParNet of architecture ``cfg`` built as ``timm.create_model`` builds one, so that it carries the
    ``pretrained_cfg`` timm's tools read (input size, statistics, interpolation, first conv, classifier) and the
    arguments that rebuild it: those of ``variant``, else of the registered variant of that architecture, else of
    the first of its form (``parnet_s``, ``parnet_cifar_s``). ``kwargs``: ``num_classes``, ``in_chans``, ...
    """
    if variant is None:
        same = (name for name, c in model_cfgs.items() if c == cfg)
        variant = next(same, "parnet_cifar_s" if cfg.small_input else "parnet_s")
    return create_model(variant, **dataclasses.asdict(cfg), **kwargs)


def imagenet_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": ("stem.0.dense.conv", "stem.0.point.conv", "stem.0.gate.conv"),
        "classifier": "head.fc",
        "paper_ids": "arXiv:2110.07641",
        "paper_name": "Non-deep Networks",
        **kwargs,
    }


def _cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    return imagenet_cfg(
        num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs
    )


# The authors' released checkpoints register their ``parnet_*_official`` variants in parnet.official.
default_cfgs = generate_default_cfgs(
    {
        "parnet_s": imagenet_cfg(),
        "parnet_m": imagenet_cfg(),
        "parnet_l": imagenet_cfg(),
        "parnet_xl": imagenet_cfg(),
        "parnet_cifar_s": _cifar_cfg(),
        "parnet_cifar_m": _cifar_cfg(),
        "parnet_cifar_l": _cifar_cfg(),
    }
)


@register_model
def parnet_s(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """ParNet-S of the paper: widths 96, 192, 384, head 1280, SiLU (19.2 M params fused)."""
    return create_parnet("parnet_s", pretrained, **kwargs)


@register_model
def parnet_m(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """ParNet-M of the paper: widths 128, 256, 512, head 2048, SiLU (35.6 M params fused)."""
    return create_parnet("parnet_m", pretrained, **kwargs)


@register_model
def parnet_l(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """ParNet-L of the paper: widths 160, 320, 640, head 2560, SiLU (54.9 M params fused)."""
    return create_parnet("parnet_l", pretrained, **kwargs)


@register_model
def parnet_xl(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """ParNet-XL of the paper: widths 200, 400, 800, head 3200, SiLU (85.0 M params fused)."""
    return create_parnet("parnet_xl", pretrained, **kwargs)


@register_model
def parnet_cifar_s(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """Small-input ParNet for 32x32 images, 1.31 M params fused (10 classes): widths 24, 48, 96, head 512."""
    return create_parnet("parnet_cifar_s", pretrained, **kwargs)


@register_model
def parnet_cifar_m(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """Small-input ParNet for 32x32 images, 15.4 M params fused (10 classes): widths 96, 192, 384, head 640."""
    return create_parnet("parnet_cifar_m", pretrained, **kwargs)


@register_model
def parnet_cifar_l(pretrained: bool = False, **kwargs: Any) -> ParNet:
    """Small-input ParNet for 32x32 images, 34.9 M params fused (10 classes): widths 128, 256, 512, head 2304."""
    return create_parnet("parnet_cifar_l", pretrained, **kwargs)
