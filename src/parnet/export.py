"""Export the folded inference model: ONNX (dynamic batch), TorchScript, ``torch.export`` (dynamic batch and size).

Every file is written atomically (:func:`parnet.io.atomic_write`) and, unless told otherwise,
read back and run against the PyTorch model (ONNX through onnxruntime) to 1e-4 plus 1e-5 of the largest
output before the command reports success; the files of one export replace the older ones together, or none does.
The exported network is :class:`parnet.deployment.FoldedParNet` (fused, BNs/interleave/shuffle
folded, NCHW), or with ``fused_only`` the plain re-parameterized ParNet.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import atomic_write, check_output_path, remove_temporaries

__all__ = [
    "FORMATS",
    "allowed_difference",
    "check_export",
    "check_name",
    "export_model",
    "load_runner",
]

FORMATS = ("onnx", "torchscript", "export")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "export": ".pt2"}
# The largest difference a file's outputs may have from the model's: TOLERANCE, plus RELATIVE_TOLERANCE of the
# largest |output|, as float32 rounding grows with the outputs' scale (logits of 590 differ by 2.6e-4, 4e-7 of them).
TOLERANCE = 1e-4
RELATIVE_TOLERANCE = 1e-5


def inference_model(model: nn.Module, fused_only: bool = False) -> nn.Module:
    """The network to export: folded (default) or only re-parameterized; eval, on CPU (``model`` is left as it is)."""
    from .deployment import fold
    from .layers import reparameterize

    net = reparameterize(model) if fused_only else fold(model)  # both copy: model.cpu() would move the caller's
    return net.cpu().eval()


def check_name(name: str) -> str:
    """``name`` as the stem of the exported files: a plain file name, so that they land in the output folder."""
    if name in ("", ".", "..") or any(sep and sep in name for sep in ("/", os.sep, os.altsep)):
        raise ValueError(
            f"the export name must be a plain file stem such as 'my_model' (no '/', not '.' or '..'), got {name!r}: "
            "give the folder as --out"
        )
    return name


def _targets(out_dir: str | os.PathLike, name: str, formats: tuple[str, ...]) -> dict[str, Path]:
    """The file each format writes, checked before any work: a file that is in the way or a folder that cannot
    be written would otherwise fail the export after some files were written."""
    name, out_dir = check_name(name), check_output_path(out_dir, folder=True)
    targets = {fmt: out_dir / f"{name}{SUFFIX[fmt]}" for fmt in formats}
    for path in targets.values():
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(f"{path} is in the way: it is {kind}; move it, or export under another name or folder")
    made_in = next(p for p in (out_dir, *out_dir.parents) if p.exists())  # out_dir, or where it will be made
    if not os.access(made_in, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {made_in} (no permission or a read-only disk): give another --out")
    return targets


# The writers write ``path`` directly: export_model gives them temporary files, checks them, and only
# then moves them into place (parnet.io.atomic_write).


def _write_onnx(
    model: nn.Module, path: Path, example: torch.Tensor, metadata: Mapping[str, str], opset: int = 17
) -> None:
    """ONNX with a dynamic batch dimension (input ``input``, output ``logits``): see
    :func:`parnet.deployment.engines.onnx_model_bytes`; ``metadata`` in the model's ``metadata_props``."""
    import onnx

    from .deployment.engines import onnx_model_bytes

    proto = onnx.load_from_string(onnx_model_bytes(model, example, opset=opset))
    onnx.helper.set_model_props(proto, dict(metadata))
    path.write_bytes(proto.SerializeToString())


