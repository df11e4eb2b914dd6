"""Building every (model, mode) pair and timing them interleaved: :func:`run_bench`, :func:`bench_files`."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deployment.engines import ENGINES, engine_module
from ..deployment.timing import SETTLE_S, time_interleaved
from ..factory import create_model
from .machine import PEAK_SIZE, machine_peak, model_gflop

# Depth and ImageNet top-1 of the paper's comparison table (reference/ARCHITECTURE.md).
PAPER: dict[str, tuple[int, float]] = {
    "parnet_s": (12, 75.19),
    "parnet_s_official": (12, 75.19),
    "parnet_m": (12, 76.60),
    "parnet_m_official": (12, 76.60),
    "parnet_l": (12, 77.66),
    "parnet_l_official": (12, 77.66),
    "parnet_xl": (12, 78.55),
    "parnet_xl_official": (12, 78.55),
    "resnet34": (34, 74.12),
    "resnet50": (50, 77.53),
    "repvgg_b1g4": (29, 77.59),
    "repvgg_b2g4": (29, 79.38),
}
PARNET_CPU_MODES = (
    "train", "fused", "folded", "channels_last", "packed", "winograd", "frozen", "parallel", "compiled"
)  # fmt: skip
PARNET_CUDA_MODES = ("train", "fused", "channels_last", "parallel", "cuda_graph", "compiled")
BASELINE_CPU_MODES = ("eager", "channels_last", "packed", "winograd", "frozen", "compiled")
BASELINE_CUDA_MODES = ("eager", "channels_last", "cuda_graph", "compiled")
# Low-precision and engine modes, as ``precision:mode`` (fp32 without a prefix); each is given to the
# ParNet variants and the baselines alike, where the CPU and the installed engines can run it.
CPU_EXTRA_MODES = (
    "onnxruntime", "openvino", "bf16:channels_last", "bf16:packed", "bf16:compiled", "bf16:openvino",
    "int8:compiled", "int8:onnxruntime", "int8:openvino",
)  # fmt: skip
BASELINE_SKIPS = ("bf16:packed",)  # ParNet's own bf16 packed blocks; the baselines' bf16 is channels_last/compiled
CUDA_EXTRA_MODES = ("bf16:channels_last", "bf16:cuda_graph", "bf16:compiled")


@dataclass
class Record:
    """One (model, mode, batch, device) measurement, times in milliseconds."""

    model: str
    mode: str
    batch: int
    device: str
    resolution: int
    threads: int
    reps: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    iqr_ms: float
    throughput_img_s: float
    max_abs_diff: float | None  # None: nothing to compare with (a deployed file)
    max_rel_diff: float | None = 0.0  # max_abs_diff / max |reference output|: deep baselines' logits can be huge
    precision: str = "fp32"
    gflop: float | None = None  # per image, 2 x multiply-adds (torch.utils.flop_counter)
    achieved_gflops: float | None = None  # gflop x images per second
    peak_fraction: float | None = None  # achieved_gflops / the machine's peak in this precision, same run
    depth: int | None = None
    paper_top1: float | None = None
    params_m: float | None = None
    times_ms: list[float] = field(default_factory=list)
    in_chans: int | None = None  # with resolution: the input each call got, (in_chans, resolution, resolution)
    chosen_mode: str | None = None  # for mode auto: the mode it chose (timed on this run's batch-1 example)

    @classmethod
    def from_times(cls, times_ms: list[float], batch: int, **fields: Any) -> Record:
        """A record of ``times_ms`` (one per timed call of ``batch`` images): the statistics and rates computed
        here, for every benchmark alike; ``fields`` are the others (model, mode, device, ...)."""
        median = statistics.median(times_ms)
        p25, p75 = _quantile(times_ms, 0.25), _quantile(times_ms, 0.75)
        return cls(
            batch=batch, median_ms=median, p25_ms=p25, p75_ms=p75, min_ms=min(times_ms), max_ms=max(times_ms),
            iqr_ms=p75 - p25, throughput_img_s=batch / median * 1e3, times_ms=[round(t, 3) for t in times_ms],
            **fields,
        )  # fmt: skip


def default_modes(device: torch.device, parnet: bool) -> list[str]:
    """Every mode of ``device`` for a ParNet or a baseline, precisions and engines the machine can run included."""
    from ..deployment.engines import ENGINES, usable
    from ..deployment.quantize import has_torchao
    from ..precision import has_native_bf16

    if device.type == "cuda":
        base = PARNET_CUDA_MODES if parnet else BASELINE_CUDA_MODES
        return list(base) + list(CUDA_EXTRA_MODES)
    base = PARNET_CPU_MODES if parnet else BASELINE_CPU_MODES
    extra = [m for m in CPU_EXTRA_MODES if parnet or m not in BASELINE_SKIPS]
    for label in list(extra):
        precision, mode = split_mode(label)
        if (mode in ENGINES and not usable(mode, precision)) or (precision == "bf16" and not has_native_bf16()):
            extra.remove(label)
        elif label == "int8:compiled" and not has_torchao():
            extra.remove(label)
    return list(base) + extra


def valid_modes(device: torch.device, parnet: bool) -> tuple[str, ...]:
    """Every mode label ``parnet bench`` knows for a ParNet (``deploy``'s modes, and ``train``) or a baseline on
    ``device``, installed or not (:func:`default_modes` keeps those the machine runs). Not ``multi_device``: it
    needs a device per stream, which the bench does not give."""
    if not parnet:
        if device.type == "cuda":
            return BASELINE_CUDA_MODES + CUDA_EXTRA_MODES
        return BASELINE_CPU_MODES + tuple(m for m in CPU_EXTRA_MODES if m not in BASELINE_SKIPS)
    from ..deployment import CPU_ONLY_MODES, CUDA_BF16_MODES, CUDA_ONLY_MODES, MODES, PRECISION_MODES

    if device.type == "cuda":
        fp32 = (m for m in MODES if m not in (*CPU_ONLY_MODES, "multi_device"))
        return ("train", *fp32, *(f"bf16:{m}" for m in CUDA_BF16_MODES))
    fp32 = (m for m in PRECISION_MODES["fp32"] if m not in (*CUDA_ONLY_MODES, "multi_device"))
    return ("train", *fp32, *(f"{p}:{m}" for p in ("bf16", "int8") for m in PRECISION_MODES[p]))


def check_modes(
    labels: Sequence[str], devices: Sequence[str], parnet: bool, flag: str | None = None, models: Sequence[str] = ()
) -> None:
    """Refuse, before any work, a mode label that none of ``devices`` knows (a typo, a CUDA mode on the CPU) in
    ParNet's own modes (``parnet``) or in the generic ones of the baselines; ``flag`` and ``models`` (those the
    modes were given for) are named in the error."""
    valid = {label for device in devices for label in valid_modes(torch.device(device), parnet)}
    unknown = [label for label in labels if label not in valid]
    if not unknown:
        return
    flag = flag or ("--modes" if parnet else "--baseline-modes")
    choices = ", ".join(sorted(valid))
    own = {label for device in devices for label in valid_modes(torch.device(device), True)}
    names, where = ", ".join(models), " or ".join(devices)
    if not parnet and flag == "--modes":  # another network than a ParNet in --models: the baselines' modes
        what = "is a mode of ParNet's own, and" if set(unknown) <= own else f"is not a mode on {where} of"
        raise ValueError(
            f"--modes: {', '.join(unknown)} {what} {names} in --models, which is not a ParNet: for it choose from "
            f"{choices}, or name it in --baselines (whose modes --baseline-modes sets)"
        )
    kind = "a ParNet" if parnet else "a baseline"
    hint = " (ParNet's own modes are for the ParNets of --models)" if not parnet and set(unknown) <= own else ""
    raise ValueError(f"{flag}: {', '.join(unknown)} is not {kind} mode on {where}{hint}; choose from {choices}")


def check_model_modes(
    models: Sequence[str], baselines: Sequence[str], modes: Sequence[str], baseline_modes: Sequence[str],
    devices: Sequence[str],
) -> None:  # fmt: skip
    """Refuse, before any work, a model in both lists and a mode its list gives it that it cannot run: ``modes``
    (``--modes``) are for ``models``, in ParNet's own modes for a ParNet and the generic ones for another network;
    ``baseline_modes`` for ``baselines``, in the generic modes, ParNets among them too (:func:`uses_parnet_modes`)."""
    both = [name for name in models if name in baselines]
    if both:
        raise ValueError(f"{', '.join(both)} is in both --models and --baselines: give each model once")
    parnets = [name for name in models if is_parnet_model(name)]
    others = [name for name in models if not is_parnet_model(name)]
    if modes and (parnets or not others):  # modes without models (--models '' with --deployed) are still checked
        check_modes(modes, devices, True, "--modes", parnets)
    if modes and others:
        check_modes(modes, devices, False, "--modes", others)
    check_modes(baseline_modes, devices, False, "--baseline-modes", baselines)


def is_parnet_model(name: str) -> bool:
    """Whether ``name`` is one of ParNet's registered variants (all named ``parnet_*``): the kind of network. Which
    modes a model gets is decided by the list it came from (:func:`uses_parnet_modes`), not by this alone."""
    return name.startswith("parnet")


def uses_parnet_modes(name: str, listed_as_model: bool) -> bool:
    """Whether ``name`` runs ParNet's own modes (:func:`parnet.deployment.deploy`'s, and ``train``): a ParNet given
    as a model (``--models``); a baseline (``--baselines``), ParNet or not, and any other network run the
    generic modes (:func:`build_entries`), so that a ParNet among the baselines is timed as a baseline is."""
    return listed_as_model and is_parnet_model(name)


def _channels_last(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module = module.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> torch.Tensor:
        return module(x.contiguous(memory_format=torch.channels_last))

    return run


def split_mode(label: str) -> tuple[str, str]:
    """``"int8:onnxruntime"`` -> ``("int8", "onnxruntime")``; a label without a precision is fp32."""
    precision, _, mode = label.rpartition(":")
    return precision or "fp32", mode


def calibration_noise(in_chans: int, resolution: int, batches: int = 2, batch: int = 8) -> list[torch.Tensor]:
    """Seeded random calibration batches: timing does not depend on the values (accuracy: ``parnet quantize``)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, in_chans, resolution, resolution, generator=g) for _ in range(batches)]


