"""Inference latency and throughput of issue 13's ablation networks: what each design choice costs to run.

The ablation grid (``scripts/ablation/grid.py``) matches parameters, not arithmetic: one stream of the
same parameters does 8x the base's multiply-adds, the depth-24 ParNet 1.3x, the narrower ResNet-20 1.8x.
This times every config's deployed (fused) form on 1x32x32 inputs, interleaved in one process with the
settle pause of ``parnet bench``, at batch 1 and a large batch, in each mode given (ParNet's default CPU
mode ``packed`` and OpenVINO by default; the ResNet in the same-named generic modes). Random BN
statistics: timing does not depend on the values.

    PYTHONPATH=src python benchmarks/ablation_latency.py --out benchmarks/results/ablation_latency
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from ablation.grid import ABLATION_CONFIGS, IMG_SIZE, IN_CHANS, NUM_CLASSES, measure  # noqa: E402

from parnet.bench.machine import machine_info  # noqa: E402
from parnet.bench.report import script_record, write_json_and_markdown  # noqa: E402
from parnet.bench.run import build_entries  # noqa: E402
from parnet.deployment.timing import SETTLE_S, time_interleaved  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="packed,openvino", help="comma list of deploy modes [packed,openvino]")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reps", type=int, default=50, help="timed repetitions at batch 1 [50]")
    p.add_argument("--reps-large", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    entries, measured = {}, {}
    for config in ABLATION_CONFIGS:
        kwargs = {"in_chans": IN_CHANS, "num_classes": NUM_CLASSES, **config.kwargs}
        _, built = build_entries(config.model, modes, torch.device("cpu"), args.threads, kwargs, IMG_SIZE)
        entries.update({f"{config.name} | {mode}": fn for mode, fn in built.items()})
        measured[config.name] = measure(config, depth=False)
    medians: dict[int, dict[str, float]] = {}
    for batch, reps in ((1, args.reps), (args.batch, args.reps_large)):
        x = torch.randn(batch, IN_CHANS, IMG_SIZE, IMG_SIZE)
        times = time_interleaved(entries, x, reps, warmup=3, device=x.device, settle_s=SETTLE_S)
        medians[batch] = {key: statistics.median(t) for key, t in times.items()}
    rows = []
    for config in ABLATION_CONFIGS:
        row = {"config": config.name, "label": config.label, **measured[config.name]}
        for mode in modes:
            key = f"{config.name} | {mode}"
            row[mode] = {
                "b1_ms": medians[1][key],
                f"b{args.batch}_images_per_s": args.batch / medians[args.batch][key] * 1e3,
            }
        rows.append(row)
    head = "| config | params | MMACs | " + " | ".join(f"{m} b1 (ms) | {m} b{args.batch} (img/s)" for m in modes) + " |"
    lines = [head, "| --- | ---: | ---: | " + " | ".join("---: | ---:" for _ in modes) + " |"]
    for row in rows:
        cells = [f"{row[m]['b1_ms']:.2f} | {row[m][f'b{args.batch}_images_per_s']:.0f}" for m in modes]
        lines.append(
            f"| {row['label']} (`{row['config']}`) | {row['params'] / 1e6:.3f} M | {row['mmacs']:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    record = {"machine": machine_info(args.threads), **script_record(args), "batch": args.batch, "modes": modes}
    record["rows"] = rows
    write_json_and_markdown(args.out, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
