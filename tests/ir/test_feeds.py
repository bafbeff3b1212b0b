"""KV-cache capture: the decoder-step graph computes transformers' logits and cache, and every pass finds its regions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.calib.data import TokenWindows
from qgraph.ir.attention import find_attention
from qgraph.ir.feeds import has_cache, token_feeds
from qgraph.ir.regions import find_linears, find_regions

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def test_cache_graph_has_genai_names_and_dynamic_axes(llama_cache_captured):
    g = llama_cache_captured.model.graph
    names = [v.name for v in g.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and has_cache(g.inputs)
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    assert [v.name for v in g.outputs] == ["logits"] + [f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    past = g.inputs[3].shape
    assert past[1] == KV_HEADS and past[3] == HEAD_DIM and not isinstance(past[0], int) and not isinstance(past[2], int)
    assert llama_cache_captured.source["kv_cache"] is True


@pytest.mark.parametrize("past", [0, 4])
def test_cache_graph_computes_the_logits_and_cache_of_transformers(llama_cache_captured, llama_module, past):
    session = session_from_model(llama_cache_captured.model, threads=1, optimize=False)
    rng = np.random.default_rng(past)
    full = rng.integers(0, 256, size=(2, past + 6), dtype=np.int64)  # batch 2: the batch axis is dynamic too
    with torch.no_grad():
        ref = llama_module(torch.from_numpy(full), use_cache=True)
        prefix = llama_module(torch.from_numpy(full[:, :past]), use_cache=True) if past else None
    feeds = token_feeds(session.get_inputs(), full[:, past:])
    feeds["attention_mask"] = np.ones((2, past + 6), dtype=np.int64)
    feeds["position_ids"] = np.broadcast_to(np.arange(past, past + 6), (2, 6)).copy()
    for i in range(LAYERS if past else 0):
        feeds[f"past_key_values.{i}.key"] = prefix.past_key_values.layers[i].keys.numpy()
        feeds[f"past_key_values.{i}.value"] = prefix.past_key_values.layers[i].values.numpy()
    logits, *present = session.run(None, feeds)
    np.testing.assert_allclose(logits, ref.logits[:, past:].numpy(), atol=2e-5)
    for i in range(LAYERS):
        assert present[2 * i].shape == (2, KV_HEADS, past + 6, HEAD_DIM)
        np.testing.assert_allclose(present[2 * i], ref.past_key_values.layers[i].keys.numpy(), atol=2e-5)
        np.testing.assert_allclose(present[2 * i + 1], ref.past_key_values.layers[i].values.numpy(), atol=2e-5)


def test_token_feeds_give_the_logits_graph_function(llama_cache_captured, llama_captured):
    ids = np.random.default_rng(1).integers(0, 256, size=(1, 9), dtype=np.int64)
    outs = []
    for captured in (llama_captured, llama_cache_captured):
        session = session_from_model(captured.model, threads=1, optimize=False)
        outs.append(session.run([session.get_outputs()[0].name], token_feeds(session.get_inputs(), ids))[0])
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)


def test_cache_graph_has_the_logits_graph_linears_regions_and_attention(llama_cache_captured, llama_captured):
    assert [x.name for x in find_linears(llama_cache_captured.model)] == [x.name for x in find_linears(llama_captured.model)]
    kinds = [sorted((r.kind, tuple(s.name for s in r.sinks)) for r in find_regions(c.model)[0])
             for c in (llama_captured, llama_cache_captured)]
    assert kinds[1] == kinds[0] and ("v->o", ("model.layers.0.self_attn.o_proj",)) in kinds[1]
    blocks, rejected = find_attention(llama_cache_captured.model)
    assert rejected == [] and len(blocks) == LAYERS
    # K and V are quantized where the cache stores them: the present outputs (past + new tokens).
    assert [(b.key.value.name, b.value.value.name) for b in blocks] == [
        (f"present.{i}.key", f"present.{i}.value") for i in range(LAYERS)]


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(0).integers(1, 250, size=(4, 32), dtype=np.int64), 0, "random")


def _migrated(compiled) -> list:
    """Each pass's regions, by their sinks (a norm source's node name differs between the two exports), and rotate's counts."""
    counts = ("r1", "r2_regions", "online_hadamards", "layers")
    return [(sorted(r.split(" -> ")[-1] for r in p.get("regions", {})), [p.get(k) for k in counts])
            for p in compiled.report["passes"]]


@pytest.mark.parametrize("recipe", ["w8a8-qsm", "w4a8-rot"])
def test_recipes_compile_the_cache_graph_verified_on_the_same_regions(llama_cache_captured, llama_captured, recipe):
    got = qgraph.compile(llama_cache_captured, recipe=recipe, calib=_windows(), progress=False, verify=True)
    ref = qgraph.compile(llama_captured, recipe=recipe, calib=_windows(), progress=False)
    assert got.report["verified"] and all(v["ok"] for v in got.report["verified"]), got.report["verified"]
    assert _migrated(got) == _migrated(ref)
    ids = _windows().ids[:1, :12]
    outs = [c.runner(1).forward(ids) for c in (ref, got)]
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-3 * float(np.abs(outs[0]).max()))
