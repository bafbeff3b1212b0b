"""The fused-attention runtime graph: GroupQueryAttention per block, the same function, the cache written in place."""

import collections

import numpy as np
import onnx_ir as ir
import pytest

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.backends.ort_attention import fuse_attention, runtime_graph
from qgraph.generate import Decoder
from tests.test_cli import assert_user_error
from tests.test_cli import qgraph as run_cli


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def _decode(decoder: Decoder, ids: np.ndarray, prompt: int, capacity: int = 256):
    cache = decoder.start(capacity=capacity)
    logits, cache = decoder.step(ids[:, :prompt], cache, 0)
    rows = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, cache = decoder.step(ids[:, t:t + 1], cache, t)
        rows.append(logits)
    return np.concatenate(rows, axis=1), {k: np.array(cache[k]) for k in cache.keys()}


@pytest.fixture(scope="module")
def fp32_runtime(llama_cache_captured):
    return qgraph.compile(llama_cache_captured, recipe="fp32", progress=False)


def test_every_block_becomes_one_group_query_attention(fp32_runtime):
    report = fp32_runtime.report["ort_fusion"]
    layers = 2
    assert report["attention_fused"] == layers and report["attention_refused"] == []
    assert report["verified_max_abs_diff"] < 1e-5
    ops = _ops(fp32_runtime.runtime)
    assert ops["GroupQueryAttention"] == layers
    # RoPE, the head repeat, the mask and the softmax are all inside the fused op now
    assert ops["Softmax"] == 0 and ops["Neg"] == 0 and ops["Expand"] == 0
    assert ops["SimplifiedLayerNormalization"] + ops["SkipSimplifiedLayerNormalization"] == 2 * layers + 1
    # the compiled model itself stays the unfused graph the passes read
    assert _ops(fp32_runtime.model)["Softmax"] == layers
    names = [v.name for v in fp32_runtime.runtime.graph.outputs]
    assert names == [v.name for v in fp32_runtime.model.graph.outputs]


def test_fused_decode_equals_the_unfused_graph_step_by_step(fp32_runtime):
    ids = np.random.default_rng(3).integers(0, 250, size=(1, 19))
    plain = Decoder(session_from_model(fp32_runtime.model))
    fused = Decoder(session_from_model(fp32_runtime.runtime))
    assert not plain.shared and fused.shared  # the runtime graph's metadata turns the in-place cache on
    want, want_cache = _decode(plain, ids, 7)
    # capacity 4 < the prompt: the shared buffer grows (twice) and keeps the tokens it holds
    got, got_cache = _decode(fused, ids, 7, capacity=4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert set(got_cache) == set(want_cache)
    for name, value in want_cache.items():
        assert got_cache[name].shape == value.shape == (1, 2, 19, 16)
        np.testing.assert_allclose(got_cache[name], value, atol=1e-5)
    unshared = Decoder(session_from_model(fp32_runtime.runtime), share_buffer=False)
    np.testing.assert_allclose(_decode(unshared, ids, 7)[0], want, atol=1e-5, rtol=1e-5)


def test_quantized_graph_fuses_and_its_check_runs_at_float_accuracy(llama_cache_captured, text_file):
    compiled = qgraph.compile(llama_cache_captured, recipe="w4a16", progress=False,
                              calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32))
    report = compiled.report["ort_fusion"]
    assert report["attention_fused"] == 2 and report["verified_max_abs_diff"] < 1e-4
    assert _ops(compiled.runtime)["MatMulNBits"] == _ops(compiled.model)["MatMulNBits"] - 4 > 0  # q, k, v packed
    levels = {n.attributes.get_int("accuracy_level") for n in compiled.runtime.graph if n.op_type == "MatMulNBits"}
    assert levels == {4}  # the check's accuracy_level 0 is restored on both graphs
    assert {n.attributes.get_int("accuracy_level") for n in compiled.model.graph if n.op_type == "MatMulNBits"} == {4}


def test_qdq_graph_fuses_and_its_check_bypasses_activation_rounding(llama_cache_captured, text_file):
    compiled = qgraph.compile(llama_cache_captured, recipe="w8a8", progress=False,
                              calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32))
    report = compiled.report["ort_fusion"]
    # unrounded, the rewrite is exact to float rounding; as compiled, moved codes may show (reported only)
    assert report["attention_fused"] == 2 and report["verified_max_abs_diff"] < 1e-4
    assert np.isfinite(report["as_compiled_max_abs_diff"])
    for graph in (compiled.model, compiled.runtime):  # the check's bypass leaves both graphs' rounding in place
        assert _ops(graph)["QuantizeLinear"] == 8  # per layer one for q/k/v, o, gate/up, down


def test_sliding_window_and_logits_graphs_stay_unfused_with_the_reason(llama_cache_captured, llama_dir):
    model = llama_cache_captured.model.clone()
    report = fuse_attention(model, sliding_window=16)
    assert report.fused == [] and len(report.refused) == 2
    assert all("sliding window of 16 tokens" in r.reason for r in report.refused)
    assert _ops(model)["Softmax"] == 2
    # a logits-only graph (no cache inputs) is not a decoder step
    logits_only = fuse_attention(qgraph.load(llama_dir, progress=False).model.clone())
    assert logits_only.fused == [] and "not a KV-cache decoder graph" in logits_only.refused[0].reason


