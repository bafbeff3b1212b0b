"""Quantized embedding table: GatherBlockQuantized lookups and a tied MatMulNBits lm_head on one stored copy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import qgraph
from qgraph.backends.embedding_table import QuantizeEmbeddingPass, quantize_table, table_spec
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.errors import QGraphError
from qgraph.ir.regions import find_embeddings
from qgraph.quantize import fake_quantize
from qgraph.recipes import parse_recipe
from tests.conftest import tiny_llama


def test_q8_0_table_comes_back_exactly(rng):
    # A table stored as int8 blocks of 32 with one scale each (GGUF Q8_0) is reproduced bit for bit.
    q = rng.integers(-127, 128, size=(10, 96)).astype(np.float32)
    q[:, ::32] = 127  # every block reaches the end of the grid, as Q8_0's max|x| / 127 scale makes it
    d = rng.uniform(0.001, 0.05, size=(10, 3, 1)).astype(np.float16).astype(np.float32)
    table = (q.reshape(10, 3, 32) * d).reshape(10, 96)
    codes, scales = quantize_table(table, table_spec("int8", 32))
    back = (codes.astype(np.float32) - 128) * scales.reshape(10, 3, 1)
    np.testing.assert_array_equal(back.reshape(10, 96), table)


def _untied_llama() -> ir.Model:
    import torch

    ids = torch.arange(16).reshape(1, 16)
    return qgraph.load(tiny_llama(tie=False), example_inputs=(ids,), progress=False).model


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("block", [32, 128])  # 128: hidden 64 is one padded (tail) block
def test_quantized_table_and_tied_head_match_the_dequantized_float_model(block, fmt, llama_captured):
    model = llama_captured.model.clone()
    table_name = find_embeddings(model)[0][1].inputs[0].name
    table = model.graph.initializers[table_name].const_value.numpy()
    reference = model.clone()
    reference.graph.initializers[table_name].const_value = ir.tensor(
        fake_quantize(table, table_spec(fmt, block)), name=table_name)

    # accuracy_level 0: float activations, so the kernels must reproduce the dequantized model exactly
    p = QuantizeEmbeddingPass(table_spec(fmt, block), tie_lm_head=True, accuracy_level=0)
    p(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1 and "Gather" not in ops
    assert table_name not in model.graph.initializers  # the float table is gone ...
    stored = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8]
    assert len(stored) == 1  # ... and its codes are stored once, for both readers
    info = p.summary()["tables"][table_name]
    blocks = -(-table.shape[1] // block)
    code_bytes = block * (8 if fmt == "int8" else 4) // 8  # 4-bit codes two per byte
    assert info["lm_head"] and info["stored_bytes"] == table.shape[0] * blocks * (code_bytes + 4)  # + one scale a block
    kernels = {n.op_type: n.attributes.get_int("bits") for n in model.graph if n.domain == "com.microsoft"}
    assert kernels == {"GatherBlockQuantized": int(fmt[3:]), "MatMulNBits": int(fmt[3:])}

    ids = np.random.default_rng(0).integers(0, 256, size=(1, 16), dtype=np.int64)
    feed = {model.graph.inputs[0].name: ids}
    want = session_from_model(reference, threads=1).run(None, feed)[0]
    got = session_from_model(model, threads=1).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_tied_head_defaults_to_int8_activations_inside_the_kernel(llama_captured):
    """The default lm_head runs at accuracy_level 4 (ORT's fast 8-bit path), off level 0 by int8 rounding only."""
    models = {}
    for level in (0, 4):
        models[level] = llama_captured.model.clone()
        QuantizeEmbeddingPass(table_spec("int8", 32), tie_lm_head=True, **({"accuracy_level": 0} if level == 0 else {}))(
            models[level])
    head = next(n for n in models[4].graph if n.op_type == "MatMulNBits")
    assert head.attributes["accuracy_level"].value == 4
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 16), dtype=np.int64)
    exact, fast = (session_from_model(models[level], threads=1).run(None, {models[level].graph.inputs[0].name: ids})[0]
                   for level in (0, 4))
    error = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    assert 0 < error < 2e-2, error


