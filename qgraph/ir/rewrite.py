"""Safe constant rewrites: change a node's constant input without touching other readers.

A weight read by anything outside the transform (a tied embedding, a deduplicated
initializer) is never changed in place: the node being rewritten gets its own copy.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named `base` (suffixed _1, _2, ... if taken)."""
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def shared_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer `name`, added once: every node needing this constant reads the same one."""
    return graph.initializers[name] if name in graph.initializers else add_initializer(graph, name, array)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value the graph's inputs and nodes produce, by name (one walk, for many lookups)."""
    values = {v.name: v for v in graph.inputs}
    values.update({o.name: o for node in graph for o in node.outputs})
    return values


def set_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, *, suffix: str = "rewritten") -> ir.Value:
    """Make input `index` of `node` the constant `array`; copy-on-write when others read the old value."""
    old = node.inputs[index]
    array = np.ascontiguousarray(array.astype(old.const_value.numpy().dtype, copy=False))
    readers = {id(user) for user, _ in old.uses()}
    if readers == {id(node)} and old not in graph.outputs and old.name in graph.initializers:
        old.const_value = ir.tensor(array, name=old.name)
        old.shape = ir.Shape(array.shape)
        return old
    new = add_initializer(graph, f"{old.name}.{suffix}", array)
    node.replace_input_with(index, new)
    return new


def input_index(node: ir.Node, value: ir.Value) -> int:
    """Position of `value` among `node`'s inputs."""
    for i, v in enumerate(node.inputs):
        if v is value:
            return i
    raise ValueError(f"{value.name} is not an input of {node.name}")


def set_linear_weight(graph: ir.Graph, layer, w: np.ndarray) -> None:
    """Give a linear layer the logical [in, out] weight w, in the storage layout its node reads."""
    node = layer.node
    if node.op_type == "Gemm" and layer.transposed:
        layer.weight = set_constant_input(graph, node, 1, w.T)
    elif node.inputs[1].const_value is not None:
        layer.weight = set_constant_input(graph, node, 1, w)
    else:  # MatMul(x, Transpose(table)): a tied weight; this layer gets its own untied copy
        new = add_initializer(graph, f"{layer.name}.weight_untied", np.ascontiguousarray(w, dtype=np.float32))
        node.replace_input_with(1, new)
        layer.weight, layer.transposed = new, False


def scale_region(graph: ir.Graph, region, s: np.ndarray) -> None:
    """Divide the region's channels by s at its sources and multiply the sinks' rows by s (exact in float).

    Source channel c leaves the sources as X_c / s_c; sink input row r reads source channel
    region.sink_index[r], so its weight row is multiplied by s[sink_index[r]].
    """
    from qgraph.ir.regions import refreshed, weight_array

    s = np.asarray(s, dtype=np.float64)
    inv = 1.0 / s
    region = refreshed(region)  # a bias an earlier region's rewrite replaced (see refreshed)
    for src in region.sources:
        if src.kind in ("rmsnorm", "mul", "layernorm"):
            gamma = src.gamma.const_value.numpy().astype(np.float64)
            set_constant_input(graph, src.node, input_index(src.node, src.gamma), gamma * inv)
            if src.beta is not None:
                beta = src.beta.const_value.numpy().astype(np.float64)
                set_constant_input(graph, src.node, input_index(src.node, src.beta), beta * inv)
        elif src.kind in ("linear", "gated_product"):
            layer = src.linear  # the up-projection for a gated product: silu(g) * (x W_up) is linear in it
            set_linear_weight(graph, layer, weight_array(layer).astype(np.float64) * inv[None, :])
            if src.bias is not None:
                b = src.bias.const_value.numpy().astype(np.float64)
                set_constant_input(graph, src.bias_node, input_index(src.bias_node, src.bias), b * inv)
        else:
            raise ValueError(f"region {region.name}: cannot scale a source of kind {src.kind}")
    rows = s[region.sink_index]
    for sink in region.sinks:
        set_linear_weight(graph, sink, weight_array(sink).astype(np.float64) * rows[:, None])


