"""fold_batchnorm: BatchNormalization after a Conv / ConvTranspose / Gemm folded into its weight and bias.

Quantizing a convolution's weight before its norm is folded rounds the wrong numbers: the norm rescales
each output channel after the rounding. torch captures arrive folded (the exporter runs the same
rules); ONNX files from other tools often keep inference-mode BatchNormalization nodes. The fold is
onnxscript's own rewrite (W * gamma / std, (b - mean) * gamma / std + beta), run on every graph before
the recipe's passes, verified like every function-preserving pass.
"""

from __future__ import annotations

import onnx_ir as ir


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold inference-mode BatchNormalization into the Conv / ConvTranspose / Gemm before it."""

    function_preserving = True

    def __init__(self):
        super().__init__()
        self.folded = 0
        self.left: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        before = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
        if before:
            rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
            rewriter.RewritePass(rewriter.RewriteRuleSet(rules))(model)
        self.left = [n.name for n in model.graph if n.op_type == "BatchNormalization"]
        self.folded = before - len(self.left)
        return ir.passes.PassResult(model, modified=self.folded > 0)

    def summary(self) -> dict:
        # A norm left in place reads a run-time input or follows no foldable layer: it runs in float.
        return {"folded": self.folded, **({"left": self.left} if self.left else {})}
