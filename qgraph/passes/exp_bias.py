"""LLM-FP4 exponent-bias reparameterization: per-channel activation scales as powers of two in the weights.

For a float format, shifting the exponent bias by an integer k is the same grid scaled by 2^k. A
per-channel activation bias b_c = rho + k_c (rho real, per tensor; k_c integer) is therefore the
per-tensor format after the channel is divided by 2^k_c: 2^-k_c is folded into the region's
sources and 2^k_c into the sink rows, both exact in float (powers of two), so the float function is
bit for bit unchanged. k_c = round(log2(max|X_c| / t)), bounded by |k_c| <= max_shift because the
sink rows scaled by different 2^k_c share one weight scale per output channel or block. The target
t (a quantile of the channel maxima: which channels the bound leaves uneven) and then rho (the
per-tensor activation range after migration, as a clip of its max) are chosen per region to
minimise the sinks' quantized output error on calibration tokens; the range is recorded on the
region input, so no second calibration run is needed.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import ChannelStats, region_stats
from qgraph.errors import QGraphError
from qgraph.ir.qspec import QuantSpec, set_range
from qgraph.ir.regions import Region, weight_array
from qgraph.ir.rewrite import scale_region
from qgraph.options import option
from qgraph.passes.qsm import source_channel_absmax
from qgraph.passes.registry import PassContext, register
from qgraph.quantize import fake_quantize, qparams_from_range, quantize_dequantize

DEFAULT_TARGETS = (0.5, 0.9, 0.99, 1.0)  # quantiles of the per-channel maxima
DEFAULT_CLIPS = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.2)  # fractions of the migrated max|X|: rho


def exponent_shifts(absmax: np.ndarray, target: float, max_shift: int) -> np.ndarray:
    """Integer k_c = round(log2(max|X_c| / target)) bounded to [-max_shift, max_shift]; dead channels 0."""
    k = np.zeros(absmax.shape, dtype=np.int64)
    live = absmax > 0
    if target > 0:
        k[live] = np.clip(np.round(np.log2(absmax[live] / target)), -max_shift, max_shift)
    return k


class ExponentBiasPass(ir.passes.InPlacePass):
    """Fold per-channel power-of-two activation scales into sources and sinks; calibrate rho per region."""

    function_preserving = True

    def __init__(self, windows: TokenWindows, *, weight_spec: QuantSpec, activation_spec: QuantSpec,
                 max_shift: int = 4, targets: tuple[float, ...] = DEFAULT_TARGETS,
                 clips: tuple[float, ...] = DEFAULT_CLIPS, sample_tokens: int = 256, progress: bool = True):
        super().__init__()
        if not activation_spec.is_float or activation_spec.granularity != "tensor":
            raise QGraphError(f"exp_bias needs per-tensor float activations, got {activation_spec.describe()}",
                              "use activations {format: fp4_e2m1 or fp8_e4m3, granularity: tensor}, or drop exp_bias")
        if max_shift < 0 or not targets or not clips or min(clips) <= 0 or max(clips) > 1:
            raise QGraphError(f"exp_bias: max_shift {max_shift}, targets {targets}, clips {clips} out of range",
                              "use max_shift >= 0, targets in [0, 1] and clips in (0, 1]")
        self.windows = windows
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        self.max_shift = int(max_shift)
        self.targets = tuple(float(t) for t in targets)
        self.clips = tuple(float(c) for c in clips)
        self.sample_tokens = sample_tokens
        self.progress = progress
        self.chosen: dict[str, dict] = {}
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.progress import track

        regions, self.refused, stats = region_stats(model, self.windows, progress=self.progress,
                                                    sample_tokens=self.sample_tokens)
        for region in track(regions, "exponent biases", total=len(regions), enabled=self.progress):
            k, clip, err = self._choose(region, stats[region.input.name])
            s = np.exp2(k).astype(np.float64)
            if k.any():
                scale_region(model.graph, region, s)
            row_s = s[region.sink_index]
            st = stats[region.input.name]
            hi = clip * float(np.maximum(-st.min / row_s, st.max / row_s).max())
            set_range(region.input, -hi, hi)
            self.chosen[region.name] = {"k_min": int(k.min()), "k_max": int(k.max()), "shifted": int((k != 0).sum()),
                                        "channels": region.channels, "clip": clip, "relative_error": err}
        return ir.passes.PassResult(model, modified=bool(regions))  # ranges are recorded even where k = 0

    def _choose(self, region: Region, stats: ChannelStats) -> tuple[np.ndarray, float, float]:
        """k per source channel and the activation clip with the least quantized output error of the sinks."""
        idx = region.sink_index
        weights = [weight_array(sink).astype(np.float32) for sink in region.sinks]
        act_rows = stats.abs_max.astype(np.float64)
        absmax = source_channel_absmax(region, act_rows)
        x = stats.sample_rows
        reference = [x @ w for w in weights]
        live = absmax[absmax > 0]
        candidates = (exponent_shifts(absmax, float(np.quantile(live, t)) if live.size else 0.0, self.max_shift)
                      for t in self.targets)
        shifts = list({k.tobytes(): k for k in candidates}.values())  # targets that give the same k are tried once
        # Quantized sink weights per candidate, computed once: the clip search reuses them.
        cache: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}

        @functools.cache
        def error(i: int, clip: float) -> float:
            if i not in cache:
                rows = np.exp2(shifts[i][idx]).astype(np.float32)
                cache[i] = rows, [fake_quantize(w * rows[:, None], self.weight_spec) for w in weights]
            rows, wq = cache[i]
            hi = clip * float((act_rows / rows).max())
            scale, zp = qparams_from_range(np.asarray(-hi), np.asarray(hi), self.activation_spec)
            xq = quantize_dequantize(x / rows, scale, zp, self.activation_spec)
            num = sum(float(np.square(y - xq @ w).sum()) for y, w in zip(reference, wq, strict=True))
            return num / max(sum(float(np.square(y).sum()) for y in reference), 1e-30)

        # Coordinate search: target at the full range, the clip for it, the target again at that clip.
        best = min(range(len(shifts)), key=lambda i: error(i, self.clips[0]))
        clip = min(self.clips, key=lambda c: error(best, c))
        best = min(range(len(shifts)), key=lambda i: error(i, clip))
        return shifts[best], clip, error(best, clip)

    def summary(self) -> dict:
        shifted = [c["shifted"] for c in self.chosen.values()]
        return {
            "regions": len(self.chosen),
            "channels_shifted": int(sum(shifted)),
            "max_shift": self.max_shift,
            "clip_mean": float(np.mean([c["clip"] for c in self.chosen.values()])) if self.chosen else None,
            "per_region": self.chosen,
            "refused": self.refused,
        }


@dataclasses.dataclass(frozen=True)
class ExpBiasOptions:
    """A recipe's `exp_bias` options."""

    max_shift: int = option(4, "bound on |k_c|, the per-channel power-of-two shift (0: only rho is searched)", ge=0)
    targets: tuple[float, ...] = option(DEFAULT_TARGETS, "quantiles of the channel maxima tried as the shift target t",
                                        ge=0, le=1)
    clips: tuple[float, ...] = option(DEFAULT_CLIPS, "fractions of the migrated max|X| tried as the activation range",
                                      gt=0, le=1)
    sample_tokens: int = option(256, "calibration tokens kept per region for the search", ge=1)


def _needs_float_activations(blocks) -> None:
    if blocks is None or blocks.weights is None or blocks.activations is None:
        raise QGraphError("exp_bias needs quantized weights and activations", "drop exp_bias")
    act = blocks.activations
    if not act.format.startswith("fp") or act.granularity != "tensor":
        raise QGraphError(f"exp_bias needs per-tensor float activations, got {act.format} {act.granularity}",
                          "use activations {format: fp4_e2m1 or fp8_e4m3, granularity: tensor}, or drop exp_bias")


@register("exp_bias", ExpBiasOptions, help="LLM-FP4 exponent biases: per-channel powers of two, then rho per region",
          requires=_needs_float_activations)
def build(options: ExpBiasOptions, ctx: PassContext) -> ExponentBiasPass:
    """The exponent-bias pass for a recipe's float weight and activation formats."""
    return ExponentBiasPass(ctx.windows, weight_spec=ctx.weight_spec, activation_spec=ctx.activation_spec,
                            max_shift=options.max_shift, targets=options.targets, clips=options.clips,
                            sample_tokens=options.sample_tokens, progress=ctx.progress)