def build_entries(
    name: str, modes: Sequence[str], device: torch.device, threads: int, kwargs: dict | None = None,
    resolution: int = 224, parnet: bool | None = None, chosen: dict[str, str] | None = None,
) -> tuple[nn.Module, dict[str, Callable[[torch.Tensor], torch.Tensor]]]:  # fmt: skip
    """The plain model (eval, the reference) and one callable per mode label (``[precision:]mode``).

    ``parnet``: build ParNet's own modes (``deploy``'s) rather than the generic ones (default: whether ``name``
    is a ParNet; :func:`uses_parnet_modes`). ``chosen``, if given, receives the mode each ``auto`` label chose.
    """
    from timm.utils import reparameterize_model

    from ..deployment import compile_cpu, freeze_cpu, pack_convs

    model = create_model(name, **(kwargs or {})).eval().to(device)
    randomize_statistics(model)
    in_chans = (kwargs or {}).get("in_chans") or getattr(model, "in_chans", 3)  # timm's ResNets keep no in_chans
    calibration = calibration_noise(in_chans, resolution)
    example = calibration[0][:1].to(device)
    entries: dict[str, Callable] = {}
    for label in modes:
        precision, mode = split_mode(label)
        if is_parnet_model(name) if parnet is None else parnet:
            calib = calibration if precision == "int8" else None
            entries[label], picked = _parnet_entry(model, label, device, calib, example, threads)
            if picked is not None and chosen is not None:
                chosen[label] = picked
            continue
        fused = reparameterize_model(model).eval()  # RepVGG: one conv per block; ResNet: unchanged
        if precision != "fp32" or mode in ENGINES:
            entries[label] = _baseline_low_precision(fused, mode, precision, device, calibration, example, threads)
        elif mode == "eager":
            entries[label] = fused
        elif mode == "channels_last":
            entries[label] = _channels_last(fused)
        elif mode in ("packed", "winograd", "frozen") and device.type != "cpu":
            raise ValueError(f"baseline mode {mode!r} runs on the CPU only")
        elif mode in ("packed", "winograd"):  # ParNet's modes, in their generic form: BNs folded first
            from torch.fx.experimental.optimization import fuse

            entries[label] = _channels_last(pack_convs(fuse(fused), winograd=mode == "winograd"))
        elif mode == "frozen":
            entries[label] = _channels_last(freeze_cpu(fused.to(memory_format=torch.channels_last)))
        elif mode == "compiled":
            cl = fused.to(memory_format=torch.channels_last)
            compiled = compile_cpu(cl) if device.type == "cpu" else torch.compile(cl)
            entries[label] = _channels_last(compiled)
        elif mode == "cuda_graph":
            from ..deployment import CudaGraphModule

            entries[label] = CudaGraphModule(fused.to(memory_format=torch.channels_last))
        else:
            raise ValueError(f"unknown baseline mode {mode!r}; choose from {BASELINE_CUDA_MODES}")
    return model, entries


