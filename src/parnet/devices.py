"""Which device a user asked for, checked against what this machine has (CPU, CUDA)."""

from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has; ``ValueError`` for a name torch does not know, CUDA where
    there is none, or a CUDA index beyond the devices present."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unsupported device {str(device)!r} (use cpu or cuda[:i])") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available on this machine")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device} (use cpu or cuda[:i])")
    return device
