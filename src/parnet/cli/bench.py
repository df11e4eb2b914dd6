"""``parnet bench``: flags over :func:`parnet.bench.run_bench` (see :mod:`parnet.bench` for what is timed)."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from ..bench import (
    BASELINE_CPU_MODES,
    CPU_EXTRA_MODES,
    CUDA_EXTRA_MODES,
    PARNET_CPU_MODES,
    PARNET_CUDA_MODES,
    PEAK_SIZE,
    SETTLE_S,
    bench_files,
    check_model_modes,
    check_targets,
    format_header,
    format_markdown,
    machine_info,
    plot_results,
    run_bench,
    targets_skipped,
)
from ..deployed import read_info
from ..factory import default_input_size
from ..io import atomic_write, check_output_path, image_format
from .args import add_kwargs_option, model_name, nonneg_float, nonneg_int, positive_int


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _model_list(text: str) -> str:
    """Comma-separated timm model names, as an argparse type: each is checked by :func:`parnet.cli.args.model_name`."""
    return ",".join(model_name(name) for name in _split(text))


def _bench(args: argparse.Namespace) -> int:
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if args.device == "all" and not torch.cuda.is_available():
        devices = ["cpu"]
    kwargs = args.model_kwargs or None
    models, baselines, deployed = _split(args.models), _split(args.baselines), _split(args.deployed or "")
    modes, baseline_modes = _split(args.modes or ""), _split(args.baseline_modes or "")
    if not models and not deployed:
        raise ValueError("--models is empty: give at least one ParNet variant, e.g. --models parnet_s (or --deployed)")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:  # before the benchmark, not after it
            check_output_path(path, what=flag)
    if args.plot:
        image_format(args.plot)
    for path in deployed:  # each file readable before minutes of timing, not after
        read_info(path)
    check_model_modes(models, baselines if models else [], modes, baseline_modes, devices)
    resolution = args.resolution or _default_resolution(models)
    machine = machine_info(args.threads)
    peaks: dict = {}
    batches = (1, args.batch) if args.batch != 1 else (1,)
    reps = (args.reps, args.reps_large or max(3, args.reps // 3))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    log(f"machine: {json.dumps(machine)}")
    records = []
    if models:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = run_bench(
                models,
                baselines,
                devices=devices,
                batches=batches,
                reps=reps,
                resolution=resolution,
                threads=args.threads,
                warmup=args.warmup,
                model_modes=modes or None,
                baseline_modes=baseline_modes or None,
                model_kwargs=kwargs,
                log=log,
                peaks=peaks,
                peak_size=args.peak_size,
                settle_s=args.settle_ms / 1e3,
            )
    machine["peak_gflops"] = peaks
    machine["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    notes = []
    if deployed:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            files = bench_files(deployed, batches, reps, args.warmup, args.threads, log, args.settle_ms / 1e3)
        other = sorted({f"{r.model} ({r.resolution}x{r.resolution})" for r in files if r.resolution != resolution})
        if (models or args.resolution) and other:  # --resolution given for files alone is not met either
            notes.append(f"- note: deployed files timed at the size they were built for, not {resolution}x"
                         f"{resolution}: {', '.join(other)}")  # fmt: skip
        records += files
    skipped = targets_skipped(models, resolution, args.threads, kwargs)  # the targets are ParNet-S's, as set
    targets = check_targets(records, models[0], args.batch, peaks) if skipped is None else []
    if skipped:
        notes.append(f"- note: {skipped}")
    table = format_markdown(records, targets) + "".join(f"{n}\n" for n in notes)
    print(table)
    if args.markdown:
        header = format_header(machine, args.argv, batches, reps, args.warmup, args.settle_ms)
        with atomic_write(args.markdown) as tmp:
            tmp.write_text(header + table)
        log(f"wrote {args.markdown}")
    if args.json:
        doc = {
            "machine": machine,
            "command": args.argv,
            "args": vars(args) | {"func": None, "argv": None},
            "targets": targets,
        }
        doc["targets_not_checked"] = skipped
        doc["records"] = [asdict(r) for r in records]
        with atomic_write(args.json) as tmp:  # strict JSON: a NaN would be a bug, not a value to write
            tmp.write_text(json.dumps(doc, indent=1, default=str, allow_nan=False))
        log(f"wrote {args.json}")
    if args.plot:
        for device in devices:
            path = Path(args.plot)
            if len(devices) > 1:
                path = path.with_name(f"{path.stem}_{device}{path.suffix}")
            if plot_results(records, path, device):
                log(f"wrote {path}")
            else:
                print(f"no plot for {device}: no model here has a known depth or paper top-1 (the paper's ImageNet "
                      "models and baselines, without --model-kwargs)")  # fmt: skip
    return 0


def _default_resolution(models: list[str]) -> int:
    """The input size the ParNet models were made for (timm's ``pretrained_cfg``), as timm's benchmark takes it:
    224 for the ImageNet variants, 32 for the CIFAR ones; models of different sizes need ``--resolution``."""
    sizes = {name: default_input_size(name) or 224 for name in models}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"the models are made for different input sizes ({listed}): give --resolution")
    return next(iter(sizes.values()), 224)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``parnet bench``."""
    p = subparsers.add_parser("bench", help="latency and throughput of ParNet modes against deep baselines")
    p.add_argument(
        "--models", default="parnet_s_official", type=_model_list,
        help="the models compared, comma-separated, ParNet variants or any timm model; they run --modes, and the "
        "first is judged against the targets where they apply (ParNet-S, 224x224, 2 threads) [parnet_s_official]",
    )  # fmt: skip
    p.add_argument(
        "--baselines", default="resnet34,resnet50,repvgg_b1g4", type=_model_list,
        help="timm models to compare with, comma-separated ('' for none); they run --baseline-modes, ParNets "
        "among them too [resnet34,resnet50,repvgg_b1g4]",
    )  # fmt: skip
    p.add_argument(
        "--modes",
        help=f"modes of --models, [PRECISION:]MODE, e.g. packed,int8:openvino; auto: deploy's choice, timed here "
        f"[a ParNet on the CPU: {','.join(PARNET_CPU_MODES)}, {','.join(CPU_EXTRA_MODES)} where installed and "
        f"supported; on CUDA: {','.join(PARNET_CUDA_MODES)}, {','.join(CUDA_EXTRA_MODES)}; another network: "
        "--baseline-modes' modes]",
    )
    p.add_argument(
        "--baseline-modes",
        help=f"modes of --baselines [CPU: {','.join(BASELINE_CPU_MODES)} and the same extras but bf16:packed]",
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda", "all"), help="[cpu]; all: CPU and CUDA if present"
    )
    p.add_argument("--threads", type=positive_int, default=2, help="intra-op threads [2]")
    p.add_argument(
        "--batch", type=positive_int, default=32, help="large batch for throughput (batch 1 is always timed) [32]"
    )
    p.add_argument(
        "--resolution", type=positive_int,
        help="input height and width, for every model [the ParNet models' own: 224 for ImageNet's, 32 for CIFAR's]",
    )  # fmt: skip
    p.add_argument("--reps", type=positive_int, default=30, help="timed repetitions at batch 1 [30]")
    p.add_argument("--reps-large", type=positive_int, help="timed repetitions at the large batch [reps/3, at least 3]")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed calls first (compilation included) [3]")
    add_kwargs_option(
        p, "--model-kwargs", "timm.create_model arguments of --models, e.g. widths=[8,16,32]",
        architecture=True,
    )  # fmt: skip
    p.add_argument(
        "--peak-size",
        type=nonneg_int,
        default=PEAK_SIZE,
        help=f"matrix size of the peak measurement, the conv's channels / 16 (0: none) [{PEAK_SIZE}]",
    )
    p.add_argument(
        "--settle-ms", type=nonneg_float, default=SETTLE_S * 1e3,
        help=f"untimed pause before each timed CPU call, so no engine is timed while another's threads spin "
        f"[{SETTLE_S * 1e3:g}]",
    )  # fmt: skip
    p.add_argument(
        "--deployed",
        help="also time these `parnet quantize` files (comma-separated; CPU; each at the size it was built for); "
        "with --models '' only these",
    )
    p.add_argument("--json", help="write every record (and the machine) to this JSON file")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument(
        "--plot", help="write latency-vs-depth and top-1-vs-latency plots to this file (.png, .svg, .pdf...)"
    )
    p.add_argument("--quiet", action="store_true", help="only print the table (and what is refused)")
    p.set_defaults(func=_bench)
