"""Where a CPU training step spends its time: ParNet against the ResNets of issue 13's full schedule.

On this machine `parnet_cifar_s` trains at about two thirds of ResNet-56's images/s although it has 9% fewer
multiply-adds. This profiles one training step (forward, backward, SGD) of each model with the recipe of
those runs (batch 128 of 1x32x32 Fashion-MNIST-sized inputs, bf16 autocast, one thread) and sorts the
operators' own time into kinds: convolutions, batch norm, activations, pooling and gates, adds and sums
(branches, residuals, the SGD update), copies (autocast's casts included) and the rest, and gives the
convolutions' rate (3 x the forward multiply-adds per image: forward, input and weight gradients). Inputs are
random: the time does not depend on the values.

    PYTHONPATH=src python benchmarks/train_profile.py --out benchmarks/results/train_profile
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import timm
import torch
from torch import nn

import parnet.baselines  # noqa: F401 - registers the CIFAR ResNets with timm
from parnet.bench.machine import machine_info, model_gflop
from parnet.bench.report import write_json_and_markdown

MODELS = ("parnet_cifar_s", "resnet56_cifar", "resnet20_cifar")
# Operator name fragments -> kind, first match wins (names are aten's, e.g. aten::convolution_backward).
KINDS = (
    ("conv", ("convolution", "conv2d", "mkldnn_conv")),
    ("batch norm", ("batch_norm",)),
    ("activation", ("silu", "relu", "sigmoid", "threshold")),
    # branch sums, residuals, gradient accumulation and the SGD update (per-parameter add_ and the momentum
    # buffer's mul_ on CPU, not separable); before the gates, whose multiplies are out of place (aten::mul)
    ("adds, sums", ("aten::add", "aten::sum", "aten::div", "_foreach", "aten::mul_")),
    ("pooling, gates", ("pool", "aten::mean", "aten::mul")),
    ("copies, casts", ("copy_", "_to_copy", "aten::cat", "clone", "contiguous", "empty_strided")),
)


def kind_of(name: str) -> str:
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return "other"


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def profile_model(name: str, batch: int, steps: int, compile: bool = False) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=1, num_classes=10)
    macs = round(model_gflop(model.eval(), 1, 32) * 1e9 / 2)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if compile:  # as `parnet train --compile`: the model (forward and backward), not the optimizer
        model = torch.compile(model)
    x, y = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))
    for _ in range(3):  # warm-up: oneDNN primitives and the allocator settle
        train_step(model, optimizer, x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, x, y)
        times.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(model, optimizer, x, y)
    by_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3 / steps  # ms per step
    step_s = statistics.median(times)
    return {
        "model": name + (" (compiled)" if compile else ""),
        "params": sum(p.numel() for p in model.parameters()),
        "macs_per_image": macs,
        "conv_gmacs_per_s": 3 * macs * batch / (by_kind["conv"] / 1e3) / 1e9,
        "step_ms": step_s * 1e3,
        "images_per_s": batch / step_s,
        "profiled_ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps, then as many profiled [5]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="also each model through torch.compile (inductor)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        profile_model(name, args.batch, args.steps, compiled)
        for name in args.models
        for compiled in ((False, True) if args.compile else (False,))
    ]
    kinds = [k for k, _ in KINDS] + ["other"]
    lines = [
        "| model | params | MMACs | step (ms) | images/s | conv GMAC/s | " + " | ".join(kinds) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |",
    ]
    for row in rows:
        total = sum(row["profiled_ms_by_kind"].values())
        shares = [row["profiled_ms_by_kind"].get(k, 0.0) for k in kinds]
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.3f} M | {row['macs_per_image'] / 1e6:.1f} | "
            f"{row['step_ms']:.0f} | {row['images_per_s']:.0f} | {row['conv_gmacs_per_s']:.1f} | "
            + " | ".join(f"{ms:.0f} ms ({100 * ms / total:.0f}%)" for ms in shares)
            + " |"
        )
    record = {"machine": machine_info(args.threads), "batch": args.batch, "steps": args.steps, "rows": rows}
    write_json_and_markdown(args.out, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
