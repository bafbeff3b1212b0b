"""Malformed graphs give QGraphError (or a rejection reason), never an IndexError deep in the region finder.

Each case is a mutation the fuzz target (tests/properties/test_fuzz_loader.py) found crashing the
recognisers before ir/validate.py, written out by hand.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

import qgraph
from qgraph.errors import QGraphError
from qgraph.ir.regions import find_linears, find_norms, find_regions
from tests.properties.graphs import Block, GraphSpec, build

SPEC = GraphSpec(vocab=29, dim=12, seq=None, gemm=False, final_norm="rmsnorm", head="untied", gamma="random",
                 dead="none", seed=1, blocks=(Block("attention", "layernorm", False, True, False, False, heads=4,
                                                    kv_heads=2, head_dim=3),))


def _edited(tmp_path, edit) -> ir.Model:
    """SPEC's graph with `edit(graph_proto)` applied, saved and loaded back through qgraph.load."""
    proto = ir.to_proto(build(SPEC))
    edit(proto.graph)
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    return qgraph.load(path, progress=False).model


def _node(graph, op_type: str, index: int = 0) -> onnx.NodeProto:
    return [n for n in graph.node if n.op_type == op_type][index]


def test_a_matmul_with_one_input_names_the_node(tmp_path):
    model = _edited(tmp_path, lambda g: _node(g, "MatMul").input.pop())
    with pytest.raises(QGraphError, match=r"node 'model.layers.0.self_attn.q_proj' \(MatMul\) has 1 inputs; .*takes 2"):
        find_linears(model)


def test_an_omitted_required_input(tmp_path):
    def edit(g):  # an empty name reads as an omitted (optional) input
        _node(g, "MatMul", 1).input[1] = ""

    with pytest.raises(QGraphError, match=r"k_proj' \(MatMul\) lacks its required input 1 \(B\)"):
        find_linears(_edited(tmp_path, edit))
    with pytest.raises(QGraphError, match=r"lacks its required input"):
        find_norms(_edited(tmp_path, edit))


def test_an_attribute_of_the_wrong_type(tmp_path):
    def edit(g):
        node = _node(g, "Transpose")
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("perm", 2))

    with pytest.raises(QGraphError, match=r"attribute 'perm' is INT, ONNX expects INTS"):
        find_regions(_edited(tmp_path, edit))


def test_a_node_without_outputs(tmp_path):
    with pytest.raises(QGraphError, match=r"\(Reshape\) has 0 outputs"):
        find_regions(_edited(tmp_path, lambda g: _node(g, "Reshape").output.pop()))


def test_a_reshape_target_that_does_not_decode(tmp_path):
    def edit(g):
        target = _node(g, "Reshape").input[1]
        next(t for t in g.initializer if t.name == target).data_type = onnx.TensorProto.FLOAT16

    with pytest.raises(QGraphError, match=r"constant 'val_ints.*' does not decode as FLOAT16"):
        find_regions(_edited(tmp_path, edit))


def test_axes_that_do_not_fit_are_a_rejection_reason(tmp_path):
    def edit(g):  # the head split's perm names five axes of a 4-D tensor
        node = _node(g, "Transpose")
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("perm", [0, 2, 1, 3, 4]))

    _, rejected = find_regions(_edited(tmp_path, edit))
    assert any("its axes or shapes do not fit its input" in r.reason for r in rejected)


def test_a_weight_declared_with_a_symbolic_dim_is_no_linear(tmp_path):
    def edit(g):
        weight = _node(g, "MatMul").input[1]
        info = onnx.helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, [12, "odd"])
        g.value_info.append(info)

    model = _edited(tmp_path, edit)
    names = [layer.name for layer in find_linears(model)]
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.0.self_attn.k_proj" in names
    find_regions(model)


def test_a_name_that_is_not_utf8(tmp_path):
    proto = ir.to_proto(build(SPEC))
    _node(proto.graph, "MatMul").name = "q_proj_name"
    data = proto.SerializeToString().replace(b"q_proj_name", b"q_proj\xf2name")
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    try:
        model = qgraph.load(path, progress=False).model
    except QGraphError:
        return  # refused by the loader itself: fine too
    with pytest.raises(QGraphError, match="not UTF-8"):
        find_regions(model)
