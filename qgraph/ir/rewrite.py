"""Safe constant rewrites: change a node's constant input without touching other readers.

A weight read by anything outside the transform (a tied embedding, a deduplicated
initializer) is never changed in place: the node being rewritten gets its own copy.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _unique_name(graph: ir.Graph, base: str) -> str:
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    return name


def set_constant_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, *, suffix: str = "rewritten") -> ir.Value:
    """Make input `index` of `node` the constant `array`; copy-on-write when others read the old value."""
    old = node.inputs[index]
    array = np.ascontiguousarray(array.astype(old.const_value.numpy().dtype, copy=False))
    readers = {id(user) for user, _ in old.uses()}
    if readers == {id(node)} and old not in graph.outputs and old.name in graph.initializers:
        old.const_value = ir.tensor(array, name=old.name)
        return old
    name = _unique_name(graph, f"{old.name}.{suffix}")
    new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(old.dtype),
                   const_value=ir.tensor(array, name=name))
    graph.register_initializer(new)
    node.replace_input_with(index, new)
    return new


def input_index(node: ir.Node, value: ir.Value) -> int:
    """Position of `value` among `node`'s inputs."""
    for i, v in enumerate(node.inputs):
        if v is value:
            return i
    raise ValueError(f"{value.name} is not an input of {node.name}")
