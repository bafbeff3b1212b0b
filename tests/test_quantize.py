"""ONNX Runtime's QuantizeLinear/DequantizeLinear against qgraph's numpy reference, per format."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qgraph.backends.onnx_qdq import session_from_model
from qgraph.ir.qspec import QuantSpec
from qgraph.quantize import (
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize,
    quantize_dequantize,
    quantize_tensor,
    tensor_range,
)

SPECS = [
    QuantSpec("int8", "tensor"),
    QuantSpec("int8", "tensor", symmetric=False),
    QuantSpec("uint8", "tensor", symmetric=False),
    QuantSpec("uint8", "tensor"),
    QuantSpec("int8", "channel", axis=1),
    QuantSpec("int8", "channel", axis=0, symmetric=False),
    QuantSpec("int4", "channel", axis=1),
    QuantSpec("int4", "block", axis=0, block_size=32),
    QuantSpec("int4", "block", axis=0, block_size=32, full_range=True),
    QuantSpec("int8", "channel", axis=1, full_range=True),
    QuantSpec("int4", "block", axis=0, block_size=16, symmetric=False),
    QuantSpec("uint4", "block", axis=0, block_size=32, symmetric=False),
    QuantSpec("fp8_e4m3", "tensor"),
    QuantSpec("fp8_e4m3", "channel", axis=1),
]


def _qdq_graph(x: np.ndarray, spec: QuantSpec, scale: np.ndarray, zp: np.ndarray) -> ir.Model:
    inp = ir.Value(name="x", shape=ir.Shape(x.shape), type=ir.TensorType(ir.DataType.FLOAT))
    s = ir.Value(name="s", const_value=ir.tensor(scale, name="s"))
    args = [inp, s]
    if not spec.is_float:
        args.append(ir.Value(name="z", const_value=ir.tensor(zp, name="z")))
    else:  # float8 output type is chosen by the zero point's type
        args.append(ir.Value(name="z", const_value=ir.tensor(np.zeros(scale.shape, dtype=spec.storage_dtype), name="z")))
    attrs = {}
    if spec.granularity in ("channel", "block"):
        attrs["axis"] = spec.axis
    if spec.granularity == "block":
        attrs["block_size"] = spec.block_size
    q = ir.node("QuantizeLinear", args, attributes=attrs)
    dq = ir.node("DequantizeLinear", [q.outputs[0], *args[1:]], attributes=attrs)
    q.outputs[0].name, dq.outputs[0].name = "q", "y"
    q.outputs[0].type = ir.TensorType(spec.onnx_dtype)
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    # ORT cannot hand 4-bit tensors to numpy: read the codes through a Cast to float.
    codes = ir.node("Cast", [q.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    codes.outputs[0].name = "codes"
    codes.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([inp], [codes.outputs[0], dq.outputs[0]], nodes=[q, dq, codes],
                     initializers=[a for a in args[1:]], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_ort_qdq_matches_numpy_reference(spec: QuantSpec):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((70, 48)) * rng.uniform(0.1, 4, size=48)).astype(np.float32)
    x[3, 5] = 9.5  # an outlier
    lo, hi = tensor_range(x, spec)
    scale, zp = qparams_from_range(lo, hi, spec)
    ref_q = quantize(x, scale, zp, spec)
    ref_y = dequantize(ref_q, scale, zp, spec)
    sess = session_from_model(_qdq_graph(x, spec, scale, zp), threads=1, optimize=False)
    got_q, got_y = sess.run(None, {"x": x})
    # Bit-exact codes and exact dequantized values.
    np.testing.assert_array_equal(np.asarray(got_q).astype(np.float32), ref_q.astype(np.float32))
    np.testing.assert_array_equal(got_y, ref_y)
    # And quantization error within half a step (integers) or the format's relative precision (fp8).
    step = np.abs(np.broadcast_to(dequantize(np.ones_like(ref_q), scale, np.zeros_like(zp), spec), x.shape))
    if spec.is_float:
        assert np.all(np.abs(ref_y - x) <= np.abs(x) * 2**-3 + step * 2**-9)
    elif spec.full_range:  # the end opposite the largest magnitude may clip by up to one step
        assert np.all(np.abs(ref_y - x) <= step + 1e-6)
    else:
        assert np.all(np.abs(ref_y - x) <= step / 2 + 1e-6)


@pytest.mark.parametrize("spec", [*SPECS, QuantSpec("uint4", "block", axis=0, block_size=16, symmetric=False,
                                                     float_zero_point=True)], ids=lambda s: s.describe().replace(" ", "-"))
def test_one_step_round_trip_is_the_two_steps_bit_for_bit(spec: QuantSpec):
    """quantize_dequantize (the searches' inner loop) skips the storage dtype; the values must not move."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 48)) * rng.uniform(0.1, 4, size=48)).astype(np.float32)
    lo, hi = tensor_range(x, spec)
    lo, hi = lo * np.float32(0.8), hi * np.float32(0.7)  # clipped ranges, as the clip search tries: codes saturate
    scale, zp = qparams_from_range(lo, hi, spec)
    x[0] = -1e-9  # rounds to a signed zero: the sign bit must come out as the two steps leave it
    two_steps = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    np.testing.assert_array_equal(quantize_dequantize(x, scale, zp, spec).view(np.uint32), two_steps.view(np.uint32))


def test_symmetric_int8_uses_restricted_range():
    spec = QuantSpec("int8", "tensor")
    assert (spec.qmin, spec.qmax) == (-127, 127)
    q, scale, zp = quantize_tensor(np.array([-2.0, 1.0, 2.0], dtype=np.float32), spec)
    assert q.tolist() == [-127, 64, 127] and float(scale) == pytest.approx(2 / 127) and int(zp) == 0


def test_block_tail_is_handled():
    spec = QuantSpec("int4", "block", axis=0, block_size=128)
    w = np.random.default_rng(0).standard_normal((576, 8)).astype(np.float32)  # 576 = 4.5 blocks
    lo, hi = tensor_range(w, spec)
    assert lo.shape == (5, 8)
    np.testing.assert_allclose(hi[4], w[512:].max(axis=0))
    err = np.abs(fake_quantize(w, spec) - w)
    assert err.max() < np.abs(w).max() / 7


def test_uint8_zero_point_128_is_the_symmetric_int8_grid():
    """The backend stores symmetric int8 activations as uint8 + 128: same scale, codes shifted by 128."""
    x = np.random.default_rng(2).standard_normal(1000).astype(np.float32) * 3
    i8, u8 = QuantSpec("int8", "tensor"), QuantSpec("uint8", "tensor")
    s8, z8 = qparams_from_range(x.min(), x.max(), i8)
    su, zu = qparams_from_range(x.min(), x.max(), u8)
    assert float(s8) == float(su) and int(zu) == 128 and int(z8) == 0
    np.testing.assert_array_equal(quantize(x, s8, z8, i8).astype(np.int16) + 128, quantize(x, su, zu, u8).astype(np.int16))
    np.testing.assert_array_equal(
        dequantize(quantize(x, s8, z8, i8), s8, z8, i8), dequantize(quantize(x, su, zu, u8), su, zu, u8)
    )


def test_full_range_maps_largest_magnitude_to_qmin():
    spec = QuantSpec("int4", "tensor", full_range=True)
    for x in (np.array([-3.0, 1.0, 2.9], dtype=np.float32), np.array([-1.0, 0.5, 4.0], dtype=np.float32)):
        q, scale, zp = quantize_tensor(x, spec)
        assert int(q[np.argmax(np.abs(x))]) == -8 and abs(float(scale)) == pytest.approx(np.abs(x).max() / 8)
        assert np.abs(dequantize(q, scale, zp, spec) - x).max() <= abs(float(scale)) + 1e-6
    with pytest.raises(Exception, match="full_range applies to symmetric signed"):
        QuantSpec("uint4", "tensor", full_range=True)


FP4_SPECS = [
    QuantSpec("fp4_e2m1", "tensor"),
    QuantSpec("fp4_e2m1", "channel", axis=1),
    QuantSpec("fp4_e2m1", "block", axis=0, block_size=16),
]


@pytest.mark.parametrize("spec", FP4_SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_fp4_reference_matches_onnx_opset23_qdq(spec: QuantSpec):
    """ORT 1.32 has no float4e2m1 kernel: the onnx reference evaluator runs the standard opset-23 Q/DQ instead."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((70, 48)) * rng.uniform(0.1, 4, size=48)).astype(np.float32)
    x[3, 5], x[4, 6], x[5, 7] = 9.5, -0.0, 1e-7  # an outlier, negative zero, a value that rounds to zero
    lo, hi = tensor_range(x, spec)
    scale, zp = qparams_from_range(lo, hi, spec)
    ref_q = quantize(x, scale, zp, spec)
    ref_y = dequantize(ref_q, scale, zp, spec)
    model = _qdq_graph(x, spec, scale, zp)
    model.graph.opset_imports[""] = 23
    got_q, got_y = ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, {"x": x})
    np.testing.assert_array_equal(np.asarray(got_q).astype(np.float32), ref_q.astype(np.float32))
    # Equal values; the onnx reference evaluator writes -0.0 as +0 (ml_dtypes and the emulated lowering keep the sign).
    np.testing.assert_array_equal(got_y, ref_y)
    # E2M1 keeps one mantissa bit: within a quarter of |x| relative, plus the subnormal step 0.5 * scale / 2 near zero.
    step = np.abs(np.broadcast_to(dequantize(np.full(ref_q.shape, 0.5, ref_q.dtype), scale, zp, spec), x.shape))
    assert np.all(np.abs(ref_y - x) <= np.abs(x) * 2**-2 + step / 2 + 1e-7)
    assert spec.bits == 4 and set(np.unique(np.abs(ref_q.astype(np.float32)))) <= {0, 0.5, 1, 1.5, 2, 3, 4, 6}
