"""OS+ shift (and scale): exact in float, centred sink inputs, biases changed, refusals where a node would be needed."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import pytest

import qgraph
from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import collect_stats
from qgraph.errors import QGraphError
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.regions import find_regions, linear_bias
from qgraph.passes.qsm import QuantStepMigrationPass, source_channel_absmax
from qgraph.passes.shift import OutlierShiftPass
from tests.conftest import tiny_bert_affine

T = 12  # the tiny BERT is exported with a static length


@pytest.fixture(scope="module")
def bert():
    return tiny_bert_affine()


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(3).integers(0, 200, size=(6, T), dtype=np.int64), 0, "random")


def _constants(model: ir.Model) -> dict[str, np.ndarray]:
    """Source biases, sink biases and sink weights of every region, by role."""
    out = {}
    for r in find_regions(model)[0]:
        out[f"{r.name}:source_bias"] = r.sources[0].bias.const_value.numpy().copy()
        out[f"{r.name}:sink_bias"] = linear_bias(r.sinks[0])[0].const_value.numpy().copy()
        out[f"{r.name}:sink_weight"] = r.sinks[0].weight.const_value.numpy().copy()
    return out


def _centres(model: ir.Model) -> dict[str, np.ndarray]:
    regions = find_regions(model)[0]
    stats = collect_stats(model, [r.input.name for r in regions], _windows(), progress=False)
    return {r.name: (stats[r.input.name].max + stats[r.input.name].min) / 2 for r in regions}


@pytest.mark.parametrize("scale", [False, True])
def test_shift_preserves_function_and_centres_vo(bert, scale):
    model = bert.clone()
    before = _constants(model)
    p = OutlierShiftPass(_windows(), scale=scale, progress=False)
    result, verdict = check_pass(p, model, verification_inputs(200, _windows().ids[:2], length=T))
    assert result.modified and verdict.relative_error < 1e-5
    assert len(p.shifted) == 2 and all(n["max_abs_shift"] > 0.1 for n in p.shifted.values())
    after = _constants(model)
    for key in before:
        if key.endswith("sink_weight") and not scale:
            np.testing.assert_array_equal(after[key], before[key])  # a pure shift leaves B alone
        else:
            assert np.abs(after[key] - before[key]).max() > 1e-3, key
    # The sink inputs are centred on the calibration tokens (they were off by up to 0.45).
    for name, centre in _centres(model).items():
        assert np.abs(centre).max() < 1e-5, name
    for note in p.shifted.values():
        assert note["absmax_after"] < 0.5 * note["absmax_before"]
        if scale:
            assert note["max_scale"] >= 1.0 and 0 < note["threshold"] <= note["absmax_after"] + 1e-9


def test_shift_refuses_post_norm_and_bias_free_regions(bert, llama_captured):
    p = OutlierShiftPass(_windows(), progress=False)
    p(bert.clone())
    reasons = {r["candidate"]: r["reason"] for r in p.refused}
    assert "residual stream (post-norm)" in reasons["encoder.layer.0.attention.output.LayerNorm"]
    # SmolLM2-like Llama: no biases anywhere, so nothing can take a shift without a new Add.
    model = llama_captured.model.clone()
    nodes = collections.Counter(n.op_type for n in model.graph)
    weights = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items()}
    q = OutlierShiftPass(TokenWindows(_windows().ids % 256, 0, "random"), progress=False)
    assert not q(model).modified and q.shifted == {}
    shift_refusals = [r["reason"] for r in q.refused if "shift" in r["reason"]]
    assert len(shift_refusals) == 8 and all("has no bias term" in r for r in shift_refusals)
    assert collections.Counter(n.op_type for n in model.graph) == nodes
    assert all(np.array_equal(v.const_value.numpy(), weights[k]) for k, v in model.graph.initializers.items())


def test_verifier_catches_a_shift_without_the_sink_bias(bert):
    class SourceOnlyShift(ir.passes.InPlacePass):
        def call(self, model):
            src = find_regions(model)[0][0].sources[0]
            src.bias.const_value = ir.tensor(src.bias.const_value.numpy() - 0.3, name=src.bias.name)
            return ir.passes.PassResult(model, modified=True)

    with pytest.raises(QGraphError, match="moved its outputs"):
        check_pass(SourceOnlyShift(), bert.clone(), verification_inputs(200, length=T))


def test_qsm_with_shift_gives_symmetric_channel_ranges(bert):
    model = bert.clone()
    p = QuantStepMigrationPass(_windows(), shift=True, progress=False)
    _, verdict = check_pass(p, model, verification_inputs(200, _windows().ids[:2], length=T))
    assert verdict.relative_error < 1e-5 and p.summary()["regions_shifted"] == 2
    regions = find_regions(model)[0]
    stats = collect_stats(model, [r.input.name for r in regions], _windows(), progress=False)
    for r in regions:
        s = stats[r.input.name]
        np.testing.assert_allclose(source_channel_absmax(r, s.max), 127.0, rtol=1e-3)
        np.testing.assert_allclose(source_channel_absmax(r, -s.min), 127.0, rtol=1e-3)


def test_w8a8_qsm_shift_on_encoder_same_nodes_and_verified(bert):
    captured = qgraph.ir.capture.CapturedModel(bert, None, {}, None)
    plain = qgraph.compile(captured, "w8a8", calib=_windows(), progress=False)
    qsm = qgraph.compile(captured, "w8a8-qsm", calib=_windows(), progress=False, verify=True)
    count = lambda m: collections.Counter(n.op_type for n in m.graph)  # noqa: E731
    assert count(plain.model) == count(qsm.model)
    assert qsm.report["verified"][0]["ok"] and qsm.report["passes"][0]["regions_shifted"] == 2
