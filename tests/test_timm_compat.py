"""ParNet passes what timm checks on its own families, for every variant: TorchScript, FX, torch.compile,
torch.export, forward/backward, the default config, gradient checkpointing, features; and the model core
has no import cycle.

Where a property does not depend on the size, the variants run small (``TINY``: narrow, fewer blocks);
their structure (form, activation, dropout, streams) is the variant's. The real configurations run on the
meta device (shapes only) or in tests marked slow.
"""

import ast
import importlib.util
import io
import math
from pathlib import Path

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import parnet
from parnet.export import export_program
from parnet.official import OFFICIAL_DROP_RATES, load_official, official_drop_rate

from .conftest import FIXTURES, randomize_bn

# timm models are expected to script (timm's own tests script them), so these tests use TorchScript on
# purpose: torch's deprecation of it is not news to these tests.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")

VARIANTS = sorted(parnet.model_cfgs)
TINY = dict(widths=(8, 16, 32), head_width=64, blocks=(1, 2, 2))
SRC = Path(parnet.__file__).parent


def tiny(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **TINY, **kwargs)


def batch(model: torch.nn.Module, steps: tuple[int, int] = (2, 2), n: int = 2) -> torch.Tensor:
    """A batch whose height and width are ``steps`` times the model's input multiple."""
    m = model.input_multiple
    return torch.randn(n, model.in_chans, steps[0] * m, steps[1] * m, generator=torch.Generator().manual_seed(0))


