"""Where an OpenVINO call spends its time: the CPU plugin's per-layer counters, grouped by kind of layer.

For each model and precision (fp32, int8) this builds the same OpenVINO model that ``parnet bench``
times (``deploy(..., mode="openvino")`` for ParNet, the engine form of the baselines), compiles it
with ``PERF_COUNT`` for each input shape, and runs every (model, precision, shape) ``--reps`` times,
in rotation after two rounds of warm-up, with the bench's settle pause between calls (so that a
host's drift falls on all alike). Each executed layer's own time (its median over the repetitions)
is added up per kind, OpenVINO's node type and the kernel it ran (e.g. ``Convolution jit_avx2_I8``),
and over all layers ("counted"), beside the median of the whole call ("wall"; the counters add some
time of their own). The JSON keeps every layer's median; the markdown lists the slowest layers other
than the convolutions. Random BN statistics and calibration batches, as in the bench: timing does not
depend on the values.

Issue 14's analysis of ParNet's smaller int8 gain (point 3) rests on it: which of ParNet's layers
that ResNet does not have (gates, gated multiplies, channel splits) int8 leaves in float, and what
they cost.

    PYTHONPATH=src python benchmarks/openvino_layers.py --out benchmarks/results/openvino_layers
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parnet.bench.machine import machine_info
from parnet.bench.report import write_json_and_markdown
from parnet.bench.run import build_entries
from parnet.deployment.engines import OpenVinoModule, openvino_core, openvino_float_precision
from parnet.deployment.timing import SETTLE_S


def profiled_request(module: OpenVinoModule, shape: tuple[int, ...], threads: int) -> Any:
    """An infer request of ``module``'s OpenVINO model compiled for ``shape`` with the per-layer counters on."""
    import openvino as ov

    model = module.model.clone()
    model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
    config = {
        "INFERENCE_PRECISION_HINT": openvino_float_precision(module.precision),
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True,
    }
    return openvino_core().compile_model(model, "CPU", config).create_infer_request()


def layer_times(request: Any, x: np.ndarray) -> tuple[float, dict[str, tuple[str, float]]]:
    """One call: its wall time (ms), and each executed layer's kind and own time (ms), by layer name."""
    start = time.perf_counter()
    request.infer({0: x})
    wall = (time.perf_counter() - start) * 1e3
    layers = {}
    for info in request.get_profiling_info():
        if info.status == info.Status.EXECUTED:  # the others were fused into another layer, or are constants
            layers[info.node_name] = (f"{info.node_type} {info.exec_type}", info.real_time.total_seconds() * 1e3)
    return wall, layers


def summarize(calls: list[tuple[float, dict[str, tuple[str, float]]]]) -> dict:
    """Medians over the calls of each layer's time, summed per kind and over all layers; the whole call's median."""
    nodes = {
        name: {"kind": kind, "ms": statistics.median(layers[name][1] for _, layers in calls)}
        for name, (kind, _) in calls[-1][1].items()
    }
    kinds: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "layers": 0})
    for node in nodes.values():
        kinds[node["kind"]]["ms"] += node["ms"]
        kinds[node["kind"]]["layers"] += 1
    return {
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["ms"])),
        "counted_ms": sum(node["ms"] for node in nodes.values()),
        "wall_ms": statistics.median(wall for wall, _ in calls),
        "nodes": dict(sorted(nodes.items(), key=lambda kv: -kv[1]["ms"])),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="parnet_s,resnet34", help="timm names, comma-separated [parnet_s,resnet34]")
    p.add_argument("--precisions", default="fp32,int8", help="comma-separated [fp32,int8]")
    p.add_argument("--batches", default="1,32", help="comma-separated [1,32]")
    p.add_argument("--reps", type=int, default=5, help="profiled calls of each, after two rounds of warm-up [5]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--top", type=int, default=8, help="kinds listed per profile in the markdown [8]")
    p.add_argument("--top-nodes", type=int, default=8, help="slowest layers that are no convolution, listed [8]")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    modes = [f"{precision}:openvino" if precision != "fp32" else "openvino" for precision in args.precisions.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    requests = {}  # (model, mode, batch): (request, input); all built first, then profiled interleaved
    for name in args.models.split(","):
        _, entries = build_entries(name, modes, torch.device("cpu"), args.threads, resolution=args.resolution)
        for mode, module in entries.items():
            for batch in batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, args.resolution, args.resolution), np.float32)
                requests[(name, mode, batch)] = (profiled_request(module, x.shape, args.threads), x)
    calls = {key: [] for key in requests}
    for rep in range(-2, args.reps):  # two rounds of warm-up: first calls allocate and pick kernels
        for key, (request, x) in requests.items():
            time.sleep(SETTLE_S)  # as the bench: let the previous call's threads go idle
            result = layer_times(request, x)
            if rep >= 0:
                calls[key].append(result)
    profiles = []
    for (name, mode, batch), key_calls in calls.items():
        result = summarize(key_calls)
        profiles.append({"model": name, "mode": mode, "batch": batch, **result})
        print(f"{name} {mode} batch {batch}: wall {result['wall_ms']:.1f} ms, counted {result['counted_ms']:.1f}")
    lines = []
    for prof in profiles:
        lines += [
            f"**{prof['model']}, {prof['mode']}, batch {prof['batch']}**: wall {prof['wall_ms']:.1f} ms, "
            f"layers counted {prof['counted_ms']:.1f} ms",
            "",
            "| layer kind (OpenVINO node type, kernel) | layers | ms per call | share of counted |",
            "| --- | ---: | ---: | ---: |",
        ]
        shown = list(prof["kinds"].items())[: args.top]
        for kind, k in shown:
            lines.append(f"| {kind} | {k['layers']} | {k['ms']:.2f} | {k['ms'] / prof['counted_ms']:.1%} |")
        rest = prof["counted_ms"] - sum(k["ms"] for _, k in shown)
        others = len(prof["kinds"]) - len(shown)
        lines += [f"| (the other {others} kinds) | | {rest:.2f} | {rest / prof['counted_ms']:.1%} |", ""]
        slowest = [(n, v) for n, v in prof["nodes"].items() if "Convolution" not in v["kind"]][: args.top_nodes]
        lines += ["| slowest layers but the convolutions | kind | ms per call |", "| --- | --- | ---: |"]
        lines += [f"| `{name}` | {v['kind']} | {v['ms']:.2f} |" for name, v in slowest] + [""]
    record = {"machine": machine_info(args.threads), "reps": args.reps, "profiles": profiles}
    write_json_and_markdown(args.out, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
