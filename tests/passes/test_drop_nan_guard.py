"""drop_nan_guard: the exporter's attention NaN guards go where the mask is finite, stay where it is not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.passes.drop_nan_guard import DropNanGuardPass


def count(model: ir.Model, op: str) -> int:
    return sum(1 for n in model.graph if n.op_type == op)


def test_llama_guards_removed_and_logits_bit_identical(llama_captured):
    model = llama_captured.model.clone()
    assert count(model, "IsNaN") == 2  # one per layer, as torch.onnx exports SDPA
    p = DropNanGuardPass()
    result, verdict = check_pass(p, model, verification_inputs(256, length=32))
    assert result.modified and p.removed == 2 and p.refused == []
    assert count(model, "IsNaN") == 0 and count(model, "Softmax") == 2
    assert verdict.ok and verdict.relative_error == 0.0  # p == Where(IsNaN(p), 0, p) when p has no NaN


def test_compile_reports_the_cleanup_and_fp32_artifact_has_no_guard(llama_captured):
    compiled = qgraph.compile(llama_captured, "fp32", progress=False, verify=True)
    (entry,) = compiled.report["simplified"]
    assert entry["pass"] == "drop_nan_guard" and entry["removed"] == 2 and entry["verified"]["ok"]
    assert count(compiled.model, "IsNaN") == 0
    # The recipe's own verdicts are not shifted by the cleanup (fp32 has no function-preserving pass).
    assert compiled.report["verified"] == []


class MaskedAttention(torch.nn.Module):
    """One attention head whose boolean mask masks the first query row entirely (its softmax is NaN)."""

    def __init__(self, mask: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)


def _capture(module, *inputs) -> ir.Model:
    return qgraph.load(module, example_inputs=inputs, progress=False).model


def _run(model: ir.Model, inputs: dict) -> np.ndarray:
    return session_from_model(model, threads=1).run(None, inputs)[0]


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 1, 4, 8, generator=g) for _ in range(3)]


def test_fully_masked_row_with_the_exporters_finite_mask_is_unchanged(qkv):
    # torch.onnx writes a boolean mask as float32's lowest value, not -inf: even a row that attends to
    # nothing has a finite softmax (uniform), so its guard never fires and removing it changes nothing.
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[0] = False
    module = MaskedAttention(mask)
    model = _capture(module, *qkv)
    feeds = {v.name: t.numpy() for v, t in zip(model.graph.inputs, qkv, strict=True)}
    before = _run(model, feeds)
    p = DropNanGuardPass()
    p(model)
    assert p.removed == 1 and count(model, "IsNaN") == 0
    after = _run(model, feeds)
    np.testing.assert_array_equal(after, before)
    # The exported graph (with or without its guard) averages v over the fully masked row; eager torch
    # returns 0 there. That gap is the exporter's, not this pass's: the other rows agree with torch.
    np.testing.assert_allclose(after[0, 0, 0], qkv[2][0, 0].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(after[0, 0, 1:], module(*qkv).numpy()[0, 0, 1:], rtol=1e-5, atol=1e-6)


def _guarded_softmax_graph(mask: ir.Value | None, mask_array: np.ndarray | None) -> ir.Model:
    """scores [1, 4, 4] (+ mask) -> Softmax -> Where(IsNaN(p), 0, p): the exporter's pattern, hand-built."""
    q = ir.Value(name="q", shape=ir.Shape([1, 4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    kt = ir.Value(name="kt", shape=ir.Shape([1, 8, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    inputs = [q, kt]
    qk = ir.node("MatMul", [q, kt])
    nodes = [qk]
    scores = x = qk.outputs[0]
    if mask is not None:
        if mask_array is not None:
            mask.const_value = ir.tensor(mask_array, name=mask.name)
        else:
            inputs.append(mask)
        add = ir.node("Add", [scores, mask])
        nodes.append(add)
        x = add.outputs[0]
    sm = ir.node("Softmax", [x], attributes={"axis": -1})
    zero = ir.Value(name="zero", const_value=ir.tensor(np.array(0.0, np.float32), name="zero"),
                    shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    isnan = ir.node("IsNaN", [sm.outputs[0]])
    where = ir.node("Where", [isnan.outputs[0], zero, sm.outputs[0]])
    where.outputs[0].name = "probs"
    graph = ir.Graph(inputs, [where.outputs[0]], nodes=[*nodes, sm, isnan, where],
                     initializers=[zero] + ([mask] if mask is not None and mask_array is not None else []),
                     opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _mask(name: str) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape([1, 4, 4]), type=ir.TensorType(ir.DataType.FLOAT))


def test_unmasked_scores_lose_the_guard_and_keep_their_values(rng):
    model = _guarded_softmax_graph(None, None)
    feeds = {"q": rng.normal(size=(1, 4, 8)).astype(np.float32), "kt": rng.normal(size=(1, 8, 4)).astype(np.float32)}
    before = _run(model, feeds)
    p = DropNanGuardPass()
    p(model)
    assert p.removed == 1 and count(model, "IsNaN") == 0
    np.testing.assert_array_equal(_run(model, feeds), before)


def test_finite_constant_mask_loses_the_guard():
    mask = np.triu(np.full((1, 4, 4), np.finfo(np.float32).min, np.float32), 1)
    p = DropNanGuardPass()
    p(_guarded_softmax_graph(_mask("causal"), mask))
    assert p.removed == 1 and p.refused == []


def test_run_time_mask_keeps_the_guard():
    model = _guarded_softmax_graph(_mask("attention_mask"), None)
    p = DropNanGuardPass()
    p(model)
    assert p.removed == 0 and "attention_mask" in p.refused[0]["reason"] and "run time" in p.refused[0]["reason"]
    ninf = np.full((1, 4, 4), -np.inf, np.float32)
    out = _run(model, {"q": np.ones((1, 4, 8), np.float32), "kt": np.ones((1, 8, 4), np.float32), "attention_mask": ninf})
    assert np.all(out == 0)  # the guard still turns the all-masked rows' NaN into 0


def test_constant_minus_inf_mask_keeps_the_guard():
    mask = np.triu(np.full((1, 4, 4), -np.inf, np.float32), 1)
    p = DropNanGuardPass()
    p(_guarded_softmax_graph(_mask("causal"), mask))
    assert p.removed == 0 and "-inf" in p.refused[0]["reason"]
