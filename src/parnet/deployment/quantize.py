"""Low precision in PyTorch: bf16 of the folded network, and int8 by PT2E static quantization.

int8 (:func:`pt2e_int8`): the folded network is captured with ``torch.export`` (dynamic batch, at the
calibration images' size, the one size it then takes), quantized with torchao's PT2E flow and the
``X86InductorQuantizer`` (per-channel symmetric int8 weights, uint8 activations, calibrated on the
caller's batches: a histogram observer for activations, per-channel min-max for weights), then compiled
by inductor with freezing, which lowers each quantized conv to oneDNN's int8 convolution with its bias,
add and activation fused as post-ops. PT2E moved from ``torch.ao`` to torchao; torch 2.14 ships neither
the quantizer nor the flow, so this mode needs ``pip install torchao``.

bf16 (:class:`Bf16Module`): the folded network's weights in bf16, the input cast on entry and the
output returned in float32; oneDNN runs bf16 convolutions natively on AVX512-BF16 / AMX CPUs.
Elsewhere it would be emulated (slower than fp32), so it is refused (:func:`check_precision`).
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterable

import torch
from torch import nn

from ..precision import cpu_features, has_native_bf16
from .inputs import check_fixed_input, check_image_dtype

PRECISIONS = ("fp32", "bf16", "int8")
# Images deploy calibrates int8 on unless told (calibration_images=), as `parnet quantize --calibration-images`;
# NNCF's own default is 300 and ONNX Runtime's quantizer reads what it is given.
CALIBRATION_IMAGES = 512


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot run natively, saying why."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if device.type != "cpu" and precision == "int8":
        raise ValueError(f"int8 deployment runs on the CPU only, got {device}")
    if device.type == "cpu" and precision == "bf16" and not has_native_bf16():
        have = sorted(f for f in cpu_features() if f.startswith(("avx512", "amx", "avx2")))
        raise ValueError(
            "bf16 needs a CPU with native bf16 (AVX512-BF16 or AMX); this one has "
            f"{', '.join(have) or 'neither'}: use precision 'fp32' (or 'int8')"
        )


def calibration_batches(
    calibration: Iterable[torch.Tensor] | None, in_chans: int, max_images: int | None = None
) -> list[torch.Tensor]:
    """The calibration batches as float32 CPU tensors, checked: int8 needs real images of the right shape.

    Accepts batches or ``(images, labels)`` pairs, as a ``DataLoader`` yields them, or one batch.
    ``max_images``: read no further than that many images (the last batch cut to it), so that a long or
    endless loader (a training loader) is neither read to its end nor held whole in memory; ``None``: all.
    """
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"calibration_images must be a positive number of images, got {max_images!r}")
    if calibration is None:
        raise ValueError(
            "int8 needs calibration data: pass calibration= an iterable of input batches (a few hundred "
            "images of the data the model will see, e.g. from its training loader)"
        )
    if isinstance(calibration, torch.Tensor):  # one batch, not an iterable of images
        calibration = [calibration]
    batches: list[torch.Tensor] = []
    images = 0
    for item in calibration:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] != in_chans:
            shape = list(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"calibration batches must be tensors (N, {in_chans}, H, W), got {shape}")
        if not batch.is_floating_point():  # uint8 pixels would calibrate the ranges 255 times too wide
            raise ValueError(
                f"calibration batches must be prepared images (floating point, normalized as the model's "
                f"input), got {batch.dtype}"
            )
        if not torch.isfinite(batch).all():  # NaN or inf would set no range, or an infinite one
            raise ValueError("calibration batches hold NaN or infinite values: give real, prepared images")
        if max_images is not None:
            batch = batch[: max_images - images]
        images += len(batch)
        batches.append(batch.detach().float().cpu())
        if max_images is not None and images >= max_images:
            break  # before asking for another batch: an endless loader stops here
    if not batches:
        raise ValueError("calibration is empty: int8 needs at least one batch of real images")
    if len({tuple(b.shape[1:]) for b in batches}) > 1:
        raise ValueError("calibration batches differ in size: give images of one resolution")
    return batches


def check_calibration_size(example: torch.Tensor | None, batches: list[torch.Tensor] | None) -> None:
    """Refuse an ``example`` of another size than the calibration images: an int8 model (an engine's, or
    ``compiled``) is calibrated at the one size it runs."""
    if example is not None and batches and example.shape[1:] != batches[0].shape[1:]:
        raise ValueError(
            f"example= is {tuple(example.shape[1:])} per image, the calibration images "
            f"{tuple(batches[0].shape[1:])}: an int8 model is calibrated at the one size it runs: "
            "give both at that size"
        )


class Bf16Module(nn.Module):
    """``net`` in bf16 behind a float32 interface (input cast on entry, output back to float32)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_dtype(x, torch.float32)  # the interface's type: uint8 pixels are not cast into bf16 unseen
        return self.net(x.to(torch.bfloat16)).float()


