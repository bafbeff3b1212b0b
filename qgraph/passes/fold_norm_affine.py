"""fold_norm_affine: move a norm's gamma into the linears it feeds (QuaRot's "fuse layer norms").

For a norm -> linears region, sink rows B <- diag(gamma) B and gamma <- 1, which is the region
scale with s = gamma. A LayerNorm with a non-zero beta also needs bias += beta @ B on every sink,
which qgraph does not fold yet: such regions are refused with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.ir.regions import find_regions
from qgraph.ir.rewrite import scale_region


class FoldNormAffinePass(ir.passes.InPlacePass):
    """Fold every pre-norm's gamma into its sink weights, leaving gamma = 1."""

    function_preserving = True

    def __init__(self):
        super().__init__()
        self.folded: list[str] = []
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        regions, _ = find_regions(model)
        for region in regions:
            if region.kind != "norm->linears":
                continue
            source = region.sources[0]
            gamma = source.gamma.const_value.numpy().astype(np.float64)
            reason = None
            if source.beta is not None and np.any(source.beta.const_value.numpy() != 0):
                reason = "LayerNorm beta needs bias += beta @ B on every sink; not folded yet"
            elif np.any(gamma == 0):
                reason = "gamma has zero entries: the channel is dead and the fold would divide by zero"
            if reason:
                self.refused.append({"candidate": region.name, "reason": reason})
                continue
            scale_region(model.graph, region, gamma)  # sources / gamma -> gamma = 1; sink rows * gamma
            self.folded.append(region.name)
        return ir.passes.PassResult(model, modified=bool(self.folded))

    def summary(self) -> dict:
        return {"folded": len(self.folded), "refused": self.refused}