def _parnet_entry(
    model: nn.Module, label: str, device: torch.device, calibration: list | None, example: torch.Tensor, threads: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str | None]:
    """A ParNet in one of its own modes (``train``: the model itself; the others :func:`parnet.deployment.deploy`'s),
    and for ``auto`` the mode it chose (else ``None``).

    ``auto`` is ``deploy``'s, given the example: every candidate built, the fastest on the example kept, and
    named by the module's ``auto_choice``."""
    from ..deployment import deploy

    precision, mode = split_mode(label)
    if label == "train":
        return model, None
    deployed = deploy(model, device, mode, precision, calibration, example, threads=threads)
    return deployed, getattr(deployed, "auto_choice", None) if mode == "auto" else None


def _baseline_low_precision(
    fused: nn.Module, mode: str, precision: str, device: torch.device, calibration: list, example: torch.Tensor,
    threads: int,
) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """A baseline in ParNet's bf16/int8/engine modes, in their generic form (the same tools, any model).

    An engine converts ``fused`` as it is: a ParNet among the baselines is not folded, so that it is timed as
    a practitioner would run it without :func:`parnet.deploy`.
    """
    from ..deployment import CudaGraphModule, compile_cpu
    from ..deployment.quantize import Bf16Module, check_precision, pt2e_int8

    check_precision(precision, device)
    if mode in ENGINES:
        batches = calibration if precision == "int8" else None
        return engine_module(mode, fused.cpu().eval(), example.cpu(), precision, batches, threads)
    if precision == "int8" and mode == "compiled":
        from torch.fx.experimental.optimization import fuse

        return pt2e_int8(fuse(fused), calibration)
    if precision == "bf16" and mode in ("channels_last", "compiled", "cuda_graph"):
        net = Bf16Module(fused.to(memory_format=torch.channels_last)).eval()
        if mode == "cuda_graph":
            return CudaGraphModule(net)
        if mode == "compiled":
            net = compile_cpu(net) if device.type == "cpu" else torch.compile(net)
        return _channels_last(net)
    raise ValueError(f"no baseline mode {precision}:{mode}")


