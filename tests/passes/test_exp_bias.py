"""exp_bias (LLM-FP4): exact in float, powers of two only, bounded shifts, rho recorded, helps FP4 on outlier channels."""

from __future__ import annotations

import numpy as np
import pytest

import qgraph
from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import collect_stats
from qgraph.errors import QGraphError
from qgraph.eval.verify import check_pass, relative_error, run_float, verification_inputs
from qgraph.ir.qspec import QuantSpec, range_of
from qgraph.ir.regions import find_regions, weight_array
from qgraph.ir.rewrite import scale_region
from qgraph.passes.exp_bias import ExponentBiasPass, exponent_shifts
from qgraph.passes.qsm import source_channel_absmax

W4 = QuantSpec("fp4_e2m1", "block", axis=0, block_size=32)
A4 = QuantSpec("fp4_e2m1", "tensor")


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(11).integers(0, 256, size=(4, 32), dtype=np.int64), 0, "random")


def _with_outliers(llama_captured):
    """Tiny Llama whose norm outputs and gated products carry a few channels 100-300x larger than the rest (as real LLMs do)."""
    model = llama_captured.model.clone()
    for region in find_regions(model)[0]:
        if region.kind in ("up->down", "norm"):
            s = np.ones(region.channels)
            s[[3, 17, 40]] = [1 / 100.0, 1 / 300.0, 1 / 150.0]
            scale_region(model.graph, region, s)
    return model


def test_exponent_shifts_are_bounded_integers():
    k = exponent_shifts(np.array([1.0, 2.0, 3.0, 1000.0, 0.0, 1e-6]), 1.0, 4)
    assert k.tolist() == [0, 1, 2, 4, 0, -4]


@pytest.mark.parametrize("w_spec,a_spec", [(W4, A4), (QuantSpec("fp8_e4m3", "channel", axis=1), QuantSpec("fp8_e4m3", "tensor"))],
                         ids=["fp4", "fp8"])
def test_exp_bias_is_exact_and_moves_only_powers_of_two(llama_captured, w_spec, a_spec):
    model = _with_outliers(llama_captured)
    before = {init.name: init.const_value.numpy().copy() for init in model.graph.initializers.values()}
    regions = find_regions(model)[0]
    names = [r.input.name for r in regions]
    stats = collect_stats(model, names, _windows(), progress=False)
    absmax_before = [source_channel_absmax(r, stats[r.input.name].abs_max) for r in regions]
    p = ExponentBiasPass(_windows(), weight_spec=w_spec, activation_spec=a_spec, max_shift=3, progress=False)
    _, verdict = check_pass(p, model, verification_inputs(256, length=16))
    assert verdict.relative_error < 1e-5
    assert p.summary()["regions"] == len(regions) == 8 and p.summary()["channels_shifted"] > 0
    changed = [n for n, a in before.items() if n in model.graph.initializers
               and not np.array_equal(model.graph.initializers[n].const_value.numpy(), a)]
    assert changed
    for name in changed:  # every changed constant is the old one times powers of two, no other rounding
        old, new = before[name], model.graph.initializers[name].const_value.numpy()
        ratio = np.log2(np.abs(new[old != 0] / old[old != 0]))
        # A linear may be a sink (rows) of one region and a source (columns) of the next: up to 2 x 3.
        assert np.array_equal(ratio, np.round(ratio)) and np.abs(ratio).max() <= 6
    # Each region input now has its recorded range; channel maxima moved by exactly 2^-k_c, |k_c| <= 3.
    regions = find_regions(model)[0]
    stats = collect_stats(model, [r.input.name for r in regions], _windows(), progress=False)
    for r, old, chosen in zip(regions, absmax_before, p.chosen.values(), strict=True):
        lo, hi = range_of(r.input)
        now = source_channel_absmax(r, stats[r.input.name].abs_max)
        k = np.log2(old / now)
        np.testing.assert_array_equal(k, np.round(k))
        assert np.abs(k).max() <= 3 and -lo == hi <= now.max() * (1 + 1e-6)
        if old.max() > 8 * np.median(old):  # regions with the injected outliers: their spread shrank
            assert chosen["shifted"] and now.max() / np.median(now) < old.max() / np.median(old) / 4


def test_max_shift_zero_only_calibrates_rho(llama_captured):
    model = llama_captured.model.clone()
    weights = {layer.name: weight_array(layer).copy() for r in find_regions(model)[0] for layer in r.sinks}
    p = ExponentBiasPass(_windows(), weight_spec=W4, activation_spec=A4, max_shift=0, progress=False)
    p(model)
    assert p.summary()["channels_shifted"] == 0
    for r in find_regions(model)[0]:
        assert range_of(r.input) is not None
        for layer in r.sinks:
            np.testing.assert_array_equal(weight_array(layer), weights[layer.name])


def test_exp_bias_needs_per_tensor_float_activations():
    with pytest.raises(QGraphError, match="per-tensor float activations"):
        ExponentBiasPass(_windows(), weight_spec=W4, activation_spec=QuantSpec("int8", "tensor"))


def test_fp4_reparameterization_beats_no_reparameterization_on_outlier_channels(llama_captured):
    float_model = _with_outliers(llama_captured)
    captured = qgraph.ir.capture.CapturedModel(float_model, None, {}, None)
    ids = verification_inputs(256, length=24, random_rows=3, seed=4)
    ref = run_float(float_model, ids)

    def error(recipe: str) -> float:
        compiled = qgraph.compile(captured, recipe, calib=_windows(), progress=False, verify=True)
        assert all(v["ok"] for v in compiled.report["verified"])
        return max(relative_error(r, g) for r, g in zip(ref, run_float(compiled.model, ids), strict=True))

    with_reparam, without = error("fp4"), error("fp4-noreparam")
    assert with_reparam < 0.8 * without, (with_reparam, without)
