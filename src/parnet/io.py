"""Files that never end up half-written, and ParNet weights as safetensors.

Every file this project writes goes through :func:`atomic_write` (but a run's ``.lock``, which holds
only a process id, and TensorBoard's event files, written by TensorBoard): the data goes to a temporary
file in the same folder, is flushed to disk, and only then renamed over the target, so a process
killed at any moment leaves either the old file or the new one, never a torn one. A kill can
leave the temporary file (not SIGTERM to a ``parnet`` command, which exits through the clean-up);
:func:`remove_temporaries` removes those of a folder (a resumed run does, an export those of its files).
Reading weights is strict and bounded (:mod:`parnet.weights`).

For tests, the environment variable ``PARNET_TEST_KILL_AT_WRITE=N`` (read at import; in a process
that has imported this module, set ``_kill_at`` instead) ends the process (exit code 86, no
clean-up, as a kill would) at the N-th write boundary (0-based), counting two per file: once the
temporary file is written, and once it has replaced the target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .devices import check_device
from .formats import is_torch_checkpoint, program_kind
from .layers import is_reparameterized, reparameterize
from .model import CFG_FIELDS, ParNet, ParNetCfg, build_parnet
from .weights import MAX_CLASSES, MAX_IN_CHANS, architecture_kwargs, bounded_int, build_checked

__all__ = [
    "atomic_write",
    "check_output_path",
    "load_model",
    "model_metadata",
    "read_safetensors",
    "remove_temporaries",
    "save_model",
    "write_safetensors",
]

KILL_EXIT_CODE = 86
_kill_at = int(os.environ.get("PARNET_TEST_KILL_AT_WRITE", "-1") or -1)
_boundaries_passed = 0


def _write_boundary() -> None:
    """The test hook of the module docstring: a deterministic stand-in for a kill at this instant."""
    global _boundaries_passed
    if _kill_at < 0:
        return
    if _boundaries_passed == _kill_at:
        os._exit(KILL_EXIT_CODE)
    _boundaries_passed += 1


def check_output_path(path: str | os.PathLike, folder: bool = False, what: str = "") -> Path:
    """``path`` as an output the command can write, checked before any work: a file that is not an existing
    folder (``folder``: a folder that is not an existing file), under no existing file. ``what`` names it
    in the message (a flag, e.g. ``--output``)."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{name} is a file: give a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{name} is a folder: give a file path")
    for parent in path.parents:
        if parent.is_dir():
            break
        if parent.exists():
            raise ValueError(f"{name} lies under {parent}, which is a file: give a {'folder' if folder else 'file'}")
    return path


def image_format(path: str | os.PathLike) -> str:
    """The figure format ``path``'s suffix names (``png``, ``svg``, ``pdf``...: what matplotlib's Agg writes),
    or a ``ValueError`` that lists them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = FigureCanvasAgg.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        choices = ", .".join(sorted(formats))
        raise ValueError(f"cannot draw into {Path(path).name}: give a file ending in one of .{choices}")
    return suffix


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left as it was. The new file has
    the permissions a plain ``open`` would give it.
    """
    path = check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _new_temporary(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _write_boundary()
        os.replace(tmp_path, path)
        _sync_folder(path.parent)  # the rename itself survives a power cut
        _write_boundary()
    finally:
        tmp_path.unlink(missing_ok=True)


_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{12}\.tmp$")  # what _new_temporary names


def remove_temporaries(folder: str | os.PathLike, targets: Collection[str] | None = None) -> list[str]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` when killed; returns their names.
    ``targets``: only those of these file names (``m.onnx``: ``.m.onnx.<hex>.tmp``).

    Only call it while no other process writes there (a run holds its folder's lock), or those files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        found = _TEMPORARY.match(path.name)
        if found and (targets is None or found["target"] in targets) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


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
    if not isinstance(model, ParNet):
        raise ValueError(
            f"save_model writes a ParNet (training form or reparameterized), got {type(model).__name__}; "
            "a deployed or feature-extraction form cannot be rebuilt from the file: save the ParNet it came from"
        )
    pool = getattr(getattr(model.head, "global_pool", None), "pool_type", "avg")
    if pool != "avg":  # the files record ParNet's average pooling only: another would come back as avg
        raise ValueError(f"the weights files hold ParNets with average pooling; this one pools with {pool!r}")
    return {
        "format": "parnet",
        "cfg": json.dumps(dataclasses.asdict(model.cfg)),
        "num_classes": str(model.num_classes),
        "in_chans": str(model.in_chans),
        "fused": str(is_reparameterized(model)),
    }


def write_safetensors(path: str | os.PathLike, module: torch.nn.Module, metadata: Mapping[str, str]) -> Path:
    """``module``'s state dict (on the CPU) as a safetensors file with ``metadata``, atomically.

    Serialized in memory first, so the file follows the umask like every other file (safetensors'
    ``save_file`` makes it 0600) and a full disk fails before the target is touched. The same
    weights and metadata give the same bytes in every process (:func:`_sorted_metadata`).
    """
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    data = _sorted_metadata(save(state, metadata={k: str(v) for k, v in metadata.items()}))
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its header metadata in sorted order.

    safetensors writes the metadata from a Rust HashMap, in an order that changes from process to
    process; a resumed run must write the same bytes as an uninterrupted one. The tensor entries
    and data are kept as they are; the header is padded to 8 bytes as safetensors pads it.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def save_model(model: ParNet, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights and architecture to a safetensors file, atomically."""
    return write_safetensors(path, model, {**model_metadata(model), **(metadata or {})})


def read_safetensors(
    path: str | os.PathLike, expected_format: str | None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file whose ``format`` metadata is ``expected_format``
    (``None``: any file, whatever its metadata)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a folder, not a weights file: give a run's last.safetensors (last_ema.safetensors for its "
            "EMA weights), or read a run folder with parnet.trained.load_trained_model"
        )
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    device = check_device(device)  # a bad name would read as a damaged file
    try:
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        if is_torch_checkpoint(path) and path.name == "last_state.pt":  # checkpoint.STATE_FILE
            raise ValueError(
                f"{path} is the training state of a run, not its weights: give the run folder ({path.parent}) or "
                "its last.safetensors"
            ) from None
        if (program := program_kind(path)) is not None:  # `parnet convert` refuses those: not named here
            raise ValueError(
                f"{path} is a {program}, an exported model that runs as it is, not weights to load: give the "
                "weights it was exported from (a run folder's last.safetensors or last_ema.safetensors)"
            ) from None
        if is_torch_checkpoint(path):
            out = path.with_name(path.name.split(".")[0] + "_converted.safetensors")
            raise ValueError(
                f"{path} is a PyTorch checkpoint (such as the authors' .pth.tar), not safetensors; convert it "
                f"first: `parnet convert {path} {out}` (a `parnet train` run's weights are its last.safetensors)"
            ) from None
        if path.suffix.lower() in (".onnx", ".xml", ".bin"):
            raise ValueError(
                f"{path} is an engine model (ONNX or OpenVINO), not trained weights (`parnet eval`, `parnet "
                "predict --checkpoint` and `parnet bench --deployed` run those `parnet quantize` writes): here "
                "give the run folder or its .safetensors weights"
            ) from None
        raise ValueError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from None
    if expected_format is not None and meta.get("format") != expected_format:
        if meta.get("format") is None:  # no metadata of ours at all: another library's weights
            raise ValueError(
                f"{path} was not written by this project (no 'format' in its metadata): for timm's own weights "
                "of a model, `parnet predict --checkpoint FILE --model NAME` reads them as timm does"
            )
        hint = ""
        if meta.get("format") == "parnet-detector":
            hint = ": a detector (`parnet predict-det`, `parnet eval-det` and parnet.detection.load_detector read it)"
        raise ValueError(f"{path} is not a {expected_format!r} file (its metadata says {meta.get('format')!r}){hint}")
    return state, meta


