"""``parnet export``: flags over :func:`parnet.export.export_model`."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from .. import checkpoint
from ..export import FORMATS, check_name, export_model
from ..factory import create_model
from ..io import check_output_path
from .args import add_kwargs_option, model_name, note_unfinished, positive_int


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
    from ..model import ParNet
    from ..trained import load_trained_model

    if args.checkpoint:
        if args.num_classes is not None or args.model_kwargs or args.model:
            raise ValueError(
                "MODEL, --num-classes and --model-kwargs build a model; a --checkpoint brings its own architecture: "
                "give one or the other"
            )
        model, source = load_trained_model(args.checkpoint)
        if not isinstance(model, ParNet):
            raise ValueError(f"{source} holds a {type(model).__name__}, not a ParNet: export takes ParNet weights")
        return model
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, **kwargs).eval()


def default_resolution(model: nn.Module, checkpoint: str | None) -> int:
    """The size the checkpoint trained at, where it says; else the model's default input size (timm's
    pretrained config), else its form's (32 for the small-input ParNets, 224 otherwise)."""
    from ..factory import default_input_size
    from ..trained import trained_on

    if checkpoint and (size := trained_on(checkpoint).img_size):
        return size
    return default_input_size(model) or (32 if getattr(model, "small_input", False) else 224)


def file_stem(path: str) -> str:
    """``run`` for ``run/``, ``last`` for ``last.safetensors``, ``model_best`` for ``model_best.pth.tar``."""
    from ..formats import TORCH_SUFFIXES

    name = Path(path).resolve().name  # "." is the folder's name
    while (suffix := Path(name).suffix).lower() in (*TORCH_SUFFIXES, ".safetensors") and suffix != name:
        name = name[: -len(suffix)]  # every weights suffix, in any case: model_best.PTH.TAR, pytorch_model.bin
    return name


# The weights files a `parnet train` run writes, by stem, and what each adds to the run's name in an export's.
_RUN_FILE_SUFFIX = {
    Path(name).stem: suffix
    for name, suffix in (
        (checkpoint.WEIGHTS_FILE, ""),
        (checkpoint.EMA_WEIGHTS_FILE, "_ema"),
        (checkpoint.FUSED_WEIGHTS_FILE, "_fused"),
        (checkpoint.EMA_FUSED_WEIGHTS_FILE, "_ema_fused"),
    )
}


def _checkpoint_name(path: str) -> str:
    """The default export name of ``--checkpoint path``: its :func:`file_stem`, but for a run's weights file
    the run folder's name (``run_ema`` for ``run/last_ema.safetensors``), as every run's files have the same
    names; a run folder is named as the file it is read from (``run_ema`` where it keeps EMA weights), so that
    the name says which weights are inside. A run's file: one in a folder holding ``config.yaml`` or
    ``last_state.pt``, or named as runs name them."""
    from ..trained import is_run_folder, run_weights_file

    if Path(path).is_dir():  # a run folder: named after the weights file it is read from (its EMA ones if kept)
        try:
            path = str(run_weights_file(path))
        except FileNotFoundError:
            return file_stem(path)  # not a run: the loader says what is wrong
    stem = file_stem(path)
    run = Path(path).resolve().parent
    if not run.name or not (is_run_folder(run) or stem in _RUN_FILE_SUFFIX):
        return stem
    return run.name + _RUN_FILE_SUFFIX.get(stem, f"_{stem}")


def _export(args: argparse.Namespace) -> int:
    check_output_path(args.out, folder=True, what="--out")
    if args.model is None and not args.checkpoint:
        args.model = "parnet_s"
    name = args.name  # checked before loading anything; "" is refused, not taken for the default
    if name is None:
        name = _checkpoint_name(args.checkpoint) if args.checkpoint else args.model
    check_name(name)
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    model = _build(args)
    res = args.resolution or default_resolution(model, args.checkpoint)
    from ..predict import preprocessing_metadata

    metadata = preprocessing_metadata(model, args.checkpoint, None if args.checkpoint else args.model, res)
    note_unfinished(args.checkpoint)
    results = export_model(
        model,
        args.out,
        name,
        formats,
        (model.in_chans, res, res),
        fused_only=args.fused_only,
        check=not args.no_check,
        metadata=metadata,
    )
    m = model.input_multiple
    takes = {  # what each file's input may be (parnet.export.dynamic_shapes for torch.export)
        "onnx": f"any batch at {res}x{res}",
        "torchscript": f"any batch, sides multiples of {m}",
        "export": f"any batch, sides multiples of {m} from {2 * m}" if res >= 2 * m else f"any batch at {res}x{res}",
    }
    for fmt, r in results.items():
        diff = "not checked" if r["max_abs_diff"] is None else f"max |diff| {r['max_abs_diff']:.2e}"
        print(f"{fmt:12s} {r['path']}  ({diff}; inputs: {r['note'] or takes[fmt]})")  # a traced file: its size
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``parnet export``."""
    p = subparsers.add_parser("export", help="export the folded model: ONNX, TorchScript, torch.export")
    p.add_argument(
        "model", nargs="?", type=parnet_model_name,
        help="ParNet variant, parnet_* (random weights; `parnet summary` lists them) [parnet_s]; not with --checkpoint",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint",
        help="a .safetensors file written by parnet, a run folder or an authors' .pth.tar (EMA weights where kept), "
        "instead of MODEL",
    )
    p.add_argument("--out", default="exports", help="output folder [exports]")
    p.add_argument(
        "--name",
        help="file stem, no folders (default: MODEL, or the checkpoint's name: a run's folder name for its weights "
        "files, RUN_ema for RUN/last_ema.safetensors)",
    )
    p.add_argument("--format", default=",".join(FORMATS), help=f"comma-separated of {', '.join(FORMATS)} [all]")
    p.add_argument(
        "--resolution",
        type=positive_int,
        help="input height and width (default: the size the checkpoint trained at, else the model's: 224 for "
        "parnet_s, 32 for the small-input variants)",
    )
    p.add_argument("--num-classes", type=positive_int, help="classifier outputs of MODEL (a checkpoint keeps its own)")
    add_kwargs_option(
        p, "--model-kwargs", "timm.create_model arguments, e.g. widths=[8,16,32] head_width=64", architecture=True
    )
    p.add_argument("--fused-only", action="store_true", help="export the re-parameterized model without folding")
    p.add_argument("--no-check", action="store_true", help="skip the round-trip check against PyTorch")
    p.set_defaults(func=_export)
