"""Export the folded inference model: ONNX (dynamic batch), TorchScript, ``torch.export``.

Every file is written atomically (:func:`parnet.io.atomic_write`) and, unless told otherwise,
read back and run against the PyTorch model (ONNX through onnxruntime) to 1e-4 before the
command reports success. The exported network is :class:`parnet.deploy.FoldedParNet` (fused,
BNs/interleave/shuffle folded, NCHW), or with ``fused_only`` the plain re-parameterized ParNet.
"""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .cli import add_kwargs_option, create_model, model_name, positive_int
from .io import atomic_write

__all__ = [
    "FORMATS",
    "check_export",
    "export_model",
    "load_runner",
]

FORMATS = ("onnx", "torchscript", "export")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "export": ".pt2"}
TOLERANCE = 1e-4


def inference_model(model: nn.Module, fused_only: bool = False) -> nn.Module:
    """The network to export: folded (default) or only re-parameterized; eval, on CPU (``model`` is left as it is)."""
    from . import reparameterize
    from .deploy import fold

    net = reparameterize(model) if fused_only else fold(model)  # both copy: model.cpu() would move the caller's
    return net.cpu().eval()


# The writers write ``path`` directly: export_model gives them a temporary file, checks it, and only
# then moves it into place (parnet.io.atomic_write).


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, opset: int = 17) -> None:
    """ONNX with a dynamic batch dimension (input ``input``, output ``logits``): see
    :func:`parnet.deploy.engines.onnx_model_bytes`."""
    from .deploy.engines import onnx_model_bytes

    path.write_bytes(onnx_model_bytes(model, example, opset=opset))


def _write_torchscript(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """TorchScript (scripted, so any batch size and any valid resolution work)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            scripted = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - a model that does not script is traced instead
            scripted = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(scripted, str(path))


def _write_program(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """A ``torch.export`` program (``.pt2``) with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    with open(path, "wb") as f:  # a file object: given a name not ending in .pt2, torch.export.save warns
        torch.export.save(program, f)


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


def load_and_run(fmt: str, path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file on ``x`` with its own runtime."""
    return load_runner(fmt, path)(x)


@torch.no_grad()
def check_export(fmt: str, path: str | os.PathLike, model: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Largest absolute difference between the file's outputs and ``model``'s; raises above 1e-4."""
    run = load_runner(fmt, path)
    worst = 0.0
    for x in inputs:
        worst = max(worst, (run(x) - model(x)).abs().max().item())
    if not worst <= TOLERANCE:
        raise ValueError(f"{fmt} export {path} differs from the model by {worst:.3g} (> {TOLERANCE})")
    return worst


@torch.no_grad()
def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    name: str,
    formats: tuple[str, ...] = FORMATS,
    input_size: tuple[int, int, int] = (3, 224, 224),
    fused_only: bool = False,
    check: bool = True,
) -> dict[str, dict]:
    """Export ``model`` in each format to ``out_dir/name.*``; returns path and max difference per format.

    Exported with a batch of 2; the check compares each file's outputs with ``model``'s own (eval
    mode) on a batch of 3, so it also checks that the batch dimension is dynamic. A file that fails
    the check is not written (an existing one is left as it was). ``model`` itself is not changed.
    """
    try:  # before any work: the model's own check says which sizes it takes
        model.check_input(torch.empty(1, *input_size, device="meta"))
    except ValueError as e:
        raise ValueError(f"cannot export at input size {tuple(input_size)}: {e}") from None
    model = copy.deepcopy(model).cpu().eval()  # the reference, on the CPU like the checks
    net = inference_model(model, fused_only)
    example = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    checks = [torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))]  # another batch size
    writers = {"onnx": _write_onnx, "torchscript": _write_torchscript, "export": _write_program}
    results = {}
    for fmt in formats:
        if fmt not in writers:
            raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
        path = Path(out_dir) / f"{name}{SUFFIX[fmt]}"
        with atomic_write(path) as tmp:  # replaced only once the file has passed the check
            writers[fmt](net, tmp, example)
            try:
                diff = check_export(fmt, tmp, model, checks) if check else None
            except ValueError as e:  # named after the target, not the temporary file
                raise ValueError(str(e).replace(str(tmp), f"{path} (not written)")) from None
        results[fmt] = {"path": str(path), "max_abs_diff": diff}
    return results


def parnet_model_name(text: str) -> str:
    """A ParNet variant (``parnet_*``), as an argparse type: other timm models cannot be folded and exported."""
    name = model_name(text)
    if not name.startswith("parnet_"):
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a ParNet variant: export takes the ParNet variants (parnet_*, e.g. parnet_s, "
            "parnet_cifar_s; `parnet summary` lists them)"
        )
    return name


def _build(args: argparse.Namespace) -> nn.Module:

    from . import io

    if args.checkpoint:
        return io.load_model(args.checkpoint)
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, **kwargs).eval()


def _export(args: argparse.Namespace) -> int:
    model = _build(args)
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    res = args.resolution
    name = args.name or (Path(args.checkpoint).stem if args.checkpoint else args.model)
    results = export_model(
        model, args.out, name, formats, (model.in_chans, res, res), fused_only=args.fused_only, check=not args.no_check
    )
    for fmt, r in results.items():
        diff = "not checked" if r["max_abs_diff"] is None else f"max |diff| {r['max_abs_diff']:.2e}"
        print(f"{fmt:12s} {r['path']}  ({diff})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``parnet export``."""
    p = subparsers.add_parser("export", help="export the folded model: ONNX, TorchScript, torch.export")
    p.add_argument(
        "model", nargs="?", default="parnet_s", type=parnet_model_name,
        help="ParNet variant, parnet_* (random weights; `parnet summary` lists them) [parnet_s]",
    )  # fmt: skip
    p.add_argument("--checkpoint", help="a .safetensors file written by parnet (overrides MODEL)")
    p.add_argument("--out", default="exports", help="output folder [exports]")
    p.add_argument("--name", help="file stem (default: model or checkpoint name)")
    p.add_argument("--format", default=",".join(FORMATS), help=f"comma-separated of {', '.join(FORMATS)} [all]")
    p.add_argument("--resolution", type=positive_int, default=224, help="example input height and width [224]")
    p.add_argument("--num-classes", type=int, help="classifier outputs (timm models only)")
    add_kwargs_option(p, "--model-kwargs", "timm.create_model arguments, e.g. widths=[8,16,32] head_width=64")
    p.add_argument("--fused-only", action="store_true", help="export the re-parameterized model without folding")
    p.add_argument("--no-check", action="store_true", help="skip the round-trip check against PyTorch")
    p.set_defaults(func=_export)
