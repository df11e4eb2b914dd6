"""Low-latency inference: exact weight folding, deployment modes and stream-parallel executors.

:func:`deploy` turns a ParNet (training form or fused) into the fastest equivalent inference
model for a device and precision. In fp32 every mode computes the plain model's eval-mode outputs
(float32, to about 1e-5). ``precision="bf16"`` (native bf16 CPUs, and CUDA) and ``"int8"`` (static
post-training quantization calibrated on ``calibration``, CPU) change the arithmetic, never the
interface: inputs and outputs stay float32 tensors (``engines`` and ``quantize`` modules).
``parnet.deploy`` is this function; the package is ``parnet.deployment``, so that each of its
modules keeps its dotted name (``import parnet.deployment.engines``).

Folding (:class:`FoldedParNet`, the base of every mode) goes beyond re-parameterization:

* the skip BN of a stream block folds into its gate (``mean(BN(x)) = a * mean(x) + b``), and the
  gated skip becomes one fused multiply-add on the conv output: ``y += x * (a g) + b g``;
* the fusion's two BNs fold into the fusion conv: the scales into its input channels exactly, the
  shifts into its bias, with the zero-padded border rows and columns corrected (a shift folded
  into a zero-padded conv is otherwise wrong at the border);
* the fusion's channel interleave becomes a plain concatenation of channel slices, the conv's
  input channels permuted to match (one copy, as before, but no BN passes);
* the channel shuffle after each fusion block disappears: its consumer (the next fusion's
  concatenation, or the final block's conv and gate) reads the channels in the unshuffled order.

Modes (``deploy(model, device, mode)``):

========== ============================================================================
fused      ``parnet.reparameterize`` (one 3x3 conv per block), eval
folded     :class:`FoldedParNet`, NCHW
channels_last  folded, channels_last weights and activations
packed     CPU only: channels_last, every conv weight pre-packed once in oneDNN's layout (per
           input shape), the bias (and the activation of ungated blocks) fused into the conv call
winograd   CPU only: packed, but each stride-1 conv runs NNPACK's fast (Winograd / FFT)
           convolution instead for the input shapes where that measured faster: decided on the
           first call with each shape (:func:`nnpack_is_faster`); large batches gain, batch 1 not
frozen     CPU only: channels_last, TorchScript frozen and ``torch.jit.optimize_for_inference``
           (PyTorch's generic oneDNN path: weights pre-packed, conv + ReLU/add fused)
compiled   channels_last + ``torch.compile`` (inductor)
parallel   CPU: the streams run concurrently (TorchScript ``torch.jit.fork`` on the inter-op
           pool, the intra-op threads split between them); CUDA: one CUDA stream per ParNet stream
cuda_graph CUDA only: ``parallel`` captured in a CUDA graph (re-captured for a new input shape)
multi_device  the streams on separate devices (``devices=``), asynchronous copies at the fusions
onnxruntime  CPU: ONNX Runtime, a fixed-shape session per input shape, past the first few one dynamic-batch
           session (fp32, int8 QDQ); at the example's image size only
openvino   CPU: OpenVINO, a compiled model per input shape, as onnxruntime (fp32, bf16, int8 with NNCF)
auto       the fastest for the device and precision: given an ``example`` input, the candidate
           modes (:func:`auto_candidates`, or ``candidates=``) are timed on it and the fastest is
           returned; otherwise a rule (:func:`auto_mode`). The candidates include every usable engine,
           so a timed choice may take the example's image size only (the engines'; the torch modes take
           any size, int8 models the calibration images' size); the ``parnet.deployment`` logger (INFO)
           says which mode was chosen and what it takes, and the module's ``auto_choice`` names it.
           ``compiled`` (minutes of compiling) is timed only when named in ``candidates=``
========== ============================================================================

bf16 runs ``channels_last``, ``packed``, ``compiled`` and ``openvino`` on the CPU; int8 runs
``compiled`` (torchao PT2E + X86InductorQuantizer + inductor), ``onnxruntime`` and ``openvino``.

Every mode takes float32 images (its ``check_input``: integer pixels and other floating types are refused,
never cast). Saving: a deployed module can be deep-copied, pickled and ``torch.save``'d (read back with
``torch.load(path, weights_only=False)``, in the same parnet and torch versions), what it built for this
process (packed weights, NNPACK timings, the ``parallel`` mode's TorchScript, engine sessions, CUDA streams
and graphs) left out and built again on the copy's first call; but not ``frozen`` (a TorchScript module:
torch's pickling error, and ``torch.jit.load`` does not read back what ``optimize_for_inference`` made of it)
and not int8 ``compiled`` (refused). To keep a model, keep the weights and deploy again, or write a file:
``parnet export`` (ONNX, TorchScript, ``torch.export``) or ``parnet quantize`` (an engine's model, with what
it takes, for :func:`parnet.deployed.load_deployed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from timm.utils import unwrap_model
from torch import nn

from ..devices import check_device
from ..layers import reparameterize
from ..model import ParNet
from .cuda import CudaGraphModule, CudaStreamParNet, MultiDeviceParNet
from .engines import BF16_ORT, ENGINES, EngineModule, engine_module, usable
from .folding import FoldedBlock, FoldedFusion, FoldedParNet, fold, shuffle_perm
from .kernels import (
    PACKED_SHAPES,
    NoAutograd,
    PackedConv2d,
    check_packing,
    compile_cpu,
    freeze_cpu,
    has_cpp_compiler,
    nnpack_is_faster,
    pack_convs,
)
from .parallel import StreamParallelParNet
from .quantize import (
    CALIBRATION_IMAGES,
    PRECISIONS,
    Bf16Module,
    calibration_batches,
    check_calibration_size,
    check_precision,
    has_torchao,
    pt2e_int8,
)
from .timing import fastest

__all__ = [
    "CALIBRATION_IMAGES",
    "MODES",
    "CPU_MODES",
    "PACKED_SHAPES",
    "PRECISIONS",
    "PRECISION_MODES",
    "FoldedBlock",
    "FoldedFusion",
    "FoldedParNet",
    "StreamParallelParNet",
    "CudaStreamParNet",
    "CudaGraphModule",
    "MultiDeviceParNet",
    "PackedConv2d",
    "auto_candidates",
    "auto_mode",
    "compile_cpu",
    "deploy",
    "fixed_input",
    "freeze_cpu",
    "nnpack_is_faster",
    "pack_convs",
    "fold",
    "shuffle_perm",
]

logger = logging.getLogger(__name__)

MODES = (
    "fused", "folded", "channels_last", "packed", "winograd", "frozen", "compiled", "parallel", "cuda_graph",
    "multi_device", "auto",
)  # fmt: skip
CPU_MODES = (
    "fused", "folded", "channels_last", "packed", "winograd", "frozen", "compiled", "parallel", "multi_device"
)  # fmt: skip
PRECISION_MODES = {
    "fp32": MODES + ENGINES,
    "bf16": ("channels_last", "packed", "compiled", "openvino", "auto"),
    "int8": ("compiled", "onnxruntime", "openvino", "auto"),  # compiled: PT2E + inductor
}
CUDA_BF16_MODES = ("channels_last", "parallel", "cuda_graph", "compiled")
ENGINE_PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16", "int8")}
INT8_PREFERENCE = ("openvino", "onnxruntime", "compiled")  # auto's int8 mode without an example
CUDA_ONLY_MODES = ("cuda_graph",)
CPU_ONLY_MODES = ("packed", "winograd", "frozen")
THREAD_MODES = ("parallel", *ENGINES)  # the modes threads= sets (parallel: on the CPU; CUDA streams take none)


def can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` (inductor) can build kernels for ``device``: C++ on CPU, Triton on CUDA."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return has_cpp_compiler()


def _packing_modes() -> tuple[str, ...]:
    """``packed`` and ``winograd`` where this torch can run them (oneDNN; NNPACK on this CPU)."""
    modes = []
    for mode in ("packed", "winograd"):
        try:
            check_packing(mode == "winograd")
        except ValueError:
            break
        modes.append(mode)
    return tuple(modes)


def _int8_modes(device: torch.device) -> tuple[str, ...]:
    """The int8 modes that can run here, in auto's order of preference (:data:`INT8_PREFERENCE`)."""
    if device.type != "cpu":
        return ()
    can = {e: usable(e, "int8") for e in ENGINES}
    can["compiled"] = has_torchao() and can_compile(device)
    return tuple(m for m in INT8_PREFERENCE if can[m])


