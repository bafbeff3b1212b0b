"""Outlier Suppression+: channel-wise shift and scale, folded into the neighbouring biases and weights.

Per region (sink input X [tokens, R], sink weights B [R, out]) channel c is centred by
z_c = (max_c + min_c) / 2 and then divided by s_c = max(1, r_c / t), r_c its half-range after
the shift: X~ = (X - z) / s. The sources absorb both (beta or bias <- (bias - z) / s, gamma and
weights / s); each sink's bias takes z @ B with B before scaling, then its rows are multiplied by
s. The threshold t is searched per region: the t whose int8-quantized sink outputs are closest to
the float ones wins (t = max r_c means no scaling). A shift is only folded where both ends have a
bias to take it; elsewhere it would cost a runtime Add, so the region is refused with that reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import ChannelStats, region_stats
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import Region, shift_refusal, weight_array
from qgraph.ir.rewrite import scale_region, shift_region
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.passes.smooth import quantized_output_error


def channel_shift(region: Region, stats: ChannelStats) -> np.ndarray:
    """z per source channel: the centre of the range of every sink input row that reads it."""
    hi = np.full(region.channels, -np.inf)
    lo = np.full(region.channels, np.inf)
    np.maximum.at(hi, region.sink_index, stats.max.astype(np.float64))
    np.minimum.at(lo, region.sink_index, stats.min.astype(np.float64))
    return np.where(np.isfinite(hi) & np.isfinite(lo), (hi + lo) / 2.0, 0.0)


def shifted_stats(stats: ChannelStats, rows: np.ndarray) -> ChannelStats:
    """The statistics of X - rows, from those of X (min, max and kept samples are exact)."""
    rows32 = rows.astype(np.float32)
    return ChannelStats(stats.min - rows, stats.max - rows, stats.abs_sum, stats.count,
                        [s - rows32 for s in stats.samples])


def centre_region(graph: ir.Graph, region: Region, stats: ChannelStats) -> tuple[Region, ChannelStats, np.ndarray]:
    """Fold the OS+ shift into the region; returns the updated region, the shifted statistics and z."""
    z = channel_shift(region, stats)
    region = shift_region(graph, region, z)
    return region, shifted_stats(stats, z[region.sink_index]), z


class OutlierShiftPass(ir.passes.InPlacePass):
    """OS+ shift (and, optionally, scale with a searched threshold) on every region with biases at both ends."""

    function_preserving = True

    def __init__(self, windows: TokenWindows, *, scale: bool = True, steps: int = 20,
                 weight_spec: QuantSpec | None = None, activation_spec: QuantSpec | None = None,
                 sample_tokens: int = 512, progress: bool = True):
        super().__init__()
        self.windows = windows
        self.scale = scale
        self.steps = steps
        self.weight_spec = weight_spec or QuantSpec("int8", "channel", axis=1)
        self.activation_spec = activation_spec or QuantSpec("int8", "tensor")
        self.sample_tokens = sample_tokens
        self.progress = progress
        self.shifted: dict[str, dict] = {}
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        regions, rejected, stats = region_stats(model, self.windows, progress=self.progress,
                                                sample_tokens=self.sample_tokens if self.scale else 0)
        self.refused = list(rejected)
        for region in regions:
            reason = shift_refusal(region)
            if reason:
                self.refused.append({"candidate": region.name, "reason": reason})
                continue
            before = stats[region.input.name]
            region, after, z = centre_region(model.graph, region, before)
            note = {"channels": region.channels, "max_abs_shift": float(np.abs(z).max()),
                    "absmax_before": float(before.abs_max.max()), "absmax_after": float(after.abs_max.max())}
            if self.scale:
                s, t, err = self._search_scale(region, after)
                if np.any(s != 1.0):
                    scale_region(model.graph, region, s)
                note.update(threshold=t, max_scale=float(s.max()), relative_error=err)
            self.shifted[region.name] = note
        return ir.passes.PassResult(model, modified=bool(self.shifted))

    def _search_scale(self, region: Region, stats: ChannelStats) -> tuple[np.ndarray, float, float]:
        """s = max(1, r / t) with t on a grid below the largest half-range r; the least quantized-output error wins."""
        idx = region.sink_index
        half = np.zeros(region.channels)
        np.maximum.at(half, idx, stats.abs_max.astype(np.float64))  # centred: abs max is the half-range
        weights = [weight_array(sink).astype(np.float32) for sink in region.sinks]
        x = stats.sample_rows
        reference = [x @ w for w in weights]
        top = float(half.max())
        best = (np.ones(region.channels), top, np.inf)
        if top <= 0:
            return best
        for k in range(self.steps, 0, -1):
            t = top * k / self.steps
            s = np.maximum(1.0, half / t)
            err = quantized_output_error(x, weights, reference, s[idx].astype(np.float32), stats.abs_max,
                                         self.weight_spec, self.activation_spec)
            if err < best[2]:
                best = (s, t, err)
        return best

    def summary(self) -> dict:
        return {"regions_shifted": len(self.shifted), "regions": self.shifted, "refused": self.refused}



@dataclasses.dataclass(frozen=True)
class ShiftOptions:
    """A recipe's `shift` options."""

    scale: bool = option(True, "after the shift, divide wide channels by max(1, r / t), t searched per region")
    steps: int = option(20, "thresholds t the search tries, evenly spaced up to the largest half-range", ge=1)
    sample_tokens: int = option(512, "calibration tokens kept per region for the search", ge=1)


@register("shift", ShiftOptions, help="OS+ shift (and scale) of channels where biases at both ends take it")
def build(options: ShiftOptions, ctx: PassContext) -> OutlierShiftPass:
    """The OS+ pass for a recipe, searching against its weight and activation formats."""
    return OutlierShiftPass(ctx.windows, scale=options.scale, steps=options.steps, weight_spec=ctx.weight_spec,
                            activation_spec=ctx.activation_spec, sample_tokens=options.sample_tokens,
                            progress=ctx.progress)
