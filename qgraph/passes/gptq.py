"""Error-feedback weight rounding (GPTQ / OBQ): round each input row, push its error onto the rows not yet rounded.

For a linear Y = X W (W [K, N], K inputs), rounding row k to the quantization grid leaves an
output error X_k (w_k - q_k); GPTQ cancels what it can of that error with the rows still in
float, using H = X^T X from the calibration tokens: w_j -= (H^-1)_kj / (H^-1)_kk (w_k - q_k) for
the later rows j. It minimises the same output error clip search measures, d^T H d, one row at a
time instead of choosing a range. Rows go in order of decreasing H_kk (the inputs that carry the
most energy are rounded first, while the most float rows are left to absorb their error).

The scales (and zero points) stay those of the original weights: every scale group keeps the
elements that set its range on the grid's ends (its largest |w|; for asymmetric grids its min and
its max), so the lowering, which derives scales from the weights' range, recomputes the same
parameters and re-rounds these weights to themselves. Changes outputs on
purpose: not function-preserving (the verifier leaves it out).

Written here rather than taken from a library: the GPTQ implementations on PyPI (auto-gptq,
gptqmodel, llm-compressor) work on torch modules with integer grids; this one works on the ONNX
graph's weights with any grid qgraph lowers: int4/int8 with or without zero points, FP8 E4M3, FP4 E2M1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.stats import collect_stats
from qgraph.errors import QGraphError
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import find_linears, weight_array
from qgraph.ir.rewrite import set_linear_weight
from qgraph.options import option
from qgraph.passes.registry import PassContext, register
from qgraph.quantize import (
    broadcast_params,
    fake_quantize,
    qparams_from_range,
    quantize_dequantize,
    tensor_range,
)

DEFAULT_DAMP = 0.01  # of the mean diagonal of H, added to it: keeps H^-1 well conditioned
DEFAULT_BLOCK = 128  # rows rounded between two full updates of the remaining rows (same result, fewer passes)


def _element_scales(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of every element of w [K, N] under spec, from w's own range."""
    if (spec.granularity == "channel" and spec.axis % 2 != 1) or (spec.granularity == "block" and spec.axis % 2 != 0):
        raise ValueError(f"gptq reads weights as [in, out]: channels along axis 1, groups along axis 0 (got {spec.describe()})")
    scale, zp = qparams_from_range(*tensor_range(w, spec), spec)
    return (np.broadcast_to(broadcast_params(scale, w.shape, spec), w.shape).copy(),
            np.broadcast_to(broadcast_params(zp, w.shape, spec), w.shape).copy())


