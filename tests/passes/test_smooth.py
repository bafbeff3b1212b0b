"""SmoothQuant: the fold preserves the float model, the weights change, the search lowers quantized error."""

from __future__ import annotations

import numpy as np
import pytest

import qgraph
from qgraph.calib.data import TokenWindows
from qgraph.errors import QGraphError
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.regions import find_linears
from qgraph.passes.smooth import SmoothQuantPass, smoothing_scales
from qgraph.recipes import load_recipe


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(5).integers(0, 256, size=(4, 32), dtype=np.int64), 0, "random")


def _outlier_model(llama_captured):
    """The tiny Llama with a few massive channels in one norm, as real LLMs have."""
    model = llama_captured.model.clone()
    from qgraph.ir.regions import find_regions
    from qgraph.ir.rewrite import scale_region

    region = next(r for r in find_regions(model)[0] if r.kind == "norm->linears")
    s = np.ones(region.channels)
    s[[3, 17]] = 1 / 40.0  # sources emit X / s: channels 3 and 17 become 40x larger
    scale_region(model.graph, region, s)
    return model


def test_smooth_preserves_float_outputs_and_changes_weights(llama_captured):
    model = _outlier_model(llama_captured)
    before = {l.name: l.weight.const_value.numpy().copy() for l in find_linears(model)}
    p = SmoothQuantPass(_windows(), progress=False)
    result, verdict = check_pass(p, model, verification_inputs(256, length=16))
    assert result.modified and verdict.relative_error < 1e-5
    after = {l.name: l.weight.const_value.numpy() for l in find_linears(model)}
    changed = [n for n in before if n in after and not np.allclose(before[n], after[n])]
    assert "model.layers.0.self_attn.q_proj" in changed and "model.layers.0.mlp.down_proj" in changed
    assert p.summary()["regions_smoothed"] == 8


def test_search_beats_no_smoothing(llama_captured):
    model = _outlier_model(llama_captured)
    p = SmoothQuantPass(_windows(), progress=False)
    p(model)
    chosen = p.chosen
    q = next(v for k, v in chosen.items() if "q_proj" in k)
    baseline = SmoothQuantPass(_windows(), alpha=0.0, progress=False)
    baseline(_outlier_model(llama_captured))
    q0 = next(v for k, v in baseline.chosen.items() if "q_proj" in k)
    assert q["relative_error"] < 0.75 * q0["relative_error"], (q, q0)  # measured 0.53x on the outlier region
    assert all(c["relative_error"] <= baseline.chosen[k]["relative_error"] + 1e-12 for k, c in chosen.items())


def test_smoothing_scales_formula():
    s = smoothing_scales(np.array([8.0, 1.0, 0.0]), np.array([2.0, 1.0, 3.0]), 0.5)
    np.testing.assert_allclose(s, [np.sqrt(8) / np.sqrt(2), 1.0, 1.0])


def test_w8a8_smooth_recipe_end_to_end(llama_captured):
    compiled = qgraph.compile(llama_captured, "w8a8-smooth", calib=_windows(), progress=False, verify=True)
    assert [p["pass"] for p in compiled.report["passes"]][:2] == ["smooth", "annotate_linears"]
    assert compiled.report["verified"][0]["ok"] and len(compiled.layers) == 14


def test_unknown_recipe_pass_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("passes:\n  - smoth: {alpha: 0.5}\nweights: {format: int8}\n")
    with pytest.raises(QGraphError, match="unknown pass 'smoth'") as e:
        load_recipe(p)
    assert "did you mean 'smooth'" in e.value.fix
