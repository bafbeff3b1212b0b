"""disassemble: QLLM's channel disassembly and assembly on gated MLPs (the down projection's input).

Disassembly: a channel whose calibrated max|x| exceeds theta becomes T = ceil(max|x| / theta)
exact copies of x / T (split_channels: gate column duplicated, up column scaled, down row
duplicated), so no single channel sets a token's (or the tensor's) activation step. Exact in float.

Assembly: the width goes back to what it was by merging the most similar pairs among the channels
that were not split: channel j is dropped and down row i takes a_ij w_j, where a_ij x_i is the
least-squares fit of x_j over every calibration token (its Gram matrix). Approximate; the pass
reports the float error it adds, and with assembly on it is not function-preserving.

The threshold is adaptive as in QLLM: per region, each candidate theta (a multiple of the median
channel's max|x|, or no split at all) is tried on calibration samples and the one whose output,
with the recipe's activation and weight rounding, is closest to the float output is kept.
Only up -> down regions: a norm's output width is fixed by the norm, and v -> o channels are heads.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qgraph.backends.dynamic_rounding import fake_quantize as round_groups
from qgraph.calib.stats import collect_stats
from qgraph.ir.qspec import FORMATS, QuantSpec
from qgraph.ir.regions import Region, find_regions, weight_array
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.passes.split_channels import (
    assemble_channels,
    assembly_pairs,
    merge_cost,
    split_channels,
    split_refusal,
)
from qgraph.quantize import fake_quantize

# Candidate thresholds, in multiples of the median channel's max|x|; None: leave the region unsplit.
CANDIDATES = (None, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0)


@dataclasses.dataclass(frozen=True)
class DisassembleOptions:
    """QLLM's channel disassembly (exact) and assembly (approximate) on gated MLPs."""

    threshold: float | Literal["adaptive"] = option(
        "adaptive", "split channels whose max|x| exceeds this many times the median channel's; adaptive: per region "
        "the candidate (none, 64, 32, 16, 8, 4) with least quantized output error on calibration samples", gt=1)
    assemble: bool = option(True, "merge the most similar channel pairs back to the original width (approximate)")
    max_copies: int = option(16, "most parts one channel is split into", ge=2)
    sample_tokens: int = option(512, "calibration tokens kept per region to score the candidates", ge=1)


def round_activation(x: np.ndarray, spec: QuantSpec | None) -> np.ndarray:
    """x [tokens, channels] after the recipe's activation rounding (static ranges from x itself)."""
    if spec is None:
        return x
    if spec.is_float or spec.static:
        if spec.granularity == "channel":
            spec = dataclasses.replace(spec, axis=1)
        return fake_quantize(x, spec)
    _, _, qmin, qmax = FORMATS[spec.format]
    bits = int(np.log2(qmax - qmin + 1))
    group = spec.block_size if spec.granularity == "block" else x.shape[1]
    if spec.granularity == "tensor":  # one run-time step for the whole tensor
        return round_groups(x.reshape(1, -1), 1, x.size, bits, symmetric=spec.symmetric, clip=spec.clip).reshape(x.shape)
    return round_groups(x, 1, group, bits, symmetric=spec.symmetric, clip=spec.clip)


@dataclasses.dataclass
class Plan:
    """One candidate for a region: the splits, the merges and what they cost on the samples."""

    threshold: float | None
    copies: dict[int, int]
    pairs: list[tuple[int, int]]
    factors: np.ndarray | None
    error: float  # |y - Qa(x') Qw(W')| / |y| on the samples
    float_error: float  # the same without rounding: what assembly alone costs


