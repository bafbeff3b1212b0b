"""Mutated copies of serialized ONNX models, for fuzzing the loader and the region finder.

A Mutation is plain data (which seed model, which kind, a random seed for where), so a failing
example prints as something mutate() replays. Byte mutations flip or cut the serialized proto (the
graph's nodes are serialized before its initializers, so half the flips land in the first 16 KB);
structural ones edit the ModelProto: a dropped node input, a changed dtype or shape, a deleted
initializer, a renamed op, an unknown-domain node, a dropped node, a duplicated output name, a
bad attribute.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import onnx
from hypothesis import strategies as st

import qgraph
from qgraph.errors import QGraphError

KINDS = ("flip_bytes", "truncate", "drop_input", "change_dtype", "change_shape", "delete_initializer", "rename_op",
         "unknown_domain_node", "drop_node", "duplicate_output", "bad_attribute")
_OPS = ("MatMul", "Gemm", "Add", "Mul", "Reshape", "Transpose", "Softmax", "LayerNormalization", "Gather", "Relu",
        "Identity", "Concat", "NotAnOp")


@dataclasses.dataclass(frozen=True)
class Mutation:
    seed_model: int
    steps: tuple[tuple[str, int], ...]  # (kind, a seed for where: which node / value / byte), applied in order


def mutation_specs(seed_models: int) -> st.SearchStrategy[Mutation]:
    step = st.tuples(st.sampled_from(KINDS), st.integers(0, 2**32 - 1))
    return st.builds(Mutation, st.integers(0, seed_models - 1), st.lists(step, min_size=1, max_size=3).map(tuple))


def mutate(data: bytes, m: Mutation) -> bytes:
    """The serialized model `data` with the steps of `m` applied; stops early once the bytes no longer parse."""
    for kind, where in m.steps:
        rng = random.Random(where)
        if kind == "flip_bytes":
            out = bytearray(data)
            span = len(out) if rng.random() < 0.5 else min(len(out), 16384)
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(span)] ^= 1 << rng.randrange(8)
            data = bytes(out)
        elif kind == "truncate":
            data = data[: rng.randrange(len(data))]
        else:
            model = onnx.ModelProto()
            try:
                model.ParseFromString(data)
            except Exception:  # noqa: BLE001 - an earlier byte step broke the proto: the loader sees that
                return data
            if not model.graph.node:
                return data
            _STRUCTURAL[kind](model.graph, rng)
            data = model.SerializeToString()
    return data


def _node(graph: onnx.GraphProto, rng: random.Random, with_inputs: bool = False) -> onnx.NodeProto:
    nodes = [n for n in graph.node if n.input or not with_inputs]
    return rng.choice(nodes or list(graph.node))


def _drop_input(graph, rng):
    node = _node(graph, rng, with_inputs=True)
    if node.input:
        i = rng.randrange(len(node.input))
        if rng.random() < 0.5:
            del node.input[i]
        else:  # an empty name (an omitted optional input) or a name nothing produces
            node.input[i] = rng.choice(["", "no_such_value"])


def _typed_values(graph) -> list:
    return list(graph.input) + list(graph.output) + list(graph.value_info)


def _change_dtype(graph, rng):
    dtype = rng.choice([0, 2, 6, 7, 10, 11, 16, 23, 99])
    if graph.initializer and rng.random() < 0.5:
        rng.choice(graph.initializer).data_type = dtype
    else:
        rng.choice(_typed_values(graph)).type.tensor_type.elem_type = dtype


def _change_shape(graph, rng):
    if graph.initializer and rng.random() < 0.5:
        t = rng.choice(graph.initializer)
        dims = list(t.dims)
        if dims and rng.random() < 0.7:
            dims[rng.randrange(len(dims))] = rng.choice([0, 1, 3, 1000, -1])
        else:
            dims.append(rng.choice([1, 2]))
        del t.dims[:]
        t.dims.extend(dims)
        return
    shape = rng.choice(_typed_values(graph)).type.tensor_type.shape
    if shape.dim and rng.random() < 0.7:
        d = shape.dim[rng.randrange(len(shape.dim))]
        if rng.random() < 0.5:
            d.dim_value = rng.choice([0, 1, 5, 7, 1000, -3])
        else:
            d.dim_param = rng.choice(["seq", "other", ""])
    elif shape.dim:
        del shape.dim[rng.randrange(len(shape.dim))]
    else:
        shape.dim.add().dim_value = 2


def _delete_initializer(graph, rng):
    if graph.initializer:
        del graph.initializer[rng.randrange(len(graph.initializer))]


def _rename_op(graph, rng):
    _node(graph, rng).op_type = rng.choice(_OPS)


def _unknown_domain_node(graph, rng):
    """A custom-domain node reading some value; half the time a later node reads its output instead."""
    node = _node(graph, rng, with_inputs=True)
    source = node.input[0] if node.input else graph.input[0].name
    extra = onnx.helper.make_node("Mystery", [source], ["mystery_out"], domain="com.example.unknown", name="mystery")
    graph.node.insert(list(graph.node).index(node), extra)
    if node.input and rng.random() < 0.5:
        node.input[0] = "mystery_out"


def _drop_node(graph, rng):
    del graph.node[rng.randrange(len(graph.node))]


def _duplicate_output(graph, rng):
    a, b = rng.sample(list(graph.node), 2) if len(graph.node) > 1 else (graph.node[0], graph.node[0])
    if a.output and b.output:
        b.output[0] = a.output[0]


def _bad_attribute(graph, rng):
    node = _node(graph, rng)
    name = rng.choice(["perm", "axis", "transB", "axes", "keepdims", "allowzero"])
    value = rng.choice([[5, 0], [0, 0, 0], 7, -9, 1.5, "x"])
    del node.attribute[:]
    node.attribute.append(onnx.helper.make_attribute(name, value))


_STRUCTURAL = {
    "drop_input": _drop_input, "change_dtype": _change_dtype, "change_shape": _change_shape,
    "delete_initializer": _delete_initializer, "rename_op": _rename_op, "unknown_domain_node": _unknown_domain_node,
    "drop_node": _drop_node, "duplicate_output": _duplicate_output, "bad_attribute": _bad_attribute,
}


def load_and_find(path: Path) -> tuple[str, str]:
    """Load an .onnx file with qgraph.load and run the recognisers on it: ('ok', '') or ('refused', the QGraphError).

    Any other exception propagates: that is the bug the fuzz target looks for.
    """
    from tests.properties.checks import check_regions

    try:
        captured = qgraph.load(path, progress=False)
        check_regions(captured.model)
    except QGraphError as exc:
        return "refused", str(exc)
    return "ok", ""
