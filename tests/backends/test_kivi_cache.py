"""KIVI's stored cache: packed codes + float residual window, the same logits as a float graph fed a KIVI cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import qgraph
from qgraph.backends import kivi_cache as kc
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.generate import Decoder, cached_forward


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), data=st.data())
def test_packing_round_trips(bits, data):
    codes = data.draw(arrays(np.uint8, (2, 3, 8 // bits * data.draw(st.integers(1, 4))),
                             elements=st.integers(0, 2**bits - 1)))
    packed = kc.pack(codes, bits)
    assert packed.shape[-1] * 8 // bits == codes.shape[-1]
    np.testing.assert_array_equal(kc.unpack(packed, bits), codes)


@settings(max_examples=40, deadline=None)
@given(role=st.sampled_from(["key", "value"]), bits=st.sampled_from([2, 4, 8]), groups=st.integers(1, 3),
       data=st.data())
def test_stored_values_stay_within_half_a_step_of_each_group(role, bits, groups, data):
    g, d = 4, 8
    n = g * groups if role == "key" else groups
    x = data.draw(arrays(np.float32, (1, 2, n, d), elements=st.floats(-50, 50, width=32)))
    layout = kc.KiviLayout(role, bits, g, d)
    stored = kc.quantize(x, layout)
    y = kc.dequantize(stored, layout)
    step = stored["step"].astype(np.float32)
    step = np.repeat(step, g, axis=2) if role == "key" else np.repeat(step, g, axis=3)
    assert np.all(np.abs(y - x) <= step / 2 * (1 + 1e-3) + 1e-6 + 1e-3 * np.abs(x))  # float16 grid, float32 math


@pytest.fixture(scope="module")
def kv4(llama_cache_captured, text_file):
    return qgraph.compile(llama_cache_captured, recipe="kv4", progress=False,
                          calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32))


def _float_decode(kv4, ids, prompt, residual):
    session = session_from_model(kc._float_cache_graph(kv4.model))
    return kc.simulate(session, ids, prompt, kc.layouts_of(kv4.runtime)[0], residual)


@pytest.mark.parametrize("residual", [0, 16])
def test_stored_cache_equals_the_float_graph_with_a_kivi_cache(kv4, residual):
    report = kv4.report["kivi_cache"]
    assert report["kivi_tensors"] == 4 and report["verified_max_abs_diff"] < 1e-4
    ids = np.random.default_rng(2).integers(0, 250, size=(1, 60))
    got = cached_forward(Decoder(session_from_model(kv4.runtime), kivi_residual=residual), 7)(ids)
    want = _float_decode(kv4, ids, 7, residual)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # until a whole group of 32 tokens lies outside the residual window everything is float
    plain = cached_forward(Decoder(session_from_model(kc._float_cache_graph(kv4.model))), 7)(ids)
    first_stored = 32 + residual
    np.testing.assert_allclose(got[:, :first_stored], plain[:, :first_stored], atol=1e-5, rtol=0)
    assert np.abs(got[:, first_stored:] - plain[:, first_stored:]).max() > 1e-4  # then the codes are read


def test_cache_bytes_are_the_codes_and_the_residual_window(kv4):
    decoder = Decoder(session_from_model(kv4.runtime), kivi_residual=16)
    float_bytes = kv4.report["kivi_cache"]["float_bytes_per_token"]
    # per layer: keys 2 heads x (16 dims x 4 bits + a float16 step and min per channel per 32 tokens),
    # values 2 heads x (16 x 4 bits + one step and min per 16 channels)
    assert decoder.bytes_per_token() == kv4.report["kivi_cache"]["stored_bytes_per_token"] == 88.0
    assert float_bytes == 512
    cache = decoder.start()
    ids = np.random.default_rng(0).integers(0, 250, size=(1, 200))
    _, cache = decoder.step(ids, cache, 0)
    held = next(iter(cache.residual.values())).shape[2]
    assert 16 <= held < 16 + 32 and cache.length == 200
    assert cache.nbytes() == 88 * (200 - held) + float_bytes * held


def test_artifact_runs_the_stored_cache_where_it_decodes(kv4, tmp_path, text_file):
    out = kv4.save(tmp_path / "kv4", progress=False, genai=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime_kind"] == "kivi-cache" and manifest["runtime_file"] == "model.ort.onnx"
    # onnxruntime-genai feeds float caches: its folder names model.onnx (the cache rounded afresh each step)
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"] == "model.onnx"
    bench = qgraph.bench(out, runs=1, steps=2, contexts=(128,), prefill_tokens=128)
    assert bench["cache_bytes_per_token"] == 88.0
    # a one-pass perplexity rounds every position (model.onnx), as the logits graph's kv4 does
    one_pass = qgraph.evaluate(out, text=str(text_file), windows=2, ctx=64, progress=False)["ppl"]
    unfused = qgraph.evaluate(qgraph.open_runner(out, runtime=False), text=str(text_file), windows=2, ctx=64,
                              progress=False)["ppl"]
    assert one_pass == unfused
    in_memory = qgraph.evaluate(kv4, text=str(text_file), windows=2, ctx=64, progress=False)["ppl"]
    assert abs(in_memory - unfused) < 1e-6 * unfused  # a CompiledModel is evaluated the same way
    assert len(qgraph.generate(out, [3, 4, 5], max_new_tokens=40).new_ids) == 40  # past the first stored group


def test_keys_only_keeps_the_float_cache_with_the_reason(llama_cache_captured, text_file, tmp_path):
    recipe = tmp_path / "keys.yaml"
    recipe.write_text("name: keys\npasses:\n  - kv_quant: {bits: 4, values: false}\n")
    compiled = qgraph.compile(llama_cache_captured, recipe=str(recipe), progress=False,
                              calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32))
    assert compiled.runtime is None
    assert "only keys or only values" in compiled.report["kivi_cache"]["refused"]


def test_two_bit_codes_pack_four_to_a_byte(llama_cache_captured, text_file):
    kv2 = qgraph.compile(llama_cache_captured, recipe="kv2", progress=False,
                         calib=qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32))
    report = kv2.report["kivi_cache"]
    assert report["bits"] == 2 and report["verified_max_abs_diff"] < 1e-4
    # per layer: keys 2 heads x (16 dims x 2 bits + 16 x 4 bytes / 32 tokens), values 2 x (4 + 4)
    assert report["stored_bytes_per_token"] == 2 * (2 * (4 + 2) + 2 * (4 + 4)) == 56
    codes = next(v for v in kv2.runtime.graph.inputs if v.name == "past_key_values.0.key.codes")
    assert codes.shape[3] == 16 * 2 // 8
