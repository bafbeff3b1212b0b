"""Convolutions with a constant weight: the quantizable layers of CNNs (Conv, ConvTranspose, any group count).

Kept apart from `find_linears` on purpose: the smoothing, rotation and rounding passes read a linear's
weight as one [in, out] matrix, which a 4-D kernel is not. A Conv is annotated and lowered by the
per-tensor / per-channel int8 path only (QuantizeLinear -> DequantizeLinear around it, which ONNX
Runtime fuses into QLinearConv).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.ir.validate import constant_array

CONV_OPS = ("Conv", "ConvTranspose")


@dataclasses.dataclass
class ConvLayer:
    """Conv / ConvTranspose(x, W[, b]) with W a constant."""

    name: str
    node: ir.Node
    weight: ir.Value
    groups: int

    @property
    def transposed(self) -> bool:
        return self.node.op_type == "ConvTranspose"

    @property
    def out_axis(self) -> int:
        """The weight axis of output channels: 0 for Conv [O, I/g, k..], 1 for ConvTranspose [I, O/g, k..]."""
        return 1 if self.transposed else 0

    @property
    def out_channels(self) -> int:
        shape = self.weight.shape
        return int(shape[1]) * self.groups if self.transposed else int(shape[0])

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def kind(self) -> str:
        """Conv, depthwise Conv, grouped Conv or ConvTranspose, as a report says it."""
        if self.transposed:
            return "ConvTranspose"
        if self.groups > 1:
            return "depthwise Conv" if int(self.weight.shape[1]) == 1 else f"grouped Conv ({self.groups} groups)"
        return "Conv"


def _constant_weight(value: ir.Value | None) -> bool:
    if value is None or value.is_graph_input() or value.const_value is None:
        return False
    dims = list(value.shape or ())
    return len(dims) >= 3 and all(isinstance(d, int) for d in dims) and dims == list(value.const_value.shape)


def find_convs(model: ir.Model) -> list[ConvLayer]:
    """Every Conv / ConvTranspose whose weight is a constant, in graph order."""
    layers = []
    for node in model.graph:
        if node.op_type in CONV_OPS and node.domain in ("", "ai.onnx") and len(node.inputs) > 1 \
                and _constant_weight(node.inputs[1]):
            layers.append(ConvLayer(node.name or node.inputs[1].name, node, node.inputs[1],
                                    node.attributes.get_int("group", 1)))
    return layers


def conv_weight(layer: ConvLayer) -> np.ndarray:
    return constant_array(layer.weight).astype(np.float32)


def channel_axis(value: ir.Value) -> int:
    """The channel axis of an activation as its readers see it: 1 for a convolution's input (NCHW), else the last."""
    for user, index in value.uses():
        if user.op_type in CONV_OPS and index == 0:
            return 1
    return -1


def quantized_output(layer: ConvLayer, *, through_activation: bool) -> ir.Value | None:
    """The value to quantize after a convolution: its output, or that of the Relu / Clip it alone feeds.

    ORT fuses DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv, and drops a Relu / Clip between
    Conv and QuantizeLinear when the quantized range lies inside the activation's. That holds for
    asymmetric uint8 (Relu's zero point is 0): through_activation=True quantizes after the Relu / Clip. A
    symmetric grid would waste half its codes there, so it quantizes the Conv's own output instead.
    None when the value is a graph output (it stays float, as the model returns it).
    """
    out = layer.node.outputs[0]
    users = [u for u, _ in out.uses()]
    if through_activation and len(users) == 1 and users[0].op_type in ("Relu", "Clip") and not out.is_graph_output():
        out = users[0].outputs[0]
    return None if out.is_graph_output() else out
