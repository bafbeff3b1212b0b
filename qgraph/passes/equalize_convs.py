"""equalize_convs: data-free cross-layer equalization of consecutive convolutions (Nagel et al., ICCV 2019).

For Conv1 -> f -> Conv2 with f positive-homogeneous (f(x / s) = f(x) / s for s > 0: Relu, or nothing),
channel i between them is scaled: Conv1's output channel i (weights and bias) by 1 / s_i, Conv2's
input channel i by s_i, with s_i = sqrt(r1_i / r2_i), r1_i and r2_i the channel's weight ranges on
either side. Both sides then span sqrt(r1_i r2_i): a depthwise layer's channels, whose ranges differ
by orders of magnitude, no longer waste a per-tensor (or coarse) weight grid. The function is
unchanged (verified like every function-preserving pass). Several sweeps, as the paper iterates:
equalizing (1, 2) moves Conv2's output ranges, which (2, 3) then sees.

Refused, with the reason in the summary: Clip (ReLU6) between the two (its bound 6 is one scalar: a
per-channel scale would need a per-channel bound), any other activation, a Conv1 output read by
anything else, ConvTranspose.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.ir.convs import ConvLayer, conv_weight, find_convs
from qgraph.ir.rewrite import set_constant_input
from qgraph.options import option
from qgraph.passes.registry import PassContext, register

HOMOGENEOUS = ("Relu",)  # f(x / s) = f(x) / s for every s > 0


@dataclasses.dataclass(frozen=True)
class EqualizeOptions:
    sweeps: int = option(4, "passes over every pair (equalizing one pair moves its neighbours' ranges)", ge=1, le=100)


def _pair_of(conv: ConvLayer, by_node: dict[int, ConvLayer]) -> tuple[ConvLayer | None, str | None]:
    """The convolution conv's output reaches through at most one positive-homogeneous op, or why there is none."""
    value = conv.node.outputs[0]
    users = list(value.uses())
    if len(users) != 1:
        return None, f"its output has {len(users)} readers"
    node, index = users[0]
    if node.op_type in HOMOGENEOUS:
        if len(node.outputs[0].uses()) != 1:
            return None, f"its {node.op_type} output has several readers"
        node, index = next(iter(node.outputs[0].uses()))
    elif node.op_type == "Clip":
        return None, "Clip (ReLU6) follows: its bound is one scalar, a per-channel scale would need one per channel"
    nxt = by_node.get(id(node))
    if nxt is None or index != 0:
        return None, f"{node.op_type} follows, not a convolution through Relu"
    if conv.transposed or nxt.transposed:
        return None, "ConvTranspose: its channel layout is not handled here"
    return nxt, None


def _input_channel_ranges(w2: np.ndarray, groups: int, channels: int) -> np.ndarray:
    """max |W2| over everything reading input channel i (grouped and depthwise layouts alike)."""
    out_ch, per_group = w2.shape[0], w2.shape[1]
    g = w2.reshape(groups, out_ch // groups, per_group, -1)  # [group, out in group, in in group, k]
    r = np.abs(g).max(axis=(1, 3))  # [group, in in group]
    return r.reshape(channels)


def _scale_input_channels(w2: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    out_ch, per_group = w2.shape[0], w2.shape[1]
    g = w2.reshape(groups, out_ch // groups, per_group, -1) * s.reshape(groups, 1, per_group, 1)
    return g.reshape(w2.shape)


class EqualizeConvsPass(ir.passes.InPlacePass):
    """Cross-layer equalization of Conv -> (Relu) -> Conv pairs; function-preserving."""

    function_preserving = True

    def __init__(self, sweeps: int = 4):
        super().__init__()
        self.sweeps = sweeps
        self.pairs: list[str] = []
        self.refused: dict[str, str] = {}
        self.spread_before = self.spread_after = 0.0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        convs = find_convs(model)
        by_node = {id(c.node): c for c in convs}
        pairs = []
        for conv in convs:
            nxt, reason = _pair_of(conv, by_node)
            if nxt is None:
                self.refused[conv.name] = reason
            else:
                pairs.append((conv, nxt))
        self.pairs = [f"{a.name} -> {b.name}" for a, b in pairs]
        if not pairs:
            return ir.passes.PassResult(model, modified=False)
        self.spread_before = self._spread(pairs)
        for _ in range(self.sweeps):
            for a, b in pairs:
                self._equalize(model.graph, a, b)
        self.spread_after = self._spread(pairs)
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _spread(pairs) -> float:
        """Mean over pairs of log10(max / min) of Conv1's output-channel weight ranges (what equalization narrows)."""
        spreads = []
        for a, _ in pairs:
            w = conv_weight(a)
            r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
            spreads.append(np.log10(r.max() / max(r.min(), 1e-30)))
        return float(np.mean(spreads))

    @staticmethod
    def _equalize(graph: ir.Graph, a: ConvLayer, b: ConvLayer) -> None:
        w1, w2 = conv_weight(a), conv_weight(b)
        channels = w1.shape[0]
        r1 = np.abs(w1).reshape(channels, -1).max(axis=1)
        r2 = _input_channel_ranges(w2, b.groups, channels)
        s = np.ones(channels, np.float64)
        live = (r1 > 0) & (r2 > 0)  # a dead channel keeps its scale
        s[live] = np.sqrt(r1[live] / r2[live])
        s = s.astype(np.float32)
        set_constant_input(graph, a.node, 1, w1 / s.reshape(-1, *([1] * (w1.ndim - 1))), suffix="equalized")
        if len(a.node.inputs) > 2 and a.node.inputs[2] is not None:
            set_constant_input(graph, a.node, 2, a.node.inputs[2].const_value.numpy() / s, suffix="equalized")
        set_constant_input(graph, b.node, 1, _scale_input_channels(w2, b.groups, s), suffix="equalized")
        a.weight, b.weight = a.node.inputs[1], b.node.inputs[1]

    def summary(self) -> dict:
        return {"pairs": len(self.pairs), "refused": self.refused,
                "weight_range_spread_log10": {"before": round(self.spread_before, 3), "after": round(self.spread_after, 3)}}


@register("equalize_convs", EqualizeOptions, data_free=True,
          help="data-free cross-layer equalization of Conv -> (Relu) -> Conv pairs (Nagel et al. 2019)")
def build(options: EqualizeOptions, ctx: PassContext) -> EqualizeConvsPass:
    del ctx  # data-free
    return EqualizeConvsPass(options.sweeps)
