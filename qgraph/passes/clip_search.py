"""Weight clip search (AWQ's second step): shrink each weight group's range where that lowers output error.

For every block linear, each (input group, output column) gets the range [r_lo lo, r_hi hi]
whose quantized weights minimise the output error on calibration tokens,
E = d^T (X_g^T X_g) d with d = w - Q(w): clipping the float weights to that range before
round-to-nearest is the same as quantizing with the clipped range. This changes outputs on
purpose, so it is not a function-preserving pass (the verifier leaves it out) and runs after
the folds it follows.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import CALIB_THREADS, collect_stats
from qgraph.errors import QGraphError
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import find_linears, weight_array
from qgraph.ir.rewrite import set_linear_weight
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.quantize import qparams_from_range, quantize_dequantize

DEFAULT_RATIOS = tuple(np.round(np.linspace(1.0, 0.5, 11), 3))


def clip_weight(w: np.ndarray, x: np.ndarray, spec: QuantSpec, ratios=DEFAULT_RATIOS) -> tuple[np.ndarray, float]:
    """w [K, N] clipped per (group, column) to the range with least output error on x [T, K]; mean range kept.

    Both ends shrink by one ratio first; for asymmetric formats (a zero point per group) each end
    is then searched on its own with the other held, which found ranges a shared ratio cannot
    (SmolLM2 w4a16-awq, 16 windows: 32.90 perplexity with one ratio, 32.34 with both ends free).
    """
    block = spec.block_size
    k, n = w.shape
    column = dataclasses.replace(spec, granularity="channel", axis=1, block_size=None)  # one group's columns
    out = w.astype(np.float32, copy=True)
    kept = []
    for a in range(0, k, block):
        g = out[a : a + block]
        xs = x[:, a : a + block].astype(np.float64)
        gram = xs.T @ xs
        lo, hi = g.min(axis=0), g.max(axis=0)

        def error(lo_c: np.ndarray, hi_c: np.ndarray, g=g, gram=gram) -> np.ndarray:
            scale, zp = qparams_from_range(lo_c, hi_c, column)
            d = (g - quantize_dequantize(np.minimum(np.maximum(g, lo_c), hi_c), scale, zp, column)).astype(np.float64)
            return np.einsum("in,in->n", gram @ d, d)

        best_lo, best_hi, best = lo.copy(), hi.copy(), error(lo, hi)
        for stage in ("both", "low", "high") if not spec.symmetric else ("both",):
            held_lo, held_hi = best_lo.copy(), best_hi.copy()
            for r in ratios:
                lo_c = held_lo if stage == "high" else lo * r
                hi_c = held_hi if stage == "low" else hi * r
                err = error(lo_c, hi_c)
                better = err < best
                best = np.where(better, err, best)
                best_lo, best_hi = np.where(better, lo_c, best_lo), np.where(better, hi_c, best_hi)
        out[a : a + block] = np.clip(g, best_lo, best_hi)
        span = hi - lo
        kept.append(np.where(span > 0, (best_hi - best_lo) / np.where(span > 0, span, 1.0), 1.0))
    return out, float(np.mean(kept))


class WeightClipSearchPass(ir.passes.InPlacePass):
    """Clip block linears' weight groups to the range that quantizes with least output error."""

    function_preserving = False

    def __init__(self, windows: TokenWindows, spec: QuantSpec, *, ratios=DEFAULT_RATIOS, sample_tokens: int = 512,
                 progress: bool = True):
        super().__init__()
        if spec.granularity != "block":
            raise ValueError("clip search works on group (block) weight quantization")
        self.windows, self.spec, self.ratios = windows, spec, tuple(ratios)
        self.sample_tokens, self.progress = sample_tokens, progress
        self.mean_ratio: dict[str, float] = {}
        self.clipped: list[str] = []  # the layers whose weights changed
        self.reason: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.progress import track

        layers = [layer for layer in find_linears(model) if layer.role == "block"]
        if not layers:
            self.reason = "the graph has no block linear (MatMul/Gemm with a constant weight)"
            return ir.passes.PassResult(model, modified=False)
        names = list(dict.fromkeys(layer.activation.name for layer in layers))
        stats = collect_stats(model, names, self.windows, progress=self.progress, sample_tokens=self.sample_tokens)

        def search(layer):
            w0 = weight_array(layer)
            return w0, *clip_weight(w0, stats[layer.activation.name].sample_rows, self.spec, self.ratios)

        # Layers are searched two at a time (numpy releases the GIL in the array work); results apply in order.
        with ThreadPoolExecutor(max_workers=CALIB_THREADS) as pool:
            searched = list(track(pool.map(search, layers), "clip search", total=len(layers), enabled=self.progress))
        for layer, (w0, w, ratio) in zip(layers, searched, strict=True):
            self.mean_ratio[layer.name] = ratio
            if not np.array_equal(w, w0):  # else every group kept its full range: nothing to rewrite
                set_linear_weight(model.graph, layer, w)
                self.clipped.append(layer.name)
        if not self.clipped:
            self.reason = f"no weight group of the {len(layers)} block linears quantizes with less output error clipped"
        return ir.passes.PassResult(model, modified=bool(self.clipped))

    def summary(self) -> dict:
        r = list(self.mean_ratio.values())
        return {"layers": len(r), "clipped": len(self.clipped), "mean_clip_ratio": float(np.mean(r)) if r else None,
                **({"reason": self.reason} if self.reason else {})}


@dataclasses.dataclass(frozen=True)
class ClipSearchOptions:
    """A recipe's `clip_search` options."""

    ratios: tuple[float, ...] = option(DEFAULT_RATIOS, "fractions of each group's low and high end the search tries",
                                       gt=0, le=1)
    sample_tokens: int = option(512, "calibration tokens kept per linear input for the output error", ge=1)


def _needs_group_weights(blocks) -> None:
    if blocks is None or blocks.weights is None or blocks.weights.granularity != "group":
        raise QGraphError("clip_search needs group weight quantization", "set weights granularity: group, or drop clip_search")


@register("clip_search", ClipSearchOptions, help="per-group weight range search on output error (changes outputs)",
          requires=_needs_group_weights)
def build(options: ClipSearchOptions, ctx: PassContext) -> WeightClipSearchPass:
    """The clip search for a recipe's group weight format."""
    return WeightClipSearchPass(ctx.windows, ctx.weight_spec, ratios=options.ratios, sample_tokens=options.sample_tokens,
                                progress=ctx.progress)
