"""Other inference engines as deploy modes: ONNX Runtime and OpenVINO (with NNCF for int8).

Each engine runs the folded network (:class:`~parnet.deployment.folding.FoldedParNet`, NCHW) converted
once at a fixed input resolution with a dynamic batch; a session (ONNX Runtime) or compiled model
(OpenVINO) is then built for each of the first :data:`ENGINE_FIXED_SHAPES` input shapes on its first call,
with every dimension fixed (a dynamic-batch ONNX Runtime session ran ParNet-S 2x slower at batch 1 than a
fixed-shape one), and kept; every other batch size runs on one dynamic-batch session, built once
(:class:`EngineModule`). Calls may come from several threads at once. Inputs and outputs are float32
torch tensors on the CPU; an input of another resolution or channel count is refused (deploy again
with an example of that size), and so are integer pixels and other floating types, as every deploy mode
refuses them (:mod:`parnet.deployment.inputs`), never cast.

int8 is static post-training quantization calibrated on the caller's batches with the engine's
own tool: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
min-max or percentile/entropy calibration) and NNCF's ``quantize`` (per-channel weights, symmetric
activations; a ParNet's block outputs are first made non-negative, exactly, by
:meth:`~parnet.deployment.folding.FoldedParNet.shift_activations`, so that they quantize to unsigned 8
bits, the form the int8 convolutions read fastest). bf16
runs through OpenVINO's CPU plugin where the CPU has native bf16; ONNX Runtime's CPU provider has
no bf16 convolution, so it is refused there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import logging
import queue
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..precision import has_native_bf16, int8_pairs_saturate
from .folding import FoldedParNet
from .inputs import check_fixed_input
from .kernels import without_caches

ENGINES = ("onnxruntime", "openvino")
ENGINE_FIXED_SHAPES = 4  # input shapes an engine module builds a fixed-shape session for (EngineModule)
DYNAMIC_BATCH = -1  # the batch of a session key that takes any batch
ORT_CALIBRATION = ("minmax", "percentile", "entropy")
BF16_ORT = (
    "ONNX Runtime's CPU provider has no bf16 convolution: for bf16 use OpenVINO (mode 'openvino'; "
    "`parnet quantize --engine openvino`) or a torch mode"
)


def installed(engine: str) -> bool:
    """Whether ``engine``'s Python package can be imported here."""
    if engine == "onnxruntime":
        return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    if engine == "openvino":
        return importlib.util.find_spec("openvino") is not None
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")


def require(engine: str, precision: str = "fp32") -> None:
    """Refuse an engine that is not installed (or, for int8 with OpenVINO, NNCF), saying what to install."""
    if not installed(engine):
        extra = "onnxruntime onnx" if engine == "onnxruntime" else "openvino"
        raise ValueError(f"mode {engine!r} needs {engine}, which is not installed: pip install {extra}")
    if engine == "openvino" and precision == "int8" and importlib.util.find_spec("nncf") is None:
        raise ValueError("int8 with OpenVINO needs NNCF, which is not installed: pip install nncf")


def usable(engine: str, precision: str = "fp32") -> bool:
    """Whether ``engine`` can run ``precision`` here: installed, with NNCF for OpenVINO's int8."""
    try:
        require(engine, precision)
    except ValueError:
        return False
    return True


def onnx_model_bytes(net: nn.Module, example: torch.Tensor, dynamic_batch: bool = True, opset: int = 17) -> bytes:
    """``net`` as an ONNX model (input ``input``, output ``logits``; the batch dynamic), serialized.

    Uses the TorchScript-based exporter (seconds); if that fails, the ``torch.export``-based one, with a
    warning naming the first exporter's error (the model's own ``ValueError`` is raised, not fallen back on).
    """
    try:
        return _torchscript_onnx_bytes(net, example, dynamic_batch, opset)
    except ValueError:  # the model's own refusal of the input: the other exporter would only obscure it
        raise
    except Exception as e:  # noqa: BLE001 - fall back to the dynamo exporter, saying why
        warnings.warn(
            f"the TorchScript-based ONNX exporter failed ({type(e).__name__}: {e}); exporting with the "
            "torch.export-based one instead",
            stacklevel=2,
        )
        return _dynamo_onnx_bytes(net, example, dynamic_batch, opset)


def _torchscript_onnx_bytes(net: nn.Module, example: torch.Tensor, dynamic_batch: bool, opset: int) -> bytes:
    """:func:`onnx_model_bytes` by the TorchScript-based exporter (its warnings silenced)."""
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (example,), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
            dynamic_axes=axes, opset_version=opset,
        )  # fmt: skip
    return buffer.getvalue()


