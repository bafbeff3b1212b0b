"""find_attention: the cached K and V of every attention block, axes read from sizes, no layer names."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.backends.onnx_qdq import session_with_outputs
from qgraph.ir.attention import find_attention
from tests.conftest import tiny_bert_affine


def test_llama_keys_after_rope_values_before_the_head_repeat(llama_captured):
    model = llama_captured.model
    blocks, refused = find_attention(model)
    assert len(blocks) == 2 and refused == []  # 2 layers
    for b in blocks:
        assert b.key.channels == b.value.channels == 16  # head_dim 64 / 4 heads
        assert b.key.value.producer().op_type == "Add"  # RoPE's x cos + rotate_half(x) sin
        assert b.key.rank == 4 and b.key.channel_axis == 3
    # The cached tensors hold 2 KV heads (GQA), not the 4 query heads the repeat makes.
    names = [t.value.name for b in blocks for t in (b.key, b.value)]
    session = session_with_outputs(model, names)
    arrays = session.run(names, {session.get_inputs()[0].name: np.arange(9, dtype=np.int64)[None]})
    for b, (k, v) in zip(blocks, zip(arrays[::2], arrays[1::2], strict=True), strict=True):
        assert k.shape[b.key.token_axis] == 9 and v.shape[b.value.token_axis] == 9
        assert k.size == v.size == 2 * 9 * 16


def test_encoder_attention_found_too():
    model = tiny_bert_affine()
    blocks, refused = find_attention(model)
    assert len(blocks) == 2 and refused == []
    assert all(b.key.channels == 16 for b in blocks)


def test_a_softmax_that_is_not_attention_is_refused_by_name():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 8]))
    node = ir.node("Softmax", [x], attributes={"axis": -1}, name="classifier_softmax")
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21})
    blocks, refused = find_attention(ir.Model(graph, ir_version=10))
    assert blocks == [] and refused[0].candidate == "classifier_softmax"
    assert "not a softmax(Q K^T) V" in refused[0].reason