def _pinned(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Mask of the elements that set each scale group's range: largest |w|, or min and max (zero points)."""
    k, n = w.shape
    size = k if spec.granularity != "block" else spec.block_size
    mask = np.zeros((k, n), dtype=bool)
    ends = (np.abs,) if spec.symmetric else (np.negative, np.positive)
    for a in range(0, k, size):
        for end in ends:
            g = end(w[a : a + size])
            if spec.granularity == "tensor":
                idx = np.unravel_index(int(np.argmax(g)), g.shape)
                mask[a + idx[0], idx[1]] = True
            else:
                mask[a + np.argmax(g, axis=0), np.arange(n)] = True
    return mask


def gptq_weight(w: np.ndarray, gram: np.ndarray, spec: QuantSpec, *, damp: float = DEFAULT_DAMP,
                block: int = DEFAULT_BLOCK, act_order: bool = True) -> np.ndarray:
    """w [K, N] rounded to spec's grid with error feedback under H = gram [K, K]; returns the dequantized weights.

    The result quantizes to itself with parameters from its own range (the lowering's round trip).
    """
    w0 = np.asarray(w, dtype=np.float32)
    k, n = w0.shape
    scale, zp = _element_scales(w0, spec)
    # Element-wise parameters: "tensor" granularity broadcasts full-shaped scales as they are.
    elementwise = dataclasses.replace(spec, granularity="tensor", axis=None, block_size=None)

    def fq(x: np.ndarray, rows: slice) -> np.ndarray:
        return quantize_dequantize(x, scale[rows], zp[rows], elementwise)

    pinned = _pinned(w0, spec)
    ends = fq(w0, slice(None))  # each pinned element sits on the grid's end exactly
    h = np.asarray(gram, dtype=np.float64).copy()
    work = w0.astype(np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    work[dead] = 0.0  # inputs never seen in calibration: nothing to measure their error against
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # Upper Cholesky factor of H^-1: row i holds the feedback weights for rounding input i.
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    work = work[order]
    out = np.empty((k, n), dtype=np.float32)
    for a in range(0, k, block):
        b = min(a + block, k)
        err = np.zeros((b - a, n))
        for i in range(a, b):
            src = order[i]
            q = fq(work[i : i + 1].astype(np.float32), slice(src, src + 1))[0]
            q = np.where(pinned[src], ends[src], q)
            e = (work[i] - q) / u[i, i]
            work[i + 1 : b] -= np.outer(u[i, i + 1 : b], e)
            err[i - a] = e
            out[src] = q
        work[b:] -= u[a:b, b:].T @ err
    return out


def output_error(w: np.ndarray, q: np.ndarray, gram: np.ndarray) -> float:
    """Sum over outputs of d^T H d, d = w - q: the squared output error on the calibration tokens.

    A reported ratio, not a rounding decision, so the product runs in float32 (relative error ~1e-6):
    in float64 it was an eighth of a 1.5 B block's compile (2.2 s per call on a 5632 x 2048 linear).
    """
    d = np.asarray(w, np.float32) - np.asarray(q, np.float32)
    return float(np.einsum("kn,kn->", np.asarray(gram, np.float32) @ d, d, dtype=np.float64))


class ErrorFeedbackRoundingPass(ir.passes.InPlacePass):
    """Round every block linear's weights with GPTQ error feedback, on calibration Gram matrices."""

    function_preserving = False

    def __init__(self, windows: TokenWindows, spec: QuantSpec, *, damp: float = DEFAULT_DAMP, act_order: bool = True,
                 progress: bool = True):
        super().__init__()
        if spec.granularity == "tensor":
            raise ValueError("gptq needs per-channel or per-group weight scales (per tensor would mix linears)")
        self.windows, self.spec, self.damp, self.act_order, self.progress = windows, spec, damp, act_order, progress
        self.error_ratio: dict[str, float] = {}
        self.rounded: list[str] = []  # the layers whose weights changed
        self.reason: str | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from qgraph.progress import track

        layers = [layer for layer in find_linears(model) if layer.role == "block"]
        if not layers:
            self.reason = "the graph has no block linear (MatMul/Gemm with a constant weight)"
            return ir.passes.PassResult(model, modified=False)
        by_input: dict[str, list] = {}
        for layer in layers:
            by_input.setdefault(layer.activation.name, []).append(layer)
        stats = collect_stats(model, list(by_input), self.windows, progress=self.progress, gram=True)
        for name, group in track(list(by_input.items()), "error-feedback rounding", total=len(by_input),
                                 enabled=self.progress):
            gram = stats[name].gram
            gram32 = gram.astype(np.float32)  # for the reported error ratios: one copy per shared input, not per call
            # Linears that read one input share H: round them as one wide matrix, one factorisation.
            weights = [weight_array(layer) for layer in group]
            wide = np.concatenate(weights, axis=1)
            rounded = gptq_weight(wide, gram, self.spec, damp=self.damp, act_order=self.act_order)
            start = 0
            for layer, w in zip(group, weights, strict=True):
                q = rounded[:, start : start + w.shape[1]]
                start += w.shape[1]
                plain = fake_quantize(w, self.spec)
                self.error_ratio[layer.name] = output_error(w, q, gram32) / max(output_error(w, plain, gram32), 1e-30)
                if not np.array_equal(q, w):  # else the weights sat on the grid already (rounded before)
                    set_linear_weight(model.graph, layer, np.ascontiguousarray(q))
                    self.rounded.append(layer.name)
        if not self.rounded:
            self.reason = f"the weights of all {len(layers)} block linears are on the grid already"
        return ir.passes.PassResult(model, modified=bool(self.rounded))

    def summary(self) -> dict:
        r = list(self.error_ratio.values())
        return {"layers": len(r), "rounded": len(self.rounded),
                "output_error_vs_round_to_nearest": float(np.mean(r)) if r else None,
                **({"reason": self.reason} if self.reason else {})}


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """A recipe's `gptq` options."""

    damp: float = option(DEFAULT_DAMP, "added to the diagonal of H, as a fraction of its mean (keeps H^-1 well conditioned)",
                         gt=0)
    act_order: bool = option(True, "round rows in order of decreasing H_kk (false: in input order)")


def _needs_scaled_weights(blocks) -> None:
    if blocks is None or blocks.weights is None or blocks.weights.granularity == "tensor":
        raise QGraphError("gptq rounds quantized weights with per-channel or per-group scales",
                          "set weights granularity: channel or group")


@register("gptq", GPTQOptions, help="GPTQ error-feedback rounding of the block weights (changes outputs)",
          requires=_needs_scaled_weights, last="move the weights off the grid gptq rounded them to")
def build(options: GPTQOptions, ctx: PassContext) -> ErrorFeedbackRoundingPass:
    """The error-feedback rounding for a recipe's weight format."""
    return ErrorFeedbackRoundingPass(ctx.windows, ctx.weight_spec, damp=options.damp, act_order=options.act_order,
                                     progress=ctx.progress)
