"""The run-time int8 kernel switch: u8u8-stored weights run on u8 x s8 only where that is exact.

Every assertion holds on any host: where the probe finds ORT's u8 x s8 kernel exact (VNNI, ARM64) the
session switches, elsewhere it keeps the stored u8 x u8 kernel, and either way the saturating linear
comes out as the exact int32 product.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qgraph
from qgraph.backends import host_int8
from qgraph.errors import QGraphError
from qgraph.eval.host import cpu_info
from qgraph.eval.int8_exactness import exact_output, saturating_inputs, saturating_linear
from qgraph.ir.qspec import QuantSpec

ASYM = QuantSpec("uint8", "tensor", symmetric=False)


def _dequantized_weights(model: ir.Model) -> np.ndarray:
    from qgraph.backends.onnx_qdq import int8_gemm_weights

    ((_, dq),) = list(int8_gemm_weights(model))
    codes, scale, zero = (v.const_value.numpy() for v in dq.inputs)
    return (codes.astype(np.int32) - zero.astype(np.int32)) * scale


def test_restoring_as_int8_keeps_every_weight_and_moves_the_storage():
    model, _, _ = saturating_linear("u8u8", ASYM)
    before = _dequantized_weights(model)
    assert host_int8.restore_as_u8s8(model) == 1
    after = _dequantized_weights(model)
    np.testing.assert_array_equal(after, before)  # the same integers: code - 128 with zero point 0
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    assert dq.inputs[0].const_value.dtype == ir.DataType.INT8 and dq.inputs[2].const_value.dtype == ir.DataType.INT8
    assert host_int8.restore_as_u8s8(model) == 0  # nothing left stored as u8u8


@pytest.mark.parametrize("kernel", ["s7", "u8s8"])
def test_weights_already_int8_are_left_alone(kernel):
    model, _, _ = saturating_linear(kernel, ASYM)
    assert host_int8.restore_as_u8s8(model) == 0


def test_probe_agrees_with_the_cpu_record():
    # MLAS picks its kernel by CPUID: a host with int32 dot products must probe exact, one without must not.
    assert host_int8.u8s8_exact_here() == (cpu_info()["int8_dot"] in ("vnni", "arm64"))


@pytest.mark.parametrize("requested", ["host", "stored"])
def test_opened_session_is_exact_on_this_cpu(tmp_path, requested):
    model, _, spec = saturating_linear("u8u8", ASYM)
    ir.save(model, tmp_path / "m.onnx")
    session, ran = host_int8.open_session(tmp_path / "m.onnx", threads=1, int8_kernel=requested)
    switched = requested == "host" and host_int8.u8s8_exact_here()
    assert ran.startswith("u8s8 (1 layers") if switched else ran == "as stored"
    x = saturating_inputs()
    ref = exact_output(x, ASYM, spec)
    got = session.run(None, {"x": x})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5, ran


def test_environment_and_argument_choose(monkeypatch):
    monkeypatch.setenv(host_int8.ENV, "stored")
    assert host_int8.choice() == "stored" and host_int8.choice("host") == "host"
    monkeypatch.setenv(host_int8.ENV, "fast")
    with pytest.raises(QGraphError, match="QGRAPH_INT8_KERNEL: 'fast' is not a run-time int8 kernel choice"):
        host_int8.choice()
    with pytest.raises(QGraphError, match="--int8-kernel: 'u8s8' is not a run-time int8 kernel choice.*host.*stored"):
        host_int8.choice("u8s8")


def test_artifact_perplexity_is_the_same_on_either_kernel(tmp_path, llama_captured):
    from qgraph.calib.data import TokenWindows

    calib = TokenWindows(np.random.default_rng(5).integers(0, 256, size=(2, 32), dtype=np.int64), 0, "random")
    compiled = qgraph.compile(llama_captured, "w8a8", calib=calib, progress=False)
    said = compiled.report["int8_gemm"]["kernels"]["u8u8"]["at_run_time_here"]
    assert said.startswith("u8s8 (re-stored at load") if host_int8.u8s8_exact_here() else said == "u8u8"
    out = compiled.save(tmp_path / "w8a8", progress=False)
    ids = np.random.default_rng(3).integers(0, 256, size=(1, 24), dtype=np.int64)
    host = qgraph.open_runner(out, int8_kernel="host")
    stored = qgraph.open_runner(out, int8_kernel="stored")
    assert stored.int8_kernel == "as stored"
    assert host.int8_kernel == ("u8s8 (14 layers; stored u8u8, exact on this host)" if host_int8.u8s8_exact_here()
                                else "as stored")
    np.testing.assert_allclose(host.forward(ids), stored.forward(ids), rtol=0, atol=1e-5)


def test_cli_bench_refuses_an_unknown_run_time_kernel(tmp_path):
    from tests.test_cli import assert_user_error
    from tests.test_cli import qgraph as cli

    assert_user_error(cli("bench", str(tmp_path), "--int8-kernel", "vnni"),
                      "--int8-kernel: 'vnni' is not a run-time int8 kernel choice", "use host")