def test_runtime_graph_refused_when_nothing_fuses(llama_cache_captured):
    runtime, report = runtime_graph(llama_cache_captured.model, {"sliding_window": 8})
    assert runtime is None and report["attention_fused"] == 0


def test_artifact_writes_the_runtime_graph_on_the_same_weights(tmp_path, llama_dir):
    out = tmp_path / "fp32-kv"
    r = run_cli("compile", llama_dir, "--kv-cache", "--recipe", "fp32", "-o", out, "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime_file"] == "model.ort.onnx" and (out / "model.ort.onnx").is_file()
    runtime = ir.load(out / "model.ort.onnx")
    assert _ops(runtime)["GroupQueryAttention"] == 2
    # generate and eval run the runtime graph; the same tokens as the unfused model.onnx
    fused = qgraph.generate(out, [5, 9, 11], max_new_tokens=12)
    plain = qgraph.generate(out / "model.onnx", [5, 9, 11], max_new_tokens=12)
    assert fused.new_ids == plain.new_ids
    # the runtime graph is for running: compiling it is refused with the file to use instead
    assert_user_error(run_cli("compile", out / "model.ort.onnx", "--recipe", "fp32", "-o", tmp_path / "again"),
                      "is ONNX Runtime's fused", "a runtime graph", "compile from the artifact's model.onnx")
    assert not (tmp_path / "again").exists()


def test_positions_past_the_rotary_caches_are_a_clear_error(fp32_runtime):
    decoder = Decoder(session_from_model(fp32_runtime.runtime))
    assert decoder.max_positions == 8192
    with pytest.raises(qgraph.QGraphError, match="more than the 8192 positions"):
        decoder.step(np.zeros((1, 2), np.int64), decoder.start(), 8191)


def test_packed_qkv_and_its_own_data_file(llama_cache_captured, text_file, tmp_path, monkeypatch):
    import qgraph.backends.ort_attention as ort_attention
    from qgraph.backends.onnx_qdq import session_from_file

    compiled = qgraph.compile(llama_cache_captured, recipe="w4a16", progress=False,
                              calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32))
    runtime_ops, model_ops = _ops(compiled.runtime), _ops(compiled.model)
    # q, k and v: one MatMulNBits per layer, read by GroupQueryAttention as its packed query
    assert runtime_ops["MatMulNBits"] == model_ops["MatMulNBits"] - 2 * 2
    packed = [n for n in compiled.runtime.graph if n.name.endswith(".qkv_proj")]
    assert len(packed) == 2 and packed[0].attributes.get_int("N") == 64 + 2 * 32
    monkeypatch.setattr(ort_attention, "OWN_DATA_MIN_BYTES", 0)  # every tensor of its own into model.ort.onnx.data
    out = compiled.save(tmp_path / "w4a16-kv", progress=False)
    assert (out / "model.ort.onnx.data").stat().st_size > 0
    ids = np.random.default_rng(1).integers(0, 250, size=(1, 12))
    want = _decode(Decoder(session_from_model(compiled.runtime)), ids, 5)[0]
    got = _decode(Decoder(session_from_file(out / "model.ort.onnx")), ids, 5)[0]
    np.testing.assert_array_equal(got, want)


def test_float_zero_point_layers_pack_with_their_block_sum_terms(llama_cache_captured):
    """w4a16-q41: q, k and v (each MatMulNBits + block_sums(x) @ shift) become one MatMulNBits and one packed
    shift MatMul; the runtime graph decodes as the unfused graph does, unrounded and as compiled alike."""
    from qgraph.backends.onnx_qdq import session_from_model

    compiled = qgraph.compile(llama_cache_captured, recipe="w4a16-q41", progress=False)
    report = compiled.report["ort_fusion"]
    assert report["attention_fused"] == 2 and report["verified_max_abs_diff"] < 1e-4
    assert report["skip_rms_norms"] == 3  # the residual Adds see the block-sum term's shape
    runtime = compiled.runtime.graph
    packed = [n for n in runtime if n.name.endswith(".qkv_proj")]
    shifts = [n for n in runtime if n.name.endswith(".qkv_proj.zero_point_shift")]
    assert len(packed) == len(shifts) == 2 and shifts[0].inputs[1].const_value.shape == (2, 64 + 2 * 32)
    assert _ops(compiled.runtime)["MatMulNBits"] == _ops(compiled.model)["MatMulNBits"] - 2 * 2
    block_sums = [sum(n.name.endswith(".block_sums") for n in g) for g in (runtime, compiled.model.graph)]
    assert block_sums == [8, 8]  # still one per input, shared by the packed term
    ids = np.random.default_rng(2).integers(0, 250, size=(1, 9))
    want = _decode(Decoder(session_from_model(compiled.model)), ids, 4)[0]
    got = _decode(Decoder(session_from_model(compiled.runtime)), ids, 4)[0]
    np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
