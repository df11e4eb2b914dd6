"""scripts/amp_curves.py: two runs' curves side by side, with the differences."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "amp_curves.py"


def load():
    spec = importlib.util.spec_from_file_location("amp_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, top1: list[float], ema: bool = True) -> Path:
    folder.mkdir()
    lines = ["epoch,lr,train_loss,test_top1" + (",ema_top1" if ema else "")]
    lines += [f"{e},0.1,{1.0 - 0.1 * e},{t}" + (f",{t + 1}" if ema else "") for e, t in enumerate(top1)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_plots_both_runs_and_tabulates_the_differences(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = write_run(tmp_path / "a", [70.0, 80.0, 85.0])
    b = write_run(tmp_path / "b", [71.0, 79.5])  # unfinished: only the common epochs are compared
    out = tmp_path / "curves.png"
    assert load().main([f"bf16={a}", f"fp32={b}", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "epoch" not in line]
    assert len(rows) == 2
    assert rows[0].split(" | ")[4:7] == ["70", "71", "-1"] and rows[1].split(" | ")[6] == "+0.5"


def test_a_folder_without_metrics_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no metrics.csv"):
        load().main([f"a={tmp_path}", f"b={tmp_path}", "--out", str(tmp_path / "x.png")])


def test_a_run_without_ema_is_compared_on_the_columns_both_have(tmp_path: Path, capsys) -> None:
    a = write_run(tmp_path / "a", [70.0, 80.0])
    b = write_run(tmp_path / "b", [71.0, 79.5], ema=False)  # trained with --no-ema
    assert load().main([f"bf16={a}", f"fp32={b}", "--out", str(tmp_path / "c.png")]) == 0
    head = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| epoch"))
    assert "test top-1" in head and "EMA" not in head