def _dynamo_onnx_bytes(net: nn.Module, example: torch.Tensor, dynamic_batch: bool, opset: int) -> bytes:
    """:func:`onnx_model_bytes` by the ``torch.export``-based exporter (its warnings silenced; opset 18 at least)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
            dynamic_shapes={"x": {0: batch}} if dynamic_batch else None, opset_version=max(opset, 18),
            external_data=False,
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            program.save(str(path))
            return path.read_bytes()


class EngineModule(nn.Module):
    """An engine's model behind a torch module: a fixed-shape session for each of the first ``fixed_shapes``
    input shapes, one dynamic-batch session for every other batch size.

    Fixed shapes are faster (a dynamic-batch ONNX Runtime session ran ParNet-S 2x slower at batch 1), but a
    server of many batch sizes must not build a session per call: past ``fixed_shapes`` (default
    :data:`ENGINE_FIXED_SHAPES`; set the attribute, before the first calls, for more) the sessions built are
    kept and the dynamic one, built once, takes the rest. Calls may come from several threads at once.

    ``build(shape)`` returns a function of a float32 NCHW numpy array (a batch of ``-1``: any batch), safe to
    call from several threads; subclasses define it. Inputs are float32 (checked as every deploy mode checks
    them, never cast). ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep the engine's model and leave the
    sessions, which the copy builds again; to keep a model, write it as a file (``parnet quantize``,
    :func:`parnet.deployed.save_deployed`), which says what it takes, and read it back with
    :func:`parnet.deployed.load_deployed`.
    """

    engine = ""

    def __init__(
        self,
        model: Any,
        in_chans: int,
        height: int,
        width: int,
        precision: str,
        threads: int,
        fixed_shapes: int = ENGINE_FIXED_SHAPES,
    ):
        super().__init__()
        self.model = model  # the engine's own model: ONNX bytes, or an openvino.Model
        self.in_chans, self.height, self.width = in_chans, height, width
        self.precision = precision
        self.threads = threads
        self.fixed_shapes = fixed_shapes
        self._sessions: dict[tuple[int, ...], Callable] = {}
        self._lock = threading.Lock()  # one build per shape, however many threads call at once

    def build(self, shape: tuple[int, ...]) -> Callable[[Any], Any]:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # the engine's sessions (and the lock) cannot be pickled: a copy builds its own
        return without_caches(self, _sessions={}, _lock=None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "_lock": threading.Lock()})

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse what the engine's model cannot take: another size than it was built for, images that are not
        float32, an input off the CPU."""
        again = "deploy again with an example of that size (`parnet quantize`: --resolution)"
        check_fixed_input(x, (self.in_chans, self.height, self.width), f"{self.engine} {self.precision} model", again)

    def session(self, shape: tuple[int, ...]) -> Callable[[Any], Any]:
        """The session that runs inputs of ``shape``: its own fixed-shape one, or past ``fixed_shapes`` the
        dynamic-batch one (each built on first use, then kept)."""
        with self._lock:
            run = self._sessions.get(shape)
            if run is None:
                fixed = sum(key[0] != DYNAMIC_BATCH for key in self._sessions)
                key = shape if fixed < self.fixed_shapes else (DYNAMIC_BATCH, *shape[1:])
                run = self._sessions.get(key) or self.build(key)
                self._sessions[key] = run
            return run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return torch.from_numpy(self.session(tuple(x.shape))(x.detach().contiguous().numpy()))


# -- ONNX Runtime ---------------------------------------------------------------------------------


class OnnxRuntimeModule(EngineModule):
    """ONNX Runtime's CPU provider on a fixed-shape copy of the model per input shape (or the dynamic-batch model)."""

    engine = "onnxruntime"

    def build(self, shape: tuple[int, ...]) -> Callable:
        import onnx
        import onnxruntime as ort
        from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

        model = onnx.load_from_string(self.model)
        if shape[0] != DYNAMIC_BATCH:  # else as exported: a dynamic batch
            make_input_shape_fixed(model.graph, "input", list(shape))
            fix_output_shapes(model)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda array: session.run(None, {"input": array})[0]