# -- TorchScript ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_scripts_trained_and_fused_with_eager_outputs(name, fast_torchscript):
    model = tiny(name).eval()
    randomize_bn(model)
    x = batch(model, (2, 3))
    for net in (model, parnet.reparameterize(model)):
        scripted = torch.jit.script(net)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)  # nothing in it is left to Python
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            expected = net(x)
            torch.testing.assert_close(scripted(x), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(torch.jit.Error, match="multiples of"):  # the scripted model checks its input too
        loaded(x[..., 1:])


# -- FX ------------------------------------------------------------------------------------------

TRACER_KWARGS = dict(
    leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
)


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.fx.GraphModule:
    """timm's tests' ``_create_fx_model``: torchvision's feature extractor returning the output node."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=TRACER_KWARGS)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**TRACER_KWARGS).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return create_feature_extractor(
        model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=TRACER_KWARGS
    )


@pytest.mark.parametrize("name", VARIANTS)
def test_fx_forward_and_backward_equal_eager(name):
    model = tiny(name, num_classes=42).eval()
    randomize_bn(model)
    x = batch(model)
    with torch.inference_mode():
        expected = model(x)
        traced = fx_model(model)
        assert torch.equal(next(iter(traced(x).values())), expected)  # timm asks for equality
        with pytest.raises(ValueError, match="multiples of"):  # the graph still checks its input
            traced(x[..., 1:])

    model.train()
    traced = fx_model(model, train=True)
    grads = []
    for net in (model, traced):
        net.zero_grad()
        torch.manual_seed(0)  # the same dropout mask for L and XL
        out = net(x)
        out = next(iter(out.values())) if isinstance(out, dict) else out
        assert out.shape == (2, 42) and not out.isnan().any()
        out.mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert all(g is not None for g in grads[1].values()), "a parameter got no gradient through FX"
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=1e-4, msg=key)


@pytest.mark.parametrize("name", ["parnet_s", "parnet_cifar_s"])
def test_fx_graph_scripts(name, fast_torchscript):
    """timm's test_model_forward_fx_torchscript: the traced graph scripts (each form once: it is slow)."""
    model = tiny(name).eval()
    x = batch(model)
    with torch.inference_mode():
        scripted = torch.jit.script(fx_model(model))
        torch.testing.assert_close(next(iter(scripted(x).values())), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["parnet_s", "parnet_cifar_s"])
def test_timm_fx_features_and_torchvision_feature_extractor(name, fast_torchscript):
    getter = tiny(name, features_only=True).eval()
    fx = tiny(name, features_only=True, feature_cls="fx").eval()
    fx.graph_module.load_state_dict(getter.model.state_dict())
    assert fx.feature_info.channels() == getter.feature_info.channels()
    x = batch(getter.model)
    with torch.no_grad():
        expected = getter(x)
        for out in (fx(x), torch.jit.script(fx)(x)):  # timm's test_model_forward_torchscript_with_features_fx
            assert len(out) == len(expected) >= 3
            for a, b in zip(out, expected):
                torch.testing.assert_close(a, b)

    # torchvision's extractor as a user calls it, without timm's tracer arguments; the graph still checks the input.
    model = tiny(name).eval()
    extractor = create_feature_extractor(model, return_nodes={"streams.0": "high", "final_block": "last"})
    with torch.no_grad():
        feats = extractor(x)
        torch.testing.assert_close(feats["last"], model.forward_features(x))
        assert feats["high"].shape[1] == 8
    with pytest.raises(ValueError, match="multiples of"):
        extractor(x[..., 1:])
    with pytest.raises(ValueError, match="in_chans=1"):
        torch.fx.symbolic_trace(model)(x[:, :1])
    with pytest.raises(ValueError, match="in_chans=1"):
        fx(x[:, :1])


@pytest.mark.parametrize("out_indices", [None, (1, 2)])
def test_features_only_backbone_scripts_with_eager_outputs(out_indices, fast_torchscript):
    """timm's default ``features_only`` wrapper (the getter) scripts, whole and pruned, as ConvNeXt's does."""
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    backbone = tiny("parnet_cifar_s", features_only=True, **kwargs).eval()
    scripted = torch.jit.script(backbone)
    x = batch(backbone.model)
    with torch.no_grad():
        expected, out = backbone(x), scripted(x)
    assert len(out) == len(expected) == (len(out_indices) if out_indices else 4)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    with pytest.raises(torch.jit.Error, match="multiples of"):
        scripted(x[..., 1:])
    if out_indices is not None:  # a feature whose blocks were pruned away is refused, not computed from nothing
        with pytest.raises(ValueError, match="prune_intermediate_layers removed"):
            backbone.model.forward_intermediates(x, indices=[0])
        with pytest.raises(torch.jit.Error, match="prune_intermediate_layers removed"):
            scripted.model.forward_intermediates(x, indices=[0])


def test_eager_mode_keeps_its_clear_value_errors():
    model = tiny("parnet_s")
    for bad, message in ((torch.randn(3, 64, 64), "4-D batch"), (torch.randn(1, 3, 48, 64), "e.g. to 64x64")):
        with pytest.raises(ValueError, match=message):
            model(bad)


# -- torch.compile and torch.export --------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """Dynamo remembers the shapes each code object saw, across compiles: a later compile of the same forward
    with another input size would make height and width dynamic. Leave no such state to other tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("fused", [False, True], ids=["trained", "fused"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_has_no_graph_break(fused, train, fresh_dynamo):
    """fullgraph=True raises at the first graph break; the eager backend captures without generating code."""
    model = tiny("parnet_cifar_s", drop_rate=0.1).eval()
    randomize_bn(model)
    if fused:
        model = parnet.reparameterize(model)
    model.train(train)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = batch(model)
    torch.manual_seed(0)
    out = compiled(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("name", ["parnet_s", "parnet_cifar_s"])
@pytest.mark.parametrize("folded", [False, True], ids=["fused", "folded"])
def test_export_of_fused_model_has_dynamic_batch_height_and_width(name, folded, fresh_dynamo):
    """The fused model, and the folded one `parnet export` writes (its border corrections once fixed the size)."""
    model = tiny(name).eval()
    randomize_bn(model)
    fused = parnet.reparameterize(model)
    m = fused.input_multiple
    net = parnet.deploy(model, "cpu", "folded") if folded else fused
    program = export_program(net, batch(fused, (3, 2)), m)
    run = program.module()
    with torch.no_grad():
        for n, steps in ((1, (2, 2)), (3, (4, 3)), (5, (2, 6))):
            x = batch(fused, steps, n)
            torch.testing.assert_close(run(x), fused(x), atol=1e-5, rtol=1e-5)
        with pytest.raises(AssertionError, match=rf"Guard failed: .*% {m} == 0"):  # not a multiple: refused
            run(torch.randn(1, 3, 2 * m + 2, 2 * m))


# -- what timm's tests check on its families -----------------------------------------------------


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = tiny(name, num_classes=42).train()
    params = sum(p.numel() for p in model.parameters())
    default = tuple(s // model.input_multiple for s in model.pretrained_cfg["input_size"][1:])
    for steps in (default, (2, 2), (3, 5)):  # the default size, the smallest, a non-square one
        model.zero_grad(set_to_none=True)
        out = model(batch(model, steps))
        out.mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing}"
        assert sum(p.grad.numel() for p in model.parameters()) == params
        assert out.shape == (2, 42) and not out.isnan().any()


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_real_variants_run_at_the_smallest_size(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(batch(model, n=1))
    assert out.shape == (1, model.num_classes) and not out.isnan().any()


@pytest.mark.parametrize("name", VARIANTS)
def test_default_cfg_is_consistent(name):
    """timm's test_model_default_cfgs, on the real configuration at its full input size (meta device: shapes only)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        cfg = model.pretrained_cfg
        assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
        assert model.num_features == model.head_hidden_size == parnet.model_cfgs[name].head_width
        x = torch.empty(1, *cfg["input_size"])
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert features.shape[1:] == (model.num_features, *cfg["pool_size"])
        assert pre_logits.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre_logits.shape
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
        headless = timm.create_model(name, num_classes=0, global_pool="").eval()
        assert headless(x).shape == features.shape
    state = timm.create_model(name, **TINY).state_dict()  # the names do not depend on the size
    for key in (cfg["classifier"],) if isinstance(cfg["classifier"], str) else cfg["classifier"]:
        assert key + ".weight" in state
    for key in cfg["first_conv"]:
        assert key + ".weight" in state


@pytest.mark.parametrize("name", VARIANTS)
def test_gradient_checkpointing_gives_the_same_output(name):
    model = tiny(name).eval()
    randomize_bn(model)
    x = batch(model)
    out = model(x)
    final, _ = model.forward_intermediates(x)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


def _check_features(feats, channels, reductions, x):
    assert len(feats) == len(channels) >= 3
    for f, c, r in zip(feats, channels, reductions):
        assert f.shape[:2] == (x.shape[0], c) and not f.isnan().any()
        assert f.shape[2] <= math.ceil(x.shape[2] / r) and f.shape[3] <= math.ceil(x.shape[3] / r)


@pytest.mark.parametrize("name", VARIANTS)
def test_features_only_and_forward_intermediates(name):
    """timm's test_model_forward_features and _forward_intermediates(_features), at 96 px (32 for CIFAR)."""
    model = tiny(name).eval()
    side = min(96, model.pretrained_cfg["input_size"][-1])
    x = torch.randn(1, 3, side, side)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        _check_features(intermediates, info.channels(), info.reduction(), x)
        torch.testing.assert_close(final, model.forward_features(x))
        for cls in ("getter", "fx"):
            backbone = tiny(name, features_only=True, feature_cls=cls).eval()
            fi = backbone.feature_info
            _check_features(backbone(x), fi.channels(), fi.reduction(), x)


def test_sequential_feature_wrappers_are_refused_and_hooks_work():
    """timm's 'dict'/'list' feature classes run a model's children one after another: ParNet's parallel
    streams would come out wrong, and timm stops on a bare assertion; 'hook' records the same features."""
    for cls in ("dict", "list"):
        with pytest.raises(ValueError, match="streams run side by side.*'hook' or 'fx'"):
            tiny("parnet_s", features_only=True, feature_cls=cls)
    x = torch.randn(1, 3, 64, 64)
    hooked, getter = (tiny("parnet_s", features_only=True, feature_cls=c).eval() for c in ("hook", "getter"))
    getter.load_state_dict({k.replace("body.", "model.", 1): v for k, v in hooked.state_dict().items()})
    with torch.no_grad():
        for a, b in zip(hooked(x), getter(x), strict=True):
            torch.testing.assert_close(a, b)


# -- the authors' variants and the import graph ---------------------------------------------------


@pytest.mark.parametrize("name", [n for n in VARIANTS if n.endswith("_official")])
def test_load_official_builds_the_variants_dropout(name):
    with torch.device("meta"):
        variant = timm.create_model(name)
    assert official_drop_rate(variant.cfg) == variant.drop_rate == OFFICIAL_DROP_RATES.get(name, 0.0)


def test_load_official_gives_parnet_l_its_dropout():
    """End to end: the authors' keys with ParNet-L's shapes load with dropout 0.1, as in timm's variant."""
    ours_to_theirs = {}
    for line in (FIXTURES / "parnet_s_official_keys.txt").read_text().splitlines():  # the same keys for every size
        key = line.split("\t")[0]
        ours_to_theirs[next(iter(parnet.convert_official_state_dict({key: torch.empty(0)})))] = key
    with torch.device("meta"):
        shapes = timm.create_model("parnet_l_official").state_dict()
    state = {ours_to_theirs[k]: torch.ones(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    model = load_official(state)
    assert model.cfg == parnet.model_cfgs["parnet_l_official"]
    assert model.drop_rate == model.head.drop.p == 0.1


def _package_imports(path: Path) -> set[str]:
    """The parnet modules ``path`` imports, anywhere in it (inside functions too); ``parnet`` is the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "parnet":
                continue
            base = (node.module or "") if node.level else (node.module or "").removeprefix("parnet").lstrip(".")
            if base:
                found.add(base.split(".")[0])
            else:  # from . import x: a module, or a name of the package
                found |= {a.name if (SRC / f"{a.name}.py").exists() else "parnet" for a in node.names}
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "parnet"]
            found |= {name.split(".")[1] if "." in name else "parnet" for name in names}
    return found


CORE = ("layers", "model", "official", "depth", "io", "formats", "weights", "factory", "devices")


def test_model_core_has_no_import_cycle():
    graph = {name: _package_imports(SRC / f"{name}.py") for name in CORE}
    assert graph["layers"] == set()
    assert graph["model"] == {"layers"}  # the network knows nothing of the authors' files, loading or tooling
    assert graph["formats"] == set()  # file sniffing, shared by io and official
    assert graph["official"] <= {"model", "formats", "weights"}  # the authors' layout on top of the network
    assert not any("official" in graph[name] for name in ("model", "io", "weights", "factory"))

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [name for name in CORE if reaches(name, name, set())]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_importing_the_network_loads_no_tooling():
    """``import parnet.model`` runs the package's ``__init__``: it must load the network and the authors'
    variants (they register with timm) and nothing of loading, training, deployment or the command line."""
    import subprocess
    import sys

    code = "import sys, parnet.model; print(' '.join(sorted(m for m in sys.modules if m.startswith('parnet'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(out) == {"parnet", "parnet.depth", "parnet.formats", "parnet.layers", "parnet.model", "parnet.official"}
    code = "import parnet as p; print(p.deployment.auto_mode('cpu'), p.precision.__name__, 'deploy' in dir(p))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["parnet.precision", "True"]  # the submodules and deploy, there as ever, imported on first use
    assert parnet.deploy.__module__ == "parnet.deployment"


def test_every_module_is_reachable_by_its_dotted_name():
    """``import parnet.deployment.engines as e`` and ``mock.patch("parnet.x.y.z")`` walk attributes: a function
    that shares its name with a module of its package (``deploy`` once did) would hide that module."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages([str(SRC)], prefix="parnet."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        module = importlib.import_module(info.name)
        parent, _, name = info.name.rpartition(".")
        assert getattr(importlib.import_module(parent), name) is module, f"{parent}.{name} is not the module"


# -- torch.hub -----------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_torch_hub_lists_every_registered_variant_and_builds_it(tmp_path):
    """``hubconf.py`` offers exactly timm's registered ParNet names: a new variant without an entry
    point, or a stray public callable in hubconf (an imported class), fails here."""
    # torch.hub.list and help read GitHub only; this is their rule on the imported hubconf.
    spec = importlib.util.spec_from_file_location("hubconf", REPO_ROOT / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert entries == timm.list_models("parnet*")
    assert "released ParNet-S weights" in hubconf.parnet_s_official.__doc__

    model = torch.hub.load(str(REPO_ROOT), "parnet_cifar_s", source="local", num_classes=7, **TINY)
    expected = tiny("parnet_cifar_s", num_classes=7)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.state_dict().items()}
    assert model.pretrained_cfg == expected.pretrained_cfg and model.cfg == expected.cfg
    # timm.create_model's own keywords too, as the docstring says: here its checkpoint_path
    torch.save(expected.state_dict(), tmp_path / "weights.pth")
    loaded = torch.hub.load(str(REPO_ROOT), "parnet_cifar_s", source="local", num_classes=7,
                            checkpoint_path=str(tmp_path / "weights.pth"), **TINY)  # fmt: skip
    for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_detection_modules_import_only_those_above_them():
    """``parnet.detection``'s modules import each other one way (its docstring's order), and the model
    core imports none of them."""
    order = ["data", "backbone", "detectors", "evaluation", "train"]
    for position, name in enumerate(order):
        siblings = {
            node.module.split(".")[0]
            for node in ast.walk(ast.parse((SRC / "detection" / f"{name}.py").read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
        assert siblings <= set(order[:position]), f"detection.{name} imports {siblings - set(order[:position])}"
    assert not any("detection" in _package_imports(SRC / f"{name}.py") for name in CORE)


@pytest.mark.parametrize("kwargs", [{}, {"widths": (8, 16), "blocks": (1, 1)}, {"widths": (8,), "blocks": (1,)}])
def test_timm_device_dtype_and_output_stride_arguments(kwargs):
    """timm passes device=, dtype= and output_stride= to its models: ParNet takes them as timm's own models do."""
    meta = timm.create_model("parnet_cifar_s", device="meta", **kwargs)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    bf16 = timm.create_model("parnet_cifar_s", dtype=torch.bfloat16, **kwargs)
    assert {t.dtype for t in bf16.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    for name in ("parnet_cifar_s", "parnet_s"):
        native = timm.create_model(name, **kwargs).feature_info[-1]["reduction"]
        backbone = timm.create_model(name, features_only=True, output_stride=native, **kwargs)
        assert backbone.feature_info.reduction()[-1] == native  # its own stride: accepted
        with pytest.raises(ValueError, match=f"output_stride={native // 2}: .* stride {native} .* no dilation"):
            timm.create_model(name, output_stride=native // 2, **kwargs)
