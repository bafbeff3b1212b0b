"""Lowering to ONNX Runtime: MatMulNBits packing, QDQ structure, numerics, fused int8 kernels."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qgraph
from qgraph.backends.onnx_qdq import pack_matmulnbits, session_from_file, session_from_model
from qgraph.calib.data import TokenWindows
from qgraph.ir.qspec import QuantSpec
from qgraph.quantize import fake_quantize


def _matmulnbits_model(k: int, n: int, packed, scales, zps, block: int) -> ir.Model:
    a = ir.Value(name="a", shape=ir.Shape([3, k]), type=ir.TensorType(ir.DataType.FLOAT))
    inits = [ir.Value(name="b", const_value=ir.tensor(packed, name="b")),
             ir.Value(name="s", const_value=ir.tensor(scales, name="s"))]
    if zps is not None:
        inits.append(ir.Value(name="z", const_value=ir.tensor(zps, name="z")))
    node = ir.node("MatMulNBits", [a, *inits], domain="com.microsoft",
                   attributes={"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": 0})
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([a], [node.outputs[0]], nodes=[node], initializers=inits,
                     opset_imports={"": 21, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("k,n,block,fmt,sym,full", [
    (576, 40, 128, "int4", True, False),     # 576 = 4.5 blocks: a partial tail block
    (576, 40, 128, "int4", True, True),      # full range: negative scales where the max is positive
    (1536, 24, 128, "int4", True, False),
    (100, 7, 32, "int4", False, False),      # odd shapes, asymmetric zero points, odd block count
    (64, 5, 16, "uint4", False, False),
])
def test_matmulnbits_packing_matches_numpy(k, n, block, fmt, sym, full):
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    spec = QuantSpec(fmt, "block", axis=0, block_size=block, symmetric=sym, full_range=full)
    packed, scales, zps = pack_matmulnbits(w, spec)
    if full:
        assert (scales < 0).any() and (scales > 0).any()
    assert packed.shape == (n, -(-k // block), block // 2)
    x = rng.standard_normal((3, k)).astype(np.float32)
    sess = session_from_model(_matmulnbits_model(k, n, packed, scales, zps, block), threads=1, optimize=False)
    got = sess.run(None, {"a": x})[0]
    ref = x @ fake_quantize(w, spec)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["uint4", "int4"])
def test_float_zero_point_recovers_q4_1_weights_exactly(fmt):
    """Weights made as llama.cpp Q4_1 makes them (x = d q + m, fp16 d and m, every block using codes 0 and 15)
    come back to the same codes: fake-quantizing them is lossless, and MatMulNBits computes x @ w."""
    k, n, block = 96, 8, 32
    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, size=(k, n))
    q[0::block], q[1::block] = 0, 15  # Q4_1 maps each block's min to 0 and max to 15
    d = rng.uniform(0.005, 0.05, size=(k // block, n)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.4, 0.1, size=(k // block, n)).astype(np.float16).astype(np.float32)
    w = (np.repeat(d, block, axis=0) * q + np.repeat(m, block, axis=0)).astype(np.float32)
    spec = QuantSpec(fmt, "block", axis=0, block_size=block, symmetric=False, float_zero_point=True)
    np.testing.assert_allclose(fake_quantize(w, spec), w, rtol=0, atol=1e-6)
    integer_zp = fake_quantize(w, QuantSpec(fmt, "block", axis=0, block_size=block, symmetric=False))
    assert np.abs(integer_zp - w).max() > 1e-3  # a rounded zero point moves the grid off the weights
    packed, scales, zps = pack_matmulnbits(w, spec)
    assert zps.dtype == np.float32 and zps.shape == (n * k // block,)
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = session_from_model(_matmulnbits_model(k, n, packed, scales, zps, block), threads=1, optimize=False).run(
        None, {"a": x})[0]
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)


def test_float_zero_point_needs_an_asymmetric_group_spec():
    with pytest.raises(qgraph.QGraphError, match="float_zero_point applies to asymmetric"):
        QuantSpec("uint4", "block", axis=0, block_size=32, symmetric=True, float_zero_point=True)


def _calib(vocab=256, n=4, ctx=32) -> TokenWindows:
    ids = np.random.default_rng(7).integers(0, vocab, size=(n, ctx), dtype=np.int64)
    return TokenWindows(ids, 0, "random")


def _run(model, ids):
    sess = session_from_model(model, threads=1, optimize=False)
    return sess.run(None, {"input_ids": ids})[0]


def test_w8a8_lowering_structure_and_numerics(llama_captured):
    compiled = qgraph.compile(llama_captured, "w8a8", calib=_calib(), progress=False)
    ops = collections.Counter(n.op_type for n in compiled.model.graph)
    # 14 block linears read 4 distinct activations per layer (qkv share one, gate/up share one):
    # one shared Q -> DQ pair per activation, plus one weight DQ per linear.
    assert ops["QuantizeLinear"] == 8
    assert ops["DequantizeLinear"] == 8 + 14
    assert len(compiled.layers) == 14 and {l["weight"] for l in compiled.layers} == {"int8 channel(axis=1) sym static"}
    # The captured float graph is untouched by compile.
    assert not any(n.op_type == "QuantizeLinear" for n in llama_captured.model.graph)
    ids = np.random.default_rng(3).integers(0, 256, size=(1, 20), dtype=np.int64)
    ref, got = _run(llama_captured.model, ids), _run(compiled.model, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-5 < rel < 0.05, rel  # quantized (not identical), but close


def test_w8a8_runs_ort_int8_kernels(tmp_path, llama_captured):
    compiled = qgraph.compile(llama_captured, "w8a8", calib=_calib(), progress=False)
    out = compiled.save(tmp_path / "w8a8", progress=False)
    optimized = tmp_path / "optimized.onnx"
    sess = session_from_file(out / "model.onnx", threads=1, optimized_path=str(optimized))
    ids = np.arange(9, dtype=np.int64).reshape(1, 9)
    fused = sess.run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(fused, _run(compiled.model, ids), rtol=2e-2, atol=2e-2)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    int8_kernels = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["DynamicQuantizeMatMul"]
    assert int8_kernels == 14, ops
    assert ops["DequantizeLinear"] == 0, ops  # every weight DQ was folded into an int8 kernel


def test_w4a16_lowers_to_matmulnbits(llama_captured):
    compiled = qgraph.compile(llama_captured, "w4a16", progress=False)
    ops = collections.Counter(n.op_type for n in compiled.model.graph)
    assert ops["MatMulNBits"] == 14 and ops["DequantizeLinear"] == 0
    ids = np.arange(12, dtype=np.int64).reshape(1, 12)
    ref, got = _run(llama_captured.model, ids), _run(compiled.model, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.2, rel


def test_artifact_roundtrip_fresh_session(tmp_path, llama_captured):
    compiled = qgraph.compile(llama_captured, "w4a16", progress=False)
    out = compiled.save(tmp_path / "art", progress=False)
    manifest = qgraph.artifact.read_manifest(out)
    assert manifest["backend"] == "onnxruntime" and manifest["recipe"] == "w4a16"
    assert manifest["opset"][""] == 21 and manifest["inputs"][0]["name"] == "input_ids"
    assert manifest["tokenizer"]["add_special_tokens"] is False
    assert len(manifest["quantized_layers"]) == 14
    ids = np.arange(6, dtype=np.int64).reshape(1, 6)
    got = session_from_file(out / "model.onnx", threads=1, optimize=False).run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(got, _run(compiled.model, ids))


@pytest.mark.parametrize("recipe,bound", [("fp8", 0.3), ("w4a8-qsm", 0.3)])
def test_formats_without_fused_kernels_still_run(llama_captured, recipe, bound):
    compiled = qgraph.compile(llama_captured, recipe, calib=_calib(), progress=False, verify=True)
    lowering = next(p for p in compiled.report["passes"] if p["pass"] == "lower_onnx")
    assert list(lowering["ops"]) == ["explicit Q -> DQ + float MatMul (ORT CPU has no fused kernel for this format)"]
    assert lowering["ops"][list(lowering["ops"])[0]] == 14
    ids = np.arange(16, dtype=np.int64).reshape(1, 16)
    ref, got = _run(llama_captured.model, ids), _run(compiled.model, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < bound, rel
    dq_types = {compiled.model.graph.initializers[n.inputs[0].name].dtype for n in compiled.model.graph
                if n.op_type == "DequantizeLinear" and n.inputs[0].name in compiled.model.graph.initializers}
    assert dq_types == ({ir.DataType.FLOAT8E4M3FN} if recipe == "fp8" else {ir.DataType.INT4})


def test_float_zero_points_lower_to_the_fast_kernel_plus_a_block_sum_correction(llama_captured):
    """w4a16-q41: MatMulNBits without zero points (ORT's fast path) + block_sums(x) @ s (8 - z), equal to
    the float graph with the same fake-quantized weights up to the kernel's int8 activations (accuracy level 4)."""
    from qgraph.ir.regions import find_linears, weight_array
    from qgraph.ir.rewrite import set_linear_weight
    from qgraph.passes.annotate import weight_spec
    from qgraph.recipes import load_recipe

    compiled = qgraph.compile(llama_captured, "w4a16-q41", progress=False)
    graph = compiled.model.graph
    nbits = [n for n in graph if n.op_type == "MatMulNBits" and n.name.startswith("model.layers")]
    assert len(nbits) == 14 and all(len(n.inputs) == 3 for n in nbits)  # no zero-point input: the fast kernel
    assert sum(n.name.endswith(".zero_point_shift") for n in graph) == 14
    # Block sums once per input (q, k, v share one; gate and up another): 4 per layer, one shared shape constant.
    sums = [n for n in graph if n.name.endswith(".block_sums")]
    assert [n.op_type for n in sums] == ["ReduceSum"] * 8
    assert len({n.inputs[0].producer().inputs[0].name for n in sums}) == 8
    assert sorted(k for k in graph.initializers if k.startswith("qgraph.block_")) == ["qgraph.block_shape_3d_32"]
    reference = llama_captured.model.clone()
    spec = weight_spec(load_recipe("w4a16-q41").blocks.weights)
    for layer in find_linears(reference):
        if layer.name.startswith("model.layers"):
            set_linear_weight(reference.graph, layer, fake_quantize(weight_array(layer), spec))
    ids = np.random.default_rng(3).integers(0, 256, size=(1, 20), dtype=np.int64)
    ref, got = _run(reference, ids), _run(compiled.model, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2
