"""What kind of weights file a path holds, by its first bytes: safetensors or a ``torch.save`` file, or an
exported program (TorchScript, ``torch.export``), which is no weights file.

Its own module, importing nothing of the package, so that the readers of either kind (:mod:`parnet.io` for
safetensors, :mod:`parnet.official` for the authors' checkpoints) both sniff files without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TORCH_SUFFIXES", "is_safetensors", "is_torch_checkpoint", "program_kind"]

# Suffixes of files written by ``torch.save`` (the authors' release files end in ``.pth.tar``).
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


def _file_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(9)


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file: the 8-byte length of its JSON header, then ``{``."""
    return _file_head(Path(path))[8:9] == b"{"


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``torch.save`` file (zip or pickle), or is named like one, rather than safetensors."""
    path = Path(path)
    head = _file_head(path)
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix.lower() in TORCH_SUFFIXES


def program_kind(path: str | os.PathLike) -> str | None:
    """What ``parnet export`` writes besides ONNX, told by the archive's entries: torch.export's ``.pt2`` (load it
    with ``torch.export.load``) or TorchScript (``torch.jit.load``); ``None`` for anything else."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/archive_format") for n in names):
        return "torch.export program (load it with torch.export.load)"
    if any("/code/__torch__/" in n for n in names):
        return "TorchScript program (load it with torch.jit.load)"
    return None
