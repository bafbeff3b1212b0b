"""fold_norm_affine: gammas become 1 and LayerNorm betas 0, sinks absorb them, outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qgraph
from qgraph.eval.verify import check_pass, verification_inputs
from qgraph.ir.regions import find_norms, find_regions, linear_bias
from qgraph.ir.rewrite import scale_region
from qgraph.passes.fold_norm_affine import FoldNormAffinePass
from tests.conftest import tiny_bert_affine


def test_fold_sets_gamma_to_one_and_preserves_outputs(llama_captured):
    model = llama_captured.model.clone()
    # Random-init gammas are all 1: give each pre-norm a distinct gamma first (an exact rescale).
    rng = np.random.default_rng(0)
    for region in [r for r in find_regions(model)[0] if r.kind == "norm->linears"]:
        scale_region(model.graph, region, rng.uniform(0.5, 2.0, region.channels))
    p = FoldNormAffinePass()
    result, verdict = check_pass(p, model, verification_inputs(256, length=16))
    assert result.modified and verdict.relative_error < 1e-5
    assert len(p.folded) == 4
    # The final norm feeds the tied lm_head: it is left alone, and the report says why.
    assert len(p.refused) == 1 and "lm_head" in p.refused[0]["reason"] and "tied" in p.refused[0]["reason"]
    folded = {r.sources[0].node.name for r in find_regions(model)[0] if r.kind == "norm->linears"}
    checked = [n for n in find_norms(model) if n.output_node.name in folded]
    assert len(checked) == 4
    for norm in checked:
        np.testing.assert_allclose(norm.gamma.const_value.numpy(), 1.0, rtol=1e-6)


class PreNormToy(torch.nn.Module):
    """Pre-norm LayerNorms with non-zero betas: ln1 feeds two biased linears, ln2 one linear without a bias."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.q, self.k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.fc = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.uniform_(0.5, 2.0)
                ln.bias.normal_(0.0, 0.5)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.q(h) + self.k(h)
        return self.fc(self.ln2(x))


@pytest.mark.parametrize("shape", [(1, 6, 16), (6, 16)], ids=["matmul+add", "gemm"])
def test_layernorm_beta_folds_into_sink_biases(shape):
    torch.manual_seed(0)
    model = qgraph.load(PreNormToy(), example_inputs=(torch.randn(*shape),), progress=False).model
    region = next(r for r in find_regions(model)[0] if r.sinks[0].name == "q")
    biases_before = [linear_bias(s)[0].const_value.numpy().copy() for s in region.sinks]
    weights_before = [s.weight.const_value.numpy().copy() for s in region.sinks]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    p = FoldNormAffinePass()
    result, verdict = check_pass(p, model, [x, 3 * x + 1])
    assert result.modified and verdict.relative_error < 1e-5
    assert p.folded == [region.name]
    # ln2 feeds fc, a linear without a bias: beta @ B would need a new Add, so it is refused.
    assert len(p.refused) == 1 and "sink fc has no bias" in p.refused[0]["reason"]
    ln1 = next(n for n in find_norms(model) if n.output_node is region.sources[0].node)
    np.testing.assert_allclose(ln1.gamma.const_value.numpy(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(ln1.beta.const_value.numpy(), 0.0)
    folded = next(r for r in find_regions(model)[0] if r.sinks[0].name == "q")
    for sink, b, w in zip(folded.sinks, biases_before, weights_before, strict=True):
        assert np.abs(linear_bias(sink)[0].const_value.numpy() - b).max() > 1e-2
        assert np.abs(sink.weight.const_value.numpy() - w).max() > 1e-2


def test_post_norm_encoder_layernorms_are_left_alone():
    model = tiny_bert_affine()
    p = FoldNormAffinePass()
    result, verdict = check_pass(p, model, verification_inputs(200, length=12))
    assert not result.modified and p.folded == [] and verdict.relative_error == 0.0
    # Regression (property test): it said nothing; now each LayerNorm carries the region finder's reason.
    reasons = {r["candidate"]: r["reason"] for r in p.refused}
    assert len(reasons) == 5 and "residual stream (post-norm)" in reasons["encoder.layer.0.attention.output.LayerNorm"]
    assert "graph output" in reasons["encoder.layer.1.output.LayerNorm"]


def test_a_folded_norm_is_left_alone_and_the_report_says_why():
    """Regression (property test): gamma = 1 without beta was 'folded' again: modified=True, nothing changed."""
    from tests.properties.checks import fingerprint
    from tests.properties.graphs import Block, GraphSpec, build

    spec = GraphSpec(vocab=11, dim=3, seq=None, gemm=False, blocks=(Block("attention", "rmsnorm", False, False, False, False),),
                     final_norm="none", head="untied", gamma="ones_shared", dead="none", seed=0)
    model = build(spec)
    before = fingerprint(model)
    p = FoldNormAffinePass()
    assert not p(model).modified and fingerprint(model) == before and p.folded == []
    assert [r["reason"] for r in p.refused] == ["gamma is 1 and beta 0 already: nothing to fold"]
