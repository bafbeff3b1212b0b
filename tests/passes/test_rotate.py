"""rotate: R1 + R2 + online Hadamard leave the float logits unchanged, found on the graph alone."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qgraph
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.capture import CausalLMLogits
from qgraph.ir.regions import find_linears
from qgraph.passes.rotate import RotateOptions, RotatePass, residual_stream
from tests.conftest import have_smollm2, tiny_bert


def _llama(hidden: int, inter: int, heads: int, kv: int, tie: bool = True) -> ir.Model:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                         tie_word_embeddings=tie, use_cache=False)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # trained-looking norms: gammas far from 1, so the fold matters
        for name, p in module.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 2.0)
    return qgraph.load(CausalLMLogits(module), example_inputs=(torch.arange(12).reshape(1, 12),),
                       progress=False).model


def test_rotate_tiny_llama_preserves_logits_and_reports_every_part(llama_captured):
    model = llama_captured.model.clone()
    p = RotatePass()
    result, verdict = check_pass(p, model, verification_inputs(256, length=16))
    assert result.modified and verdict.ok and verdict.relative_error < 1e-5
    s = p.summary()
    # 2 layers: writers o/down; readers q, k, v, gate, up per layer plus lm_head; 5 RMSNorms.
    assert s["r1"] == {"size": 64, "matrix": "hadamard", "writers": 4, "readers": 11, "norms": 5}
    assert s["r2_regions"] == 2 and s["online_hadamards"] == 2 and s["refused"] == []
    assert s["untied_lm_head_bytes"] == 256 * 64 * 4  # the tied lm_head got its own fp32 copy
    # The online Hadamard factors are not layers to quantize.
    assert len(find_linears(model)) == len(find_linears(llama_captured.model))


@pytest.mark.parametrize("hidden, inter, heads, kv", [(48, 96, 4, 2), (80, 200, 5, 5), (96, 384, 6, 3)])
def test_rotate_non_power_of_two_sizes(hidden, inter, heads, kv):
    # 48 = 12 x 4, 96 = 12 x 8, 200 = 8 x 25 (no Hadamard: random orthogonal), 384 = 12 x 32 (> 256: Kronecker).
    model = _llama(hidden, inter, heads, kv, tie=hidden != 80)
    p = RotatePass()
    result, verdict = check_pass(p, model, verification_inputs(128, length=12))
    assert result.modified and verdict.ok, verdict
    assert p.summary()["r1"]["writers"] == 4 and p.summary()["online_hadamards"] == 2
    if inter == 384:  # the Kronecker chain, not a dense 384 x 384 MatMul
        ops = [n.op_type for n in model.graph if ".online_hadamard." in (n.name or "")]
        assert ops.count("MatMul") == 4 and ops.count("Transpose") == 4


def test_each_rotation_alone_preserves_logits(llama_captured):
    for options in (RotateOptions(r2=False, online_down=False), RotateOptions(r1=False, online_down=False),
                    RotateOptions(r1=False, r2=False)):
        model = llama_captured.model.clone()
        result, verdict = check_pass(RotatePass(options), model, verification_inputs(256, length=16))
        assert result.modified and verdict.ok, options


@pytest.mark.parametrize("hidden, heads, kv", [(64, 4, 2), (96, 4, 2), (80, 5, 5)])
def test_online_qk_rotates_keys_where_the_cache_holds_them(hidden, heads, kv):
    # head sizes 16, 24 (= 12 x 2, not a power of two) and 16; GQA (kv < heads) and plain multi-head.
    from qgraph.ir.attention import find_attention

    model = _llama(hidden, 2 * hidden, heads, kv)
    p = RotatePass(RotateOptions(r1=False, r2=False, online_down=False, online_qk=True))
    result, verdict = check_pass(p, model, verification_inputs(128, length=12))
    assert result.modified and verdict.ok and verdict.relative_error < 1e-5, verdict
    assert p.summary()["online_qk_blocks"] == 2 and p.refused == []
    blocks, _ = find_attention(model)
    # The cached key is now the rotated one (a cache would store K H), before GQA's head repeat.
    assert all(b.key.value.name.endswith(".key.rotated") for b in blocks)
    assert all(b.scores.inputs[0].name.endswith(".query.rotated") for b in blocks)
    assert all(b.key.channels == hidden // heads for b in blocks)


def test_online_qk_on_a_graph_without_attention_says_why():
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([2, 8]))
    node = ir.node("Relu", [x], name="relu")
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 21}), ir_version=10)
    p = RotatePass(RotateOptions(r1=False, r2=False, online_down=False, online_qk=True))
    assert not p(model).modified
    assert [r["candidate"] for r in p.refused] == ["online_qk"] and "no attention block" in p.refused[0]["reason"]


def test_layernorm_encoder_refuses_r1_with_the_reason():
    from qgraph.ir.capture import EncoderHidden

    module = tiny_bert()
    model = qgraph.load(EncoderHidden(module), example_inputs=(torch.arange(12).reshape(1, 12),),
                        progress=False).model
    p = RotatePass(RotateOptions(online_down=False))
    _, verdict = check_pass(p, model, verification_inputs(200, length=12))
    assert verdict.ok  # whatever it applies (R2 on v -> o) is exact
    (refusal,) = [r for r in p.refused if "R1" in r["candidate"]]
    assert "LayerNorm subtracts the mean" in refusal["reason"]


def test_residual_stream_of_tiny_llama(llama_captured):
    stream = residual_stream(llama_captured.model)
    assert len(stream.writers) == 4 and len(stream.norms) == 5
    assert {w.name.rsplit(".", 1)[-1] for w, _, _ in stream.writers} == {"o_proj", "down_proj"}


@pytest.mark.slow
@pytest.mark.skipif(not have_smollm2(), reason="SmolLM2 package not installed")
def test_rotate_smollm2_preserves_logits():
    captured = qgraph.load(progress=False)
    model = captured.model.clone()
    p = RotatePass()
    _, verdict = check_pass(p, model, verification_inputs(49152, length=64))
    assert verdict.ok and verdict.relative_error < 1e-5
    assert p.summary()["r1"] == {"size": 576, "matrix": "hadamard", "writers": 60, "readers": 151, "norms": 61}
    assert p.summary()["r2_regions"] == 30 and p.summary()["online_hadamards"] == 30


class BiasWriterToy(torch.nn.Module):
    """Tokens [1, T] -> [T] -> embedding -> RMSNorm -> Linear(bias) written back to the stream -> RMSNorm -> head.

    2-D activations, so torch.onnx writes each biased linear as a Gemm whose C is the bias: R1 must
    rotate that C with the writer's weight.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, 24)
        self.norm1, self.norm2 = torch.nn.RMSNorm(24), torch.nn.RMSNorm(24)
        self.write = torch.nn.Linear(24, 24, bias=True)
        self.head = torch.nn.Linear(24, 32, bias=False)
        with torch.no_grad():
            self.write.bias.normal_(0.0, 1.0)

    def forward(self, ids):
        x = self.embed(ids.reshape(-1))  # [1, T] -> [T, C]
        x = x + self.write(self.norm1(x))
        return self.head(self.norm2(x))


