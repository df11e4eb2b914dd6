"""Deployment modes: each gives the plain model's eval outputs (float32, 1e-4); bad requests refused."""

from __future__ import annotations

import copy
import gc
import io
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

import parnet
import parnet.deployment as deploy_module
from parnet.deployment import (
    CPU_MODES,
    PACKED_SHAPES,
    CudaGraphModule,
    CudaStreamParNet,
    FoldedBlock,
    FoldedParNet,
    MultiDeviceParNet,
    PackedConv2d,
    StreamParallelParNet,
    auto_mode,
    deploy,
    fold,
    kernels,
    nnpack_is_faster,
    pack_convs,
    shuffle_perm,
)
from parnet.deployment import engines as engines_module
from parnet.layers import channel_shuffle

from .conftest import TINY, randomize_bn
from .test_bench import FakeClock  # the timing tests' one fake clock

TOL = 1e-4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def make(seed: int = 0, name: str = "parnet_cifar_s", **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_bn(timm.create_model(name, **{**TINY, **kwargs}), seed).eval()
    with torch.no_grad():  # a trained-looking classifier: outputs of order 1
        model.head.fc.weight.normal_(0, 1.0)
    return model


VARIANTS = {
    "silu": {},
    "relu": dict(act="relu"),
    "hardswish": dict(act="hardswish"),
    "no_gate": dict(use_gate=False),
    "odd_halves": dict(widths=(6, 10, 14), head_width=20),  # C/2 odd: the shuffle has no aligned slices
    "two_streams": dict(widths=(8, 16), blocks=(2, 3)),
    "four_streams": dict(widths=(8, 8, 16, 16), blocks=(1, 2, 1, 2)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cpu_modes_match_plain_model(variant: str) -> None:
    model = make(1, **VARIANTS[variant])
    n = model.cfg.num_streams
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        ref = model(x)
        assert ref.abs().max() > 0.1  # a meaningful output, so a 1e-4 tolerance means something
        for mode in CPU_MODES:
            if mode == "compiled":
                continue  # slow; see test_compiled_mode_matches
            out = deploy(model, "cpu", mode, devices=["cpu"] * n if mode == "multi_device" else None)(x)
            assert out.shape == ref.shape
            assert (out - ref).abs().max().item() < TOL, (variant, mode)


def test_imagenet_form_and_other_resolution() -> None:
    model = make(2, name="parnet_s", widths=(8, 16, 32), head_width=32)
    with torch.inference_mode():
        for shape in [(1, 3, 64, 64), (2, 3, 96, 64)]:
            x = torch.randn(shape)
            ref = model(x)
            for mode in ("folded", "channels_last", "packed", "frozen", "parallel"):
                assert (deploy(model, "cpu", mode)(x) - ref).abs().max().item() < TOL


def test_deploy_leaves_the_model_alone_and_returns_eval() -> None:
    model = make(3)
    before = copy.deepcopy(model.state_dict())
    folded = deploy(model, "cpu", "channels_last")
    assert all(b.reparam_conv is None for b in model.modules() if isinstance(b, parnet.ParNetBlock))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    assert parnet.deploy is deploy


def test_folding_removes_bns_shuffles_and_interleaves() -> None:
    folded = fold(make(4))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    # the last fusion's shuffle went into the final block's input channels: a permuted weight
    fused = parnet.reparameterize(make(4))
    perm = shuffle_perm(fused.final_block.in_chs)
    w = fused.final_block.reparam_conv.weight
    assert torch.equal(folded.final_block.conv.weight[:, perm], w)


def test_border_correction_is_needed_and_exact() -> None:
    """The fusion BN shift folded into a zero-padded conv: without the border fix it is wrong."""
    model = make(5)
    with torch.no_grad():
        for fusion in model.fusions:
            fusion.norm_stream.bias.fill_(2.0)
            fusion.norm_fused.bias.fill_(-1.5)
    x = torch.randn(2, 3, 32, 32)
    folded = fold(model)
    with torch.inference_mode():
        ref = model(x)
        assert (folded(x) - ref).abs().max().item() < TOL
        for fusion in folded.fusions:
            fusion.block.has_border = False
        assert (folded(x) - ref).abs().max().item() > 1e-3


def test_channel_shuffle_perm() -> None:
    y = torch.randn(2, 12, 3, 3)
    assert torch.equal(channel_shuffle(y, 2), y[:, shuffle_perm(12)])


def test_parallel_restores_threads_and_runs_streams_forked() -> None:
    model = make(6)
    torch.set_num_threads(2)  # the fixture restores it
    par = deploy(model, "cpu", "parallel")
    assert par.per_stream == 1  # 2 threads, 3 streams: one each
    assert "fork" in par.core.code  # the streams really go through torch.jit.fork
    before = torch.get_num_threads()
    with torch.inference_mode():
        par(torch.randn(1, 3, 32, 32))
    assert torch.get_num_threads() == before


def test_multi_device_on_one_device() -> None:
    model = make(7)
    x = torch.randn(2, 3, 32, 32)
    md = deploy(model, "cpu", "multi_device", devices=["cpu", "cpu", "cpu"])
    with torch.inference_mode():
        assert (md(x) - model(x)).abs().max().item() < TOL


def test_bad_requests_are_refused() -> None:
    model = make(8)
    with pytest.raises(ValueError, match="unknown deploy mode"):
        deploy(model, "cpu", "warp_speed")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        deploy(model, "cpu", "cuda_graph")
    with pytest.raises(ValueError, match="one device per stream"):
        deploy(model, "cpu", "multi_device", devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="needs devices"):
        deploy(model, "cpu", "multi_device")
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match="CUDA"):
        deploy(model, "cpu", "multi_device", devices=["cpu", "cpu", f"cuda:{n + 3}"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            deploy(model, "cuda", "parallel")
    with pytest.raises(ValueError, match="takes a ParNet"):
        deploy(nn.Linear(2, 2), "cpu", "folded")
    folded = deploy(model, "cpu", "parallel")
    with pytest.raises(ValueError, match="multiples of 8"):
        folded(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="built for 3 input channels"):
        folded(torch.randn(1, 4, 32, 32))


def test_a_wrapped_parnet_deploys_the_parnet_inside() -> None:
    """torch.compile's and timm's EMA wrappers are unwrapped (nothing is compiled); a wrapped non-ParNet is
    refused by its own name."""
    from timm.utils import ModelEmaV3

    model = make(9)
    x = torch.randn(2, 3, 32, 32)
    for wrapped in (torch.compile(model), ModelEmaV3(model)):
        with torch.inference_mode():
            assert (deploy(wrapped, "cpu", "folded")(x) - model(x)).abs().max().item() < TOL
    with pytest.raises(ValueError, match="takes a ParNet, got Linear"):
        deploy(torch.compile(nn.Linear(2, 2)), "cpu", "folded")


def test_packed_mode_keeps_a_few_input_shapes() -> None:
    model = make(14)
    net = deploy(model, "cpu", "packed")
    with torch.inference_mode():
        for batch in (1, 2, 3, 4, 1, 5, 3):
            x = torch.randn(batch, 3, 32, 32)
            assert (net(x) - model(x)).abs().max().item() < TOL
    caches = [m.packed.packed_weights for m in net.modules() if isinstance(m, FoldedBlock)]
    assert caches and all(len(c) == PACKED_SHAPES for c in caches)
    # the least recently used shape (batch 2) was forgotten, not the first one seen (batch 1)
    assert all([key[0] for key in c] == [4, 1, 5, 3] for c in caches)


def test_a_shape_cache_builds_each_entry_once_for_threads_asking_together() -> None:
    """Threads calling one deployed model at once: a second caller of a shape being built waits for that build
    (it neither builds it again nor evicts it); a copy starts empty."""
    import pickle
    import threading

    from parnet.deployment.kernels import ShapeCache

    cache, started, release, builds = ShapeCache(limit=2), threading.Event(), threading.Event(), []

    def slow_build() -> str:
        builds.append("slow")
        started.set()
        release.wait(10)
        return "packed"

    got: list[str] = []
    first = threading.Thread(target=lambda: got.append(cache.get((1, 3), slow_build)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: got.append(cache.get((1, 3), lambda: builds.append("again") or "x")))
    second.start()
    second.join(0.2)
    assert second.is_alive()  # waiting for the first build, not building its own
    release.set()
    first.join(10), second.join(10)
    assert got == ["packed", "packed"] and builds == ["slow"]
    for shape in ((2, 3), (3, 3)):
        cache.get(shape, lambda: "other")
    assert list(cache) == [(2, 3), (3, 3)] and cache.values() == ["other", "other"]  # the oldest dropped
    assert len(pickle.loads(pickle.dumps(cache))) == 0 and len(copy.deepcopy(cache)) == 0 and len(cache) == 2


def test_packed_model_called_from_threads_at_once_matches() -> None:
    """More shapes than a block keeps, from four threads at once: every output the plain model's."""
    from concurrent.futures import ThreadPoolExecutor

    model = make(16)
    net = deploy(model, "cpu", "packed")
    inputs = [torch.randn(batch, 3, 32, 32) for batch in (1, 2, 3, 4, 5, 6) * 3]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return net(x)

        with ThreadPoolExecutor(4) as pool:
            outputs = list(pool.map(run, inputs))
    assert all((out - ref).abs().max().item() < TOL for out, ref in zip(outputs, expected, strict=True))


NNPACK = pytest.mark.skipif(not torch.backends.nnpack.is_available(), reason="PyTorch without NNPACK here")


@NNPACK
@pytest.mark.parametrize("nnpack", [True, False])
def test_winograd_mode_matches_whichever_backend_wins(monkeypatch: pytest.MonkeyPatch, nnpack: bool) -> None:
    # The choice is timed, so each outcome is forced in turn; both must give the plain outputs.
    monkeypatch.setattr(kernels, "_time_pair", make_timer(nnpack_fast=nnpack))
    model = make(15, **VARIANTS["odd_halves"])
    net = deploy(model, "cpu", "winograd")
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert (net(x) - model(x)).abs().max().item() < TOL
    choices = [c for m in net.modules() if isinstance(m, PackedConv2d) and m.use_nnpack for c in m.use_nnpack.values()]
    assert choices and set(choices) == {nnpack}  # every stride-1 conv was timed, and followed the timing
    stride_2 = [m for m in net.modules() if isinstance(m, PackedConv2d) and m.conv.stride != (1, 1)]
    assert stride_2 and all(m.use_nnpack is None for m in stride_2)  # NNPACK has no strided convolution


def make_timer(nnpack_fast: bool):
    """A stand-in for nnpack_is_faster's timer (NNPACK's call first): NNPACK faster, or slower."""
    return lambda nnpack, onednn: (1.0, 2.0) if nnpack_fast else (2.0, 1.0)


@NNPACK
def test_nnpack_is_refused_when_it_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 16, 16)
    monkeypatch.setattr(kernels, "_time_pair", make_timer(nnpack_fast=True))
    assert nnpack_is_faster(x, conv.weight, conv.bias, conv.padding, conv)
    assert not nnpack_is_faster(x, conv.weight, conv.bias, conv.padding, lambda t: conv(t) + 1.0)  # wrong: refused


@NNPACK
@pytest.mark.parametrize("winograd", [True, False])
def test_pack_convs_on_a_baseline(monkeypatch: pytest.MonkeyPatch, winograd: bool) -> None:
    from torch.fx.experimental.optimization import fuse

    monkeypatch.setattr(kernels, "_time_pair", make_timer(nnpack_fast=True))
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("resnet18", num_classes=10), 0).eval()
    packed = pack_convs(fuse(copy.deepcopy(model)), winograd=winograd)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        out = packed(x.contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max().item() < TOL * ref.abs().max().item()
    convs = [m for m in packed.modules() if isinstance(m, PackedConv2d)]
    assert len(convs) == 20 and all(m.packed_weights for m in convs)
    assert any(m.use_nnpack for m in convs) == winograd


def test_auto_mode_choice() -> None:
    assert auto_mode("cuda") == "cuda_graph"
    assert auto_mode("cpu") == ("packed" if torch.backends.mkldnn.is_available() else "channels_last")
    model = make(13)
    x = torch.randn(2, 3, 32, 32)
    net = deploy(model, "cpu", "auto", example=x, candidates=("folded", "parallel"))
    assert isinstance(net, (FoldedParNet, StreamParallelParNet))
    assert net.auto_choice == ("folded" if isinstance(net, FoldedParNet) else "parallel")  # said, for reports
    assert deploy(model, "cpu", "auto").auto_choice == auto_mode("cpu")  # without an example: the rule's
    with torch.inference_mode():
        assert (net(x) - model(x)).abs().max().item() < TOL


def test_auto_candidates_take_what_the_rule_takes_and_build_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto's default candidates are never compiled (minutes to build); they are the torch modes that build in
    seconds and every usable engine (issue 14: auto considers every installed engine); int8 the engines."""
    import torch.utils._triton as triton_check

    monkeypatch.setattr(triton_check, "has_triton", lambda: True)
    assert deploy_module.auto_candidates(torch.device("cuda")) == ("channels_last", "parallel", "cuda_graph")
    monkeypatch.setattr(deploy_module, "has_cpp_compiler", lambda: True)
    engines = tuple(e for e in ("onnxruntime", "openvino") if engines_module.usable(e, "fp32"))
    cpu_modes = ("channels_last", "packed", "winograd", "parallel", *engines)
    assert deploy_module.auto_candidates(torch.device("cpu")) == cpu_modes
    bf16_engines = ("openvino",) if engines_module.usable("openvino", "bf16") else ()
    assert deploy_module.auto_candidates(torch.device("cpu"), "bf16") == ("channels_last", "packed", *bf16_engines)
    engines = tuple(e for e in ("openvino", "onnxruntime") if engines_module.usable(e, "int8"))
    assert deploy_module.auto_candidates(torch.device("cpu"), "int8") == engines
    # only what can run here: OpenVINO's int8 needs NNCF, winograd NNPACK
    real_require = engines_module.require

    def without_nncf(engine: str, precision: str = "fp32") -> None:
        if engine == "openvino" and precision == "int8":
            raise ValueError("int8 with OpenVINO needs NNCF, which is not installed: pip install nncf")
        real_require(engine, precision)

    monkeypatch.setattr(engines_module, "require", without_nncf)
    assert "openvino" not in deploy_module.auto_candidates(torch.device("cpu"), "int8")
    if engines_module.installed("onnxruntime"):
        assert deploy_module.auto_mode("cpu", "int8") == "onnxruntime"
    monkeypatch.undo()
    monkeypatch.setattr(torch.backends.nnpack, "is_available", lambda: False)
    assert "winograd" not in deploy_module.auto_candidates(torch.device("cpu"))


def test_auto_says_what_its_choice_takes(caplog: pytest.LogCaptureFixture) -> None:
    """Timed on an example, auto may choose an engine, built for the example's image size: its log line says so."""
    model = make(14)
    for candidates, takes in (
        (["packed", "channels_last"], "any image size"),
        (["onnxruntime"], "inputs (N, 3, 32, 32) only"),
    ):
        caplog.clear()
        with caplog.at_level("INFO", logger="parnet.deployment"):
            net = deploy(model, "cpu", "auto", example=torch.randn(1, 3, 32, 32), candidates=candidates)
        assert f"deploy mode 'auto' chose {net.auto_choice!r}, timed on (1, 3, 32, 32): it takes {takes}" in caplog.text
    x = torch.randn(2, 3, 64, 64)  # another size than the example's: the engine refuses it, saying why
    with pytest.raises(ValueError, match=r"built for inputs \(N, 3, 32, 32\)"):
        net(x)


def test_deploy_says_what_to_do_with_another_model_or_a_deployed_one() -> None:
    with pytest.raises(ValueError, match=r"got ResNet\. For another image classifier: parnet\.deployed\.build") as e:
        deploy(timm.create_model("resnet10t", num_classes=10), "cpu", "packed")
    assert "pack_convs(model)" in str(e.value) and "changes the model in place and folds no BN" in str(e.value)
    folded = deploy(make(15), "cpu", "folded")
    for deployed in (folded, deploy(make(15), "cpu", "frozen")):
        with pytest.raises(ValueError, match=r"this (FoldedParNet|RecursiveScriptModule) is deployed \(or scripted\)"):
            deploy(deployed, "cpu", "packed")


@pytest.mark.slow
def test_compiled_mode_matches() -> None:
    model = make(9)
    x = torch.randn(2, 3, 32, 32)
    compiled = deploy(model, "cpu", "compiled")
    with torch.inference_mode():
        ref = model(x)
        assert (compiled(x) - ref).abs().max().item() < TOL
        x3 = torch.randn(3, 3, 32, 32)  # a new shape recompiles, never a wrong answer
        assert (compiled(x3) - model(x3)).abs().max().item() < TOL


def test_multi_device_keeps_no_folded_copy_and_blocks_copies_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make(7)
    folded = fold(model, channels_last=True)
    alive = weakref.ref(folded)
    md = MultiDeviceParNet(folded, ["cpu"] * 3).eval()
    del folded
    gc.collect()
    assert alive() is None  # it holds its own copies only, not the folded model they came from
    flags, to = [], torch.Tensor.to

    def spy(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        flags.append(kwargs.get("non_blocking", False))
        return to(self, *args, **kwargs)

    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    with torch.inference_mode():
        out = md(x)
    monkeypatch.undo()
    # a non_blocking copy to the CPU (from a GPU) returns before its data is there: never to the CPU
    assert flags and not any(flags)
    with torch.inference_mode():
        assert (out - model(x)).abs().max().item() < TOL
    with pytest.raises(ValueError, match="multiples of 8"):
        md(torch.randn(1, 3, 36, 36))


def test_auto_timing_synchronizes_the_example_device(monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    example = SimpleNamespace(device=torch.device("cuda", 1))  # only its device is looked at
    assert deploy_module.fastest({"a": lambda x: None, "b": lambda x: None}, example, reps=2) in ("a", "b")
    assert synced and all(d == torch.device("cuda", 1) for d in synced)  # not the current device


def test_cuda_graph_bookkeeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaGraphModule's graphs per input, copies and grad modes, with the capture replaced by a CPU stand-in."""

    def capture(self: CudaGraphModule, static_x: torch.Tensor) -> tuple:
        with torch.inference_mode():
            static_y = self.module(static_x)

        def replay() -> None:  # the captured forward again, static input to static output; like a real
            with torch.inference_mode():  # replay, it runs outside autograd whatever the caller's mode
                static_y.copy_(self.module(static_x))

        return SimpleNamespace(replay=replay), static_y

    monkeypatch.setattr(CudaGraphModule, "_capture", capture)
    torch.manual_seed(0)
    net = CudaGraphModule(nn.Linear(4, 3), max_graphs=2)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with torch.inference_mode():
        out_a = net._replay(a)  # the first call in inference mode: its static input is an inference tensor
    with torch.no_grad():
        out_b = net._replay(b)  # the same graph, called outside inference mode
        assert torch.allclose(out_a, net.module(a)) and torch.allclose(out_b, net.module(b))  # out_a kept
        for batch in (5, 6, 5, 2):
            x = torch.randn(batch, 4)
            assert torch.allclose(net._replay(x), net.module(x))  # each shape its own graph
    assert [k[0] for k in net._graphs] == [(5, 4), (2, 4)]  # at most max_graphs, the least recently used dropped
    net.double()
    assert not net._graphs  # the graphs read the float weights' old memory
    with pytest.raises(ValueError, match="CUDA input"):
        net(torch.randn(2, 4))
    with pytest.raises(ValueError, match="warmup >= 1"):
        CudaGraphModule(nn.Identity(), warmup=0)


# cuDNN convolutions use TF32 by default (about 1e-3 relative error on Hopper, seen at 2.2e-4 absolute
# here); the modes are compared in full fp32, as on the CPU.
@CUDA
def test_cuda_modes_match_and_graph_recaptures() -> None:
    model = make(10).cuda()
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for mode in ("folded", "channels_last", "parallel", "cuda_graph"):
            net = deploy(model, "cuda", mode)
            for batch in (1, 2, 1):  # a new shape gets its own graph; the old one is reused
                x = torch.randn(batch, 3, 32, 32, device="cuda")
                assert (net(x) - model(x)).abs().max().item() < TOL, mode
        graph = deploy(model, "cuda", "cuda_graph")
        graph(torch.randn(2, 3, 32, 32, device="cuda"))
        graph(torch.randn(4, 3, 32, 32, device="cuda"))
        assert len(graph._graphs) == 2
        with pytest.raises(ValueError, match="CUDA input"):
            graph(torch.randn(2, 3, 32, 32))


@CUDA
def test_multi_device_cuda() -> None:
    model = make(11)
    devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(3)]
    md = deploy(model, "cuda", "multi_device", devices=devices)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert (md(x.cuda()).cpu() - model(x)).abs().max().item() < TOL


def test_folded_is_a_plain_module() -> None:
    assert isinstance(fold(make(12)), FoldedParNet)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shifted_activations_are_non_negative_and_exact(variant: str) -> None:
    """`shift_activations` makes every block's output but the last non-negative (the int8 engines' input
    form) and compensates in the consumers exactly: conv bias and zero-padded border, gate, skip term."""
    model = make(16, **VARIANTS[variant])
    shifted = fold(model).shift_activations()
    outputs = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: outputs.append(o))
        for b in shifted.modules()
        if isinstance(b, FoldedBlock)
    ]
    x = torch.randn(2, 3, 48, 32)  # not square; every stride-2 border case
    with torch.inference_mode():
        ref = model(x)
        assert (shifted(x) - ref).abs().max().item() < TOL
        for h in hooks:
            h.remove()
        assert (shifted.pack()(x) - ref).abs().max().item() < TOL  # the in-place packed form too
    if model.cfg.act == "relu":
        return
    assert all(o.min() >= 0 for o in outputs[:-1]) and outputs[-1].min() < 0  # the last block's output: as it was
    assert sum(1 for b in shifted.modules() if isinstance(b, FoldedBlock) and b.out_shift > 0) == len(outputs) - 1


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded: the machine is shared, and 2-thread OpenMP barriers stall under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@CUDA
def test_cuda_bf16_modes_are_close() -> None:
    model = make(16).cuda()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        ref = model(x)
        for mode in ("channels_last", "parallel", "cuda_graph"):
            out = deploy(model, "cuda", mode, "bf16")(x)
            assert out.dtype == torch.float32
            assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item(), mode


def test_auto_timing_picks_the_lowest_median_and_settles_between_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from parnet.deployment.timing import SETTLE_S, fastest

    clock = FakeClock.install(monkeypatch)  # the calls take the times they say, however loaded the machine
    # the fast entry's one slow call (a hiccup) does not move its median, as it would the mean
    durations = {"slow": iter([0.02] * 4), "fast": iter([0.002, 0.1, 0.002, 0.002])}
    entries = {name: lambda x, name=name: clock.work(next(durations[name])) for name in durations}
    assert fastest(entries, torch.zeros(1), reps=3) == "fast"
    timed = clock.events[2:]  # after one warm-up call each
    assert timed[::2] == [("sleep", SETTLE_S)] * 6 and [kind for kind, _ in timed[1::2]] == ["work"] * 6


def test_onnx_export_falls_back_to_the_dynamo_exporter_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TorchScript-based exporter's error is not lost: a warning names it, then the dynamo exporter's bytes."""

    class Program:
        def save(self, path: str) -> None:
            Path(path).write_bytes(b"dynamo's model")

    def export(*args, dynamo: bool = False, **kwargs):
        if not dynamo:
            raise RuntimeError("Unsupported: ONNX export of operator foo")
        return Program()

    monkeypatch.setattr(torch.onnx, "export", export)
    said = r"TorchScript-based ONNX exporter failed \(RuntimeError: Unsupported: ONNX export of operator foo\)"
    with pytest.warns(UserWarning, match=said):
        assert engines_module.onnx_model_bytes(nn.Identity(), torch.zeros(1, 3, 8, 8)) == b"dynamo's model"


def test_packed_conv_drops_its_packed_weights_when_moved() -> None:
    """`.to(...)` (a dtype, a device, or weights loaded and moved) makes the packed copies stale: they go."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    packed, x = PackedConv2d(conv), torch.randn(1, 8, 16, 16)
    torch.testing.assert_close(packed(x), conv(x))
    assert packed.packed_weights
    with torch.no_grad():
        conv.weight.mul_(2.0)
    packed.to(torch.float32)
    assert not packed.packed_weights
    torch.testing.assert_close(packed(x), conv(x))


def _round_trips(net: nn.Module) -> list[nn.Module]:
    """``net`` deep-copied, pickled and read back, and ``torch.save``'d and loaded."""
    import io
    import pickle

    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    return [copy.deepcopy(net), pickle.loads(pickle.dumps(net)), torch.load(buffer, weights_only=False)]


@pytest.mark.parametrize("mode", ["packed", "winograd", "parallel"])
def test_cpu_modes_can_be_copied_pickled_and_saved_after_a_call(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """oneDNN's packed weights (opaque tensors) and the parallel mode's TorchScript cannot be pickled: they are
    left out of the copies, which build them again on their first call; the original keeps its own."""
    if mode == "winograd" and not torch.backends.nnpack.is_available():
        pytest.skip("PyTorch without NNPACK here")
    monkeypatch.setattr(kernels, "_time_pair", make_timer(nnpack_fast=True))
    model, x = make(17), torch.randn(2, 3, 32, 32)
    net = deploy(model, "cpu", mode)
    with torch.inference_mode():
        ref = net(x)
        packed = [m for m in net.modules() if isinstance(m, PackedConv2d)]
        assert all(m.packed_weights for m in packed)
        for copied in _round_trips(net):
            assert not any(m.packed_weights for m in copied.modules() if isinstance(m, PackedConv2d))
            torch.testing.assert_close(copied(x), ref)
            if mode == "parallel":
                assert "fork" in copied.core.code  # scripted again
        assert all(m.packed_weights for m in packed)  # the original's caches are its own


def test_cuda_executors_pickle_without_their_streams_and_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA streams and graphs cannot be pickled: a copy makes its own (stand-ins: CPU closures, not picklable)."""
    import pickle

    monkeypatch.setattr(CudaGraphModule, "_capture", lambda self, x: (SimpleNamespace(replay=lambda: None), x * 2))
    graph = CudaGraphModule(nn.Identity())
    graph._replay(torch.randn(2, 4))
    assert graph._graphs and not pickle.loads(pickle.dumps(graph))._graphs
    streams = CudaStreamParNet(fold(make(18)))
    streams._streams = [lambda: None]
    assert pickle.loads(pickle.dumps(streams))._streams is None and streams._streams


REFUSED = (ValueError, torch.jit.Error)  # TorchScript (frozen) raises the ValueError as its own error


@pytest.mark.parametrize("mode", ["folded", "channels_last", "packed", "frozen", "parallel", "multi_device"])
def test_every_mode_refuses_integer_and_other_float_images(mode: str) -> None:
    """As the plain model: uint8 pixels are not images yet, and a float32 model's convs refuse float64 (packed and
    frozen failed obscurely there, frozen crashed on bf16): the same message from every mode, TorchScript's too."""
    net = deploy(make(19), "cpu", mode, devices=["cpu"] * 3 if mode == "multi_device" else None)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        with pytest.raises(REFUSED, match=r"expected floating-point images, got torch.uint8: convert them"):
            net((x * 255).to(torch.uint8))
        for dtype in (torch.float64, torch.bfloat16):
            with pytest.raises(REFUSED, match=rf"expected torch.float32 images, the model's type, got {dtype}"):
                net(x.to(dtype))


@pytest.mark.parametrize("mode", ["fused", "channels_last", "packed", "parallel", "frozen"])
@pytest.mark.parametrize("built_in_inference_mode", [True, False])
def test_torch_modes_record_no_autograd_graph_wherever_built(mode: str, built_in_inference_mode: bool) -> None:
    """Without gradients, as every mode: built under inference_mode, their weights are never saved for backward
    when called outside it on an input that requires grad; built outside it, they record no graph either."""
    model, x = make(20), torch.randn(2, 3, 32, 32)
    with torch.inference_mode(built_in_inference_mode):
        net = deploy(model, "cpu", mode)
    assert not any(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        ref = model(x)
    out = net(x.clone().requires_grad_())
    assert not out.requires_grad
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)
    if mode == "frozen":  # still a TorchScript module, as it was (its saved file does not load: torch's, noted)
        assert isinstance(net, torch.jit.ScriptModule) and "no_grad" in net.code
        torch.jit.save(net, io.BytesIO())


@pytest.mark.parametrize("mode", ["folded", "packed", "parallel"])
def test_an_input_on_the_meta_device_is_a_clear_error(mode: str) -> None:
    net = deploy(make(21), "cpu", mode)
    with pytest.raises(ValueError, match="meta device, which has shapes but no values"):
        net(torch.empty(1, 3, 32, 32, device="meta"))


def test_arguments_a_mode_would_ignore_are_refused() -> None:
    """The modes on torch's threads (one here: the fixture's) take threads=1, which they honour, not threads=2."""
    model, x = make(21), torch.randn(1, 3, 32, 32)
    for mode in ("packed", "frozen", "auto"):  # auto without an example: packed
        with pytest.raises(ValueError, match=r"runs on torch's \(1 now\): call torch.set_num_threads\(2\) instead"):
            deploy(model, "cpu", mode, threads=2)
        deploy(model, "cpu", mode, threads=1)
    with pytest.raises(ValueError, match=r"; 'auto' \(which builds folded, packed here\) on cpu runs on torch's"):
        deploy(model, "cpu", "auto", example=x, candidates=["folded", "packed"], threads=2)
    with pytest.raises(ValueError, match="candidates= is empty: give the modes 'auto' should time"):
        deploy(model, "cpu", "auto", example=x, candidates=[])
    with pytest.raises(ValueError, match=r"devices= is for mode 'multi_device', not 'auto' \(which builds folded"):
        deploy(model, "cpu", "auto", example=x, candidates=["folded"], devices=["cpu"] * 3)
    # where one candidate takes threads, auto takes them and gives them to that one only
    net = deploy(model, "cpu", "auto", example=x, candidates=["folded", "parallel"], threads=2)
    assert getattr(net, "threads", 2) == 2
    assert deploy(model, "cpu", "parallel", threads=2).threads == 2