@torch.no_grad()
def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters (seeded), as a trained network has.

    A fresh network's BNs are identities and its features nearly zero, so output differences
    between modes (or between a model and its fused form) would mean little; timing does not
    depend on the values. Also used by the tests.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, linear between the sorted values (NumPy's default).

    Not ``statistics.quantiles(method="inclusive")``: before Python 3.13 it refuses one value (``--reps 1``).
    """
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_bench(
    models: Sequence[str],
    baselines: Sequence[str],
    devices: Sequence[str] = ("cpu",),
    batches: Sequence[int] = (1, 32),
    reps: Sequence[int] = (30, 10),
    resolution: int = 224,
    threads: int = 2,
    warmup: int = 3,
    model_modes: Sequence[str] | None = None,
    baseline_modes: Sequence[str] | None = None,
    model_kwargs: dict | None = None,
    log: Callable[[str], None] = print,
    peaks: dict | None = None,
    peak_size: int = PEAK_SIZE,
    settle_s: float = SETTLE_S,
) -> list[Record]:
    """Time every model in every mode at every batch size on every device (see module docstring).

    ``model_modes`` are the modes of ``models`` and ``baseline_modes`` those of ``baselines`` (default: every
    mode of the device each runs; :func:`check_model_modes`); ``model_kwargs`` go to ``models``. ``peaks``, if
    given, receives each device's measured peak GFLOP/s per precision (:func:`machine_peak`, with a
    ``peak_size`` matrix product; 0: no peak, no fractions). ``settle_s``: the untimed pause before each timed
    CPU call (:func:`time_interleaved`).
    """
    check_model_modes(models, baselines, model_modes or (), baseline_modes or (), devices)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_bench(
            models, baselines, devices, batches, reps, resolution, threads, warmup,
            model_modes, baseline_modes, model_kwargs, log, {} if peaks is None else peaks, peak_size, settle_s,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(
    models: Sequence[str],
    baselines: Sequence[str],
    devices: Sequence[str],
    batches: Sequence[int],
    reps: Sequence[int],
    resolution: int,
    threads: int,
    warmup: int,
    model_modes: Sequence[str] | None,
    baseline_modes: Sequence[str] | None,
    model_kwargs: dict | None,
    log: Callable[[str], None],
    peaks: dict,
    peak_size: int,
    settle_s: float,
) -> list[Record]:
    from timm.utils import reparameterize_model

    from ..deployment import fold

    records: list[Record] = []
    listed = {name: True for name in models} | {name: False for name in baselines}  # from --models or not
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available")
        modes = _device_modes(listed, model_modes, baseline_modes, device, log)
        refs, entries, params, gflop, depths, top1s, chosen = {}, {}, {}, {}, {}, {}, {}
        precisions = sorted({split_mode(m)[0] for labels in modes.values() for m in labels})
        peak = machine_peak(precisions, size=peak_size) if device.type == "cpu" and peak_size > 0 else {}
        log(f"[{device}] peak GFLOP/s: {json.dumps(peak)}")
        peaks[str(device)] = peak
        for name, as_model in listed.items():
            log(f"[{device}] building {name}: {', '.join(modes[name])}")
            kwargs = model_kwargs if as_model else None
            picked: dict[str, str] = {}
            ref, ents = build_entries(
                name, modes[name], device, threads, kwargs, resolution, uses_parnet_modes(name, as_model), picked
            )
            refs[name] = ref
            chosen.update({(name, label): mode for label, mode in picked.items()})
            custom = bool(kwargs)  # not the paper's network: none of its figures
            depths[name] = _depth(name, ref, resolution, custom)
            top1s[name] = None if custom else PAPER.get(name.split(".")[0], (None, None))[1]
            # the work of the deployed form: ParNet folded (one 3x3 conv per block), baselines re-parameterized
            counted = fold(ref) if is_parnet_model(name) else reparameterize_model(ref)
            gflop[name] = model_gflop(counted, getattr(ref, "in_chans", 3), resolution)
            params[name] = sum(p.numel() for p in ref.parameters()) / 1e6
            for mode, fn in ents.items():
                entries[(name, mode)] = fn
        in_chans = {name: ref.in_chans if hasattr(ref, "in_chans") else 3 for name, ref in refs.items()}
        for batch, nrep in zip(batches, reps):
            g = torch.Generator().manual_seed(batch)
            xs = {
                c: torch.randn(batch, c, resolution, resolution, generator=g).to(device) for c in set(in_chans.values())
            }
            diffs, scales = {}, {}
            with torch.inference_mode():
                for (name, mode), fn in entries.items():
                    x = xs[in_chans[name]]
                    ref = refs[name](x).float()
                    diffs[(name, mode)] = (fn(x).float() - ref).abs().max().item()
                    scales[(name, mode)] = max(ref.abs().max().item(), 1e-30)
            log(f"[{device}] batch {batch}: {len(entries)} entries x {nrep} interleaved repetitions")

            timed = {key: _bind(fn, xs[in_chans[key[0]]]) for key, fn in entries.items()}
            x0 = xs[3] if 3 in xs else next(iter(xs.values()))
            times = time_interleaved(timed, x0, nrep, warmup, device, settle_s if device.type == "cpu" else 0.0)
            for (name, mode), ts in times.items():
                precision = split_mode(mode)[0]
                rate = gflop[name] * batch / statistics.median(ts) * 1e3
                best_peak = max(peak.get(precision, {}).values(), default=None)
                records.append(
                    Record.from_times(
                        ts,
                        batch,
                        model=name,
                        mode=mode,
                        device=str(device),
                        resolution=resolution,
                        in_chans=in_chans[name],
                        threads=threads,
                        reps=nrep,
                        max_abs_diff=diffs[(name, mode)],
                        max_rel_diff=diffs[(name, mode)] / scales[(name, mode)],
                        depth=depths[name],
                        paper_top1=top1s[name],
                        params_m=round(params[name], 2),
                        precision=precision,
                        gflop=round(gflop[name], 3),
                        achieved_gflops=round(rate, 1),
                        peak_fraction=round(rate / best_peak, 3) if best_peak else None,
                        chosen_mode=chosen.get((name, mode)),
                    )
                )
    return records


def _device_modes(
    listed: dict[str, bool], model_modes: Sequence[str] | None, baseline_modes: Sequence[str] | None,
    device: torch.device, log: Callable[[str], None],
) -> dict[str, list[str]]:  # fmt: skip
    """Each model's mode labels on ``device``: its list's (``listed``: ``True`` for ``models``, whose modes are
    ``model_modes``), or every mode of the device its kind runs; a mode of only the other device (packed,
    cuda_graph; with two devices) is left out and said."""
    out, skipped = {}, {}
    for name, as_model in listed.items():
        parnet = uses_parnet_modes(name, as_model)
        given = model_modes if as_model else baseline_modes
        labels = list(given) if given else default_modes(device, parnet)
        valid = valid_modes(device, parnet)
        out[name] = [label for label in labels if label in valid]
        skipped.update(dict.fromkeys(label for label in labels if label not in valid))
    if skipped:
        log(f"[{device}] not timed here (modes of the other device): {', '.join(skipped)}")
    return out


def _depth(name: str, model: nn.Module, resolution: int, custom: bool) -> int | None:
    """The paper's depth of a model it lists; else the measured one (:func:`parnet.network_depth`), ``None``
    where the model cannot be traced."""
    if not custom and name.split(".")[0] in PAPER:
        return PAPER[name.split(".")[0]][0]
    from ..depth import network_depth

    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, getattr(model, "in_chans", 3), resolution, resolution, device=device)
        return network_depth(model, x)
    except Exception:  # noqa: BLE001 - a figure for the table and plot only; the timing does not need it
        return None


def bench_files(
    paths: Sequence[str], batches: Sequence[int], reps: Sequence[int], warmup: int, threads: int,
    log: Callable[[str], None] = print, settle_s: float = SETTLE_S,
) -> list[Record]:  # fmt: skip
    """Time files written by ``parnet quantize`` (CPU, at the resolution each was built for), interleaved.

    There is no plain model to compare with, so ``max_abs_diff`` is ``None``: ``parnet quantize`` scored them.
    """
    from ..deployed import load_deployed

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        names = [Path(p).name for p in paths]  # short names in the table, unless two files share one
        if len(set(map(str, paths))) < len(paths):
            raise ValueError(f"a deployed file is given twice: {', '.join(map(str, paths))}")
        keys = names if len(set(names)) == len(names) else [str(p) for p in paths]
        nets = {key: load_deployed(p, threads) for key, p in zip(keys, paths)}
        records = []
        for batch, nrep in zip(batches, reps):
            log(f"[cpu] deployed files, batch {batch}: {len(nets)} x {nrep} interleaved repetitions")
            timed = {}
            for name, net in nets.items():
                x = torch.randn(batch, net.in_chans, net.height, net.width, generator=torch.Generator().manual_seed(0))
                net(x)  # untimed: builds the engine's session for this shape, as the models' output check does
                timed[name] = _bind(net, x)
            times = time_interleaved(timed, torch.empty(0), nrep, warmup, torch.device("cpu"), settle_s)
            for name, ts in times.items():
                net = nets[name]
                records.append(
                    Record.from_times(
                        ts, batch, model=name, mode=f"{net.precision}:{net.engine}", device="cpu",
                        resolution=net.height, threads=threads, reps=nrep, max_abs_diff=None, max_rel_diff=None,
                        precision=net.precision, in_chans=net.in_chans,
                    )
                )  # fmt: skip
        return records
    finally:
        torch.set_num_threads(previous)


def _bind(fn: Callable, x: torch.Tensor) -> Callable:
    """``fn`` on a fixed input (models with other input channels get their own)."""
    return lambda _x: fn(x)
