"""fold_norm_affine: move a norm's gamma into the linears it feeds (QuaRot's "fuse layer norms").

For a norm -> linears region, sink rows B <- diag(gamma) B and gamma <- 1, which is the region
scale with s = gamma. A LayerNorm with a non-zero beta first moves it into the sinks' biases:
bias <- bias + beta @ B with the original B (the OS+ shift with z = beta), so beta <- 0. That
needs a bias on every sink; a sink MatMul without one would need a new Add node, so such a
region is refused with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.ir.regions import find_norms, find_regions, shift_refusal
from qgraph.ir.rewrite import scale_region, shift_region
from qgraph.options import NoOptions
from qgraph.passes.registry import PassContext, register


class FoldNormAffinePass(ir.passes.InPlacePass):
    """Fold every pre-norm's gamma (and LayerNorm beta) into its sinks, leaving gamma = 1 and beta = 0."""

    function_preserving = True

    def __init__(self):
        super().__init__()
        self.folded: list[str] = []
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        regions, rejected = find_regions(model)
        self._refuse_non_sources(model, regions, rejected)
        for region in regions:
            if region.kind != "norm->linears":
                continue
            source = region.sources[0]
            gamma = source.gamma.const_value.numpy().astype(np.float64)
            has_beta = source.beta is not None and bool(np.any(source.beta.const_value.numpy() != 0))
            reason = None
            if np.all(gamma == 1) and not has_beta:  # folded already (or never trained): s = 1 changes nothing
                reason = "gamma is 1 and beta 0 already: nothing to fold"
            elif np.any(gamma == 0):
                reason = "gamma has zero entries: the channel is dead and the fold would divide by zero"
            elif has_beta and shift_refusal(region):
                reason = f"LayerNorm beta cannot move into the sink biases: {shift_refusal(region)}"
            if reason:
                self.refused.append({"candidate": region.name, "reason": reason})
                continue
            if has_beta:  # bias += beta @ B with B before the gamma scaling; beta - beta = 0
                region = shift_region(model.graph, region, source.beta.const_value.numpy().reshape(-1))
            scale_region(model.graph, region, gamma)  # sources / gamma -> gamma = 1; sink rows * gamma
            self.folded.append(region.name)
        return ir.passes.PassResult(model, modified=bool(self.folded))

    def _refuse_non_sources(self, model: ir.Model, regions: list, rejected: list) -> None:
        """Say why each norm that is no region source is left alone: the region finder's reason."""
        norms = find_norms(model)
        if not norms:
            self.refused.append({"candidate": "graph", "reason": "the graph has no RMSNorm or LayerNormalization"})
        sources = {id(r.sources[0].node) for r in regions if r.kind == "norm->linears"}
        reasons = {r.candidate: r.reason for r in rejected}
        for norm in norms:
            if id(norm.output_node) in sources:
                continue
            # find_regions names a norm by its gamma, or by kind and node when a deduplicated gamma is shared.
            name = norm.name if norm.name in reasons else f"{norm.kind} {norm.output_node.name}"
            self.refused.append({"candidate": name, "reason": reasons.get(name, "not a norm -> linears region")})

    def summary(self) -> dict:
        return {"folded": len(self.folded), "refused": self.refused}


@register("fold_norm_affine", NoOptions, help="pre-norm gammas and LayerNorm betas folded into their linears")
def build(options: NoOptions, ctx: PassContext) -> FoldNormAffinePass:
    """The fold for a recipe (it needs neither calibration nor specs)."""
    return FoldNormAffinePass()
