"""``parnet bench`` on a tiny model: it runs, checks outputs, writes its table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from parnet import cli
from parnet.bench import Record, check_targets, format_markdown

TINY = ["widths=[8,16,32]", "head_width=64"]
PARNET_MODES = ["train", "fused", "folded", "channels_last", "packed", "winograd", "frozen", "parallel"]
BASELINE_MODES = ["eager", "channels_last", "packed", "winograd", "frozen"]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path, str]:
    root = tmp_path_factory.mktemp("bench")
    args = ["bench", "--models", "parnet_cifar_s", "--model-kwargs", *TINY, "--baselines", "resnet18"]
    args += ["--modes", ",".join(PARNET_MODES), "--baseline-modes", ",".join(BASELINE_MODES)]
    args += [
        "--threads",
        "1",
        "--resolution",
        "32",
        "--batch",
        "4",
        "--reps",
        "3",
        "--reps-large",
        "2",
        "--warmup",
        "1",
        "--peak-size",
        "0",  # the peak measurement is timing: not in tests
    ]
    args += ["--json", str(root / "b.json"), "--plot", str(root / "b.png"), "--markdown", str(root / "b.md"), "--quiet"]
    with pytest.MonkeyPatch.context() as mp:  # called from Python: the record says the arguments main was given
        mp.setattr("sys.argv", ["python", "-c", "the caller's own command line"])  # not what the record says
        assert cli.main(args) == 0
    return json.loads((root / "b.json").read_text()), root / "b.png", root / "b.md", ""


def test_one_record_per_model_mode_batch_device(bench_run) -> None:
    doc, _, _, _ = bench_run
    keys = [(r["model"], r["mode"], r["batch"], r["device"]) for r in doc["records"]]
    assert len(keys) == len(set(keys))
    expected = {("parnet_cifar_s", m, b, "cpu") for m in PARNET_MODES for b in (1, 4)}
    expected |= {("resnet18", m, b, "cpu") for m in BASELINE_MODES for b in (1, 4)}
    assert set(keys) == expected
    for r in doc["records"]:
        assert len(r["times_ms"]) == (3 if r["batch"] == 1 else 2)
        assert r["min_ms"] <= r["p25_ms"] <= r["median_ms"] <= r["p75_ms"] <= r["max_ms"]
        assert r["throughput_img_s"] == pytest.approx(r["batch"] / r["median_ms"] * 1e3)
        assert r["max_abs_diff"] < 1e-4  # every mode checked against its plain model
        assert 0 <= r["max_rel_diff"] < 1e-4
    assert doc["machine"]["threads"] == 1 and doc["machine"]["cpu_count"] >= 1
    assert "torch" in doc["machine"]


def test_plot_and_markdown_written(bench_run) -> None:
    _, png, md, _ = bench_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "| parnet_cifar_s | parallel | 3x32x32 |" in text and "Best mode per model" in text  # the input each got


def _rec(model: str, mode: str, batch: int, ms: float) -> Record:
    precision = mode.split(":")[0] if ":" in mode else "fp32"
    thr = batch / ms * 1e3
    return Record(model, mode, batch, "cpu", 224, 2, 5, ms, ms, ms, ms, ms, 0.0, thr, 0.0, precision=precision)


def test_targets_use_best_modes_and_can_fail() -> None:
    recs = [
        _rec("parnet_s", "fused", 1, 100.0),
        _rec("parnet_s", "compiled", 1, 90.0),
        _rec("resnet34", "eager", 1, 120.0),
        _rec("resnet34", "compiled", 1, 100.0),
        _rec("parnet_s", "compiled", 32, 1000.0),
        _rec("resnet50", "compiled", 32, 1100.0),
    ]
    lat, thr = check_targets(recs, "parnet_s", 32)
    assert lat["faster_mode"] == "parnet_s compiled" and lat["slower_mode"] == "resnet34 compiled"
    assert lat["speedup"] == pytest.approx(100 / 90) and lat["met"]  # 0.9x the latency <= 0.95x
    assert thr["speedup"] == pytest.approx(1.1) and not thr["met"]  # 1.1x < 1.2x
    text = format_markdown(recs, [lat, thr])
    assert "MET (speedup 1.11x, needed 1.05x" in text and "MISSED (speedup 1.10x, needed 1.20x" in text


def test_low_precision_targets_compare_each_model_with_its_own_fp32() -> None:
    recs = [
        _rec("parnet_s", "packed", 1, 60.0),
        _rec("parnet_s", "openvino", 1, 50.0),
        _rec("parnet_s", "int8:openvino", 1, 20.0),
        _rec("resnet34", "openvino", 1, 40.0),
        _rec("resnet34", "int8:compiled", 1, 10.0),
    ]
    targets = {t["target"]: t for t in check_targets(recs, "parnet_s", 1)}
    lat = targets["parnet_s int8 batch-1 latency <= 0.5 x its best fp32"]
    assert lat["speedup"] == pytest.approx(2.5) and lat["met"]  # against the best fp32 (openvino), not packed
    gain = targets["parnet_s int8 gain at batch 1 >= resnet34's int8 gain"]
    assert gain["speedup"] == pytest.approx(2.5) and gain["needed"] == pytest.approx(4.0) and not gain["met"]
    own = targets["parnet_s fp32 batch-1: own modes >= 1.2 x faster than every engine"]
    assert own["faster_mode"] == "parnet_s packed" and own["speedup"] == pytest.approx(50 / 60) and not own["met"]
    assert not any("batch-32" in t for t in targets)  # no large batch measured


def test_int8_targets_beyond_the_machines_int8_peak_are_marked_out_of_reach() -> None:
    recs = [
        _rec("parnet_s", "openvino", 1, 60.0),
        _rec("parnet_s", "int8:openvino", 1, 33.0),
        _rec("parnet_s", "openvino", 32, 1800.0),
        _rec("parnet_s", "int8:openvino", 32, 950.0),
    ]
    avx2 = {
        "cpu": {
            "fp32": {"matmul": 173.0, "conv3x3": 165.0},
            "int8": {"conv3x3_openvino": 335.0, "conv3x3_onnxruntime": 369.0},
        }
    }
    targets = {t["target"]: t for t in check_targets(recs, "parnet_s", 32, avx2)}
    lat = targets["parnet_s int8 batch-1 latency <= 0.5 x its best fp32"]
    thr = targets["parnet_s int8 batch-32 throughput >= 2.5 x its best fp32"]
    assert not lat["met"] and "out_of_reach" not in lat  # needs 2x: the best int8 over the best fp32 is 2.13x
    assert not thr["met"] and thr["out_of_reach"] == "this machine's int8 peak is 2.13x its fp32 peak"
    text = format_markdown(recs, list(targets.values()))
    assert "MISSED (out of reach for any network here: this machine's int8 peak is 2.13x" in text
    vnni = {"cpu": {"fp32": {"matmul": 430.0}, "int8": {"matmul": 1600.0}}}
    assert not any("out_of_reach" in t for t in check_targets(recs, "parnet_s", 32, vnni))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "parnet_s,parnet_q"], "argument --models: unknown model 'parnet_q'"),
        (["--baselines", "resnet34,resnt50"], "argument --baselines: unknown model 'resnt50'; similar: resnet50"),
    ],
)
def test_model_names_checked_one_by_one(args: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", *args])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--resolution", "-32"), ("--reps-large", "0"), ("--threads", "0"),
                                         ("--warmup", "-1"), ("--settle-ms", "nan")])  # fmt: skip
def test_counts_and_sizes_checked_as_parsed(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", flag, value])
    assert f"argument {flag}: " in capsys.readouterr().err


def test_no_models_is_a_clear_error(capsys) -> None:
    assert cli.main(["bench", "--models", " ", "--baselines", ""]) == 2
    assert "--models is empty" in capsys.readouterr().err


def test_machine_peak_and_gflop_count() -> None:
    import torch

    from parnet.bench import machine_peak, model_gflop
    from parnet.deployment.engines import ENGINES, installed
    from parnet.precision import has_int8_dot_product

    peak = machine_peak(["fp32", "int8"], reps=1, size=64)
    # fp32 and int8: a conv stack through every installed engine; torch._int_mm only where it has a fast kernel
    engine_kernels = {f"conv3x3_{e}" for e in ENGINES if installed(e)}
    assert set(peak) == {"fp32", "int8"} and set(peak["fp32"]) == {"matmul", "conv3x3"} | engine_kernels
    assert set(peak["int8"]) == engine_kernels | ({"matmul"} if has_int8_dot_product() else set())
    assert all(rate > 0 for rates in peak.values() for rate in rates.values())
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)  # 2 x 3 x 8 x 9 x 16 x 16 flop
    assert model_gflop(conv, 3, 16) == pytest.approx(2 * 3 * 8 * 9 * 16 * 16 / 1e9)


def test_engine_peak_is_the_long_stacks_extra_rate() -> None:
    """A stack's fixed cost (its float input and output) cancels: 2 convs in 30 ms and 8 in 60 ms is 5 ms a conv."""
    from parnet.bench.machine import stack_rate

    assert stack_rate(1e9, 0.030, 0.060) == pytest.approx(1e9 / 0.005 / 1e9)  # 200 GFLOP/s
    assert stack_rate(1e9, 0.030, 0.029) == pytest.approx(8 * 1e9 / 0.029 / 1e9)  # noise: the long stack whole