def onnxruntime_module(
    net: nn.Module,
    example: torch.Tensor,
    precision: str,
    calibration: list[torch.Tensor] | None,
    threads: int,
    method: str = "minmax",
) -> OnnxRuntimeModule:
    """ONNX Runtime's form of ``net`` (a folded ParNet); int8: static QDQ quantization on ``calibration``."""
    require("onnxruntime", precision)
    if precision == "bf16":
        raise ValueError(BF16_ORT)
    model_bytes = onnx_model_bytes(net, example)
    if precision == "int8":
        model_bytes = ort_quantize(model_bytes, calibration or [], method)
    _, c, h, w = example.shape
    return OnnxRuntimeModule(model_bytes, c, h, w, precision, threads).eval()


def ort_quantize(
    model_bytes: bytes, calibration: list[torch.Tensor], method: str = "minmax", reduce_range: bool | None = None
) -> bytes:
    """ONNX Runtime static quantization: QDQ, per-channel symmetric int8 weights, uint8 activations
    (what ORT recommends on x86), calibrated on ``calibration`` with ``method``.

    ``reduce_range``: 7-bit weights, as ONNX Runtime advises for its u8 x s8 kernels on x86 CPUs
    without an 8-bit dot product (AVX2, AVX-512 without VNNI), whose 16-bit pair sums saturate
    otherwise; ``None``: on such a CPU (:func:`parnet.precision.int8_pairs_saturate`).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in ORT_CALIBRATION:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {ORT_CALIBRATION}")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch.float().contiguous().numpy()}

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
                extra_options={"CalibMovingAverage": False},
                reduce_range=int8_pairs_saturate() if reduce_range is None else reduce_range,
            )  # fmt: skip
        return out.read_bytes()


def ort_max_weight_level(model_bytes: bytes) -> int:
    """The largest absolute int8 level among a quantized ONNX model's weights (127: 8-bit, 64: 7-bit)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model_bytes).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    return max((int(abs(w.astype("int16")).max()) for w in weights if w.ndim >= 2), default=0)  # not zero points


# -- OpenVINO -------------------------------------------------------------------------------------


