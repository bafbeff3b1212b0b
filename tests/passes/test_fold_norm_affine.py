"""fold_norm_affine: gammas become 1, sinks absorb them, outputs unchanged."""

from __future__ import annotations

import numpy as np

from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.regions import find_norms, find_regions
from qgraph.ir.rewrite import scale_region
from qgraph.passes.fold_norm_affine import FoldNormAffinePass


def test_fold_sets_gamma_to_one_and_preserves_outputs(llama_captured):
    model = llama_captured.model.clone()
    # Random-init gammas are all 1: give each pre-norm a distinct gamma first (an exact rescale).
    rng = np.random.default_rng(0)
    for region in [r for r in find_regions(model)[0] if r.kind == "norm->linears"]:
        scale_region(model.graph, region, rng.uniform(0.5, 2.0, region.channels))
    p = FoldNormAffinePass()
    result, verdict = check_pass(p, model, verification_inputs(256, length=16))
    assert result.modified and verdict.relative_error < 1e-5
    assert len(p.folded) == 4 and p.refused == []
    folded = {r.sources[0].node.name for r in find_regions(model)[0] if r.kind == "norm->linears"}
    checked = [n for n in find_norms(model) if n.output_node.name in folded]
    assert len(checked) == 4
    for norm in checked:
        np.testing.assert_allclose(norm.gamma.const_value.numpy(), 1.0, rtol=1e-6)
