"""The verifier passes a correct fold and catches a deliberately wrong one."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.errors import QGraphError
from qgraph.eval.verify import check_pass, run_float, token_range, verification_inputs
from qgraph.ir.regions import find_linears, find_norms


class ScaleNormIntoQKVPass(ir.passes.InPlacePass):
    """Test pass: scale the first norm's gamma by s and (if `fold`) divide the q/k/v weight rows by s."""

    def __init__(self, fold: bool):
        super().__init__()
        self.fold = fold

    def call(self, model):
        norm = find_norms(model)[0]
        s = np.linspace(0.5, 2.0, norm.gamma.shape[0]).astype(np.float32)
        # Random-init norms all have gamma = 1, which the exporter deduplicates into one shared
        # initializer: give this norm its own copy before changing it.
        name = f"{norm.name}.scaled_gamma"
        own = ir.Value(name=name, const_value=ir.tensor(norm.gamma.const_value.numpy() * s, name=name))
        model.graph.register_initializer(own)
        norm.output_node.replace_input_with(list(norm.output_node.inputs).index(norm.gamma), own)
        if self.fold:
            for layer in find_linears(model)[:3]:  # q, k, v read the first norm
                w = layer.weight.const_value.numpy()
                layer.weight.const_value = ir.tensor(w / s[:, None], name=layer.weight.name)
        return ir.passes.PassResult(model, modified=True)


def test_correct_fold_passes_and_weights_changed(llama_captured):
    model = llama_captured.model.clone()
    inputs = verification_inputs(256, np.arange(40)[None, :] % 256)
    q_before = find_linears(model)[0].weight.const_value.numpy().copy()
    result, verdict = check_pass(ScaleNormIntoQKVPass(fold=True), model, inputs)
    assert result.modified and verdict.ok and verdict.relative_error < 1e-5 and verdict.inputs == 3
    assert not np.allclose(find_linears(model)[0].weight.const_value.numpy(), q_before)


def test_wrong_fold_is_caught_with_pass_name_and_error(llama_captured):
    model = llama_captured.model.clone()
    inputs = verification_inputs(256)
    with pytest.raises(QGraphError, match=r"pass ScaleNormIntoQKVPass .* moved its outputs: \|\|y' - y\|\| / \|\|y\|\| = "):
        check_pass(ScaleNormIntoQKVPass(fold=False), model, inputs)


def test_run_float_is_deterministic(llama_captured):
    inputs = verification_inputs(256, random_rows=1, length=9)
    a, b = run_float(llama_captured.model, inputs), run_float(llama_captured.model, inputs)
    np.testing.assert_array_equal(a[0], b[0])


def test_random_tokens_span_the_embedding_table_not_the_output_width(llama_captured):
    from tests.conftest import tiny_bert_affine

    assert token_range(llama_captured.model) == 256  # decoder: the table is the vocabulary
    encoder = tiny_bert_affine()
    assert encoder.graph.outputs[0].shape[-1] == 64  # an encoder's output width is its hidden size
    assert token_range(encoder) == 200
