"""disassemble (QLLM): outlier channels split exactly, similar channels merged back, threshold chosen by error."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

import qgraph
from qgraph.calib.data import TokenWindows
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.capture import CausalLMLogits
from qgraph.ir.regions import find_regions, weight_array
from qgraph.passes.annotate import activation_spec, weight_spec
from qgraph.passes.disassemble import ChannelDisassemblyPass, DisassembleOptions, plan_region, round_activation
from qgraph.passes.split_channels import assembly_pairs, merge_cost
from qgraph.recipes import load_recipe

LOUD = [5, 40, 77]


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(5).integers(0, 256, size=(8, 12), dtype=np.int64), 0, "random")


def _llama_with_loud_mlp_channels():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    module = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in module.model.layers:
            layer.mlp.up_proj.weight[LOUD] *= 40
    return qgraph.load(CausalLMLogits(module), example_inputs=(torch.arange(12).reshape(1, 12),), progress=False).model


def _pass(options: DisassembleOptions, recipe: str = "w8a8") -> ChannelDisassemblyPass:
    r = load_recipe(recipe)
    return ChannelDisassemblyPass(_windows(), options, weight_spec=weight_spec(r.blocks.weights),
                                  activation_spec=activation_spec(r.blocks.activations), progress=False)


def _down_widths(model) -> list[int]:
    return [weight_array(r.sinks[0]).shape[0] for r in find_regions(model)[0] if r.kind == "up->down"]


def test_disassembly_alone_is_exact_and_widens_only_the_weights():
    model = _llama_with_loud_mlp_channels()
    ops = collections.Counter(n.op_type for n in model.graph)
    p = _pass(DisassembleOptions(threshold=8.0, assemble=False))
    assert p.function_preserving
    result, verdict = check_pass(p, model, verification_inputs(256, length=12))
    assert result.modified and verdict.ok and verdict.relative_error < 1e-5, verdict
    assert collections.Counter(n.op_type for n in model.graph) == ops  # no op added: three weights grew
    s = p.summary()
    assert s["regions_split"] == 2 and s["channels_merged"] == 0
    assert _down_widths(model) == [96 + r["copies"] for r in s["regions"]]
    assert all(r["split"] >= len(LOUD) and r["error"] < r["error_unsplit"] for r in s["regions"]), s


def test_assembly_restores_the_width_and_reports_its_error():
    model = _llama_with_loud_mlp_channels()
    p = _pass(DisassembleOptions(threshold=8.0))
    assert not p.function_preserving  # merged channels are least-squares fits of others
    assert p(model).modified
    s = p.summary()
    assert _down_widths(model) == [96, 96]
    assert all(r["merged"] == r["copies"] > 0 and r["width"] == 96 for r in s["regions"]), s
    assert all(0 < r["assembly_float_error"] < 1 for r in s["regions"])


def test_adaptive_threshold_picks_the_least_error_and_may_keep_a_region_whole():
    model = _llama_with_loud_mlp_channels()
    p = _pass(DisassembleOptions(assemble=False))
    assert p(model).modified
    for r in p.summary()["regions"]:  # the loud channels dominate a per-tensor int8 step: a split pays
        assert r["threshold"] is not None and r["error"] < 0.5 * r["error_unsplit"], r
    # Float activations and weights: nothing to gain, and the region is left alone with the reason.
    quiet = _llama_with_loud_mlp_channels()
    p = ChannelDisassemblyPass(_windows(), DisassembleOptions(), progress=False)
    assert not p(quiet).modified and "kept unsplit" in p.summary()["reason"]


def test_merge_cost_is_zero_for_proportional_channels_and_pairs_are_disjoint():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    x[:, 4] = 2.0 * x[:, 1]  # channel 4 is exactly twice channel 1
    cost, a = merge_cost(x.T @ x, np.ones(6))
    assert cost[1, 4] == pytest.approx(0, abs=1e-9) and a[1, 4] == pytest.approx(2.0)
    allowed = np.ones(6, dtype=bool)
    allowed[0] = False
    pairs = assembly_pairs(cost, 3, allowed)
    assert pairs[0] in ((1, 4), (4, 1))
    used = [c for pair in pairs for c in pair]
    assert len(pairs) == 2 and len(used) == len(set(used)) and 0 not in used  # 5 allowed channels: 2 pairs


def test_plan_splits_then_merges_to_the_same_output_in_float_when_channels_repeat():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 40))
    x[:, 0] *= 8  # one loud channel, split into two
    x[:, 7] = x[:, 6]  # a free merge: 7 duplicates 6
    w = rng.normal(size=(40, 5))
    plan = plan_region(x, x.T @ x, np.abs(x).max(axis=0), w, 4.0, True, 16, None, None)
    assert plan.copies == {0: 2} and plan.pairs in ([(6, 7)], [(7, 6)])
    assert plan.float_error < 1e-9  # the split is exact, and the one merge costs nothing


def test_round_activation_follows_the_spec():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16)
    assert np.array_equal(round_activation(x, None), x)
    static = activation_spec(load_recipe("w8a8").blocks.activations)
    assert np.abs(round_activation(x, static) - x).max() <= 1 / 127 / 2 + 1e-6
    token = activation_spec(load_recipe("w4a4-rot").blocks.activations)
    y = round_activation(x, token)
    assert len(np.unique(y[0])) <= 16 and not np.array_equal(y, x)


def test_an_encoder_without_gated_mlp_is_left_alone_with_the_reason():
    from tests.conftest import tiny_bert_affine

    model = tiny_bert_affine()
    p = ChannelDisassemblyPass(_windows(), DisassembleOptions(threshold=2.0, assemble=False), progress=False)
    _, verdict = check_pass(p, model, verification_inputs(200, length=12))
    assert verdict.ok and verdict.relative_error == 0  # BERT's MLP is Gelu(fc1) -> fc2: no gated product to split
    assert "no gated MLP" in p.summary()["reason"]


@pytest.mark.slow
def test_disassembly_of_smollm2_is_exact():
    from tests.conftest import have_smollm2

    if not have_smollm2():
        pytest.skip("SmolLM2 package not installed")
    captured = qgraph.load(progress=False)
    ids = np.random.default_rng(0).integers(0, 49152, size=(2, 64), dtype=np.int64)
    r = load_recipe("w8a8")
    p = ChannelDisassemblyPass(TokenWindows(ids, 0, "random"), DisassembleOptions(threshold=8.0, assemble=False),
                               weight_spec=weight_spec(r.blocks.weights),
                               activation_spec=activation_spec(r.blocks.activations), progress=False)
    _, verdict = check_pass(p, captured.model.clone(), verification_inputs(49152, length=64))
    assert verdict.ok and verdict.relative_error < 1e-5, verdict
    assert p.summary()["regions_split"] > 0