def auto_candidates(device: torch.device, precision: str = "fp32") -> tuple[str, ...]:
    """The modes ``auto`` times when given an example (unless ``candidates=`` names others), those that build in
    seconds: on CUDA channels_last, parallel and cuda_graph; on the CPU channels_last, packed and winograd
    (where NNPACK is) and parallel (fp32), and every usable engine of the precision (int8: only those).

    The engines take the example's image size only (the torch modes any size): the log line of ``auto``'s
    choice says what it takes, as :func:`fixed_input` does. Not ``compiled`` (inductor compiles for minutes on
    the first calls): name it in ``candidates=`` to time it too."""
    engines = tuple(e for e in ENGINES if device.type == "cpu" and precision in ENGINE_PRECISIONS[e])
    engines = tuple(e for e in engines if usable(e, precision))
    if precision == "int8":
        return tuple(m for m in INT8_PREFERENCE if m in engines)
    if device.type == "cuda":
        return ("channels_last", "parallel", "cuda_graph")
    if precision == "fp32":
        return ("channels_last", *_packing_modes(), "parallel", *engines)
    return ("channels_last", *_packing_modes()[:1], *engines)


def auto_mode(device: str | torch.device, precision: str = "fp32") -> str:
    """The fastest mode for ``device`` and ``precision``: see ``RESULTS.md`` ("Inference latency and throughput")."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda_graph"
    if precision == "int8":
        modes = _int8_modes(device)
        if not modes:
            raise ValueError("int8 needs onnxruntime, openvino (+nncf) or torchao installed; none is")
        return modes[0]
    # CPU: packed had the lowest batch-1 latency and needs no compilation; winograd is faster at
    # batch 32 but times its convolutions on the first call with each input shape.
    return "packed" if torch.backends.mkldnn.is_available() else "channels_last"


def fixed_input(deployed: nn.Module) -> tuple[int, int, int] | None:
    """The one (C, H, W) a deployed module takes (an engine's, int8 ``compiled``), or ``None`` for any size."""
    if isinstance(deployed, EngineModule):
        return deployed.in_chans, deployed.height, deployed.width
    return getattr(deployed, "shape", None)  # FrozenCompiled


def _say_auto_choice(deployed: nn.Module, chosen: str, example: torch.Tensor | None) -> nn.Module:
    """Name ``auto``'s choice on the module (``auto_choice``, for reports) and in the log, with what it takes."""
    deployed.auto_choice = chosen
    shape = fixed_input(deployed)
    takes = "any image size the model takes" if shape is None else "inputs (N, {}, {}, {}) only".format(*shape)
    timed = "" if example is None else f", timed on {tuple(example.shape)}"
    logger.info("deploy mode 'auto' chose %r%s: it takes %s", chosen, timed, takes)
    return deployed


def deploy(
    model: nn.Module,
    device: str | torch.device = "cpu",
    mode: str = "auto",
    precision: str = "fp32",
    calibration: Iterable[torch.Tensor] | None = None,
    example: torch.Tensor | None = None,
    devices: Sequence[str | torch.device] | None = None,
    threads: int | None = None,
    candidates: Sequence[str] | None = None,
    calibration_images: int | None = None,
) -> nn.Module:
    """The fastest inference model of ``model`` for ``device`` in ``precision`` (see the module docstring).

    Args:
        model: a ParNet in training form or fused (it is not modified), or a wrapper of one (``torch.compile``,
            DDP, timm's EMA), which deploys the ParNet inside.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        mode: one of :data:`MODES` (for bf16 and int8 on the CPU, one of :data:`PRECISION_MODES`; for
            bf16 on CUDA, one of ``CUDA_BF16_MODES``); ``"auto"`` picks the fastest for the device and precision.
        precision: ``"fp32"`` (every mode equals the plain model to about 1e-5), ``"bf16"`` (CUDA, and CPUs
            with native bf16) or ``"int8"`` (static post-training quantization, CPU).
        calibration: for int8: an iterable of input batches (or ``(images, labels)`` pairs, as a
            ``DataLoader`` yields), a few hundred real images; required. It is read up to
            ``calibration_images`` images only (a training loader is not read to its end).
        example: an input batch. With ``mode="auto"`` the candidate modes (``candidates``, default
            :func:`auto_candidates`) are built, timed on it and the fastest returned; without it
            ``auto`` follows :func:`auto_mode`. The engine modes are built for its resolution, and take that
            size only; int8 models (the engines' and ``compiled``) are built for the calibration images' size,
            which the example must share when both are given. The other modes take any size the model takes;
            for them the example is only checked (the model's ``check_input``), as the calibration images are
            for every mode.
        devices: for ``multi_device``: one device per stream.
        threads: for ``parallel`` on CPU: intra-op threads to split between the streams; for the
            engines, their threads (default: ``torch.get_num_threads()``). The other modes run on torch's
            threads: for them another number than ``torch.get_num_threads()`` is refused (it would be ignored).
        candidates: the modes ``auto`` chooses among when ``example`` is given (not empty).
        calibration_images: for int8: how many images of ``calibration`` to calibrate on, at most (default
            :data:`CALIBRATION_IMAGES`, 512; the last batch read is cut to it).

    Returns an eval-mode module taking and returning float32 tensors, without gradients; call it under
    ``torch.inference_mode()``. With ``mode="auto"`` its ``auto_choice`` names the mode chosen. What can be saved of
    it: the module docstring. Raises ``ValueError`` for a mode, precision or engine the device cannot run, for
    int8 without calibration data, and for an argument the mode would ignore.
    """
    device = check_device(device)
    check_precision(precision, device)
    allowed = PRECISION_MODES[precision] if device.type == "cpu" else MODES
    if mode == "onnxruntime" and precision == "bf16":
        raise ValueError(BF16_ORT)
    if mode not in allowed:
        raise ValueError(f"unknown deploy mode {mode!r} for precision {precision}; choose one of {allowed}")
    model = unwrap_model(model)  # torch.compile's, DDP's and timm's EMA wrappers: deployed is what they wrap
    if not isinstance(model, ParNet):
        raise ValueError(_not_a_parnet(model))
    if model.pruned:
        raise ValueError(
            "deploy takes a whole ParNet; this one was pruned to some of its features (prune_intermediate_layers, "
            "as features_only does): deploy the classifier, or run the backbone as it is"
        )
    dtypes = {p.dtype for p in model.parameters()} - {torch.float32}
    if dtypes:  # the modes and engines are float32 inside (precision= gives bf16 and int8 from it)
        raise ValueError(
            f"deploy takes a float32 model, got {', '.join(map(str, sorted(dtypes, key=str)))} weights: call "
            "model.float() first (precision='bf16' or 'int8' gives the lower precisions)"
        )
    _check_arguments_apply(mode, device, precision, calibration, example, devices, threads, candidates)
    if calibration_images is not None and precision != "int8":
        raise ValueError(f"calibration_images= is for precision 'int8'; this deploy is {precision}")
    if example is not None:
        model.check_input(example)  # a ValueError that says what to pass, not an exporter's traceback
    cap = CALIBRATION_IMAGES if calibration_images is None else calibration_images
    batches = calibration_batches(calibration, model.in_chans, cap) if precision == "int8" else None
    if batches:
        model.check_input(batches[0])  # the same, before any export calibrates on them
        check_calibration_size(example, batches)
    # The modes auto builds get the batches already read and cut, whole: no second cut to the default.
    read = {"calibration_images": sum(len(b) for b in batches)} if batches else {}
    if mode == "auto" and example is not None:
        built = {
            name: deploy(
                model,
                device,
                name,
                precision,
                batches,
                example,
                devices=devices if name == "multi_device" else None,
                threads=threads if _takes_threads(name, device) else None,
                **read,
            )  # fmt: skip
            for name in _modes_built(mode, device, precision, example, candidates)
        }
        chosen = fastest(built, example.to(device))
        return _say_auto_choice(built[chosen], chosen, example)
    if mode == "auto":
        chosen_by_rule = auto_mode(device, precision)
        deployed = deploy(
            model, device, chosen_by_rule, precision, batches, example, devices=devices, threads=threads, **read
        )
        return _say_auto_choice(deployed, chosen_by_rule, None)
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise ValueError(f"mode {mode!r} needs a CUDA device, got {device}")
    if mode in CPU_ONLY_MODES and device.type != "cpu":
        raise ValueError(f"mode {mode!r} runs on the CPU only, got {device}; on CUDA use cuda_graph or compiled")
    if precision == "bf16" and device.type == "cuda":
        return _deploy_cuda_bf16(model, device, mode)
    if precision != "fp32" or mode in ENGINES:
        return _deploy_cpu_precision(model, mode, precision, batches, example, threads)
    if mode == "fused":  # no gradients, as every mode: built under inference_mode, it runs outside it too
        fused = reparameterize(model).to(device).requires_grad_(False)
        fused.register_forward_pre_hook(_detach_input)
        return fused
    if mode == "multi_device":
        if devices is None:
            raise ValueError("mode 'multi_device' needs devices=[one device per stream]")
        return MultiDeviceParNet(fold(model, channels_last=device.type == "cpu"), devices).eval()
    folded = fold(model, channels_last=mode != "folded").to(device)
    if mode in ("folded", "channels_last"):
        return folded
    if mode in ("packed", "winograd"):
        return folded.pack(winograd=mode == "winograd")
    if mode == "frozen":
        return freeze_cpu(NoAutograd(folded))  # a TorchScript module, as ever: jit.save, .code
    if mode == "compiled":
        return compile_cpu(folded) if device.type == "cpu" else torch.compile(folded)
    if device.type == "cuda":
        parallel = CudaStreamParNet(folded).eval()
        return parallel if mode == "parallel" else CudaGraphModule(parallel).eval()
    return StreamParallelParNet(folded, threads=threads).eval()


def _not_a_parnet(model: nn.Module) -> str:
    """Why ``deploy`` refuses ``model``, and what to do instead: for a deployed model, that it is; else the
    generic forms any classifier can take."""
    name = type(model).__name__
    if type(model).__module__.startswith(f"{__name__}.") or isinstance(model, torch.jit.ScriptModule):
        return (
            f"deploy takes a ParNet (training form or fused); this {name} is deployed (or scripted) already: "
            "run it as it is, or deploy the ParNet it was made from again for another mode or precision"
        )
    return (
        f"deploy takes a ParNet, got {name}. For another image classifier: parnet.deployed.build(model, "
        "'onnxruntime' or 'openvino', precision, calibration, example) gives an engine model (fp32, bf16, int8; "
        "its BNs folded; at the example's image size), or pack_convs(model) from parnet.deployment runs its convs "
        "as modes 'packed' and 'winograd' do: it changes the model in place and folds no BN, so fold them first "
        "(torch.fx.experimental.optimization.fuse(model.eval()))"
    )


def _detach_input(module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
    """The fused mode's forward pre-hook: no autograd graph, in or out of inference mode (weights made under
    it cannot be saved for backward). Scriptable, as the ParNet it is on."""
    return (args[0].detach(),)


def _takes_threads(mode: str, device: torch.device) -> bool:
    """Whether ``threads=`` sets anything in ``mode`` on ``device`` (:data:`THREAD_MODES`)."""
    return mode in THREAD_MODES and device.type == "cpu"


def _modes_built(
    mode: str, device: torch.device, precision: str, example: Any, candidates: Sequence[str] | None
) -> tuple[str, ...]:
    """The modes a deploy call builds: ``auto``'s candidates (given an example) or its rule's choice, else ``mode``."""
    if mode != "auto":
        return (mode,)
    if example is not None and candidates is not None:
        return tuple(candidates)
    if example is not None and (defaults := auto_candidates(device, precision)):
        return defaults
    return (auto_mode(device, precision),)  # nothing to time by default (int8 with torchao alone): the rule's


def _check_arguments_apply(
    mode: str,
    device: torch.device,
    precision: str,
    calibration: Any,
    example: Any,
    devices: Any,
    threads: Any,
    candidates: Any,
) -> None:
    """Refuse an argument that the mode and precision would ignore: a forgotten ``precision="int8"`` beside
    calibration data, say, must not quietly give an fp32 model. ``auto`` is judged by the modes it builds."""
    if calibration is not None and precision != "int8":
        raise ValueError(f"calibration= is for precision 'int8'; this deploy is {precision}: pass precision='int8'")
    if candidates is not None and (mode != "auto" or example is None):
        raise ValueError("candidates= is for mode 'auto' with an example= to time them on")
    if candidates is not None and not candidates:  # not the defaults: a list filtered down to nothing, say
        raise ValueError(
            "candidates= is empty: give the modes 'auto' should time, or leave it out for auto_candidates(device)"
        )
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer (or None for torch's), got {threads!r}")
    if example is not None and not isinstance(example, torch.Tensor):
        raise ValueError(f"example= must be an input batch (a tensor (N, C, H, W)), got {type(example).__name__}")
    if devices is None and threads is None:
        return
    built = _modes_built(mode, device, precision, example, candidates)
    if devices is not None and "multi_device" not in built:
        raise ValueError(f"devices= is for mode 'multi_device', not {_describe(mode, built)}")
    # The other modes run on torch's threads: threads= as many is what they do, another number is ignored.
    ignored = threads is not None and threads != torch.get_num_threads()
    if ignored and not any(_takes_threads(m, device) for m in built):
        raise ValueError(
            f"threads= sets the threads of modes {THREAD_MODES} on the CPU; {_describe(mode, built)} on "
            f"{device.type} runs on torch's ({torch.get_num_threads()} now): call torch.set_num_threads({threads}) "
            "instead, or leave threads= out"
        )


def _describe(mode: str, built: tuple[str, ...]) -> str:
    """``mode`` as an error message names it: for ``auto``, with the modes it builds."""
    return repr(mode) if mode != "auto" else f"'auto' (which builds {', '.join(built)} here)"


def _deploy_cuda_bf16(model: ParNet, device: torch.device, mode: str) -> nn.Module:
    """bf16 on CUDA: the folded network (its streams on CUDA streams for ``parallel`` and ``cuda_graph``) in bf16."""
    if mode not in CUDA_BF16_MODES:
        raise ValueError(f"bf16 on CUDA runs the modes {CUDA_BF16_MODES}, not {mode!r}")
    folded = fold(model, channels_last=True).to(device)
    net = Bf16Module(CudaStreamParNet(folded) if mode in ("parallel", "cuda_graph") else folded).eval()
    if mode == "cuda_graph":
        return CudaGraphModule(net).eval()
    return torch.compile(net) if mode == "compiled" else net


def _deploy_cpu_precision(
    model: ParNet,
    mode: str,
    precision: str,
    batches: list[torch.Tensor] | None,
    example: torch.Tensor | None,
    threads: int | None,
) -> nn.Module:
    """The CPU modes of bf16 and int8, and the engines in every precision."""
    if mode in ENGINES:
        shape_from = example if example is not None else (batches[0] if batches else None)
        if shape_from is None:
            raise ValueError(f"mode {mode!r} needs example= (an input batch: its size fixes the engine's input size)")
        folded = fold(model).cpu()
        return engine_module(
            mode, folded, shape_from[:1].float().cpu(), precision, batches, threads or torch.get_num_threads()
        )
    if precision == "int8":  # mode 'compiled'
        return pt2e_int8(fold(model).cpu(), batches or [])
    folded = fold(model, channels_last=True).cpu()
    if mode == "packed":
        folded.pack()
    net = Bf16Module(folded).eval()
    return compile_cpu(net) if mode == "compiled" else net
