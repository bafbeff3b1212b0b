"""Is a graph well formed enough to analyse? Node arity and attribute types against the ONNX schemas.

The recognisers in ir/regions.py index node inputs and read attributes as the ONNX operator
definitions promise; a damaged or hand-edited file (a MatMul with one input, a perm stored as an
int) would otherwise surface as an IndexError deep in a walk. These checks turn that into one
QGraphError naming the node and what is wrong with it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.errors import QGraphError

_FIX = "the graph is malformed: re-export the model (or repair that node)"


@functools.cache
def _schema(op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:  # not an ONNX operator: analysed as an unknown op, not checked
        return None


def check_nodes(model: ir.Model) -> None:
    """Raise QGraphError for the first default-domain node whose inputs or attributes break its ONNX schema."""
    opset = model.opset_imports.get("", 21)
    for node in model.graph:
        what = f"node {node.name!r} ({node.op_type})"
        names = [node.name, node.op_type] + [v.name for v in (*node.inputs, *node.outputs) if v is not None]
        if not all(isinstance(x, (str, type(None))) for x in names):  # protobuf hands back bytes that are not UTF-8
            raise QGraphError(f"{what} has a name that is not UTF-8 text", "the model file is damaged: re-export it")
        if node.domain not in ("", "ai.onnx"):
            continue
        schema = _schema(node.op_type, opset)
        if schema is None:
            continue
        if not schema.min_output <= len(node.outputs) <= schema.max_output:
            raise QGraphError(f"{what} has {len(node.outputs)} outputs; ONNX {node.op_type} gives "
                              f"{schema.min_output}..{schema.max_output}", _FIX)
        n = len(node.inputs)
        if not schema.min_input <= n <= schema.max_input:
            bound = schema.min_input if schema.min_input == schema.max_input else f"{schema.min_input}..{schema.max_input}"
            raise QGraphError(f"{what} has {n} inputs; ONNX {node.op_type}-{schema.since_version} takes {bound}", _FIX)
        for i, formal in enumerate(schema.inputs[:n]):
            if formal.option == onnx.defs.OpSchema.FormalParameterOption.Single and node.inputs[i] is None:
                raise QGraphError(f"{what} lacks its required input {i} ({formal.name})", _FIX)
        for name, attr in node.attributes.items():
            expected = schema.attributes.get(name)
            if expected is not None and int(attr.type) != int(expected.type):
                raise QGraphError(f"{what} attribute {name!r} is {attr.type.name}, ONNX expects {expected.type.name}",
                                  _FIX)


def constant_array(value: ir.Value) -> np.ndarray:
    """A constant's values; a tensor whose data does not match its dtype and shape raises QGraphError."""
    try:
        return value.const_value.numpy()
    except (ValueError, TypeError) as exc:
        raise QGraphError(f"constant {value.name!r} does not decode as {value.const_value.dtype} "
                          f"{list(value.const_value.shape)}: {str(exc).splitlines()[0][:120]}",
                          "the model file is damaged: re-export it") from None