def header_json(meta: Mapping[str, str], key: str, source: str) -> object:
    """A JSON value of a safetensors header, or ``ValueError`` naming the file and key."""
    if key not in meta:
        raise ValueError(f"{source}: its metadata has no {key!r}")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"{source}: metadata {key!r} is not valid JSON") from None


def header_flag(meta: Mapping[str, str], key: str, source: str) -> bool:
    """A ``"True"``/``"False"`` entry of a safetensors header (missing: ``False``)."""
    value = meta.get(key, "False")
    if value not in ("True", "False"):
        raise ValueError(f"{source}: metadata {key!r} must be 'True' or 'False', got {value!r}")
    return value == "True"


def header_img_size(meta: Mapping[str, str], source: str) -> int:
    """The image side a run's weights file says it trained at, bounded (0: not said, files written before)."""
    from .data import MIN_IMG_SIZE

    return bounded_int(meta["img_size"], "img_size", MIN_IMG_SIZE, 4096, source) if "img_size" in meta else 0


def header_classes_and_chans(meta: Mapping[str, str], source: str) -> tuple[int, int]:
    """``num_classes`` and ``in_chans`` of a safetensors header, bounded."""
    num_classes = bounded_int(meta.get("num_classes"), "num_classes", 0, MAX_CLASSES, source)
    return num_classes, bounded_int(meta.get("in_chans"), "in_chans", 1, MAX_IN_CHANS, source)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> ParNet:
    """Rebuild a model written by :func:`save_model` (fused models come back fused), in eval mode; one a run
    wrote carries its training data's ``pretrained_cfg`` (:func:`parnet.data.describe_training_data`).

    The header's architecture and the tensors are checked before the model is built (:mod:`parnet.weights`).
    """
    state, meta = read_safetensors(path, "parnet", device)
    source = str(path)
    cfg_dict = header_json(meta, "cfg", source)
    if not isinstance(cfg_dict, dict) or not {"widths", "head_width"} <= cfg_dict.keys() <= CFG_FIELDS:
        raise ValueError(f"{source}: metadata 'cfg' must hold widths, head_width and only {sorted(CFG_FIELDS)}")
    cfg_kwargs = architecture_kwargs(cfg_dict, f"{source}: cfg")
    try:
        cfg = ParNetCfg(**cfg_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: metadata 'cfg' is not a ParNet architecture: {e}") from None
    num_classes, in_chans = header_classes_and_chans(meta, source)
    fused = header_flag(meta, "fused", source)

    def build() -> ParNet:
        model = build_parnet(cfg, num_classes=num_classes, in_chans=in_chans)
        return reparameterize(model, inplace=True) if fused else model

    model = build_checked(build, state, source).to(device).eval()
    describe_header_data(model, meta, source)
    return model


def header_image_prep(meta: Mapping[str, str], source: str) -> dict[str, Any] | None:
    """The ``image_prep`` of a weights file's header (an image folder prepared otherwise than ImageNet's way), checked;
    ``None`` if absent."""
    from .data import check_image_prep

    return check_image_prep(header_json(meta, "image_prep", source), source) if "image_prep" in meta else None


def describe_header_data(model: torch.nn.Module, meta: Mapping[str, str], source: str) -> None:
    """Give ``model`` the timm ``pretrained_cfg`` of the data a run's weights header names (none named: unchanged),
    as every reader of run weights does (:func:`parnet.data.describe_training_data`)."""
    if "dataset" in meta:
        from .data import describe_training_data

        describe_training_data(model, meta["dataset"], header_img_size(meta, source), header_image_prep(meta, source))