def plan_region(x: np.ndarray, gram: np.ndarray, absmax: np.ndarray, w: np.ndarray, threshold: float | None,
                assemble: bool, max_copies: int, activation: QuantSpec | None, weight: QuantSpec | None) -> Plan:
    """Split (and merge back) in numpy on samples x [n, C] with down weight w [C, N]; score the result."""
    channels = len(absmax)
    positive = absmax[absmax > 0]
    median = float(np.median(positive)) if positive.size else 0.0
    copies: dict[int, int] = {}
    if threshold is not None and median > 0:
        limit = threshold * median
        copies = {int(c): min(max_copies, int(np.ceil(absmax[c] / limit))) for c in np.flatnonzero(absmax > limit)}
        copies = {c: k for c, k in copies.items() if k > 1}
    extra = [c for c in sorted(copies) for _ in range(copies[c] - 1)]
    src = np.concatenate([np.arange(channels), np.asarray(extra, dtype=np.int64)])
    f = np.ones(len(src))
    for c, k in copies.items():
        f[src == c] = 1.0 / k
    xw, ww = x[:, src] * f[None, :], w[src].astype(np.float64)
    pairs, factors = [], None
    if assemble and extra:
        wide_gram = gram[np.ix_(src, src)] * np.outer(f, f)
        cost, factors = merge_cost(wide_gram, np.square(ww).sum(axis=1))
        allowed = np.zeros(len(src), dtype=bool)
        allowed[:channels] = True
        allowed[list(copies)] = False  # a split channel's copies would merge back at no cost and undo the split
        pairs = assembly_pairs(cost, len(extra), allowed)
        for i, j in pairs:
            ww[i] += factors[i, j] * ww[j]
        keep = np.setdiff1d(np.arange(len(src)), [j for _, j in pairs])
        xw, ww = xw[:, keep], ww[keep]
    y = x.astype(np.float64) @ w.astype(np.float64)
    norm = float(np.linalg.norm(y)) or 1.0
    wq = fake_quantize(ww.astype(np.float32), weight) if weight is not None else ww
    error = float(np.linalg.norm(y - round_activation(xw.astype(np.float32), activation).astype(np.float64) @ wq)) / norm
    float_error = float(np.linalg.norm(y - xw @ ww)) / norm
    return Plan(threshold, copies, pairs, factors, error, float_error)


class ChannelDisassemblyPass(ir.passes.InPlacePass):
    """Split the outlier channels of each gated MLP's down-projection input; merge similar ones back."""

    def __init__(self, windows, options: DisassembleOptions = DisassembleOptions(), *, weight_spec=None,
                 activation_spec=None, progress: bool = True):
        super().__init__()
        self.windows, self.options, self.progress = windows, options, progress
        self.weight_spec, self.activation_spec = weight_spec, activation_spec
        # Disassembly alone is exact; assembly replaces channels by fits of others.
        self.function_preserving = not options.assemble
        self.regions: list[dict] = []
        self.refused: list[dict] = []
        self.reason = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        regions: list[Region] = []
        for region in find_regions(model)[0]:
            if region.kind != "up->down":
                continue
            reason = split_refusal(region)
            if reason:
                self.refused.append({"candidate": region.name, "reason": reason})
            else:
                regions.append(region)
        if not regions:
            self.reason = "no gated MLP (up -> down region) whose channels can be split"
            return ir.passes.PassResult(model, modified=False)
        stats = collect_stats(model, [r.input.name for r in regions], self.windows, progress=self.progress,
                              sample_tokens=o.sample_tokens, gram=o.assemble)
        candidates = CANDIDATES if o.threshold == "adaptive" else (None, float(o.threshold))
        modified = False
        for region in regions:
            s = stats[region.input.name]
            x, w = s.sample_rows, weight_array(region.sinks[0])
            gram = s.gram if s.gram is not None else np.zeros((region.channels, region.channels))
            plans = [plan_region(x, gram, s.abs_max, w, t, o.assemble, o.max_copies, self.activation_spec,
                                 self.weight_spec) for t in candidates]
            best = min(plans, key=lambda p: p.error) if o.threshold == "adaptive" else plans[-1]
            if best.copies:
                wide = split_channels(model.graph, region, best.copies)
                assemble_channels(model.graph, wide, best.pairs, best.factors)
                modified = True
            self.regions.append({"region": region.name, "threshold": best.threshold, "split": len(best.copies),
                                 "copies": sum(k - 1 for k in best.copies.values()), "merged": len(best.pairs),
                                 "width": region.channels + sum(k - 1 for k in best.copies.values()) - len(best.pairs),
                                 "error_unsplit": round(plans[0].error, 6), "error": round(best.error, 6),
                                 "assembly_float_error": round(best.float_error, 6)})
        if not modified:
            self.reason = "no region's quantized output error drops with a split (every region kept unsplit)"
        return ir.passes.PassResult(model, modified=modified)

    def summary(self) -> dict:
        return {"regions_split": sum(r["split"] > 0 for r in self.regions),
                "channels_split": sum(r["split"] for r in self.regions),
                "channels_merged": sum(r["merged"] for r in self.regions),
                "regions": self.regions, "refused": self.refused, "reason": self.reason}


@register("disassemble", DisassembleOptions,
          help="QLLM: split outlier channels of gated MLPs (adaptive threshold), merge similar ones back")
def build(options: DisassembleOptions, ctx: PassContext) -> ChannelDisassemblyPass:
    """The disassembly for a recipe, scored with its activation and weight rounding."""
    return ChannelDisassemblyPass(ctx.windows, options, weight_spec=ctx.weight_spec, activation_spec=ctx.activation_spec,
                                  progress=ctx.progress)