class FakeClock:
    """``time.perf_counter`` and ``time.sleep`` of :mod:`parnet.deployment.timing` on a clock that moves only when
    slept on or worked on (:meth:`work`), so that no load on the machine changes a timing test's outcome;
    ``events`` lists both, in order. :meth:`install` puts it in place for one test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[str, float]] = []

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
        from parnet.deployment import timing

        clock = cls()
        monkeypatch.setattr(timing, "time", clock)
        return clock

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.events.append(("sleep", seconds))
        self.now += seconds

    def work(self, seconds: float) -> None:
        """A call that takes ``seconds``."""
        self.events.append(("work", seconds))
        self.now += seconds


def test_interleaved_timing_pauses_before_each_call_untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    from parnet.bench import time_interleaved

    clock = FakeClock.install(monkeypatch)
    entries = {"a": lambda x: clock.work(0.001), "b": lambda x: clock.work(0.003)}
    times = time_interleaved(entries, torch.zeros(1), reps=3, warmup=1, device=torch.device("cpu"), settle_s=0.02)
    assert clock.events[:2] == [("work", 0.001), ("work", 0.003)]  # one warm-up call each, no pause
    timed = clock.events[2:]
    assert timed[::2] == [("sleep", 0.02)] * 6 and [kind for kind, _ in timed[1::2]] == ["work"] * 6
    assert times == {"a": pytest.approx([1.0] * 3), "b": pytest.approx([3.0] * 3)}  # ms: the pause is not in them


def test_entries_of_a_one_channel_baseline_take_one_channel() -> None:
    """A baseline built with in_chans=1 (timm's ResNets keep no ``in_chans``) is calibrated and run on 1 channel."""
    from parnet.bench.run import build_entries

    kwargs = {"in_chans": 1, "num_classes": 10, "widths": [4, 8, 16]}
    model, entries = build_entries("resnet20_cifar", ["eager", "onnxruntime"], torch.device("cpu"), 1, kwargs, 32)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for run in entries.values():
            torch.testing.assert_close(run(x), model(x), atol=1e-4, rtol=1e-4)


def test_benchmark_scripts_write_json_and_markdown_side_by_side(tmp_path) -> None:
    from parnet.bench.report import write_json_and_markdown

    write_json_and_markdown(tmp_path / "sub" / "run1", {"rows": [1, 2]}, "| a |\n| --- |")
    assert json.loads((tmp_path / "sub" / "run1.json").read_text()) == {"rows": [1, 2]}
    assert (tmp_path / "sub" / "run1.md").read_text() == "| a |\n| --- |\n"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["run1.json", "run1.md"]  # no temporaries left


def test_a_parnet_changed_by_model_kwargs_gets_no_paper_top1_and_a_measured_depth() -> None:
    """parnet_s with other widths is not the paper's ParNet-S: no paper top-1 beside its timing, its depth measured."""
    from parnet.bench import run_bench

    common = dict(devices=["cpu"], batches=[1], reps=[1], resolution=64, threads=1, warmup=0, model_modes=["folded"])
    common |= dict(log=lambda *_: None, peak_size=0, settle_s=0.0)
    tiny = {"widths": [8, 16, 32], "head_width": 64, "stem_width": 8}
    (custom,) = run_bench(["parnet_s"], [], model_kwargs=tiny, **common)
    assert (custom.model, custom.paper_top1, custom.depth) == ("parnet_s", None, 12)
    (stock,) = run_bench(["parnet_s_official"], [], **common)  # the registered network keeps them
    assert (stock.paper_top1, stock.depth) == (75.19, 12)


def test_modes_checked_before_any_work(capsys) -> None:
    """A typo or another device's mode is refused with the device's choices, before the peak or any model is built."""
    args = ["bench", "--models", "parnet_cifar_s", "--model-kwargs", *TINY, "--resolution", "32", "--peak-size", "0"]
    for flag, modes, named in (
        ("--modes", "fusedd", "not a ParNet mode on cpu"),
        ("--modes", "cuda_graph", "not a ParNet mode on cpu"),  # was dropped without a word
        ("--baseline-modes", "eagerr", "not a baseline mode on cpu"),
    ):
        assert cli.main([*args, "--baselines", "resnet18", flag, modes]) == 2
        out, err = capsys.readouterr()
        assert named in err and "packed" in err and "building" not in out and "machine:" not in out


def test_every_mode_of_the_gpu_check_is_known() -> None:
    """scripts/gpu_check.sh runs where no test can: its bench modes must at least be ones bench knows on CUDA."""
    import re

    from parnet.bench.run import valid_modes

    script = (Path(__file__).parents[1] / "scripts" / "gpu_check.sh").read_text()
    for flag, parnet in (("--modes", True), ("--baseline-modes", False)):
        lists = re.findall(rf"{flag} (\S+)", script)
        assert lists, flag
        for label in ",".join(lists).split(","):
            assert label in valid_modes(torch.device("cuda"), parnet), (flag, label)


def test_plot_format_by_suffix_and_measured_depth(tmp_path: Path, capsys) -> None:
    """--plot writes the format its suffix names and refuses one matplotlib cannot write, before timing."""
    args = ["bench", "--models", "parnet_cifar_s", "--model-kwargs", *TINY, "--modes", "folded", "--resolution", "32"]
    args += ["--batch", "1", "--reps", "1", "--warmup", "0", "--threads", "1", "--peak-size", "0", "--quiet"]
    assert cli.main([*args, "--baselines", "", "--plot", str(tmp_path / "p.txt")]) == 2
    assert "cannot draw into p.txt" in capsys.readouterr().err
    out = ["--plot", str(tmp_path / "p.svg"), "--json", str(tmp_path / "p.json")]
    assert cli.main([*args, "--baselines", "", *out]) == 0
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:400]
    # a network of other widths is still 12 deep: measured (parnet.network_depth), not looked up
    assert {r["depth"] for r in json.loads((tmp_path / "p.json").read_text())["records"]} == {12}


