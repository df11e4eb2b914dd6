"""Each convolution's int8 gain, from the per-layer counters that ``openvino_layers.py`` wrote.

Joins every convolution's time in the fp32 and int8 profiles of one model and batch with its
arithmetic (2 FLOPs per multiply-add, from a forward of the model the engine ran: the folded
ParNet, or the timm baseline as it is), and lists each one's rate in both precisions and their
ratio, then the convolutions' total against the whole call's. No timing of its own: it reads a
JSON, so it can run on a busy machine. Issue 14's point 3 (ParNet's int8 gain against ResNet's)
asks how much of the gap lies in the convolutions and how much in the layers around them.

    PYTHONPATH=src python benchmarks/openvino_conv_gains.py benchmarks/results/openvino_layers_s19.json \
        --out benchmarks/results/openvino_conv_gains_s19
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from torch import nn

import parnet  # noqa: F401  (registers the ParNet models with timm)
from parnet.bench.report import write_json_and_markdown
from parnet.deployment.folding import fold
from parnet.model import ParNet


def conv_flops(name: str, resolution: int) -> dict[str, int]:
    """FLOPs per image of each convolution of the model the engine ran, by module name."""
    model = timm.create_model(name).eval()
    if isinstance(model, ParNet):
        model = fold(model)
    flops = {}

    def count(module_name: str):
        def hook(conv: nn.Conv2d, inputs: tuple, out: torch.Tensor) -> None:
            flops[module_name] = 2 * out[0].numel() * conv.weight[0].numel()  # the weight of one output channel

        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(count(module_name))
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return flops


def conv_times(nodes: dict[str, dict]) -> dict[str, float]:
    """Each convolution's own time (ms) in a profile, by OpenVINO's node name."""
    return {node: value["ms"] for node, value in nodes.items() if "Convolution" in value["kind"]}


def module_name(node: str) -> str | None:
    """The module a convolution's node came from (``__module.NAME/aten::_convolution/...``); ``None`` where
    OpenVINO named it after another node (a baseline's conv carries the name of its folded BN)."""
    if node.startswith("__module.") and "/aten::_convolution/" in node:
        return node.removeprefix("__module.").split("/")[0]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profiles", type=Path, help="a JSON written by openvino_layers.py (fp32 and int8 profiles)")
    p.add_argument("--resolution", type=int, default=224, help="the profiles' input size [224]")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = p.parse_args()
    record = json.loads(args.profiles.read_text())
    by_key = {(prof["model"], prof["mode"], prof["batch"]): prof for prof in record["profiles"]}
    rows, lines = [], []
    for (model, mode, batch), int8 in by_key.items():
        fp32 = by_key.get((model, "openvino", batch))
        if mode != "int8:openvino" or fp32 is None:
            continue
        flops = conv_flops(model, args.resolution)
        t32, t8 = conv_times(fp32["nodes"]), conv_times(int8["nodes"])
        if not len(flops) == len(t32) == len(t8):  # a conv fused into another layer: the totals would be wrong
            raise SystemExit(f"{model}: {len(flops)} convolutions, {len(t32)} and {len(t8)} counted in fp32 and int8")
        total = {"gflop": sum(flops.values()) * batch / 1e9, "fp32_ms": sum(t32.values()), "int8_ms": sum(t8.values())}
        by_module32 = {module_name(n): ms for n, ms in t32.items()}
        by_module8 = {module_name(n): ms for n, ms in t8.items()}
        convs = [
            {"conv": c, "gflop": flops[c] * batch / 1e9, "fp32_ms": by_module32[c], "int8_ms": by_module8[c]}
            for c in flops
            if c in by_module32 and c in by_module8
        ]
        rows.append({"model": model, "batch": batch, "convs": convs, "total": total,
                     "wall_fp32_ms": fp32["wall_ms"], "wall_int8_ms": int8["wall_ms"]})  # fmt: skip
        lines += [
            f"**{model}, batch {batch}**: {len(flops)} convolutions, {total['gflop']:.1f} GFLOP: "
            f"{total['fp32_ms']:.1f} ms fp32 ({total['gflop'] / total['fp32_ms'] * 1e3:.0f} GFLOP/s), "
            f"{total['int8_ms']:.1f} ms int8 ({total['gflop'] / total['int8_ms'] * 1e3:.0f} GOP/s), gain "
            f"{total['fp32_ms'] / total['int8_ms']:.2f}x; whole call {fp32['wall_ms']:.1f} / {int8['wall_ms']:.1f} ms, "
            f"gain {fp32['wall_ms'] / int8['wall_ms']:.2f}x",
            "",
        ]
        if not convs:
            lines += ["(OpenVINO named these convolutions after other nodes: totals only)", ""]
            continue
        lines += [
            "| convolution | GFLOP | fp32 ms | fp32 GFLOP/s | int8 ms | int8 GOP/s | gain |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in convs:
            rate32, rate8 = c["gflop"] / c["fp32_ms"] * 1e3, c["gflop"] / c["int8_ms"] * 1e3
            lines.append(
                f"| `{c['conv']}` | {c['gflop']:.2f} | {c['fp32_ms']:.2f} | {rate32:.0f} | {c['int8_ms']:.2f} | "
                f"{rate8:.0f} | {c['fp32_ms'] / c['int8_ms']:.2f}x |"
            )
        lines.append("")
    if not rows:
        raise SystemExit(f"{args.profiles} holds no pair of openvino and int8:openvino profiles of one model and batch")
    write_json_and_markdown(args.out, {"profiles": str(args.profiles), "rows": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