def _write_torchscript(model: nn.Module, path: Path, example: torch.Tensor, metadata: Mapping[str, str]) -> str | None:
    """TorchScript, scripted, so any batch size and any valid resolution work; ``metadata`` as extra files.

    A model that does not script is traced on ``example`` instead, which may fix its input size: a warning
    names the scripting error, the file's metadata says ``torchscript: traced, fixed input size HxW``, and so
    does the returned note (``None`` when scripted).
    """
    extra = dict(metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception as e:  # noqa: BLE001 - any scripting failure: traced instead, and said so
            size = "x".join(map(str, example.shape[2:]))
            extra["torchscript"] = f"traced, fixed input size {size}"
            warnings.warn(
                f"the model does not script ({type(e).__name__}: {e}); the TorchScript file is traced instead "
                f"and may take only {size} inputs (its metadata says so: torchscript)",
                stacklevel=3,
            )
            scripted = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(scripted, str(path), _extra_files=extra)
    return extra.get("torchscript")


def dynamic_shapes(example: torch.Tensor, multiple: int) -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic shapes of a ParNet input ``x``: any batch, any height and width that are multiples
    of ``multiple`` (the model's ``input_multiple``) from twice that on.

    At once ``multiple`` the last stage is 1 pixel wide, where broadcasting makes torch.export specialize; an
    example that small keeps its height and width fixed.
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes: dict[int, Any] = {0: batch}
    for axis, name in ((2, "height"), (3, "width")):
        steps = example.shape[axis] // multiple
        if steps >= 2:
            shapes[axis] = multiple * torch.export.Dim(f"{name}_steps", min=2, max=max(steps, 4096 // multiple))
    return {"x": shapes}


def export_program(model: nn.Module, example: torch.Tensor, multiple: int) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` (eval mode) with :func:`dynamic_shapes`."""
    return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(example, multiple))


def _write_program(
    model: nn.Module, path: Path, example: torch.Tensor, metadata: Mapping[str, str], multiple: int = 1
) -> None:
    """A ``torch.export`` program (``.pt2``) with a dynamic batch, height and width (:func:`dynamic_shapes`);
    ``metadata`` as extra files."""
    program = export_program(model, example, multiple)
    with open(path, "wb") as f:  # a file object: given a name not ending in .pt2, torch.export.save warns
        torch.export.save(program, f, extra_files=dict(metadata))


def load_runner(fmt: str, path: str | os.PathLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an exported file with its own runtime; returns a function of the input batch."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))
    if fmt == "export":
        with open(path, "rb") as f:
            return torch.export.load(f).module()
    raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")


def allowed_difference(outputs: torch.Tensor) -> float:
    """The largest difference from ``outputs`` that an exported file's may have: 1e-4, plus 1e-5 of their
    largest magnitude (:data:`TOLERANCE`, :data:`RELATIVE_TOLERANCE`)."""
    return TOLERANCE + RELATIVE_TOLERANCE * outputs.abs().max().item()


@torch.no_grad()
def check_export(fmt: str, path: str | os.PathLike, model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest absolute difference between the file's outputs and ``model``'s; raises above
    :func:`allowed_difference` of ``model``'s outputs."""
    run = load_runner(fmt, path)
    worst = 0.0
    for x in inputs:
        expected = model(x)
        diff = (run(x) - expected).abs().max().item()
        worst = max(worst, diff)
        if not diff <= (allowed := allowed_difference(expected)):  # NaN too
            raise ValueError(f"{fmt} export {path} differs from the model by {diff:.3g} (> {allowed:.3g})")
    return worst


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    name: str,
    formats: tuple[str, ...] = FORMATS,
    input_size: tuple[int, int, int] = (3, 224, 224),
    fused_only: bool = False,
    check: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, dict]:
    """Export ``model`` in each format to ``out_dir/name.*``; returns path and max difference per format.

    ``metadata`` (names to strings, e.g. :func:`parnet.predict.preprocessing_metadata`) goes into each file:
    ONNX's ``metadata_props`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``), and the
    extra files of TorchScript and ``torch.export`` (``torch.jit.load(path, _extra_files=...)``,
    ``torch.export.load(path, extra_files=...)``). TorchScript files are scripted: any batch and any size
    the model takes; a model that does not script is traced at ``input_size`` instead, with a warning, and
    its file's metadata says ``torchscript: traced, fixed input size HxW``.

    Exported with a batch of 2; the check compares each file's outputs with ``model``'s own (eval
    mode) on a batch of 3, so it also checks that the batch dimension is dynamic. The files replace
    older ones only once every format is converted and checked: where one fails, none is written (the
    existing ones are left as they were). ``name`` is a plain file stem (:func:`check_name`); a target
    that is not a file, or a folder that cannot be written, is refused before any work. ``model`` itself
    is not changed.
    Where the model's outputs hardly depend on the input (an untrained one), the check proves little:
    a warning says so.
    """
    if isinstance(formats, str):  # one format, not its letters
        formats = (formats,)
    if not formats:
        raise ValueError(f"no export format given; choose from {FORMATS}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:  # before any work: no file is written for a request that cannot be met in full
        raise ValueError(f"unknown export format {unknown[0]!r}; choose from {FORMATS}")
    targets = _targets(out_dir, name, formats)
    needed = ("onnx", "onnxruntime") if check else ("onnx",)  # onnxruntime runs the round-trip check
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if "onnx" in formats and missing:
        raise ValueError(
            f"ONNX export needs {' and '.join(missing)}, not installed here: pip install {' '.join(missing)} "
            "(or leave onnx out of the formats)"
        )
    try:  # the model's own check says which sizes it takes
        model.check_input(torch.empty(1, *input_size, device="meta"))
    except ValueError as e:
        raise ValueError(f"cannot export at input size {tuple(input_size)}: {e}") from None
    remove_temporaries(out_dir, [path.name for path in targets.values()])  # left by a killed export of these files
    # no_grad as a context, not a decorator: a warning's stacklevel names the caller, not torch's wrapper
    with torch.no_grad():
        model = copy.deepcopy(model).cpu().eval()  # the reference, on the CPU like the checks
        net = inference_model(model, fused_only)
        example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
        checks = [torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))]  # another batch size
        writers = {
            "onnx": _write_onnx,
            "torchscript": _write_torchscript,
            "export": functools.partial(_write_program, multiple=model.input_multiple),
        }
        results = {}
        # Each format goes to a temporary file; all replace their targets at the end of the block, or, on any
        # failure, none does: a new file beside the older ones of another format would pass for one set.
        with contextlib.ExitStack() as written:
            for fmt, path in targets.items():
                tmp = written.enter_context(atomic_write(path))
                note = writers[fmt](net, tmp, example, metadata or {})  # the TorchScript writer's: traced
                try:
                    diff = check_export(fmt, tmp, model, checks) if check else None
                except ValueError as e:  # named after the target, not the temporary file
                    raise ValueError(f"{str(e).replace(str(tmp), str(path))}; no file was written") from None
                results[fmt] = {"path": str(path), "max_abs_diff": diff, "note": note}
        if check:  # an untrained network with fresh BN statistics answers nearly the same to every input
            out = model(checks[0])
            spread = (out - out.mean(0)).abs().max().item()
            if spread <= 10 * allowed_difference(out):
                warnings.warn(
                    f"the check compared little: the model's outputs differ by at most {spread:.1e} between inputs "
                    "(untrained weights?), so a file that ignored its input would pass it too",
                    stacklevel=2,
                )
    return results