def test_resolution_defaults_to_the_models_own(capsys) -> None:
    """Like timm's benchmark: each ParNet's pretrained_cfg input size, 32 for the CIFAR variants (not 224)."""
    from parnet.cli.bench import _default_resolution

    assert _default_resolution(["parnet_cifar_s"]) == 32 and _default_resolution(["parnet_s", "parnet_m"]) == 224
    assert cli.main(["bench", "--models", "parnet_s,parnet_cifar_s", "--baselines", ""]) == 2
    assert "different input sizes (parnet_s 224, parnet_cifar_s 32): give --resolution" in capsys.readouterr().err


def _fake_bench(monkeypatch: pytest.MonkeyPatch, records: list[Record]) -> None:
    """``parnet bench``'s timing replaced by ``records`` (the CLI around it runs as it is)."""
    from parnet.cli import bench

    monkeypatch.setattr(bench, "run_bench", lambda *args, **kwargs: list(records))


def _at(record: Record, resolution: int) -> Record:
    record.resolution = resolution
    return record


@pytest.mark.parametrize(
    "args, why",
    [
        (["--models", "parnet_cifar_s", "--resolution", "32"], "the first model is parnet_cifar_s; 32x32"),
        (["--models", "resnet18", "--resolution", "224"], "the first model is resnet18)"),
        (["--models", "parnet_s", "--resolution", "224", "--threads", "1"], "(here: 1 thread)"),
        (["--models", "parnet_s", "--model-kwargs", "act=relu"], "--model-kwargs makes it another network"),
    ],
)
def test_targets_checked_only_for_parnet_s_at_224_on_2_threads(
    args: list[str], why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Issue 14's targets are ParNet-S's at 224x224 on 2 threads: no other first model or setting is judged by them."""
    resolution = int(args[args.index("--resolution") + 1]) if "--resolution" in args else 224
    model = args[1]
    recs = [_at(_rec(model, "fused", 1, 50.0), resolution), _at(_rec("resnet34", "eager", 1, 100.0), resolution)]
    _fake_bench(monkeypatch, recs)
    out = tmp_path / "b.json"
    assert cli.main(["bench", *args, "--baselines", "resnet34", "--batch", "1", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "- target (" not in printed and "MET" not in printed  # was: parnet_cifar_s against resnet34, MET
    note = "no targets checked: they are ParNet-S's (parnet_s or parnet_s_official first in --models) at 224x224"
    assert note in printed and why in printed
    doc = json.loads(out.read_text())
    assert doc["targets"] == [] and doc["targets_not_checked"].startswith(note) and why in doc["targets_not_checked"]


def test_targets_checked_for_parnet_s_at_224_on_2_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    _fake_bench(monkeypatch, [_rec("parnet_s_official", "packed", 1, 90.0), _rec("resnet34", "eager", 1, 100.0)])
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--baselines", "resnet34", "--batch", "1", "--json", str(out), "--quiet"]) == 0
    assert "- target (cpu) parnet_s_official batch-1 latency <= 0.95 x resnet34" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["targets_not_checked"] is None and doc["targets"][0]["met"]


def test_modes_follow_the_list_a_model_is_given_in() -> None:
    """--modes go to --models and --baseline-modes to --baselines, whatever the names: a ResNet among the models
    runs --modes, a ParNet among the baselines the baselines' (generic) modes."""
    from parnet.bench import run_bench

    common = dict(devices=["cpu"], batches=[1], reps=[1], resolution=32, threads=1, warmup=0, peak_size=0)
    recs = run_bench(
        ["resnet18"], ["parnet_cifar_s"], model_modes=["channels_last"], baseline_modes=["eager"],
        log=lambda *_: None, settle_s=0.0, **common,
    )  # fmt: skip
    assert {(r.model, r.mode) for r in recs} == {("resnet18", "channels_last"), ("parnet_cifar_s", "eager")}
    assert all(r.max_abs_diff < 1e-4 for r in recs)


@pytest.mark.parametrize(
    "args, message",
    [
        # was: --modes ignored for a name not starting with parnet, and 14 modes timed
        (["--models", "resnet18", "--modes", "fused"], "--modes: fused is a mode of ParNet's own, and resnet18 in"),
        (["--models", "parnet_cifar_s,resnet18", "--modes", "packed,train"], "train is a mode of ParNet's own, and "
         "resnet18 in --models, which is not a ParNet: for it choose from bf16:channels_last, "),
        (["--models", "resnet18", "--modes", "eagerr"], "eagerr is not a mode on cpu of resnet18 in --models"),
        # was: a ParNet among the baselines timed in ParNet's modes, --baseline-modes ignored
        (["--baselines", "parnet_cifar_m", "--baseline-modes", "fused"], "--baseline-modes: fused is not a baseline "
         "mode on cpu (ParNet's own modes are for the ParNets of --models)"),
        (["--models", "parnet_cifar_s", "--baselines", "parnet_cifar_s"], "parnet_cifar_s is in both --models and "
         "--baselines"),
        # was: accepted, then failed after the machine's probe with "needs devices=[...]"
        (["--modes", "multi_device"], "--modes: multi_device is not a ParNet mode on cpu"),
    ],
)  # fmt: skip
def test_modes_a_model_cannot_run_refused_before_any_work(args: list[str], message: str, monkeypatch, capsys) -> None:
    from parnet.cli import bench

    def probe(*_args: object) -> dict:
        raise AssertionError("the machine was probed before the modes were checked")

    monkeypatch.setattr(bench, "machine_info", probe)
    assert cli.main(["bench", "--resolution", "32", "--peak-size", "0", *args]) == 2
    assert message in capsys.readouterr().err


def test_auto_records_the_mode_it_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` is timed as deploy chooses it, and the record and tables say which mode that was."""
    import parnet.deployment
    from parnet.bench import run_bench

    monkeypatch.setattr(parnet.deployment, "auto_candidates", lambda device, precision="fp32": ("folded", "packed"))
    monkeypatch.setattr(parnet.deployment, "fastest", lambda built, example: sorted(built)[-1])  # packed: not first
    common = dict(devices=["cpu"], batches=[1], reps=[1], resolution=32, threads=1, warmup=0, peak_size=0)
    (rec,) = run_bench(["parnet_cifar_s"], [], model_modes=["auto"], log=lambda *_: None, settle_s=0.0, **common)
    assert (rec.mode, rec.chosen_mode) == ("auto", "packed") and rec.max_abs_diff < 1e-4
    text = format_markdown([rec])
    assert "| parnet_cifar_s | auto (packed) |" in text and "| parnet_cifar_s | fp32 | auto (packed), " in text


def test_json_ties_records_to_code_and_onednn(bench_run) -> None:
    """The record says which parnet, commit, oneDNN and command line measured it."""
    import re

    import parnet

    doc, _, _, _ = bench_run
    onednn = doc["machine"]["engines"]["onednn"]
    assert onednn is None or re.fullmatch(r"\d+\.\d+(\.\d+)?", onednn), onednn  # was "True"
    code = doc["machine"]["code"]
    assert code["parnet"] == parnet.__version__
    assert (re.fullmatch("[0-9a-f]{40}", code["commit"]) and isinstance(code["dirty"], bool)) or (
        code["commit"] is None and code["git"].startswith(("not in a git checkout", "unknown"))
    )
    assert doc["command"][:4] == ["parnet", "bench", "--models", "parnet_cifar_s"] and "--quiet" in doc["command"]


def test_onednn_version_read_from_torch_config() -> None:
    from parnet.bench import onednn_version

    assert onednn_version("  - Intel(R) MKL-DNN v3.12.0 (Git Hash 80afa71049cd)\n") == "3.12.0"
    assert onednn_version("  - oneDNN v3.7.1 (Git Hash abc)\n") == "3.7.1"
    assert onednn_version("PyTorch built with:\n  - GCC 13.3\n").startswith("unknown")


def test_code_version_names_the_commit_and_changes(tmp_path: Path) -> None:
    """A git checkout: its commit, and whether tracked files changed since; elsewhere it says it is not one."""
    import shutil
    import subprocess

    from parnet.bench import code_version

    outside = code_version(tmp_path)
    assert (outside["commit"], outside["dirty"]) == (None, None) and "not in a git checkout" in outside["git"]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert (code_version(tmp_path)["commit"], code_version(tmp_path)["dirty"]) == (head, False)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path)["dirty"] is True


def test_markdown_file_has_a_header(bench_run) -> None:
    """The .md reads alone: the command, the code, the CPU and its flags, threads, repetitions and peaks."""
    import parnet

    doc, _, md, _ = bench_run
    head = md.read_text().split("| model |")[0]
    assert head.startswith("# parnet bench\n") and "- command: `parnet bench --models parnet_cifar_s " in head
    assert f"- code: parnet {parnet.__version__}, " in head and f"- CPU: {doc['machine']['cpu']} (" in head
    assert "- threads: 1 (inter-op " in head and "3 at batch 1, 2 at batch 4; 1 untimed first" in head
    assert "- peak GFLOP/s (cpu): not measured (--peak-size 0)" in head


def test_header_gives_each_precisions_peak() -> None:
    from parnet.bench import format_header

    machine = {
        "cpu": "AMD EPYC 9R14", "cpu_count": 2, "cpu_flags": ["avx2", "avx512_vnni"], "threads": 2,
        "interop_threads": 1, "torch": "2.14.1", "engines": {"onednn": "3.12.0", "openvino": None},
        "code": {"parnet": "0.1.0", "commit": "a" * 40, "dirty": True},
        "peak_gflops": {"cpu": {"fp32": {"matmul": 430.0, "conv3x3": 390.0}, "int8": {"conv3x3_openvino": 1500.0}}},
    }  # fmt: skip
    head = format_header(machine, ["parnet", "bench", "--models", "parnet s"], [1, 32], [30, 10], 3, 100.0)
    assert "- command: `parnet bench --models 'parnet s'`" in head
    assert "- code: parnet 0.1.0, commit aaaaaaaaaaaa (with uncommitted changes)" in head
    assert "- CPU: AMD EPYC 9R14 (2 logical cores; avx2, avx512_vnni)" in head and "onednn 3.12.0" in head
    assert "- peak GFLOP/s (cpu): fp32 430 (matmul), int8 1500 (conv3x3_openvino)" in head
    assert "30 at batch 1, 10 at batch 32; 3 untimed first; 100 ms pause" in head


def test_baselines_help_shows_its_default(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "[resnet34,resnet50,repvgg_b1g4]" in capsys.readouterr().out


def test_a_parnet_among_the_baselines_reaches_the_engines_unfolded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A baseline's engine mode converts the re-parameterized model as it is (a practitioner's way, without
    ``parnet.deploy``): a ParNet there is not folded, or the bench could not compare deploy with the plain way."""
    from parnet.bench import run as bench_run
    from parnet.deployment.folding import FoldedParNet
    from parnet.model import ParNet

    converted = []
    engine_module = bench_run.engine_module
    monkeypatch.setattr(
        bench_run, "engine_module", lambda mode, net, *a: converted.append(net) or engine_module(mode, net, *a)
    )
    model, entries = bench_run.build_entries("parnet_cifar_s", ["onnxruntime"], torch.device("cpu"), 1, None, 32, False)
    assert len(converted) == 1 and isinstance(converted[0], ParNet) and not isinstance(converted[0], FoldedParNet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(entries["onnxruntime"](x), model(x), atol=1e-4, rtol=1e-4)
