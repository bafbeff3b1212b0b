"""split_channels: exact channel splitting for a gated MLP (QSM dimensional reconstruction, QLLM disassembly).

Channel c of the gated product silu(g_c) * u_c becomes k copies silu(g_c) * (u_c / k): the gate
column is duplicated, the up column is scaled by 1/k and duplicated, and the down row is
duplicated, so the sum over the copies is the original term. The widened channels each span 1/k
of the outlier's range, which is what lets a per-output-channel weight scale and a per-tensor
activation grid both fit. The graph gains no node: only the three weights grow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.ir.regions import Region, linear_bias, weight_array
from qgraph.ir.rewrite import set_linear_weight


def _values_between(start: list[ir.Value], stop: ir.Node) -> list[ir.Value]:
    """Values on every path from `start` up to (not including) the node `stop`."""
    seen: dict[int, ir.Value] = {}
    frontier = list(start)
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen[id(v)] = v
        for user, _ in v.uses():
            if user is not stop:
                frontier.extend(user.outputs)
    return list(seen.values())


def split_refusal(region: Region) -> str | None:
    """Why split_channels cannot widen the region, or None when it can."""
    if region.kind != "up->down" or len(region.sources) != 1 or len(region.sinks) != 1:
        return "split_channels handles a gated MLP (one up -> one down) only"
    source = region.sources[0]
    # A bias (an Add after the linear, or Gemm's C) would need its entries duplicated too.
    biased = [layer.name for layer in (source.gate, source.linear) if linear_bias(layer)[0] is not None]
    if biased:
        return f"gate/up with biases ({', '.join(biased)}) cannot be split yet"
    return None


def split_channels(graph: ir.Graph, region: Region, copies: dict[int, int]) -> Region:
    """Split channel c of an up->down region into copies[c] exact parts; returns the widened region."""
    reason = split_refusal(region)
    if reason:
        raise QGraphError(f"region {region.name}: {reason}", "check split_refusal(region) first, or skip the split")
    source, sink = region.sources[0], region.sinks[0]
    order = sorted(c for c, k in copies.items() if k > 1)
    if not order:
        return region
    extra = [c for c in order for _ in range(copies[c] - 1)]
    factor = np.ones(region.channels)
    for c in order:
        factor[c] = 1.0 / copies[c]
    w_gate = weight_array(source.gate)
    w_up = weight_array(source.linear) * factor[None, :].astype(np.float32)
    w_down = weight_array(sink)
    set_linear_weight(graph, source.gate, np.concatenate([w_gate, w_gate[:, extra]], axis=1))
    set_linear_weight(graph, source.linear, np.concatenate([w_up, w_up[:, extra]], axis=1))
    set_linear_weight(graph, sink, np.concatenate([w_down, w_down[extra, :]], axis=0))
    width = region.channels + len(extra)
    for layer in (source.gate, source.linear):
        layer.out_features = width
    sink.in_features = width
    # The exporter recorded the old width on the intermediate values; let ORT infer the new one.
    for v in _values_between([source.gate.node.outputs[0], source.linear.node.outputs[0]], sink.node):
        v.shape = None
    return dataclasses.replace(region, channels=width, sink_index=np.arange(width, dtype=np.int64))