class OpenVinoModule(EngineModule):
    """OpenVINO's CPU plugin: the model reshaped to each input shape and compiled for it.

    ``INFERENCE_PRECISION_HINT`` is set explicitly: on a CPU with native bf16 the plugin's default
    is bf16, so an fp32 request would otherwise silently run in bf16. For int8 it sets the precision
    of what stays unquantized between the int8 convolutions (ParNet's gates, gated multiplies, SiLU):
    bf16 where the CPU has it natively, as OpenVINO itself would (measured here: ParNet-S int8 at
    batch 32, 519 ms with f32 there, 452 ms with bf16; top-1 in RESULTS.md), f32 elsewhere.
    """

    engine = "openvino"

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "model": openvino_ir(self.model)}  # an openvino.Model cannot be pickled

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "model": read_openvino_ir(*state["model"])})

    def build(self, shape: tuple[int, ...]) -> Callable:
        import openvino as ov

        model = self.model.clone()
        model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
        config = {
            "INFERENCE_PRECISION_HINT": openvino_float_precision(self.precision),
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        compiled = openvino_core().compile_model(model, "CPU", config)
        output = compiled.outputs[0]
        # An infer request runs one call at a time: each concurrent caller takes an idle one (or a new one, as
        # OpenVINO advises, a request per concurrent caller) and returns it once its output is copied out.
        idle: queue.SimpleQueue = queue.SimpleQueue()

        def run(array: Any) -> Any:
            try:
                request = idle.get_nowait()
            except queue.Empty:
                request = compiled.create_infer_request()
            try:
                return request.infer({0: array})[output].copy()
            finally:
                idle.put(request)

        return run


@functools.cache
def openvino_core() -> Any:
    """The process's one ``openvino.Core``, which every OpenVINO model of parnet is read and compiled by.

    It is kept for the life of the process because of what OpenVINO's CPU plugin (2026.4) does with signal
    stacks: the plugin gives the thread that creates it a signal stack of its own, and unmaps that stack when it
    is destroyed, but it restores the thread's earlier stack only when it is destroyed on that same thread. A
    plugin destroyed on another thread, for example when the last compiled model is dropped there, leaves the
    creating thread with an unmapped signal stack. The next signal that thread handles (a SIGCHLD from any
    subprocess, once torch's DataLoader has installed its handler) then kills the process, or writes its frame
    into whatever memory is mapped there now. One Core made once is never destroyed while the process runs.
    """
    import openvino as ov

    return ov.Core()


def openvino_ir(model: Any) -> tuple[bytes, bytes]:
    """An ``openvino.Model`` as the bytes of its IR files (``.xml``, ``.bin``): what can be pickled of it."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.xml"
        ov.save_model(model, str(path), compress_to_fp16=False)
        return path.read_bytes(), path.with_suffix(".bin").read_bytes()


def read_openvino_ir(xml: bytes, weights: bytes) -> Any:
    """The ``openvino.Model`` of :func:`openvino_ir`'s bytes."""
    import numpy as np
    import openvino as ov

    return openvino_core().read_model(xml.decode(), ov.Tensor(np.frombuffer(weights, np.uint8)))


def openvino_float_precision(precision: str) -> str:
    """OpenVINO's ``INFERENCE_PRECISION_HINT`` for ``precision``: the floating point (see :class:`OpenVinoModule`)."""
    if precision == "bf16" or (precision == "int8" and has_native_bf16()):
        return "bf16"
    return "f32"


@contextlib.contextmanager
def quiet_nncf() -> Iterator[None]:
    """NNCF without its INFO lines and progress bars on stdout (a library call prints nothing), then as it was.

    Its logger's level (``nncf.set_log_level``) silences the lines; its progress bars (rich) have no switch and
    write to ``sys.stdout``, so that is redirected meanwhile, warnings and errors going to stderr as ever.
    """
    import nncf
    from nncf.common.logging.logger import nncf_logger

    levels = [nncf_logger.level, *(h.level for h in nncf_logger.handlers)]
    nncf.set_log_level(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(levels[0])
        for handler, level in zip(nncf_logger.handlers, levels[1:]):
            handler.setLevel(level)


def openvino_module(
    net: nn.Module,
    example: torch.Tensor,
    precision: str,
    calibration: list[torch.Tensor] | None,
    threads: int,
    unsigned_activations: bool = True,
) -> OpenVinoModule:
    """OpenVINO's form of ``net`` (a folded ParNet); int8: NNCF post-training quantization on ``calibration``.

    ``unsigned_activations``: int8 of a :class:`FoldedParNet` with its activations shifted to be
    non-negative (the default; ``False`` only to measure what that gains).
    """
    require("openvino", precision)
    import openvino as ov

    _, c, h, w = example.shape
    if precision == "int8" and unsigned_activations and isinstance(net, FoldedParNet):
        # non-negative activations: NNCF gives them unsigned int8, which the int8 convolutions take
        # directly (measured faster here; ONNX Runtime's asymmetric uint8 gains nothing: RESULTS.md)
        net = copy.deepcopy(net).shift_activations()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(net, example_input=example, input=[ov.PartialShape([-1, c, h, w])])
    if precision == "int8":
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        openvino_core()  # made before NNCF's own Core, so that this one's signal stack outlives NNCF's (see there)

        batches = list(calibration or [])
        dataset = nncf.Dataset(batches, lambda batch: batch.float().contiguous().numpy())
        # No bias correction: on 8 trained Fashion-MNIST models NNCF's (fast) bias correction changed 1.8x as
        # many test predictions (1,168 against 664 of 80,000) and cost a hard-swish ParNet 0.62 points of top-1
        # (0.25 without); RESULTS.md, issue 14's hard-swish section.
        with quiet_nncf():
            ov_model = nncf.quantize(
                ov_model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, target_device=nncf.TargetDevice.CPU,
                subset_size=len(batches),  # NNCF counts dataset items: batches, not images
                advanced_parameters=AdvancedQuantizationParameters(disable_bias_correction=True),
                # The linears (ParNet's gates, the classifier) in float: on 6 trained ParNets the worst top-1 loss
                # 0.31 -> 0.22 points (mean 0.16 -> 0.11; as many predictions changed) for 2% of ParNet-S's batch-1
                # time (RESULTS.md, issue 14's border-map section).
                ignored_scope=nncf.IgnoredScope(types=["MatMul"], validate=False),
            )  # fmt: skip
    return OpenVinoModule(ov_model, c, h, w, precision, threads).eval()


def engine_module(
    engine: str,
    net: nn.Module,
    example: torch.Tensor,
    precision: str,
    calibration: Iterable[torch.Tensor] | None,
    threads: int,
    method: str = "minmax",
) -> EngineModule:
    """``net`` (a folded ParNet, or any image classifier; eval, on the CPU) run by ``engine`` in ``precision``.

    ``method``: ONNX Runtime's calibration (:data:`ORT_CALIBRATION`); NNCF calibrates its own way.
    """
    batches = list(calibration) if calibration is not None else None
    if engine == "onnxruntime":
        return onnxruntime_module(net, example, precision, batches, threads, method)
    if engine == "openvino":
        return openvino_module(net, example, precision, batches, threads)
    raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
