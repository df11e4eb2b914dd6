"""Input checks shared by the deployed modules, so that every mode refuses the same inputs with the same message.

A deployed model takes float32 images: integer pixels (not yet prepared) and another floating type are refused,
never cast silently, as the plain model refuses them. A model built for one input size (the engines, int8
``compiled``) refuses every other size, saying how to get one for it.
"""

from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """``str(dtype)``; in TorchScript, where a dtype formats as its number, the types images come in by name."""
    if not torch.jit.is_scripting():
        return str(dtype)
    names = (
        (torch.float32, "torch.float32"),
        (torch.float64, "torch.float64"),
        (torch.float16, "torch.float16"),
        (torch.bfloat16, "torch.bfloat16"),
        (torch.uint8, "torch.uint8"),
    )
    for candidate, name in names:
        if dtype == candidate:
            return name
    return f"dtype number {dtype}"


def check_image_dtype(x: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse images that are not floating point (pixels to prepare first), or not of ``dtype``, the model's.

    Scriptable: the frozen mode's TorchScript runs it.
    """
    if not x.is_floating_point():
        raise ValueError(
            f"expected floating-point images, got {dtype_name(x.dtype)}: convert them (e.g. x.float() / 255, then "
            "normalize)"
        )
    if x.dtype != dtype:  # a float32 model given float64 (or bf16) images: refused, as the plain model's convs do
        want = dtype_name(dtype)
        raise ValueError(
            f"expected {want} images, the model's type, got {dtype_name(x.dtype)}: convert them (x.to({want}))"
        )


def check_fixed_input(x: torch.Tensor, shape: tuple[int, int, int], built: str, again: str) -> None:
    """Refuse an input that a CPU model built for one size cannot take: another (C, H, W) than ``shape``,
    images that are not float32 (its interface), an input off the CPU.

    ``built`` names the model (``"onnxruntime int8 model"``); ``again`` says how to get one for another size.
    """
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        c, h, w = shape
        raise ValueError(f"this {built} was built for inputs (N, {c}, {h}, {w}), got {list(x.shape)}: {again}")
    check_image_dtype(x, torch.float32)
    if x.device.type != "cpu":
        raise ValueError(f"this {built} runs on the CPU; got an input on {x.device}")


def check_has_values(x: torch.Tensor) -> None:
    """Refuse an input on the meta device (shapes without values), which the kernels would fail on obscurely.

    Scriptable: the frozen mode's TorchScript runs it.
    """
    if x.device.type == "meta":
        raise ValueError(
            "got an input on the meta device, which has shapes but no values to compute on: pass real images "
            "(a tensor on the model's device)"
        )
