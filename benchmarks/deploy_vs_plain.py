"""What ``parnet.deploy`` adds in fp32: its modes against the plain ways to run the same ParNet, timed together.

Issue 14's point 8 asks that fp32 ``deploy`` run ParNet-S at least 1.2x faster than the fastest other way
to run the same network at batch 1, and ahead of all of them at batch 32 at 90% or more of the machine's
fp32 peak. The other ways are what a practitioner does with the tools alone, starting from the
re-parameterized timm model (``timm.utils.reparameterize_model``: one 3x3 conv per block; the skip BN,
gates, channel shuffles and interleaves as they are): ``torch.compile`` of it in channels_last (the
authors' own way), ONNX Runtime on its ONNX export, OpenVINO on its conversion: the generic modes that
``parnet bench`` gives its baselines (:func:`parnet.bench.run.build_entries`), a ParNet among them too.
``deploy``'s modes run the folded network (:func:`parnet.deployment.fold`): shuffles and BN passes gone,
gated skips as one add. Its engine modes count as ``deploy``'s: ``deploy(mode="auto")`` considers them
with the others.

Every way is built from one model (random BN statistics), checked against it, and timed interleaved in
one process with the bench's settle pause; the machine's fp32 peak is measured in the same run.

    PYTHONPATH=src python benchmarks/deploy_vs_plain.py --out benchmarks/results/deploy_vs_plain
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from timm.utils import reparameterize_model

from parnet.bench.machine import machine_info, machine_peak, model_gflop
from parnet.bench.report import script_record, write_json_and_markdown
from parnet.bench.run import build_entries
from parnet.deployment import deploy
from parnet.deployment.timing import SETTLE_S, time_interleaved

DEPLOY_MODES = ("packed", "winograd", "compiled", "onnxruntime", "openvino")
PLAIN_MODES = ("compiled", "onnxruntime", "openvino")
BATCH_1_TARGET = 1.2  # deploy's best over the best plain way, batch 1
PEAK_TARGET = 0.9  # deploy's best at the large batch, as a fraction of the machine's fp32 peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="parnet_s", help="a ParNet variant [parnet_s]")
    p.add_argument("--deploy-modes", default=",".join(DEPLOY_MODES), help="deploy's fp32 modes, comma-separated")
    p.add_argument("--plain-modes", default=",".join(PLAIN_MODES), help="the plain ways, comma-separated")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions at batch 1 [20]")
    p.add_argument("--reps-large", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    # the plain ways are the bench's generic modes (as its baselines get them); deploy's from the same model
    model, plain = build_entries(args.model, args.plain_modes.split(","), cpu, args.threads, parnet=False)
    example = torch.randn(1, 3, 224, 224)
    own = {m: deploy(model, cpu, m, example=example, threads=args.threads) for m in args.deploy_modes.split(",")}
    entries = {f"deploy {m}": fn for m, fn in own.items()} | {f"plain {m}": fn for m, fn in plain.items()}
    gflop = model_gflop(reparameterize_model(model), 3, 224)  # the work that runs: one 3x3 conv per block
    peak = max(machine_peak(["fp32"])["fp32"].values())
    rows: dict[str, dict] = {key: {"way": key} for key in entries}
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224)
        ref = model(x)
        for key, fn in entries.items():
            rows[key]["max_abs_diff"] = float((fn(x) - ref).abs().max())
    for batch, reps in ((1, args.reps), (args.batch, args.reps_large)):
        x = torch.randn(batch, 3, 224, 224)
        times = time_interleaved(entries, x, reps, warmup=2, device=cpu, settle_s=SETTLE_S)
        for key, t in times.items():
            ms = statistics.median(t)
            rows[key][f"b{batch}"] = {"ms": ms, "gflop_s": gflop * batch / ms * 1e3}
        print(f"batch {batch}: " + ", ".join(f"{k}: {statistics.median(t):.1f} ms" for k, t in times.items()))
    table = list(rows.values())
    verdicts = _verdicts(table, args.batch, peak)
    record = {
        "machine": machine_info(args.threads),  # the CPU's flags, engine versions, the code's commit
        **script_record(args),
        "gflop_per_image": gflop,
        "fp32_peak_gflop_s": peak,
        "rows": table,
        "verdicts": verdicts,
    }
    markdown = _markdown(table, args.batch, peak, verdicts)
    write_json_and_markdown(args.out, record, markdown)
    print(markdown)


def _verdicts(rows: list[dict], batch: int, peak: float) -> list[dict]:
    """Point 8's two fp32 checks: deploy's best mode against the best plain way at batch 1 and at ``batch``."""
    out = []
    for b, needed in ((1, BATCH_1_TARGET), (batch, 1.0)):
        key = f"b{b}"
        own = min((r for r in rows if r["way"].startswith("deploy")), key=lambda r: r[key]["ms"])
        other = min((r for r in rows if r["way"].startswith("plain")), key=lambda r: r[key]["ms"])
        speedup = other[key]["ms"] / own[key]["ms"]
        verdict = {"batch": b, "deploy": own["way"], "plain": other["way"], "speedup": speedup, "needed": needed}
        if b != 1:
            verdict["peak_fraction"] = own[key]["gflop_s"] / peak
        verdict["met"] = speedup >= needed and verdict.get("peak_fraction", 1.0) >= PEAK_TARGET
        out.append(verdict)
    return out


def _markdown(rows: list[dict], batch: int, peak: float, verdicts: list[dict]) -> str:
    lines = [
        f"| way | max abs diff | b1 ms | b1 GFLOP/s | b{batch} ms | b{batch} GFLOP/s (of fp32 peak {peak:.0f}) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        one, big = r["b1"], r[f"b{batch}"]
        lines.append(
            f"| {r['way']} | {r['max_abs_diff']:.1e} | {one['ms']:.1f} | {one['gflop_s']:.0f} | "
            f"{big['ms']:.0f} | {big['gflop_s']:.0f} ({big['gflop_s'] / peak:.0%}) |"
        )
    lines += [
        "",
        "| batch | deploy's best | best plain way | speedup | needed | met |",
        "| ---: | --- | --- | ---: | --- | --- |",
    ]
    for v in verdicts:
        needed = f">= {v['needed']}x" + (
            f", >= {PEAK_TARGET:.0%} of peak ({v['peak_fraction']:.0%})" if v["batch"] != 1 else ""
        )
        met = "yes" if v["met"] else "no"
        lines.append(f"| {v['batch']} | {v['deploy']} | {v['plain']} | {v['speedup']:.2f}x | {needed} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
