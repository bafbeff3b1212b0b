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


def _resize_channels(source, sink, width: int) -> None:
    """The exporter recorded the old width on the values between the sources and the sink: give them the new one.

    Their last axis is the channel axis (elementwise ops of a gated product); any other shape is
    dropped for ONNX Runtime to infer, as the region finder reads ranks from what is left.
    """
    for v in _values_between([source.gate.node.outputs[0], source.linear.node.outputs[0]], sink.node):
        if v.shape is not None and len(v.shape) >= 1:
            v.shape = ir.Shape([*v.shape[:-1], width])
        else:
            v.shape = None


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
    _resize_channels(source, sink, width)
    return dataclasses.replace(region, channels=width, sink_index=np.arange(width, dtype=np.int64))



def merge_cost(gram: np.ndarray, row_norm2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cost[i, j] of merging channel j into i (j dropped, row_i += a_ij row_j) and the factors a_ij.

    With x_j ~ a x_i (least squares, a = <x_i, x_j> / <x_i, x_i>) the output moves by (x_j - a x_i) w_j,
    whose expected square is (G_jj - G_ij^2 / G_ii) |w_j|^2 from the channels' Gram matrix G = X^T X.
    """
    g = np.asarray(gram, dtype=np.float64)
    d = np.diag(g).copy()
    safe = np.where(d > 0, d, 1.0)
    a = np.where(d[:, None] > 0, g / safe[:, None], 0.0)
    residual = np.maximum(d[None, :] - g * a, 0.0)  # [i, j]: G_jj - G_ij^2 / G_ii
    return residual * row_norm2[None, :], a


def assembly_pairs(cost: np.ndarray, count: int, allowed: np.ndarray) -> list[tuple[int, int]]:
    """`count` disjoint (keep i, drop j) pairs among the allowed channels, cheapest first (greedy)."""
    c = cost.astype(np.float64, copy=True)
    blocked = ~allowed
    c[blocked, :] = np.inf
    c[:, blocked] = np.inf
    np.fill_diagonal(c, np.inf)
    pairs = []
    for _ in range(count):
        flat = int(np.argmin(c))
        i, j = divmod(flat, c.shape[1])
        if not np.isfinite(c[i, j]):
            break
        pairs.append((i, j))
        c[[i, j], :] = np.inf
        c[:, [i, j]] = np.inf
    return pairs


def assemble_channels(graph: ir.Graph, region: Region, pairs: list[tuple[int, int]], factors: np.ndarray) -> Region:
    """QLLM's channel assembly: channel j of each (i, j) is dropped and the sink reads a_ij x_i in its place.

    Approximate (x_j is replaced by its least-squares fit from x_i): the caller reports the error.
    Gate and up columns j and down row j go; down row i becomes w_i + a_ij w_j.
    """
    if not pairs:
        return region
    source, sink = region.sources[0], region.sinks[0]
    w_down = weight_array(sink).astype(np.float64)
    for i, j in pairs:
        w_down[i] += factors[i, j] * w_down[j]
    keep = np.setdiff1d(np.arange(region.channels), [j for _, j in pairs])
    for layer in (source.gate, source.linear):
        set_linear_weight(graph, layer, weight_array(layer)[:, keep])
        layer.out_features = len(keep)
    set_linear_weight(graph, sink, w_down[keep].astype(np.float32))
    sink.in_features = len(keep)
    _resize_channels(source, sink, len(keep))
    return dataclasses.replace(region, channels=len(keep), sink_index=np.arange(len(keep), dtype=np.int64))
