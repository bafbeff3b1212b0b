"""reorder: RPTQ's channel reordering, so each activation group holds channels of similar range.

Group-wise activation quantization (a step per `group_size` channels of a token) loses the most
where one outlier channel shares a group with quiet ones. RPTQ clusters channels by their
calibrated range and reorders them; with groups of a fixed size the clusters are runs of the
channels sorted by range (max - min over the calibration tokens), which is what this pass uses.

One permutation goes on each region's linear sources (output columns and bias: the up and the gate
of a gated MLP together) and the inverse on its sinks' input rows, so the function is unchanged in
float and no op is added. For v -> o the channels move only inside their head (attention mixes
tokens per head), and with GQA every query head reading a KV head follows it. Norm-sourced regions
(q/k/v, gate/up) read the residual stream, which one permutation for the whole stream would have to
reorder (as R1 rotates it): not done here, reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.calib.stats import region_stats
from qgraph.ir.rewrite import permute_region
from qgraph.options import option
from qgraph.passes.registry import PassContext, register


@dataclasses.dataclass(frozen=True)
class ReorderOptions:
    """Which regions get their channels sorted by calibrated range."""

    mlp: bool = option(True, "gated MLP: gate/up output columns and down_proj rows")
    heads: bool = option(True, "attention: v_proj output columns and o_proj rows, inside each head")


def range_order(span: np.ndarray, block: int | None = None) -> np.ndarray:
    """The permutation sorting channels by span (stable), inside each `block` of channels if given."""
    span = np.asarray(span, dtype=np.float64)
    if not block:
        return np.argsort(span, kind="stable")
    return np.concatenate([start + np.argsort(span[start:start + block], kind="stable")
                           for start in range(0, len(span), block)])


class ReorderPass(ir.passes.InPlacePass):
    """Sort each linear-sourced region's channels by calibrated range (exact in float)."""

    function_preserving = True

    def __init__(self, windows, options: ReorderOptions = ReorderOptions(), *, progress: bool = True):
        super().__init__()
        self.windows, self.options, self.progress = windows, options, progress
        self.reordered: list[dict] = []
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.passes.rotate import _head_dim

        kinds = {"up->down"} if self.options.mlp else set()
        kinds |= {"v->o"} if self.options.heads else set()
        regions, _, stats = region_stats(model, self.windows, progress=self.progress)
        for region in regions:
            if region.kind not in kinds:
                if region.kind == "norm->linears":
                    self.refused.append({"candidate": region.name, "reason": "a norm source reads the residual "
                                         "stream: its channels move only with a permutation of the whole stream"})
                continue
            s = stats[region.input.name]
            span = np.zeros(region.channels)
            np.maximum.at(span, region.sink_index, s.max - s.min)  # a source channel read by several heads (GQA)
            block = _head_dim(region) if region.kind == "v->o" else None
            if region.kind == "v->o" and block is None:
                self.refused.append({"candidate": region.name, "reason": "no Reshape on the v -> o path names the "
                                     "head size, and channels may not cross heads"})
                continue
            perm = range_order(span, block)
            try:
                permute_region(model.graph, region, perm)
            except ValueError as exc:
                self.refused.append({"candidate": region.name, "reason": str(exc)})
                continue
            moved = int(np.count_nonzero(perm != np.arange(len(perm))))
            self.reordered.append({"region": region.name, "channels": int(region.channels), "moved": moved,
                                   **({"within": f"heads of {block}"} if block else {})})
        return ir.passes.PassResult(model, modified=any(r["moved"] for r in self.reordered))

    def summary(self) -> dict:
        return {"reordered": self.reordered, "refused": self.refused}


@register("reorder", ReorderOptions, help="RPTQ: sort channels by calibrated range in v->o and up->down regions")
def build(options: ReorderOptions, ctx: PassContext) -> ReorderPass:
    """The reordering for a recipe (calibrated on the recipe's windows)."""
    return ReorderPass(ctx.windows, options, progress=ctx.progress)