def _bias_factor(node: ir.Node) -> float:
    """How a node scales its bias input: Gemm's beta attribute, 1 for an Add."""
    return node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0


def shift_region(graph: ir.Graph, region, z: np.ndarray):
    """Subtract z from the region's channels at its sources and add z @ B to every sink's bias (exact in float).

    Source channel c leaves the sources as X_c - z_c (LayerNorm beta or the linear's bias takes -z);
    each sink adds z[sink_index] @ B to its bias, with B as it is now, so shift before scaling.
    The caller checks qgraph.ir.regions.shift_refusal first. Returns the region with its updated
    source constants (shared ones are copied first, so no other node sees the change).
    """
    import dataclasses

    from qgraph.ir.regions import linear_bias, unshare, weight_array

    z = np.asarray(z, dtype=np.float64)
    region = unshare(graph, region)
    rows = z[region.sink_index]
    for sink in region.sinks:
        bias, node = linear_bias(sink)
        b = bias.const_value.numpy().astype(np.float64)
        alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
        moved = alpha * (rows @ weight_array(sink).astype(np.float64)) / _bias_factor(node)
        set_constant_input(graph, node, input_index(node, bias), b + moved.reshape(b.shape), suffix="shifted")
    sources = []
    for src in region.sources:
        field, node = ("beta", src.node) if src.kind == "layernorm" else ("bias", src.bias_node)
        value = getattr(src, field)
        old = value.const_value.numpy().astype(np.float64)
        new = set_constant_input(graph, node, input_index(node, value), old - z.reshape(old.shape) / _bias_factor(node),
                                 suffix="shifted")
        sources.append(dataclasses.replace(src, **{field: new}))
    return dataclasses.replace(region, sources=sources)


def permute_region(graph: ir.Graph, region, perm: np.ndarray) -> None:
    """Reorder a linear-sourced region's channels: new channel j is old channel perm[j] (exact in float).

    The sources' output columns (a gated product's gate and up both) and biases take perm; each sink
    row r reads source channel c = sink_index[r], so it takes the row that read perm[c] before: r + perm[c] - c
    on the contiguous per-head layout the paths produce (checked, so a layout that is not refuses).
    """
    from qgraph.ir.regions import linear_bias, weight_array

    perm = np.asarray(perm, dtype=np.int64)
    idx = region.sink_index
    rows = np.arange(len(idx)) + perm[idx] - idx
    if rows.min() < 0 or rows.max() >= len(idx) or np.any(idx[rows] != perm[idx]):
        raise ValueError(f"region {region.name}: its sinks do not read the permuted channels in contiguous blocks")
    for src in region.sources:
        if src.kind not in ("linear", "gated_product"):
            raise ValueError(f"region {region.name}: a {src.kind} source cannot reorder its output channels alone")
        for layer in (src.linear, src.gate):
            if layer is None:
                continue
            set_linear_weight(graph, layer, weight_array(layer)[:, perm])
            bias, node = linear_bias(layer)
            if bias is not None:
                b = bias.const_value.numpy()
                set_constant_input(graph, node, input_index(node, bias), b.reshape(-1)[perm].reshape(b.shape),
                                   suffix="permuted")
    for sink in region.sinks:
        set_linear_weight(graph, sink, weight_array(sink)[rows])


class NodeChain:
    """New nodes named '<base>.<suffix>' (each output named as its node) and their constants, kept in order
    so a rewrite inserts them in one place."""

    def __init__(self, graph: ir.Graph, base: str):
        self.graph, self.base, self.nodes = graph, base, []

    def op(self, kind: str, inputs: list, suffix: str, **attrs) -> ir.Value:
        node = ir.node(kind, inputs, attributes=attrs, name=f"{self.base}.{suffix}")
        node.outputs[0].name = f"{self.base}.{suffix}"
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, suffix: str, array) -> ir.Value:
        return add_initializer(self.graph, f"{self.base}.{suffix}", np.asarray(array))
