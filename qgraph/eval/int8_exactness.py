"""Does ORT's fused int8 GEMM give the exact integer product on this CPU? A lone linear that would saturate.

The weight codes are +-qmax in every position and the activations sit at both ends of their grid, so
adjacent u8 x s8 products sum to +-64,770: twice what a saturating int16 pair sum holds. Used by
tests/backends/test_int8_kernels.py and tools/bench_int8_kernels.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.ir.qspec import LayerAnnotation, QuantSpec, annotate, set_range

K, N, M = 576, 64, 16


def _weights() -> np.ndarray:
    return np.random.default_rng(0).choice([-1.0, 1.0], size=(K, N)).astype(np.float32)  # per-channel max 1


def saturating_linear(kernel: str, activation: QuantSpec):
    """x [M, K] @ W [K, N] lowered by qgraph for `kernel`: (model, the lowering pass, the weight spec)."""
    from qgraph.backends.int8_kernels import KERNELS
    from qgraph.backends.onnx_qdq import LowerToOnnxPass

    spec = QuantSpec(KERNELS[kernel].weight_format, "channel", axis=1)
    w = _weights()
    x = ir.Value(name="x", shape=ir.Shape([M, K]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", shape=ir.Shape(w.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w))
    mm = ir.node("MatMul", [x, weight], name="layers.0.proj")
    y = mm.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([M, N])
    model = ir.Model(ir.Graph([x], [y], nodes=[mm], initializers=[weight], opset_imports={"": 21}), ir_version=10)
    annotate(mm, LayerAnnotation(mm.name, spec, activation))
    set_range(x, -1.0, 1.0)
    lower = LowerToOnnxPass(int8_kernel=kernel)
    lower(model)
    return model, lower, spec


def saturating_inputs() -> np.ndarray:
    """+-2 (clipped to the grid's ends) everywhere; row 0 all +2: each same-sign weight pair saturates."""
    x = np.random.default_rng(1).choice([-2.0, 2.0], size=(M, K)).astype(np.float32)
    x[0] = 2.0
    return x


def exact_output(x: np.ndarray, activation: QuantSpec, spec: QuantSpec) -> np.ndarray:
    """The int32 product of the activation and weight codes, rescaled in float64.

    Both activation kinds are stored as uint8 (symmetric int8: zero point 128, so a clipped -2 lands on
    code 0, i.e. -128).
    """
    a_scale = 1.0 / 127 if activation.symmetric else 2.0 / 255
    a_zero = 128 if activation.symmetric else round(1.0 / a_scale)
    a = np.clip(np.round(x / a_scale) + a_zero, 0, 255).astype(np.int64) - a_zero
    codes = (_weights().astype(np.float64) * spec.qmax).astype(np.int64)
    return (a @ codes) * a_scale * (1.0 / spec.qmax)


def _rel_error(session, activation: QuantSpec, spec: QuantSpec) -> float:
    x = saturating_inputs()
    got = session.run(None, {"x": x})[0]
    ref = exact_output(x, activation, spec)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def max_rel_error(kernel: str, activation: QuantSpec, directory: Path, optimized: Path | None = None) -> float:
    """max |ORT - exact| / max |exact| of the saturating linear saved under `directory`, ORT fully optimized."""
    from qgraph.backends.onnx_qdq import session_from_file

    model, _, spec = saturating_linear(kernel, activation)
    path = Path(directory) / f"{kernel}.onnx"
    ir.save(model, path)
    session = session_from_file(path, threads=1, optimized_path=str(optimized) if optimized else None)
    return _rel_error(session, activation, spec)


def probe_rel_error(kernel: str, activation: QuantSpec) -> float:
    """max_rel_error of the saturating linear in memory (no files): what ORT computes on this host."""
    from qgraph.backends.onnx_qdq import session_from_model

    model, _, spec = saturating_linear(kernel, activation)
    return _rel_error(session_from_model(model, threads=1), activation, spec)
