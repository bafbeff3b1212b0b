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
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import region_stats
from qgraph.ir.qspec import set_range
from qgraph.ir.regions import Region, shift_refusal
from qgraph.ir.rewrite import scale_region
from qgraph.passes.shift import centre_region
from qgraph.passes.split_channels import split_channels


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


def source_channel_absmax(region: Region, row_absmax: np.ndarray) -> np.ndarray:
    """max|X| per source channel from per-sink-input-row maxima (GQA rows share a KV channel)."""
    out = np.zeros(region.channels, dtype=np.float64)
    np.maximum.at(out, region.sink_index, row_absmax)
    return out


class QuantStepMigrationPass(ir.passes.InPlacePass):
    """Fold static per-channel activation steps into sources and sinks; split outlier channels first."""

    function_preserving = True

    def __init__(self, windows: TokenWindows, *, qmax: float = 127.0, qmin: float | None = None, clip: float = 1.0,
                 split_threshold: float | None = 8.0, max_copies: int = 8, shift: bool = False, progress: bool = True):
        super().__init__()
        self.windows = windows
        self.qmax = qmax
        self.qmin = -qmax if qmin is None else qmin
        self.clip = clip
        self.split_threshold = split_threshold
        self.max_copies = max_copies
        self.shift = shift
        self.progress = progress
        self.migrated: dict[str, dict] = {}
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        regions, self.refused, stats = region_stats(model, self.windows, progress=self.progress)
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
            split = 0
            if self.split_threshold and region.kind == "up->down":
                region, absmax, split = self._split(model.graph, region, absmax)
            steps = np.where(absmax > 0, self.clip * absmax / self.qmax, 1.0)
            scale_region(model.graph, region, steps)
            # Every channel now spans [-qmax / clip, qmax / clip]: the per-tensor quantizer's range is
            # known without another calibration run (scale 1 for clip = 1).
            set_range(region.input, self.qmin / self.clip, self.qmax / self.clip)
            self.migrated[region.name] = {"channels": region.channels, "split": split, "max_abs_shift": shifted,
                                          "step_ratio_max_median": float(steps.max() / np.median(steps))}
        return ir.passes.PassResult(model, modified=True)

    def _split(self, graph: ir.Graph, region: Region, absmax: np.ndarray) -> tuple[Region, np.ndarray, int]:
        limit = self.split_threshold * float(np.median(absmax[absmax > 0]))
        copies = {int(c): min(self.max_copies, int(np.ceil(absmax[c] / limit))) for c in np.flatnonzero(absmax > limit)}
        if not copies:
            return region, absmax, 0
        wide = split_channels(graph, region, copies)
        extra = [c for c in sorted(copies) for _ in range(copies[c] - 1)]
        absmax = absmax.copy()
        for c, k in copies.items():
            absmax[c] /= k  # each copy carries u_c / k: exactly 1/k of the range
        return wide, np.concatenate([absmax, absmax[extra]]), len(extra)

    def summary(self) -> dict:
        return {
            "regions_migrated": len(self.migrated),
            "channels_split": sum(m["split"] for m in self.migrated.values()),
            "regions_shifted": sum(m["max_abs_shift"] > 0 for m in self.migrated.values()),
            "regions": self.migrated,
            "refused": self.refused,
        }
