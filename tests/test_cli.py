"""The command line: `parnet summary` and `python -m parnet`."""

from __future__ import annotations

import json
import subprocess
import sys

from parnet.cli import main


def test_summary_json(capsys):
    assert main(["summary", "--json", "parnet_cifar_s", "parnet_s_official"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["parnet_cifar_s", "parnet_s_official"]
    s = rows[1]
    assert s["depth"] == 12 and s["act"] == "relu" and s["input_size"] == [3, 224, 224]
    assert round(s["params_fused_m"], 1) == 19.2 and round(s["gflops"], 1) == 9.7


def test_summary_table_via_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "parnet", "summary", "parnet_cifar_s"], capture_output=True, text=True, check=True
    ).stdout
    assert "| parnet_cifar_s | small-input | 24,48,96 | 512 | silu | 32x32 | 1.45 M | 1.31 M | 0.21 | 12 |" in out


def test_unknown_variant_is_a_clear_error(capsys):
    assert main(["summary", "parnet_q"]) == 2
    assert "unknown ParNet variant 'parnet_q'" in capsys.readouterr().err
