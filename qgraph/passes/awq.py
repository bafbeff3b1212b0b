"""AWQ (activation-aware weight quantization), weight-only: protect the salient input channels.

Per region, s_c = mean|X_c|^a (normalised to geometric mean 1), folded like SmoothQuant: the
sources emit X / s and the sink rows become s W before the weights are quantized. The strength a
is searched per region to minimise the sinks' output error with the weights quantized (the
activations stay float). The fold itself is exact; the verifier checks it.
"""

from __future__ import annotations

import numpy as np

from qgraph.passes.registry import PassContext, register
from qgraph.passes.smooth import SmoothOptions, SmoothQuantPass


class AWQPass(SmoothQuantPass):
    """Scale every legal region by AWQ factors searched against weight-only quantization error."""

    weight_only = True
    label = "AWQ scaling regions"

    def scales(self, act_max: np.ndarray, act_mean: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
        live = act_mean > 0
        s = np.ones_like(act_mean)
        if not live.any():  # a region whose input is all zero: nothing to protect
            return s
        s[live] = act_mean[live] ** alpha
        s[live] /= np.exp(np.log(s[live]).mean())  # geometric mean 1: only the relative scale matters
        return np.clip(s, 1e-4, 1e4)


@register("awq", SmoothOptions, help="AWQ scaling of salient input channels, for weight-only formats")
def build(options: SmoothOptions, ctx: PassContext) -> AWQPass:
    """The AWQ pass for a recipe, searching against its weight format (activations stay float)."""
    return AWQPass(ctx.windows, alpha=options.alpha, grid=options.grid, weight_spec=ctx.weight_spec,
                   sample_tokens=options.sample_tokens, progress=ctx.progress)
