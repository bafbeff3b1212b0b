"""fold_batchnorm: inference-mode BatchNormalization after a convolution, folded before quantization."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph.backends.onnx_qdq import session_from_model


def _conv_bn_model(path, seed: int = 0):
    """x -> Conv -> BatchNormalization -> Relu -> Conv (grouped) -> BatchNormalization, as non-torch exporters write it."""
    rng = np.random.default_rng(seed)
    inits = []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def bn(prefix, c):
        return [const(f"{prefix}.gamma", rng.uniform(0.5, 2, c)), const(f"{prefix}.beta", rng.normal(0, 0.5, c)),
                const(f"{prefix}.mean", rng.normal(0, 0.5, c)), const(f"{prefix}.var", rng.uniform(0.2, 3, c))]

    nodes = [
        helper.make_node("Conv", ["x", const("w1", rng.normal(0, 0.3, (8, 3, 3, 3)))], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", *bn("bn1", 8)], ["b1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", const("w2", rng.normal(0, 0.3, (8, 2, 3, 3))), const("b2", rng.normal(0, 0.1, 8))],
                         ["c2"], name="conv2", group=4),
        helper.make_node("BatchNormalization", ["c2", *bn("bn2", 8)], ["y"], name="bn2"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)


def test_batchnorm_folds_into_convolutions_and_the_fold_is_verified(tmp_path):
    _conv_bn_model(tmp_path / "m.onnx")
    captured = qgraph.load(tmp_path / "m.onnx", progress=False)
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    want = session_from_model(captured.model).run(None, {"x": x})[0]
    compiled = qgraph.compile(captured, "fp32", progress=False, verify=True)
    fold = next(p for p in compiled.report["simplified"] if p["pass"] == "fold_batchnorm")
    assert fold["folded"] == 2 and fold["verified"]["ok"] and fold["verified"]["relative_error"] < 1e-5
    assert "BatchNormalization" not in {n.op_type for n in compiled.model.graph}
    np.testing.assert_allclose(session_from_model(compiled.model).run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-5)

    calib = [{"x": np.random.default_rng(i).standard_normal((4, 3, 12, 12)).astype(np.float32)} for i in range(4)]
    quantized = qgraph.compile(captured, "w8a8-cnn", calib=calib, progress=False)
    assert quantized.report["quantized_layers"] == 2  # both convolutions, their norms already in the weights
    got = session_from_model(quantized.model).run(None, {"x": x})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
