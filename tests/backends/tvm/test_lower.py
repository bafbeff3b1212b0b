"""Whole-graph lowering to Relax on the tiny Llama: logits match ONNX Runtime per recipe; the artifact round-trips."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

tvm = pytest.importorskip("tvm")

import qgraph  # noqa: E402
from qgraph.backends.onnx_qdq import session_from_model  # noqa: E402
from qgraph.backends.tvm import artifact as A  # noqa: E402
from qgraph.backends.tvm import lower as L  # noqa: E402
from qgraph.calib.data import TokenWindows  # noqa: E402

LENGTHS = (1, 8)
# int4 asymmetric (uint4 codes with per-group zero points), nothing else: the zero-point path of Q4Linear.
W4_ASYM = """name: w4a16-asym
layers: {select: block-linears, skip: []}
weights: {format: int4, granularity: group, group_size: 128, symmetric: false}
lowering: matmulnbits
lm_head: float
embedding: float
"""


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(9).integers(0, 256, size=(3, 32), dtype=np.int64), 0, "random")


@pytest.fixture(scope="module")
def lowered(llama_captured, tmp_path_factory):
    """recipe -> (CompiledModel, run(fn_length, ids) on the TVM build); one build per recipe."""
    cache = {}
    asym = tmp_path_factory.mktemp("recipes") / "w4a16-asym.yaml"
    asym.write_text(W4_ASYM)

    def get(recipe):
        if recipe not in cache:
            source = {"w4a16-asym": str(asym)}.get(recipe, recipe)
            compiled = qgraph.compile(llama_captured, source, calib=_windows(), progress=False)
            mod, params, names, counts = A.lower_to_relax(compiled.model, LENGTHS)
            vm = tvm.relax.VirtualMachine(A.build(mod), tvm.cpu())

            def run(ids, vm=vm, params=params, names=names):
                fn = f"seq{ids.shape[1]}"
                return vm[fn](tvm.runtime.tensor(ids), *[params[n] for n in names[fn]]).numpy()

            cache[recipe] = (compiled, run, counts)
        return cache[recipe]

    return get


def ort_exact(model: ir.Model):
    """ORT session of the same graph; MatMulNBits at accuracy_level 0 (fp32 activations, as the TVM kernel)."""
    proto = ir.to_proto(model)
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 0
    return session_from_model(ir.from_proto(proto), threads=1)


@pytest.mark.parametrize("recipe,linear,tol", [
    ("fp32", "F32Linear", 1e-5),
    ("w4a16", "Q4Linear", 1e-4),  # tiny K (64, 160) with group 128: every layer ends in a group tail
    ("w4a16-asym", "Q4Linear", 1e-4),  # packed 4-bit zero points
    ("w8a8", "Int8Linear", 2e-3),  # ORT's int8 kernel rescales in another order: float rounding only
    ("w4a8-qsm", "Int8Linear", 2e-3),  # packed int4 weights; ORT dequantizes them to fp32: float rounding only
])
def test_logits_match_onnxruntime(lowered, recipe, linear, tol):
    compiled, run, counts = lowered(recipe)
    # every block linear goes through qgraph's kernels (14 in the tiny model; + the tied lm_head in float)
    assert counts == {"Q4Linear": 0, "Int8Linear": 0, "F32Linear": 1} | {linear: 14 + (linear == "F32Linear")}, counts
    session = ort_exact(compiled.model)
    rng = np.random.default_rng(3)
    for length in LENGTHS:
        ids = rng.integers(0, 256, (1, length)).astype(np.int64)
        ref = session.run(None, {"input_ids": ids})[0]
        got = run(ids)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() / np.abs(ref).max() < tol, (recipe, length)


def test_refuses_formats_without_a_kernel(llama_captured):
    compiled = qgraph.compile(llama_captured, "fp8", calib=_windows(), progress=False)
    with pytest.raises(qgraph.errors.QGraphError, match="TVM lowers"):
        L.rewrite_linears(compiled.model)


def test_artifact_roundtrip_pads_to_compiled_length(tmp_path, lowered):
    compiled, _, _ = lowered("w4a16")
    out = A.save_artifact(compiled, tmp_path / "tvm", lengths=LENGTHS, progress=False)
    assert {"model.so", "params.npz", "manifest.json", "report.json"} <= {p.name for p in out.iterdir()}
    runner = qgraph.api.open_runner(out)
    assert runner.kind == "tvm-llvm"
    session = ort_exact(compiled.model)
    ids = np.random.default_rng(4).integers(0, 256, (1, 5)).astype(np.int64)
    ref = session.run(None, {"input_ids": ids})[0]
    got = runner.forward(ids)  # 5 tokens run the length-8 function, right-padded: causal, so logits unchanged
    assert got.shape == ref.shape and np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
    with pytest.raises(qgraph.errors.QGraphError, match="exceed the longest compiled length 8"):
        runner.forward(np.zeros((1, 9), np.int64))


@pytest.mark.slow  # two exports and a TVM build of lengths 1 and 512 in subprocesses: ~50 s of CPU
def test_cli_compile_backend_tvm_then_eval(tmp_path, llama_dir, text_file):
    """`qgraph compile --backend tvm` writes an artifact that `qgraph eval` reads like the ONNX one."""
    from tests.test_cli import assert_user_error
    from tests.test_cli import qgraph as cli

    ort_dir, tvm_dir = tmp_path / "ort", tmp_path / "tvm"
    common = ["--recipe", "w4a16", "--calib-text", text_file, "--calib-windows", "2", "--ctx", "32", "-q"]
    assert cli("compile", llama_dir, *common, "-o", ort_dir).returncode == 0
    r = cli("compile", llama_dir, *common, "--backend", "tvm", "-o", tvm_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tvm_dir / "manifest.json").read_text())
    assert manifest["backend"] == "tvm" and manifest["model_file"] == "model.so" and manifest["recipe"] == "w4a16"
    results = []
    for d in (ort_dir, tvm_dir):
        r = cli("eval", d, "--text", text_file, "--windows", "2", "--ctx", "64", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert results[1]["runtime"] == "tvm-llvm" and results[1]["tokens"] == results[0]["tokens"] == 126
    # ORT's MatMulNBits quantizes activations to int8 inside (accuracy_level 4); TVM keeps them fp32
    assert abs(results[1]["ppl"] / results[0]["ppl"] - 1) < 0.02, results
    assert_user_error(cli("compile", llama_dir, "--recipe", "fp32", "--backend", "mlir", "-o", tmp_path / "x"),
                      "unknown backend 'mlir'", "--backend tvm")


def _qdq_linear(n: int, w_bits: int, rng) -> ir.Model:
    """x [1, 5, 24] -> QuantizeLinear -> DequantizeLinear -> MatMul with a per-channel int8 / int4 weight [24, n]."""
    import ml_dtypes

    def const(name, array):
        return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                        const_value=ir.tensor(array, name=name))

    x = ir.Value(name="x", shape=ir.Shape([1, 5, 24]), type=ir.TensorType(ir.DataType.FLOAT))
    a_scale, a_zero = const("a_scale", np.array(0.05, np.float32)), const("a_zero", np.array(128, np.uint8))
    lo, dtype = (-8, ml_dtypes.int4) if w_bits == 4 else (-127, np.int8)
    wq = const("wq", rng.integers(lo, -lo, (24, n)).astype(dtype))
    ws = const("ws", (rng.random(n) * 0.1 + 0.01).astype(np.float32))
    quant = ir.node("QuantizeLinear", [x, a_scale, a_zero])
    dequant = ir.node("DequantizeLinear", [quant.outputs[0], a_scale, a_zero])
    wdq = ir.node("DequantizeLinear", [wq, ws], attributes={"axis": 1})
    mm = ir.node("MatMul", [dequant.outputs[0], wdq.outputs[0]])
    y = mm.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, 5, n])
    graph = ir.Graph([x], [y], nodes=[quant, dequant, wdq, mm], initializers=[a_scale, a_zero, wq, ws],
                     opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("w_bits", [4, 8])
def test_odd_channel_count_is_padded_to_the_vector_width(w_bits):
    """QSM's split channels give N like 1537: the kernel runs on N padded to 16 (zero channels), the output is sliced."""
    rng = np.random.default_rng(0)
    model = _qdq_linear(37, w_bits, rng)
    x = (rng.standard_normal((1, 5, 24)) * 3).astype(np.float32)
    ref = session_from_model(model, threads=1, optimize=False).run(None, {"x": x})[0]
    L.rewrite_linears(model)
    L.inline_constants(model, L.weight_names(model))
    mod, params = tvm.relax.frontend.detach_params(L.import_onnx(ir.to_proto(model)))
    assert [tuple(p.shape) for p in params["main"][:2]] == [((24 + 7) // 8 if w_bits == 4 else 24, 48), (48,)]
    got = tvm.relax.VirtualMachine(A.build(mod), tvm.cpu())["main"](tvm.runtime.tensor(x), *params["main"]).numpy()
    assert got.shape == (1, 5, 37) and np.abs(got - ref).max() / np.abs(ref).max() < 1e-5


def test_tied_table_is_stored_once(llama_captured):
    """The embedding lookup reads the lm_head kernel's [D, V] copy: no [V, D] table among the parameters."""
    compiled = qgraph.compile(llama_captured, "fp32", progress=False)
    _, params, names, _ = A.lower_to_relax(compiled.model, LENGTHS)
    shapes = [tuple(params[n].shape) for n in names["seq1"]]
    assert (64, 256) in shapes and (256, 64) not in shapes, shapes
    assert set(names["seq1"]) == set(names["seq8"])
