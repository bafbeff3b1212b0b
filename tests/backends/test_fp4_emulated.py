"""FP4 E2M1 lowering: the emulated form in ORT ops matches the numpy reference bit for bit; the opset-23 form checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qgraph
from qgraph.backends.fp4_emulated import E2M1_VALUES, KERNEL, emulated_activation, emulated_weight
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.calib.data import TokenWindows
from qgraph.errors import QGraphError
from qgraph.ir.qspec import QuantSpec
from qgraph.quantize import dequantize, fake_quantize, quantize
from qgraph.recipes import load_recipe


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _graph_around(build, inputs: list[ir.Value]) -> ir.Model:
    """A graph whose one output is what `build(graph, sink)` inserts before an Identity sink."""
    graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": 21})
    sink = ir.node("Identity", [inputs[0] if inputs else ir.Value(name="placeholder")], name="sink")
    graph.append(sink)
    sink.replace_input_with(0, build(graph, sink))
    sink.outputs[0].name, sink.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(sink.outputs[0])
    return ir.Model(graph, ir_version=10)


def _activation_cases(scale: np.float32) -> np.ndarray:
    """Every E2M1 value and midpoint (ties), subnormal 0.5, saturation, signed zeros, tiny and huge values, noise."""
    grid = np.array([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 6.5, 7, 1e3], dtype=np.float32)
    near = np.concatenate([np.nextafter(grid * scale, np.float32(np.inf)), np.nextafter(grid * scale, np.float32(0))])
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38], dtype=np.float32)
    noise = np.random.default_rng(3).standard_normal(700).astype(np.float32) * 3 * scale
    return np.concatenate([grid * scale, -grid * scale, near, -near, special, noise]).astype(np.float32)


@pytest.mark.parametrize("shape", [(1, 790), (5, 158), (2, 5, 79)])
@pytest.mark.parametrize("optimize", [False, True])
def test_emulated_activation_matches_reference_bit_for_bit(shape, optimize):
    scale = np.float32(0.37)
    spec = QuantSpec("fp4_e2m1", "tensor")
    x = _activation_cases(scale)[: int(np.prod(shape))].reshape(shape)
    with np.errstate(over="ignore"):  # +-3e38 / scale overflows to inf before saturating, as in ORT
        ref = dequantize(quantize(x, scale, np.zeros(()), spec), scale, None, spec)
    xv = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    model = _graph_around(lambda g, sink: emulated_activation(g, sink, xv, float(scale)), [xv])
    got = session_from_model(model, threads=1, optimize=optimize).run(None, {"x": x})[0]
    np.testing.assert_array_equal(_bits(got), _bits(ref))
    assert set(np.abs(got / scale).ravel()) <= set(E2M1_VALUES.tolist())
    # The reference itself: ties to even, 0.25 -> 0 and 0.75 -> 1, saturation at 6, negative zero kept.
    q = lambda v: float(dequantize(quantize(np.float32(v) * scale, scale, 0, spec), scale, None, spec) / scale)  # noqa: E731
    assert [q(v) for v in (0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 1e3)] == [0, 0.5, 1, 1, 2, 2, 4, 4, 6, 6]
    assert np.signbit(q(-0.1)) and np.signbit(q(-0.0))


@pytest.mark.parametrize("spec", [
    QuantSpec("fp4_e2m1", "channel", axis=1),
    QuantSpec("fp4_e2m1", "block", axis=0, block_size=32),
    QuantSpec("fp4_e2m1", "block", axis=0, block_size=16),
    QuantSpec("fp4_e2m1", "tensor"),
], ids=lambda s: s.describe().replace(" ", "-"))
@pytest.mark.parametrize("shape", [(64, 8), (75, 5), (97, 3)])
def test_emulated_weight_matches_reference_bit_for_bit(spec, shape):
    rng = np.random.default_rng(shape[0])
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, size=shape[1])).astype(np.float32)
    w[0, 0], w[1, 1], w[2, 0] = -0.0, -1e-9, 40.0  # negative zero, a tiny negative, a saturating outlier
    ref = fake_quantize(w, spec)
    model = _graph_around(lambda g, sink: emulated_weight(g, sink, "w", w, spec), [])
    for optimize in (False, True):  # optimized: ORT folds the Gather chain into a float constant
        got = session_from_model(model, threads=1, optimize=optimize).run(None, {})[0]
        np.testing.assert_array_equal(_bits(got), _bits(ref))
    codes = model.graph.initializers["w.fp4_codes"].const_value.numpy()
    assert codes.dtype == np.uint8 and codes.size * 2 <= w.size + 2 * shape[1] + (spec.block_size or 0) * shape[1]


def test_emulated_weight_refuses_odd_blocks():
    with pytest.raises(QGraphError, match="even-sized input blocks"):
        emulated_weight(ir.Graph([], [], nodes=[]), None, "w", np.ones((8, 2), np.float32),
                        QuantSpec("fp4_e2m1", "block", axis=0, block_size=3))


def _calib() -> TokenWindows:
    return TokenWindows(np.random.default_rng(7).integers(0, 256, size=(4, 32), dtype=np.int64), 0, "random")


def test_fp4_recipe_runs_in_ort_and_opset23_form_matches_it(llama_captured):
    from onnx.reference import ReferenceEvaluator

    recipe = load_recipe("fp4")
    emulated = qgraph.compile(llama_captured, recipe, calib=_calib(), progress=False, verify=True)
    lowering = next(p for p in emulated.report["passes"] if p["pass"] == "lower_onnx")
    assert lowering["ops"] == {KERNEL: 14} and emulated.report["verified"][0]["ok"]
    assert dict(emulated.model.opset_imports)[""] == 21 and len(emulated.report["layer_sqnr_db"]) == 14
    ids = np.arange(16, dtype=np.int64).reshape(1, 16)
    ref = session_from_model(llama_captured.model).run(None, {"input_ids": ids})[0]
    got = session_from_model(emulated.model).run(None, {"input_ids": ids})[0]
    assert 1e-3 < np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.4

    qdq_recipe = dataclasses.replace(recipe, name="fp4-qdq", blocks=dataclasses.replace(recipe.blocks, lowering="qdq"))
    standard = qgraph.compile(llama_captured, qdq_recipe, calib=_calib(), progress=False)
    lowering = next(p for p in standard.report["passes"] if p["pass"] == "lower_onnx")
    assert list(lowering["ops"]) == ["standard opset-23 float4e2m1 Q/DQ (no ORT 1.32 CPU kernel: lowering fp4-emulated "
                                     "runs in ORT)"]
    assert dict(standard.model.opset_imports)[""] == 23 and standard.report["layer_sqnr_db"] == {}
    proto = ir.serde.serialize_model(standard.model)
    onnx.checker.check_model(proto, full_check=True)
    fp4_inits = [v for v in standard.model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT4E2M1]
    assert len(fp4_inits) >= 14
    # Same grid, same scales: the onnx reference evaluator on the standard form agrees with ORT on the emulation.
    std = ReferenceEvaluator(proto).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(std, got, rtol=0, atol=1e-5 * np.abs(got).max())
