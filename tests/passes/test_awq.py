"""AWQ: exact fold, weight-only error no worse than unscaled, lowers to MatMulNBits with zero points."""

from __future__ import annotations

import collections

import numpy as np

import qgraph
from qgraph.calib.data import TokenWindows
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.qspec import QuantSpec
from qgraph.passes.awq import AWQPass


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(3).integers(0, 256, size=(4, 32), dtype=np.int64), 0, "random")


SPEC = QuantSpec("int4", "block", axis=0, block_size=32, symmetric=False)


def test_awq_fold_is_exact_and_search_never_loses(llama_captured):
    model = llama_captured.model.clone()
    p = AWQPass(_windows(), weight_spec=SPEC, progress=False)
    _, verdict = check_pass(p, model, verification_inputs(256, length=16))
    assert verdict.relative_error < 1e-5 and p.activation_spec is None
    base = AWQPass(_windows(), alpha=0.0, weight_spec=SPEC, progress=False)
    base(llama_captured.model.clone())
    assert len(p.chosen) == 8
    for name, c in p.chosen.items():
        assert c["relative_error"] <= base.chosen[name]["relative_error"] + 1e-12
    assert any(c["alpha"] > 0 for c in p.chosen.values())


def test_w4a16_awq_recipe(llama_captured):
    compiled = qgraph.compile(llama_captured, "w4a16-awq", calib=_windows(), progress=False, verify=True)
    ops = collections.Counter(n.op_type for n in compiled.model.graph)
    # 14 block linears in int4, plus the tied lm_head in 8 bits on the embedding table's codes.
    assert ops["MatMulNBits"] == 15 and ops["GatherBlockQuantized"] == 1 and compiled.report["verified"][0]["ok"]
    nbits = [n for n in compiled.model.graph if n.op_type == "MatMulNBits"]
    assert sorted(n.attributes.get_int("bits") for n in nbits) == [4] * 14 + [8]
    assert all(len(n.inputs) == 4 for n in nbits if n.attributes.get_int("bits") == 4)  # asymmetric: zero points


def test_clip_search_never_increases_the_layer_error():
    from qgraph.passes.clip_search import clip_weight
    from qgraph.quantize import fake_quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((100, 12)).astype(np.float32)
    w[7, 3] = 9.0  # one outlier weight: clipping its group pays off
    x = rng.standard_normal((256, 100)).astype(np.float32)
    clipped, ratio = clip_weight(w, x, SPEC)
    err = lambda v: float(np.square(x @ w - x @ fake_quantize(v, SPEC)).sum())  # noqa: E731
    assert err(clipped) < err(w) and ratio < 1.0
    # The two ends of a group move independently (asymmetric formats have a zero point per group).
    groups = [slice(a, a + 32) for a in range(0, 100, 32)]
    lo_ratio = np.array([clipped[g].min(0) / w[g].min(0) for g in groups])
    hi_ratio = np.array([clipped[g].max(0) / w[g].max(0) for g in groups])
    assert hi_ratio[0, 3] < 1.0 and np.any(np.abs(lo_ratio - hi_ratio) > 0.01)
    symmetric = QuantSpec("int4", "block", axis=0, block_size=32)
    sym_clipped, _ = clip_weight(w, x, symmetric)
    sym_err = lambda v: float(np.square(x @ w - x @ fake_quantize(v, symmetric)).sum())  # noqa: E731
    assert sym_err(sym_clipped) < sym_err(w)


def _small_graph():
    from tests.properties.checks import windows_for
    from tests.properties.graphs import Block, GraphSpec, build

    spec = GraphSpec(vocab=11, dim=3, seq=6, gemm=False, blocks=(Block("attention", "rmsnorm", False, False, False, False),),
                     final_norm="rmsnorm", head="untied", gamma="random", dead="none", seed=0)
    model = build(spec)
    return model, windows_for(model, spec.length)


def test_clip_search_that_clips_nothing_says_so():
    """Regression (property test, this graph): clip search kept every range yet said modified=True."""
    from qgraph.passes.clip_search import WeightClipSearchPass
    from tests.properties.checks import fingerprint

    model, windows = _small_graph()
    before = fingerprint(model)
    p = WeightClipSearchPass(windows, QuantSpec("int4", "block", axis=0, block_size=128, symmetric=False), progress=False)
    assert not p(model).modified and fingerprint(model) == before
    assert p.summary()["clipped"] == 0 and "less output error clipped" in p.summary()["reason"]


def test_awq_strength_zero_leaves_the_graph_alone_and_says_why():
    """Regression (property test): alpha = 0 gives s = 1 everywhere; AWQ said modified=True for that."""
    from tests.properties.checks import fingerprint

    model, windows = _small_graph()
    before = fingerprint(model)
    p = AWQPass(windows, alpha=0.0, weight_spec=SPEC, progress=False)
    assert not p(model).modified and fingerprint(model) == before
    assert p.summary()["regions_smoothed"] == 0 and len(p.chosen) == 3
    unscaled = [r for r in p.refused if "scales every channel by 1" in r["reason"]]
    assert {r["candidate"] for r in unscaled} == set(p.chosen)
