"""Network depth, measured on the traced graph rather than read off a configuration.

Depth, as the paper counts it, is the number of convolution and linear layers on the longest path
from the input to the output. :func:`network_depth` exports the model with ``torch.export`` and
finds that path in the ATen graph, so it works for any exportable model (ParNet, timm's ResNets
and RepVGGs, fused or not).
"""

from __future__ import annotations

import torch
from torch import nn

# ATen ops that are one layer each. Matmuls inside attention are not layers in the paper's sense.
_LAYER_OPS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "linear",
    "addmm",
    "mkldnn_convolution",
    "cudnn_convolution",
}


def _is_layer(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", getattr(node.target, "__name__", ""))
    return name in _LAYER_OPS


def graph_depth(graph: torch.fx.Graph, inputs: set[str]) -> int:
    """Longest count of layer nodes on a path starting at one of the placeholders ``inputs``."""
    depth: dict[torch.fx.Node, int] = {}
    for node in graph.nodes:  # fx graphs are in topological order
        if node.op == "placeholder":
            if node.name in inputs:
                depth[node] = 0
            continue
        preds = [depth[p] for p in node.all_input_nodes if p in depth]
        if preds:  # reachable from the input; weights and buffers alone do not count
            depth[node] = max(preds) + _is_layer(node)
    outputs = [n for n in graph.nodes if n.op == "output"]
    return max((depth.get(n, 0) for n in outputs), default=0)


def network_depth(model: nn.Module, example_input: torch.Tensor) -> int:
    """Convolution and linear layers on the longest input-to-output path of ``model``.

    The model is traced in eval mode on ``example_input`` (its values do not matter, its shape
    must be one the model accepts); every submodule's training flag is restored afterwards (so a
    frozen BN stays in eval mode inside a model that is training).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example_input,), strict=False)
    finally:
        for m, training in modes:
            m.training = training
    sig = program.graph_signature
    user_inputs = set(sig.user_inputs)
    return graph_depth(program.graph, user_inputs)