def has_torchao() -> bool:
    """Whether torchao (PT2E quantization: int8 in mode ``compiled``) is installed."""
    return importlib.util.find_spec("torchao") is not None


def require_torchao() -> None:
    if not has_torchao():
        raise ValueError(
            "int8 in PyTorch (mode 'compiled') needs torchao's PT2E quantization, which is not installed: "
            "pip install torchao (or use mode 'onnxruntime' or 'openvino')"
        )


@torch.no_grad()
def pt2e_int8(net: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """``net`` (eval, CPU, NCHW float32) statically quantized by PT2E + X86InductorQuantizer and compiled."""
    require_torchao()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = calibration[0][:1].expand(2, -1, -1, -1).contiguous()  # batch 2: a batch of 1 would be fixed
    batch = torch.export.Dim("batch", min=1, max=4096)
    captured = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}}).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(captured, quantizer)
    for batch_x in calibration:
        prepared(batch_x)
    return FrozenCompiled(convert_pt2e(prepared), tuple(example.shape[1:])).eval()


class FrozenCompiled(nn.Module):
    """``torch.compile`` of ``module`` with inductor's freezing switched on while it compiles (on each new shape).

    Measured with torch 2.14.1 and torchao 0.18: passing ``options={"freezing": True}`` to
    ``torch.compile`` leaves the int8 weight pre-packing (``onednn.qconv_prepack``) unfolded and
    inductor fails on it; the global ``torch._inductor.config.freezing``, set around the call, works.

    Compiled as Dynamo does by default: the first batch size static (the fastest graph for a server of one
    batch size), a second one recompiled with a dynamic batch that serves every later size but 1, which
    gets its own: three compiles at most.

    ``shape``: the (C, H, W) it was calibrated and exported at, the only size it takes (any batch), as an
    engine's int8 model; another is refused before the exported graph's own guard fails on it. It can be
    deep-copied but not pickled (torchao's quantized graph cannot be): deploy again where it runs.
    """

    def __init__(self, module: nn.Module, shape: tuple[int, int, int]):
        super().__init__()
        self.module = module
        self.shape = shape
        # Not dynamic=True from the start: that would save one recompile but was not measured as fast as the
        # static graph at a fixed batch (6.2 against 5.5 ms at batch 8, busy cores), which RESULTS.md times.
        self.compiled = torch.compile(module)

    def __getstate__(self) -> dict:
        raise TypeError(
            "an int8 'compiled' model cannot be pickled or saved (torchao's quantized graph cannot be): deploy it "
            "again where it runs, or write an int8 engine file with `parnet quantize` (parnet.deployed.save_deployed)"
        )

    def __deepcopy__(self, memo: dict) -> FrozenCompiled:
        return FrozenCompiled(copy.deepcopy(self.module, memo), self.shape).train(self.training)

    def train(self, mode: bool = True) -> FrozenCompiled:
        """Only the flag: the quantized graph is inference-only, and torchao's exported module refuses ``train()``."""
        self.training = mode
        return self

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse another size than it was calibrated at, images that are not float32, an input off the CPU."""
        check_fixed_input(x, self.shape, "int8 compiled model", "deploy again with calibration images of that size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        self.check_input(x)
        with inductor_config.patch(freezing=True), torch.no_grad():
            return self.compiled(x)
