"""Capture: torch module / HF dir / .onnx into onnx_ir, numerics equal to torch in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.ir.capture import CausalLMLogits, EncoderHidden
from qgraph.ir.regions import find_embeddings, find_linears, find_norms
from tests.conftest import tiny_bert


def _ort(model, ids):
    sess = session_from_model(model, threads=1, optimize=False)
    return sess.run(None, {sess.get_inputs()[0].name: ids})[0]


def test_hf_dir_capture_matches_torch_at_any_length(llama_captured, llama_module):
    assert isinstance(llama_captured.model, ir.Model)
    assert llama_captured.source["kind"] == "huggingface"
    assert llama_captured.input_names == ["input_ids"] and llama_captured.output_names == ["logits"]
    for length in (1, 7, 40):  # dynamic sequence axis, including the single-token case
        ids = np.random.default_rng(length).integers(0, 256, size=(1, length), dtype=np.int64)
        with torch.no_grad():
            ref = llama_module(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
        got = _ort(llama_captured.model, ids)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_hf_logits_graph_has_a_dynamic_batch(llama_captured, tmp_path, text_file):
    assert [str(d) for d in llama_captured.model.graph.inputs[0].shape] == ["batch", "seq"]
    ids = np.random.default_rng(4).integers(0, 256, size=(4, 9), dtype=np.int64)
    rows = np.concatenate([_ort(llama_captured.model, ids[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(_ort(llama_captured.model, ids), rows, rtol=1e-5, atol=1e-5)
    # A static-activation artifact keeps it: every row is computed as if it came alone.
    compiled = qgraph.compile(llama_captured, "w8a8", calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32),
                              progress=False)
    compiled.save(tmp_path / "w8a8", progress=False)
    runner = qgraph.open_runner(tmp_path / "w8a8", progress=False)
    rows = np.concatenate([runner.forward(ids[i : i + 1]) for i in range(4)])
    assert runner.forward(ids).shape == (4, 9, 256)
    np.testing.assert_allclose(runner.forward(ids), rows, rtol=1e-5, atol=1e-5)


def test_linears_named_by_module_path_with_roles(llama_captured):
    layers = find_linears(llama_captured.model)
    names = [l.name for l in layers]
    blocks = [l for l in layers if l.role == "block"]
    assert len(blocks) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert "model.layers.0.self_attn.q_proj" in names
    assert "model.layers.1.mlp.down_proj" in names
    head = [l for l in layers if l.role == "lm_head"]
    assert len(head) == 1 and head[0].name == "lm_head" and head[0].transposed  # tied to the embedding
    k_proj = next(l for l in layers if l.name.endswith("k_proj"))
    assert (k_proj.in_features, k_proj.out_features) == (64, 32)  # 2 KV heads x 16


def test_norms_and_embedding_recognised(llama_captured):
    norms = find_norms(llama_captured.model)
    assert [n.kind for n in norms] == ["rmsnorm"] * 5  # 2 per block + final
    assert norms[0].name == "model.layers.0.input_layernorm"
    assert len(find_embeddings(llama_captured.model)) == 1


def test_module_capture_with_example_inputs(llama_module):
    ids = torch.arange(10).reshape(1, 10)
    captured = qgraph.load(CausalLMLogits(llama_module), example_inputs=(ids,), progress=False)
    assert [str(d) for d in captured.model.graph.inputs[0].shape] == ["batch", "10"]  # the example's length
    ids = torch.cat([ids, ids.flip(1)])  # batch 2 through the batch-1 example's graph
    got = _ort(captured.model, ids.numpy())
    with torch.no_grad():
        ref = llama_module(input_ids=ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_module_without_example_inputs_is_refused(llama_module):
    with pytest.raises(qgraph.QGraphError, match="needs example inputs"):
        qgraph.load(CausalLMLogits(llama_module))


def test_bert_capture_matches_torch():
    bert = tiny_bert()
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    captured = qgraph.load(EncoderHidden(bert), example_inputs=(ids,), progress=False)
    with torch.no_grad():
        ref = bert(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(_ort(captured.model, ids.numpy()), ref, rtol=1e-4, atol=1e-4)
    layers = find_linears(captured.model)
    assert len(layers) == 2 * 6 and all(l.role == "block" for l in layers)  # q k v o intermediate output
    assert sum(n.kind == "layernorm" for n in find_norms(captured.model)) == 5  # embeddings + 2 per layer


def test_bert_hf_dir_capture(tmp_path):
    bert = tiny_bert()
    bert.save_pretrained(tmp_path)
    captured = qgraph.load(tmp_path, progress=False)
    assert captured.source["task"] == "encoder"
    ids = np.arange(27, dtype=np.int64).reshape(3, 9) % 200  # batch 3: the encoder's batch axis is dynamic too
    with torch.no_grad():
        ref = bert(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(_ort(captured.model, ids), ref, rtol=1e-4, atol=1e-4)


def test_onnx_file_roundtrip(tmp_path, llama_captured):
    path = tmp_path / "m.onnx"
    ir.save(llama_captured.model, path)
    again = qgraph.load(path)
    assert again.source["kind"] == "onnx"
    ids = np.arange(5, dtype=np.int64).reshape(1, 5)
    np.testing.assert_array_equal(_ort(again.model, ids), _ort(llama_captured.model, ids))


def test_corrupt_and_missing_inputs_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage-not-a-model" * 10)
    with pytest.raises(qgraph.QGraphError, match="cannot read ONNX file"):
        qgraph.load(bad)
    with pytest.raises(qgraph.QGraphError, match="does not exist"):
        qgraph.load(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(qgraph.QGraphError, match="unsupported model"):
        qgraph.load(tmp_path / "notes.txt")


@pytest.mark.parametrize("architectures, model_type, causal", [
    ([], "gemma3_text", True),  # a Gemma-3 GGUF's config: no architectures, a type no hand list knew
    (["Gemma3ForCausalLM"], "gemma3_text", True), ([], "qwen3", True), (["Qwen2ForCausalLM"], "qwen2", True),
    ([], "mistral", True), (["Phi3ForCausalLM"], "phi3", True), (["GPT2LMHeadModel"], "gpt2", True),
    ([], "opt", True), ([], "falcon", True), ([], "smollm3", True),
    (["BertModel"], "bert", False), ([], "bert", False), ([], "roberta", False),  # encoders with an LM-head class too
])
def test_causal_lm_detection_comes_from_transformers(architectures, model_type, causal):
    from qgraph.ir.capture import causal_lm

    assert causal_lm(architectures, model_type) is causal


def test_a_gemma3_text_checkpoint_without_architectures_loads_as_a_causal_lm(tmp_path):
    import json

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    written.pop("architectures", None)  # as a GGUF's converted config has none
    (tmp_path / "config.json").write_text(json.dumps(written))
    captured = qgraph.load(tmp_path, progress=False, export=False)
    assert captured.source["task"] == "causal-lm" and captured.source["loaded_class"] == "Gemma3ForCausalLM"
