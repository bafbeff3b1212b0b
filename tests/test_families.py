"""Decoder families transformers ships, as tiny random checkpoints: each compiles w8a8-qsm and w4a16-awq with --verify.

No per-architecture code is involved: the checkpoints differ in norms (RMSNorm with (1 + w) weights,
sandwich norms, q/k norms, LayerNorm with bias), fused projections (Phi-3's qkv and gate_up, GPT-2's
Conv1D as Gemm), untied heads (Mistral, Qwen3, Phi-3 under the tied-head recipe w4a16-awq) and parallel
blocks (Falcon). Random checkpoints have all-zero biases, which the exporter deduplicates into one
shared initializer (OPT): the shift's rewrites must keep each reader's own value. The default run
covers the families whose graphs differ most; the rest run in the slow suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qgraph
from qgraph.calib.data import TokenWindows

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _families():
    import transformers as t

    return {
        "gemma3": lambda: t.Gemma3ForCausalLM(t.Gemma3TextConfig(**SMALL, num_key_value_heads=2, head_dim=16)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=128,
                                                    word_embed_proj_dim=64)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**SMALL, num_key_value_heads=2)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, num_key_value_heads=2)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, new_decoder_architecture=False,
                                                             parallel_attn=True, alibi=False)),
    }


DEFAULT_RUN = ["gemma3", "phi3", "gpt2", "opt"]
# Quantized layers: Phi-3's qkv / gate_up, GPT-2's c_attn and Falcon's query_key_value are split into their
# parts for the region passes (split_fused_linears), so they quantize as a Llama's q, k, v (gate, up) do.
LINEARS = {"gemma3": 14, "phi3": 14, "gpt2": 12, "opt": 12, "mistral": 14, "qwen2": 14, "qwen3": 14, "gemma2": 14,
           "falcon": 12}


@pytest.mark.parametrize("family", [f if f in DEFAULT_RUN else pytest.param(f, marks=pytest.mark.slow)
                                    for f in LINEARS])
def test_family_compiles_and_verifies(tmp_path, family):
    torch.manual_seed(0)
    _families()[family]().eval().save_pretrained(tmp_path)
    captured = qgraph.load(tmp_path, progress=False)
    assert captured.source["task"] == "causal-lm"
    calib = TokenWindows(np.random.default_rng(1).integers(0, 256, size=(2, 32), dtype=np.int64), 0, "random")
    for recipe in ("w8a8-qsm", "w4a16-awq"):
        compiled = qgraph.compile(captured, recipe=recipe, calib=calib, progress=False, verify=True)
        assert compiled.report["quantized_layers"] == LINEARS[family], (recipe, compiled.report["quantized_layers"])
        assert compiled.report["verified"] and all(v["ok"] for v in compiled.report["verified"]), compiled.report["verified"]
        migrated = next(p for p in compiled.report["passes"] if p["pass"] in ("qsm", "awq"))
        assert migrated["modified"], (recipe, migrated)
        sqnr = list(compiled.report["layer_sqnr_db"].values())
        # a wrong lowering (a Gemm bias dropped, an untied head misread) shows up as a layer near 0 dB
        assert len(sqnr) == LINEARS[family] and min(sqnr) > 10, (recipe, compiled.report["layer_sqnr_db"])