def test_untied_head_under_a_tied_recipe_gets_its_own_copy_of_the_format():
    # Mistral, Qwen3, Phi-3 ... ship untied heads: the tied recipe (w4a16-awq) gives the head the table's
    # 8-bit blocks in its own copy, and the logits equal the model whose head weights are those values.
    model = _untied_llama()
    head = next(n for n in model.graph if n.op_type == "MatMul" and "lm_head" in (n.name or ""))
    weight = head.inputs[1]
    w = weight.const_value.numpy() if weight.const_value is not None else None
    reference = model.clone()
    ref_weight = next(n for n in reference.graph if n.name == head.name).inputs[1]
    float_name = weight.name
    if w is None:  # MatMul(x, Transpose(W [V, D]))
        source = weight.producer().inputs[0]
        float_name = source.name
        fq = fake_quantize(source.const_value.numpy(), table_spec("int8", 32))
        ref_weight.producer().inputs[0].const_value = ir.tensor(fq, name=source.name)
    else:  # W [D, V]: blocks run along D, the table's hidden axis
        ref_weight.const_value = ir.tensor(np.ascontiguousarray(fake_quantize(w.T, table_spec("int8", 32)).T),
                                           name=weight.name)
    table_name = find_embeddings(reference)[0][1].inputs[0].name
    table = reference.graph.initializers[table_name]
    table.const_value = ir.tensor(fake_quantize(table.const_value.numpy(), table_spec("int8", 32)), name=table_name)
    p = QuantizeEmbeddingPass(table_spec("int8", 32), tie_lm_head=True, accuracy_level=0)
    p(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 1 and ops.count("GatherBlockQuantized") == 1
    assert list(p.summary()["untied_lm_head"]) == [head.name]
    assert float_name not in model.graph.initializers  # the float head is not stored any more
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 16), dtype=np.int64)
    want = session_from_model(reference, threads=1).run(None, {reference.graph.inputs[0].name: ids})[0]
    got = session_from_model(model, threads=1).run(None, {model.graph.inputs[0].name: ids})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float activations: the dequantized model exactly


def test_tied_head_needs_an_lm_head_on_a_constant():
    model = _untied_llama()
    head = next(n for n in model.graph if n.op_type == "MatMul" and "lm_head" in (n.name or ""))
    fed = ir.Value(name="head_weight", type=ir.TensorType(ir.DataType.FLOAT), shape=head.inputs[1].shape)
    model.graph.inputs.append(fed)
    head.replace_input_with(1, fed)
    with pytest.raises(QGraphError, match="no lm_head MatMul on a constant weight"):
        QuantizeEmbeddingPass(table_spec("int8", 32), tie_lm_head=True)(model)


def test_recipe_tied_head_needs_a_quantized_table():
    with pytest.raises(QGraphError, match="lm_head: tied reads the quantized embedding table"):
        parse_recipe({"weights": {"format": "int8"}, "lm_head": "tied"}, "r.yaml")
    with pytest.raises(QGraphError, match="block size 24 .* power of two"):
        table_spec("int8", 24)
    with pytest.raises(QGraphError, match="embedding fp8_e4m3 group is not supported"):
        parse_recipe({"embedding": {"format": "fp8_e4m3", "granularity": "group", "group_size": 32}}, "r.yaml")
    with pytest.raises(QGraphError, match="embedding int4 channel is not supported"):
        parse_recipe({"embedding": {"format": "int4", "granularity": "channel"}}, "r.yaml")
    int4 = parse_recipe({"embedding": {"format": "int4", "granularity": "group", "group_size": 32}}, "r")
    assert int4.embedding.format == "int4"
    r = parse_recipe({"embedding": {"format": "int8", "granularity": "group", "group_size": 32}, "lm_head": "tied"}, "r")
    assert r.lm_head_tied and r.embedding.group_size == 32 and r.lm_head is None
