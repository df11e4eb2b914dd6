"""What the activation costs int8: ParNet-S with SiLU, ReLU and hard-swish, and ResNet-34, fp32 and int8, timed.

An int8 convolution does its multiply-adds about 4x faster than an fp32 one, but its activation post-op
(SiLU's exponential, per output element) costs the same in both; a SiLU network therefore gains less from
int8 than a ReLU one, and hard-swish (``act="hardswish"``: multiplies and a clamp, no exponential) lies
between. This benchmark measures how much of ParNet's smaller int8 gain (issue 14, point 3) that explains,
and what unsigned int8 activations gain (``FoldedParNet.shift_activations``, which OpenVINO's int8
applies; the row "signed" is the same network quantized without it): every (model, mode) pair at batch 1
and a large batch, interleaved in one process with the settle pause of ``parnet bench``, random BN
statistics, int8 calibrated on random batches (timing does not depend on the values; accuracy:
``scripts/quant_accuracy.py``).

    PYTHONPATH=src python benchmarks/int8_activation.py --out benchmarks/results/int8_activation
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from parnet.bench.machine import machine_info
from parnet.bench.report import script_record, write_json_and_markdown
from parnet.bench.run import build_entries, calibration_noise
from parnet.deployment import fold
from parnet.deployment.engines import openvino_module
from parnet.deployment.timing import SETTLE_S, time_interleaved

MODELS = {  # label: (timm name, kwargs)
    "ParNet-S, SiLU (the paper's)": ("parnet_s", {}),
    "ParNet-S, ReLU": ("parnet_s", {"act": "relu"}),
    "ParNet-S, hard-swish": ("parnet_s", {"act": "hardswish"}),
    "ResNet-34": ("resnet34", {}),
}
SIGNED = "ParNet-S, SiLU, signed int8 activations"  # int8 OpenVINO only; its fp32 is the SiLU row's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32-mode", default="openvino", help="the fp32 mode every model is compared in [openvino]")
    p.add_argument("--int8-mode", default="int8:openvino", help="low-precision mode (times: int8_ms)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=20, help="timed repetitions at batch 1 [20]")
    p.add_argument("--reps-large", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    modes = (args.fp32_mode, args.int8_mode)
    entries = {}
    for label, (name, kwargs) in MODELS.items():
        model, built = build_entries(name, modes, torch.device("cpu"), args.threads, kwargs)
        entries.update({(label, mode): fn for mode, fn in built.items()})
        if name == "parnet_s" and not kwargs and args.int8_mode == "int8:openvino":
            calibration = calibration_noise(3, 224)
            entries[(SIGNED, modes[1])] = openvino_module(
                fold(model), calibration[0][:1], "int8", calibration, args.threads, unsigned_activations=False
            )
    medians: dict[int, dict[tuple[str, str], float]] = {}
    for batch, reps in ((1, args.reps), (args.batch, args.reps_large)):
        x = torch.randn(batch, 3, 224, 224)
        named = {f"{label} | {mode}": fn for (label, mode), fn in entries.items()}
        times = time_interleaved(named, x, reps, warmup=2, device=x.device, settle_s=SETTLE_S)
        medians[batch] = {key: statistics.median(times[f"{key[0]} | {key[1]}"]) for key in entries}
        print(f"batch {batch}: " + ", ".join(f"{k}: {statistics.median(t):.1f} ms" for k, t in times.items()))
    rows = []
    for label in [*MODELS, *([SIGNED] if (SIGNED, modes[1]) in entries else [])]:
        row = {"model": label}
        fp32_label = next(iter(MODELS)) if label == SIGNED else label
        for batch in medians:
            fp32, int8 = medians[batch][(fp32_label, modes[0])], medians[batch][(label, modes[1])]
            row[f"b{batch}"] = {"fp32_ms": fp32, "int8_ms": int8, "gain": fp32 / int8}
        rows.append(row)
    # machine holds the engine versions and the code's; script_record the arguments and command line
    record = {"machine": machine_info(args.threads), **script_record(args), "modes": modes, "rows": rows}
    big = args.batch
    lines = [
        f"| model | fp32 {modes[0]} b1 | {modes[1]} b1 | gain b1 | fp32 b{big} | {modes[1]} b{big} | gain b{big} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        a, b = row["b1"], row[f"b{big}"]
        lines.append(
            f"| {row['model']} | {a['fp32_ms']:.1f} | {a['int8_ms']:.1f} | {a['gain']:.2f}x | "
            f"{b['fp32_ms']:.0f} | {b['int8_ms']:.0f} | {b['gain']:.2f}x |"
        )
    write_json_and_markdown(args.out, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
