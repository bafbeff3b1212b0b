"""Run-time group rounding: the graph's float ops equal the numpy reference; 4-bit activations lower and run."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qgraph
from qgraph.backends.dynamic_rounding import TINY_STEP, fake_quantize, insert_rounding
from qgraph.backends.onnx_qdq import session_from_model, session_with_outputs


@settings(max_examples=60, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 24)), elements=st.floats(-50, 50, width=32)),
       group=st.integers(1, 12), bits=st.sampled_from([4, 8]), clip=st.sampled_from([1.0, 0.9, 0.5]))
@example(x=np.array([[1.8999067e-29]], np.float32), group=1, bits=8, clip=1.0)  # a step below TINY_STEP
def test_symmetric_rounding_codes_and_error(x, group, bits, clip):
    y = fake_quantize(x, -1, group, bits, symmetric=True, clip=clip)
    qmax = 2 ** (bits - 1) - 1
    for start in range(0, x.shape[-1], group):
        xg, yg = x[:, start:start + group], y[:, start:start + group]
        # The step is floored at TINY_STEP (an all-zero or subnormal group rounds to itself, no 0 / 0).
        step = np.maximum(np.abs(xg).max(axis=-1, keepdims=True) * np.float32(clip) / qmax, TINY_STEP)
        codes = np.divide(yg, step, out=np.zeros_like(yg), where=step > 0)
        assert np.all(np.abs(codes - np.round(codes)) < 1e-3)
        assert np.round(codes).min() >= -qmax - 1 and np.round(codes).max() <= qmax
        inside = np.abs(xg) <= step * (qmax + 0.5)  # not clipped
        assert np.all(np.abs(yg - xg)[inside] <= (step / 2 + 1e-5 * (np.abs(xg) + 1))[inside] if inside.any() else True)
        if clip == 1.0:
            assert np.all(np.abs(yg) <= np.abs(xg).max(axis=-1, keepdims=True) * (1 + 1e-6))


def _graph(tokens: int | str, channels: int) -> tuple[ir.Model, ir.Value]:
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, tokens, channels]))
    node = ir.node("Relu", [x], name="relu")
    node.outputs[0].name = "h"
    node.outputs[0].shape, node.outputs[0].type = ir.Shape([2, tokens, channels]), ir.TensorType(ir.DataType.FLOAT)
    ident = ir.node("Identity", [node.outputs[0]], name="out")
    ident.outputs[0].name = "y"
    graph = ir.Graph([x], ident.outputs, nodes=[node, ident], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10), node.outputs[0]


@pytest.mark.parametrize("axis, group, symmetric, clip", [(-1, 8, True, 0.9), (-1, 5, False, 1.0), (1, 4, False, 1.0),
                                                          (1, 3, True, 1.0)])
def test_graph_equals_reference_on_a_dynamic_axis(axis, group, symmetric, clip):
    model, h = _graph("seq", 24)
    insert_rounding(model.graph, h, axis=axis, rank=3, group_size=group, bits=4, symmetric=symmetric, clip=clip)
    session = session_from_model(model)
    rng = np.random.default_rng(0)
    for tokens in (1, 7, 16):  # partial groups and whole ones along the run-time axis
        x = rng.normal(size=(2, tokens, 24)).astype(np.float32) * np.linspace(0.1, 5, 24, dtype=np.float32)
        got = session.run(None, {"x": x})[0]
        ref = fake_quantize(np.maximum(x, 0), axis, group, 4, symmetric=symmetric, clip=clip)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_graph_flushes_groups_below_the_tiny_step_as_the_reference_does():
    model, h = _graph("seq", 24)
    insert_rounding(model.graph, h, axis=-1, rank=3, group_size=8, bits=8, symmetric=True, clip=1.0)
    x = np.abs(np.random.default_rng(1).normal(size=(2, 3, 24))).astype(np.float32)
    x[0, 0, :8] *= np.float32(1e-29)  # a group of magnitudes far below any activation: rounds to zero
    x[0, 1, 8:16] = 0  # an all-zero group: zero, no 0 / 0
    got = session_from_model(model).run(None, {"x": x})[0]
    ref = fake_quantize(x, -1, 8, 8, symmetric=True)
    assert not got[0, 0, :8].any() and not got[0, 1, 8:16].any() and got[0, 2].any()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


W4A4 = """name: tiny-w4a4
description: test
passes:
  - rotate: {}
weights: {format: int4, granularity: group, group_size: 16, symmetric: false}
activations: {format: int4, granularity: token, symmetric: true, static: false, clip: 0.9}
lowering: matmulnbits
"""


@pytest.mark.parametrize("granularity", ["token", "group"])
def test_w4a4_lowers_to_rounding_before_matmulnbits(tmp_path, llama_captured, granularity):
    path = tmp_path / "w4a4.yaml"
    group = 16  # a token's 64 hidden channels in 4 groups, the 160 MLP channels in 10
    path.write_text(W4A4 if granularity == "token" else W4A4.replace("granularity: token", f"granularity: group, "
                                                                                            f"group_size: {group}"))
    compiled = qgraph.compile(llama_captured, str(path), progress=False, verify=True)
    graph = compiled.model.graph
    ops = collections.Counter(n.op_type for n in graph)
    assert ops["MatMulNBits"] == 14
    lowering = next(p for p in compiled.report["passes"] if p["pass"] == "lower_onnx")
    assert lowering["ops"] == {f"MatMulNBits after run-time int4 rounding of its input per {granularity}": 14}
    assert compiled.layers[0]["activation"] == ("int4 token sym dynamic clip 0.9" if granularity == "token"
                                                else f"int4 block(axis=-1,size={group}) sym dynamic clip 0.9")
    # One rounding chain per activation tensor: q/k/v share one, gate/up one, o and down their own.
    rounded = {n.inputs[0].name for n in graph if n.op_type == "MatMulNBits"}
    assert len(rounded) == 2 * 4 and all(".dynamic_int4." in name for name in rounded)
    # Each rounding is the reference applied to that layer's float input (in the quantized graph).
    sources = {name: next(n for n in graph if n.outputs[0].name == name) for name in rounded}
    inputs = []
    for name in rounded:  # walk back over the rounding's own nodes to the tensor it read
        node = sources[name]
        while any(".dynamic_int4." in (v.name or "") for v in node.inputs if v is not None and v.producer() is not None):
            node = next(v.producer() for v in node.inputs if v is not None and v.producer() is not None
                        and ".dynamic_int4." in (v.name or ""))
        inputs.append(node.inputs[0].name)
    ids = np.arange(12, dtype=np.int64).reshape(1, 12)
    names = list(rounded) + inputs
    outs = session_with_outputs(compiled.model, names).run(names, {"input_ids": ids})
    for got, x in zip(outs[: len(rounded)], outs[len(rounded):], strict=True):
        size = x.shape[-1] if granularity == "token" else group
        np.testing.assert_allclose(got, fake_quantize(x, -1, size, 4, symmetric=True, clip=0.9),
                                   rtol=1e-5, atol=1e-6 * np.abs(x).max())
    ref = session_from_model(llama_captured.model).run(None, {"input_ids": ids})[0]
    got = session_from_model(compiled.model).run(None, {"input_ids": ids})[0]
    assert 1e-3 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.5
