"""Files that never end up half-written, and ParNet weights as safetensors.

Every file this project writes goes through :func:`atomic_write`: the data goes to a temporary
file in the same folder, is flushed to disk, and only then renamed over the target, so a process
killed at any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .model import ParNet, ParNetCfg

__all__ = ["atomic_write", "save_model", "load_model", "model_metadata", "read_safetensors"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was. The new file has
    the permissions a plain ``open`` would give it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temporary(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _sync_folder(path.parent)  # the rename itself survives a power cut
    finally:
        tmp_path.unlink(missing_ok=True)


def _new_temporary(path: Path) -> Path:
    """A new empty file beside ``path``, made with mode 0o666 so that the kernel applies the umask
    (``tempfile.mkstemp`` makes 0600, and reading the umask means changing it, which races with threads)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # nor syncs them on every file system
        pass
    finally:
        os.close(fd)


def model_metadata(model: ParNet) -> dict[str, str]:
    """What it takes to rebuild ``model``: its cfg, class count and input channels, as strings."""
    return {
        "format": "parnet",
        "cfg": json.dumps(dataclasses.asdict(model.cfg)),
        "num_classes": str(model.num_classes),
        "in_chans": str(model.in_chans),
        "fused": str(any(getattr(m, "reparam_conv", None) is not None for m in model.modules())),
    }


def save_model(model: ParNet, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and architecture to a safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(state, str(tmp), metadata={**model_metadata(model), **(metadata or {})})
    return Path(path)


# Suffixes of files written by ``torch.save`` (the authors' release files end in ``.pth.tar``).
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")


def is_torch_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``torch.save`` file (zip or pickle), or is named like one, rather than safetensors.

    A safetensors file starts with the 8-byte length of its JSON header, then ``{``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or path.suffix.lower() in TORCH_SUFFIXES


def read_safetensors(
    path: str | os.PathLike, expected_format: str | None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file whose ``format`` metadata is ``expected_format``
    (``None``: any file, whatever its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        if is_torch_checkpoint(path):
            out = path.with_name(path.name.split(".")[0] + "_converted.safetensors")
            raise ValueError(
                f"{path} is a PyTorch checkpoint (such as the authors' .pth.tar), not safetensors; convert it "
                f"first: `parnet convert {path} {out}` (a `parnet train` run's weights are its last.safetensors)"
            ) from None
        raise ValueError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from None
    if expected_format is not None and meta.get("format") != expected_format:
        raise ValueError(f"{path} is not a {expected_format!r} file (its metadata says {meta.get('format')!r})")
    return state, meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> ParNet:
    """Rebuild a model written by :func:`save_model` (fused models come back fused), in eval mode."""
    from . import reparameterize  # noqa: PLC0415 - the package imports this module

    state, meta = read_safetensors(path, "parnet", device)
    cfg = ParNetCfg(**json.loads(meta["cfg"]))
    model = ParNet(cfg, num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    if meta.get("fused") == "True":
        model = reparameterize(model, inplace=True)
    model.load_state_dict(state)
    return model.to(device).eval()
