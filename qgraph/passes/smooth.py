"""SmoothQuant: migrate activation outliers into the weights, one region at a time.

For a region with sink input X [tokens, R] and sink weights W [R, out], channel c gets
s_c = max|X_c|^a / max|W_c,:|^(1-a); the sources emit X / s and the sink rows become s W,
so the float function is unchanged (exact up to rounding; the verifier checks it). The
strength a is searched per region on calibration tokens: the a whose int8-quantized
sink outputs Q(X / s) Q(s W) are closest to the float X W wins.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import CALIB_THREADS, ChannelStats, region_stats
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import Region, weight_array
from qgraph.ir.rewrite import scale_region
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.quantize import fake_quantize, qparams_from_range, quantize_dequantize

# Coarse grid for the strength search; the best point is then refined by +-0.05.
DEFAULT_GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.0001, 0.1))


def _per_source_channel(values: np.ndarray, index: np.ndarray, channels: int) -> np.ndarray:
    """Max of per-sink-row values over the rows that read each source channel."""
    out = np.zeros(channels, dtype=np.float64)
    np.maximum.at(out, index, values)
    return out


def smoothing_scales(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """s = act_max^alpha / weight_max^(1 - alpha), with dead channels left at 1."""
    a = np.maximum(act_max, 1e-8)
    w = np.maximum(weight_max, 1e-8)
    s = a**alpha / w ** (1.0 - alpha)
    s = np.where((act_max > 0) & (weight_max > 0), s, 1.0)
    return np.clip(s, 1e-4, 1e4)


def quantized_output_error(x: np.ndarray, weights: list[np.ndarray], reference: list[np.ndarray], row_scale: np.ndarray,
                           act_absmax: np.ndarray, w_spec: QuantSpec, a_spec: QuantSpec) -> float:
    """Relative error of Q(X / s) Q(s W) against the float X W over the sinks; activation range from calibration.

    a_spec None: weight-only (the activation stays float).
    """
    xq = x / row_scale
    if a_spec is not None:
        hi = float((act_absmax / row_scale).max())
        scale, zp = qparams_from_range(np.asarray(-hi), np.asarray(hi), a_spec)
        xq = quantize_dequantize(xq, scale, zp, a_spec)
    num = den = 0.0
    for w, y in zip(weights, reference, strict=True):
        yq = xq @ fake_quantize(w * row_scale[:, None], w_spec)
        num += float(np.square(y - yq).sum())
        den += float(np.square(y).sum())
    return num / max(den, 1e-30)


class SmoothQuantPass(ir.passes.InPlacePass):
    """Scale every legal region by SmoothQuant factors (alpha fixed or searched per region)."""

    function_preserving = True
    weight_only = False
    label = "smoothing regions"

    def scales(self, act_max: np.ndarray, act_mean: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
        """Per-source-channel factors for one strength alpha."""
        return smoothing_scales(act_max, weight_max, alpha)

    def __init__(self, windows: TokenWindows, *, alpha: float | str = "search", grid: tuple[float, ...] = DEFAULT_GRID,
                 weight_spec: QuantSpec | None = None, activation_spec: QuantSpec | None = None,
                 sample_tokens: int = 512, progress: bool = True):
        super().__init__()
        self.windows = windows
        self.alpha = alpha
        self.grid = tuple(grid) if alpha == "search" else (float(alpha),)
        self.weight_spec = weight_spec or QuantSpec("int8", "channel", axis=1)
        self.activation_spec = None if self.weight_only else activation_spec or QuantSpec("int8", "tensor")
        self.sample_tokens = sample_tokens
        self.progress = progress
        self.chosen: dict[str, dict] = {}  # every region's search result
        self.scaled: list[str] = []  # the regions whose scales are not all 1
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.progress import track

        regions, self.refused, stats = region_stats(model, self.windows, progress=self.progress, sample_tokens=self.sample_tokens)
        if not regions:
            return ir.passes.PassResult(model, modified=False)
        for region in track(regions, self.label, total=len(regions), enabled=self.progress):
            s, alpha, err = self._choose(region, stats[region.input.name])
            self.chosen[region.name] = {"alpha": alpha, "relative_error": err, "max_scale": float(s.max()),
                                        "min_scale": float(s.min())}
            if np.all(s == 1.0):  # AWQ's alpha = 0, or only dead channels: scaling by 1 would change nothing
                self.refused.append({"candidate": region.name,
                                     "reason": f"the best strength (alpha {alpha}) scales every channel by 1"})
                continue
            scale_region(model.graph, region, s)
            self.scaled.append(region.name)
        return ir.passes.PassResult(model, modified=bool(self.scaled))

    def _choose(self, region: Region, stats: ChannelStats) -> tuple[np.ndarray, float, float]:
        idx = region.sink_index
        weights = [weight_array(sink).astype(np.float32) for sink in region.sinks]
        act_rows = stats.abs_max.astype(np.float64)
        w_rows = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        act_c = _per_source_channel(act_rows, idx, region.channels)
        mean_c = _per_source_channel(stats.abs_mean.astype(np.float64), idx, region.channels)
        w_c = _per_source_channel(w_rows, idx, region.channels)
        x = stats.sample_rows
        reference = [x @ w for w in weights]

        def trial(alpha: float) -> tuple[np.ndarray, float, float]:
            s = self.scales(act_c, mean_c, w_c, alpha)
            err = quantized_output_error(x, weights, reference, s[idx].astype(np.float32), act_rows, self.weight_spec,
                                         self.activation_spec)
            return s, alpha, err

        # Trials are independent and numpy releases the GIL in their array work: two run at once (the
        # calibration thread count), the same results in the same order as one after another.
        with ThreadPoolExecutor(max_workers=CALIB_THREADS) as pool:
            best = min(pool.map(trial, self.grid), key=lambda t: t[2])
            if self.alpha == "search":
                near = [round(best[1] + d, 3) for d in (-0.05, 0.05) if 0.0 <= best[1] + d <= 1.0]
                best = min([best, *pool.map(trial, near)], key=lambda t: t[2])
        return best

    def summary(self) -> dict:
        alphas = [c["alpha"] for c in self.chosen.values()]
        return {
            "regions_smoothed": len(self.scaled),
            "alpha_mean": float(np.mean(alphas)) if alphas else None,
            "regions": self.chosen,
            "refused": self.refused,
        }


@dataclasses.dataclass(frozen=True)
class SmoothOptions:
    """A recipe's `smooth` (and `awq`) options: the strength, fixed or searched per region."""

    alpha: float | Literal["search"] = option(
        "search", "strength in [0, 1] (the exponent on the activation statistic), or search it per region", ge=0, le=1)
    grid: tuple[float, ...] = option(DEFAULT_GRID, "strengths the search tries; the best is refined by +-0.05",
                                     ge=0, le=1)
    sample_tokens: int = option(512, "calibration tokens kept per region for the search", ge=1)


@register("smooth", SmoothOptions, help="SmoothQuant: activation outliers migrated into the weights, per region")
def build(options: SmoothOptions, ctx: PassContext) -> SmoothQuantPass:
    """The SmoothQuant pass for a recipe, searching against its weight and activation formats."""
    return SmoothQuantPass(ctx.windows, alpha=options.alpha, grid=options.grid, weight_spec=ctx.weight_spec,
                           activation_spec=ctx.activation_spec, sample_tokens=options.sample_tokens,
                           progress=ctx.progress)
