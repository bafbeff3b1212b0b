"""qgraph.ir.partition: blocks found from module scopes, parts extracted and joined back to the same function."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qgraph.backends.onnx_qdq import session_from_model
from qgraph.errors import QGraphError
from qgraph.ir.capture import CausalLMLogits, export_token_module
from qgraph.ir.partition import SHARED_SUFFIX, append_part, extract, partition
from tests.conftest import tiny_llama


def _unfolded(layers: int, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(layers)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, use_cache=False)
    return export_token_module(CausalLMLogits(LlamaForCausalLM(config).eval()), progress=False, optimize=False)


@pytest.mark.parametrize(("layers", "tie"), [(1, True), (3, False)])
def test_parts_rejoin_to_the_same_function(layers, tie):
    model = _unfolded(layers, tie)
    parts = partition(model)
    assert [p.name for p in parts] == ["prologue", *(f"model.layers.{i}" for i in range(layers)), "epilogue"]
    for p in parts[1:-1]:  # a block reads the hidden state and the token ids (positions, mask: recomputed)
        assert len(p.inputs) == 2 and "input_ids" in p.inputs and len(p.outputs) == 1
    assert parts[-1].outputs == ["logits"]
    # The tied table is read by the prologue's lookup and the epilogue's head: both parts see it shared.
    assert bool(parts[0].shared) == tie and bool(parts[-1].shared) == tie

    whole = ir.Model(ir.Graph([ir.Value(name="input_ids", type=model.graph.inputs[0].type,
                                        shape=model.graph.inputs[0].shape)], [], nodes=[]), ir_version=model.ir_version)
    whole.opset_imports.update(model.opset_imports)
    for p in parts:
        sub = extract(model, p)
        if p.shared:
            assert all(v.name.endswith(SHARED_SUFFIX) for v in sub.graph.outputs[len(p.outputs):])
        append_part(whole, sub, p.name.replace(".", "_"))
    whole.graph.outputs.extend(o for n in whole.graph for o in n.outputs if o.name == "logits")
    ids = np.arange(3, 3 + 2 * 11).reshape(2, 11) % 256
    expected = session_from_model(model).run(None, {"input_ids": ids})[0]
    joined = session_from_model(whole).run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(joined, expected)


def test_a_graph_without_blocks_is_refused():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.node("Relu", [x])
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node]), ir_version=10)
    with pytest.raises(QGraphError, match="no repeated blocks"):
        partition(model)


def test_parts_of_the_test_llama_are_its_layers():
    model = export_token_module(CausalLMLogits(tiny_llama()), progress=False, optimize=False)
    names = [p.name for p in partition(model)]
    assert names == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
