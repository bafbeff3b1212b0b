"""Exact int8 on every CPU: a QDQ linear whose integer sums would saturate int16 pair sums.

ONNX Runtime's u8 x s8 kernel on AVX2 hosts without VNNI adds adjacent byte products in int16 with
saturation; qgraph's default lowering (u8 x u8) and the s7 grid must give the exact int32 product on
any host, so these tests pass on AVX2, AVX-512, VNNI and ARM64 machines alike.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

import qgraph
from qgraph.backends.int8_kernels import KERNELS, host_verdict
from qgraph.errors import QGraphError
from qgraph.eval.host import cpu_info, describe_host
from qgraph.eval.int8_exactness import max_rel_error, saturating_linear
from qgraph.ir.qspec import QuantSpec

ACTIVATIONS = {
    "int8-sym": QuantSpec("int8", "tensor"),  # stored uint8, zero point 128: codes 1..255 (0 after clipping)
    "uint8-asym": QuantSpec("uint8", "tensor", symmetric=False),  # w8a8-qsm's activations: codes 0..255
}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("kernel", ["u8u8", "s7"])
def test_fused_int8_equals_exact_int32_on_this_cpu(tmp_path, kernel, activation):
    # Activations at both ends of the grid, weight codes +-qmax: adjacent u8 x s8 products sum to +-64770,
    # twice what an int16 pair sum holds, so a saturating kernel is off by tens of percent here.
    optimized = tmp_path / "optimized.onnx"
    err = max_rel_error(kernel, ACTIVATIONS[activation], tmp_path, optimized)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    assert ops["MatMulIntegerToFloat"] == 1 and ops["DequantizeLinear"] == 0, ops  # ORT's fused integer kernel ran
    assert err < 1e-5, (describe_host(), kernel, activation, err)
    _, lower, _ = saturating_linear(kernel, ACTIVATIONS[activation])
    assert lower.summary()["int8_kernel"] == kernel
    storage = onnx.load(str(tmp_path / f"{kernel}.onnx")).graph.initializer
    w_dtype = next(t.data_type for t in storage if t.name.endswith("weight_q"))
    assert w_dtype == (onnx.TensorProto.UINT8 if kernel == "u8u8" else onnx.TensorProto.INT8)


def test_s7_codes_fit_int16_pair_sums():
    model, _, _ = saturating_linear("s7", ACTIVATIONS["int8-sym"])
    codes = next(v.const_value.numpy() for name, v in model.graph.initializers.items() if name.endswith("weight_q"))
    assert codes.dtype == np.int8 and np.abs(codes).max() == 63
    assert 2 * 255 * 64 <= 2**15 - 1  # the worst u8 x s7 pair cannot leave int16


def test_recipe_int8_kernel_moves_the_weight_grid():
    base = qgraph.load_recipe("w8a8-qsm")
    assert base.int8_kernel == "u8u8" and base.blocks.weights.format == "int8"
    s7 = base.with_int8_kernel("s7")
    assert s7.blocks.weights.format == "int7" and s7.int8_kernel == "s7"
    assert s7.with_int8_kernel("u8u8") == base  # the round trip restores the recipe
    assert base.with_int8_kernel("u8s8").blocks.weights.format == "int8"
    weight_only = qgraph.load_recipe("w4a16")
    assert weight_only.with_int8_kernel("s7").blocks == weight_only.blocks  # no int8 GEMM: nothing to move
    with pytest.raises(QGraphError, match="unknown int8 kernel 'vnni'.*use one of u8u8, s7, u8s8"):
        base.with_int8_kernel("vnni")


def test_host_record_names_the_int8_unit():
    info = cpu_info()
    assert info["int8_dot"] in ("vnni", "arm64", "pmaddubsw") and info["model"]
    assert describe_host().startswith(info["model"])
    assert host_verdict(KERNELS["u8u8"], info["int8_dot"]) == "exact"
    assert host_verdict(KERNELS["s7"], "pmaddubsw") == "exact"
    assert host_verdict(KERNELS["u8s8"], "pmaddubsw").startswith("saturates")
    assert host_verdict(KERNELS["u8s8"], "vnni") == "exact"


def _calib():
    from qgraph.calib.data import TokenWindows

    return TokenWindows(np.random.default_rng(5).integers(0, 256, size=(2, 32), dtype=np.int64), 0, "random")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_report_and_inspect_name_the_int8_gemm(tmp_path, llama_captured, kernel):
    recipe = qgraph.load_recipe("w8a8").with_int8_kernel(kernel)
    compiled = qgraph.compile(llama_captured, recipe, calib=_calib(), progress=False)
    gemm = compiled.report["int8_gemm"]
    assert gemm["layers"] == {kernel: 14}, gemm  # read back from the lowered graph's weight storage and codes
    assert gemm["host"] == cpu_info()
    assert gemm["kernels"][kernel]["on_this_host"] == host_verdict(KERNELS[kernel], cpu_info()["int8_dot"])
    lowering = next(p for p in compiled.report["passes"] if p["pass"] == "lower_onnx")
    assert lowering["int8_kernel"] == kernel
    out = compiled.save(tmp_path / kernel, progress=False)
    from typer.testing import CliRunner

    from qgraph.cli import app

    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert f"int8 GEMMs: 14 x {kernel}" in shown.output and "host: " in shown.output


def test_cli_refuses_an_unknown_int8_kernel_before_any_work(tmp_path):
    from tests.test_cli import assert_user_error
    from tests.test_cli import qgraph as cli

    assert_user_error(cli("compile", "--int8-kernel", "vnni", "-o", tmp_path / "x"),
                      "--int8-kernel: unknown int8 kernel 'vnni'", "use one of u8u8, s7, u8s8")
    assert not (tmp_path / "x").exists()
