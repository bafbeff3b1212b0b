"""QSM: MergeQuant's quantization-step migration with OutlierTune's dequantization pre-execution.

Static per-channel activation steps D_c = clip * max|X_c| / qmax are folded into the region's
sources (they emit X / D directly) and D into the sink rows before the weights are quantized.
Every channel then spans the same range [-qmax, qmax], so a per-tensor quantizer with scale 1
does the work of a per-channel one at zero runtime cost: the lowered graph has exactly the nodes
of plain w8a8. Channels whose step is far above the rest (the gated product before down_proj)
are split first (dimensional reconstruction), so no weight row of the sink dominates its
output channel's scale.

With shift=True each region whose source and sinks have biases is first centred by the OS+ shift
(OutlierTune's symmetrization): the steps then cover max|X - z| instead of max|X|, half the grid
for a one-sided channel. Regions without biases (SmolLM2) are left as they were.

With clip="search" every channel gets its own clip ratio (MergeQuant's adaptive clipping): the
ratio from CLIP_GRID whose rounding + clamping error on calibration samples, weighted by the
squared norm of the sink rows that read the channel, is least. The samples include each window's
first positions, so the attention-sink tokens' huge values are never clipped away cheaply.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import region_stats
from qgraph.ir.qspec import set_range
from qgraph.ir.regions import Region, shift_refusal, weight_array
from qgraph.ir.rewrite import scale_region
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.passes.shift import centre_region
from qgraph.passes.split_channels import split_channels, split_refusal


def centred_grid(spec) -> tuple[float, float]:
    """(qmin, qmax) of the grid a migrated activation uses with scale 1, centred on zero.

    Symmetric: [-qmax, qmax]. With a zero point (uint8 asymmetric): [-128, 127] around code 128,
    which lowers to exactly the Q/DQ pair of symmetric int8 (scale 1, zero point 128).
    """
    if spec is None:
        return -127.0, 127.0
    if spec.symmetric or spec.is_float:
        return -float(spec.qmax), float(spec.qmax)
    half = float((spec.qmax - spec.qmin) // 2)
    return -half - 1.0, half


CLIP_GRID = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))


def channel_clip_search(x: np.ndarray, index: np.ndarray, absmax: np.ndarray, row_weight: np.ndarray, qmax: float,
                        grid=CLIP_GRID) -> np.ndarray:
    """Per source channel, the clip ratio with least weighted error of round(clamp(x / D)) * D on samples.

    x [T, R] samples of the sink input rows; index [R] source channel of each row; absmax [C] per
    source channel; row_weight [R] squared sink-row norm (how much an error on that row costs).
    """
    x = x.astype(np.float64)
    channels = absmax.shape[0]
    errors = np.zeros((len(grid), channels))
    for g, ratio in enumerate(grid):
        step = np.where(absmax > 0, ratio * absmax / qmax, 1.0)[index]
        e = x - np.clip(np.round(x / step), -qmax, qmax) * step
        np.add.at(errors[g], index, (e * e).mean(axis=0) * row_weight)
    return np.asarray(grid)[errors.argmin(axis=0)]


def source_channel_absmax(region: Region, row_absmax: np.ndarray) -> np.ndarray:
    """max|X| per source channel from per-sink-input-row maxima (GQA rows share a KV channel)."""
    out = np.zeros(region.channels, dtype=np.float64)
    np.maximum.at(out, region.sink_index, row_absmax)
    return out


class QuantStepMigrationPass(ir.passes.InPlacePass):
    """Fold static per-channel activation steps into sources and sinks; split outlier channels first."""

    function_preserving = True

    def __init__(self, windows: TokenWindows, *, qmax: float = 127.0, qmin: float | None = None,
                 clip: float | str = 1.0, sample_tokens: int = 512, split_threshold: float | None = 8.0,
                 max_copies: int = 8, shift: bool = False, progress: bool = True):
        super().__init__()
        self.windows = windows
        self.qmax = qmax
        self.qmin = -qmax if qmin is None else qmin
        if clip != "search" and not isinstance(clip, (int, float)):
            from qgraph.errors import QGraphError

            raise QGraphError(f"qsm clip {clip!r} is neither a ratio nor 'search'", "use clip: 1.0 or clip: search")
        self.clip = clip
        self.sample_tokens = sample_tokens
        self.split_threshold = split_threshold
        self.max_copies = max_copies
        self.shift = shift
        self.progress = progress
        self.migrated: dict[str, dict] = {}
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        searching = self.clip == "search"
        regions, self.refused, stats = region_stats(model, self.windows, progress=self.progress,
                                                    sample_tokens=self.sample_tokens if searching else 0)
        if not regions:
            return ir.passes.PassResult(model, modified=False)
        for region in regions:
            channel_stats = stats[region.input.name]
            shifted = 0.0
            if self.shift:
                reason = shift_refusal(region)
                if reason:
                    self.refused.append({"candidate": region.name, "reason": f"no shift: {reason}"})
                else:
                    region, channel_stats, z = centre_region(model.graph, region, channel_stats)
                    shifted = float(np.abs(z).max())
            absmax = source_channel_absmax(region, channel_stats.abs_max)
            if searching:
                row_weight = sum(np.square(weight_array(sink)).sum(axis=1) for sink in region.sinks)
                clip = channel_clip_search(channel_stats.sample_rows, region.sink_index, absmax, row_weight, self.qmax)
            else:
                clip = np.full(region.channels, float(self.clip))
            split = 0
            if self.split_threshold and region.kind == "up->down":
                region, absmax, extra = self._split(model.graph, region, absmax)
                clip, split = np.concatenate([clip, clip[extra]]), len(extra)
            steps = np.where(absmax > 0, clip * absmax / self.qmax, 1.0)
            scale_region(model.graph, region, steps)
            # Every channel now spans [-qmax / clip_c, qmax / clip_c]; the per-tensor quantizer keeps scale 1
            # (range [qmin, qmax]) when clips are searched, 1 / clip for one uniform clip. Either way the
            # range is known without another calibration run.
            uniform = 1.0 if searching else float(self.clip)
            set_range(region.input, self.qmin / uniform, self.qmax / uniform)
            self.migrated[region.name] = {"channels": region.channels, "split": split, "max_abs_shift": shifted,
                                          "clipped_channels": int((clip < 1).sum()), "mean_clip": float(clip.mean()),
                                          "step_ratio_max_median": float(steps.max() / np.median(steps))}
        return ir.passes.PassResult(model, modified=True)

    def _split(self, graph: ir.Graph, region: Region, absmax: np.ndarray) -> tuple[Region, np.ndarray, list[int]]:
        limit = self.split_threshold * float(np.median(absmax[absmax > 0]))
        copies = {int(c): min(self.max_copies, int(np.ceil(absmax[c] / limit))) for c in np.flatnonzero(absmax > limit)}
        if not copies:
            return region, absmax, []
        reason = split_refusal(region)
        if reason:  # migrate unsplit: the steps still fold exactly, only the outliers keep their range
            self.refused.append({"candidate": region.name, "reason": f"{len(copies)} outlier channels not split: {reason}"})
            return region, absmax, []
        wide = split_channels(graph, region, copies)
        extra = [c for c in sorted(copies) for _ in range(copies[c] - 1)]
        absmax = absmax.copy()
        for c, k in copies.items():
            absmax[c] /= k  # each copy carries u_c / k: exactly 1/k of the range
        return wide, np.concatenate([absmax, absmax[extra]]), extra

    def summary(self) -> dict:
        return {
            "regions_migrated": len(self.migrated),
            "channels_split": sum(m["split"] for m in self.migrated.values()),
            "regions_shifted": sum(m["max_abs_shift"] > 0 for m in self.migrated.values()),
            "channels_clipped": sum(m["clipped_channels"] for m in self.migrated.values()),
            "regions": self.migrated,
            "refused": self.refused,
        }


@dataclasses.dataclass(frozen=True)
class QSMOptions:
    """A recipe's `qsm` options."""

    clip: float | Literal["search"] = option(
        1.0, "step = clip * max|x| / qmax per channel: a ratio in (0, 1], or search one per channel", gt=0, le=1)
    split_threshold: float | None = option(
        8.0, "split gated-MLP channels whose step exceeds this many times the median step (null: no splits)", gt=1)
    max_copies: int = option(8, "most parts one split channel becomes", ge=2)
    shift: bool = option(False, "centre each region first (OS+ shift) where its source and sinks have biases")
    sample_tokens: int = option(512, "calibration tokens kept per region for clip: search", ge=1)


@register("qsm", QSMOptions, help="quantization-step migration with exact channel splitting")
def build(options: QSMOptions, ctx: PassContext) -> QuantStepMigrationPass:
    """The QSM pass for a recipe, migrating onto its activation grid."""
    qmin, qmax = centred_grid(ctx.activation_spec)
    return QuantStepMigrationPass(ctx.windows, qmax=qmax, qmin=qmin, clip=options.clip,
                                  sample_tokens=options.sample_tokens, split_threshold=options.split_threshold,
                                  max_copies=options.max_copies, shift=options.shift, progress=ctx.progress)
