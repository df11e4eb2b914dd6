"""The variant table: parameters (training and fused form), GFLOPs, depth, input size."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from .depth import network_depth
from .layers import reparameterize
from .model import model_cfgs


def variant_summary(name: str) -> dict[str, Any]:
    """Measured figures of one registered variant (built on the meta device: no weights allocated)."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
        size = tuple(model.pretrained_cfg["input_size"])
        x = torch.empty(1, *size)
        fused = reparameterize(model)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fused(x)
        depth = network_depth(fused, x)
    cfg = model.cfg
    return {
        "name": name,
        "form": "small-input" if cfg.small_input else "imagenet",
        "widths": list(cfg.widths),
        "head_width": cfg.head_width,
        "blocks": list(cfg.blocks),
        "act": cfg.act,
        "num_classes": model.num_classes,
        "input_size": list(size),
        "params_train_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "params_fused_m": sum(p.numel() for p in fused.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
        "depth": depth,
    }


def summary(names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows for ``names`` (default: every registered variant)."""
    names = [name.split(".")[0] for name in names] if names else None  # timm's pretrained tags name one variant
    unknown = sorted(set(names or ()) - set(model_cfgs))
    if unknown:
        raise ValueError(f"unknown ParNet variant {unknown[0]!r}; choose from {sorted(model_cfgs)}")
    return [variant_summary(n) for n in (names or list(model_cfgs))]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`summary` rows."""
    lines = [
        "| variant | form | widths | head | act | input | params (train) | params (fused) | GFLOPs | depth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"][1:])
        lines.append(
            f"| {r['name']} | {r['form']} | {','.join(map(str, r['widths']))} | {r['head_width']} | {r['act']} "
            f"| {size} | {r['params_train_m']:.2f} M | {r['params_fused_m']:.2f} M | {r['gflops']:.2f} | {r['depth']} |"
        )
    return "\n".join(lines)