def test_r1_rotates_a_gemm_writers_bias():
    model = qgraph.load(BiasWriterToy(), example_inputs=(torch.arange(8).reshape(1, 8),), progress=False).model
    writers = residual_stream(model).writers
    assert len(writers) == 1 and writers[0][1] is not None  # the bias is found, wherever it is added
    p = RotatePass(RotateOptions(r2=False, online_down=False))
    _, verdict = check_pass(p, model, verification_inputs(32, length=8))
    assert verdict.ok and p.summary()["r1"]["writers"] == 1, verdict


def _spin(steps: int, activations: bool = True) -> RotatePass:
    from qgraph.calib.data import TokenWindows
    from qgraph.passes.annotate import activation_spec
    from qgraph.recipes import load_recipe

    windows = TokenWindows(np.random.default_rng(5).integers(0, 128, size=(8, 12), dtype=np.int64), 0, "random")
    spec = activation_spec(load_recipe("w4a4-rot").blocks.activations) if activations else None
    return RotatePass(RotateOptions(spin_steps=steps, spin_lr=0.1, spin_tokens=64), windows=windows,
                      activation_spec=spec, progress=False)


def test_spinquant_rotations_are_exact_in_float_and_lower_the_4bit_error():
    model = _llama(48, 96, 4, 2)  # 48 = 12 x 4 and head 12: Paley Hadamards as the start
    p = _spin(8)
    result, verdict = check_pass(p, model, verification_inputs(128, length=12))
    assert result.modified and verdict.ok and verdict.relative_error < 1e-5
    spin = p.summary()["spin"]
    # q/k/v and gate/up read the two norms of each of the 2 layers; lm_head is not a block linear.
    assert spin["r1"]["inputs"] == 4 and len(spin["r2"]) == 2
    for part in [spin["r1"], *spin["r2"]]:
        assert 0 < part["error_learned"] <= part["error_start"]
    assert "SpinQuant" in p.summary()["r1"]["matrix"]


def test_spinquant_without_quantized_activations_keeps_the_hadamard_and_says_why():
    model = _llama(48, 96, 4, 2)
    p = _spin(8, activations=False)
    p(model)
    s = p.summary()
    assert s["spin"] == {} and s["r1"]["matrix"] == "hadamard"
    assert any(r["candidate"] == "spin_steps" and "quantizes no activations" in r["reason"] for r in s["refused"])
