"""Weight clip search (AWQ's second step): shrink each weight group's range where that lowers output error.

For every block linear, each (input group, output column) gets the clip ratio r from a grid
whose quantized weights minimise the output error on calibration tokens,
E = d^T (X_g^T X_g) d with d = w - Q_r(w): clipping the float weights to [r lo, r hi] before
round-to-nearest is the same as quantizing with the clipped range. This changes outputs on
purpose, so it is not a function-preserving pass (the verifier leaves it out) and runs after
the folds it follows.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import collect_stats
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import find_linears, weight_array
from qgraph.ir.rewrite import set_linear_weight
from qgraph.quantize import fake_quantize, tensor_range

DEFAULT_RATIOS = tuple(np.round(np.linspace(1.0, 0.6, 9), 3))


def clip_weight(w: np.ndarray, x: np.ndarray, spec: QuantSpec, ratios=DEFAULT_RATIOS) -> tuple[np.ndarray, float]:
    """w [K, N] clipped per (group, column) to the ratio with least output error on x [T, K]; mean ratio."""
    block = spec.block_size
    k, n = w.shape
    groups = [(g, min(k, g + block)) for g in range(0, k, block)]
    gram = [x[:, a:b].T.astype(np.float64) @ x[:, a:b].astype(np.float64) for a, b in groups]
    lo, hi = tensor_range(w, spec)  # [groups, N]
    best_err = np.full((len(groups), n), np.inf)
    best_w = w.copy()
    best_r = np.ones((len(groups), n))
    for r in ratios:
        lo_r = np.repeat(lo * r, block, axis=0)[:k]
        hi_r = np.repeat(hi * r, block, axis=0)[:k]
        wc = np.clip(w, lo_r, hi_r)
        d = (w - fake_quantize(wc, spec)).astype(np.float64)
        for gi, (a, b) in enumerate(groups):
            err = np.einsum("in,in->n", gram[gi] @ d[a:b], d[a:b])
            better = err < best_err[gi]
            best_err[gi] = np.where(better, err, best_err[gi])
            best_r[gi] = np.where(better, r, best_r[gi])
            best_w[a:b, better] = wc[a:b, better]
    return best_w, float(best_r.mean())


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

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.progress import track

        layers = [layer for layer in find_linears(model) if layer.role == "block"]
        names = list(dict.fromkeys(layer.activation.name for layer in layers))
        stats = collect_stats(model, names, self.windows, progress=self.progress, sample_tokens=self.sample_tokens)
        for layer in track(layers, "clip search", total=len(layers), enabled=self.progress):
            x = stats[layer.activation.name].sample_rows
            w, ratio = clip_weight(weight_array(layer), x, self.spec, self.ratios)
            set_linear_weight(model.graph, layer, w)
            self.mean_ratio[layer.name] = ratio
        return ir.passes.PassResult(model, modified=bool(layers))

    def summary(self) -> dict:
        r = list(self.mean_ratio.values())
        return {"layers": len(r), "mean_clip_ratio": float(np.mean(r)) if r else None}
