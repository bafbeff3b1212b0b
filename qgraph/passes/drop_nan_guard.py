"""drop_nan_guard: remove the exporter's `Where(IsNaN(p), 0, p)` after an attention Softmax.

torch's scaled_dot_product_attention decomposition guards every attention probability tensor
against rows that are masked entirely (softmax over -inf only is NaN; the guard makes it 0). On
SmolLM2 the 30 guards cost 10-12 % of a 512-token prefill in ONNX Runtime (IsNaN plus a
broadcasting Where over [heads, T, T]), in the float and in the quantized artifact alike.

The guard is dead when the scores reaching the Softmax are finite: softmax subtracts the row
maximum, so every exponent is <= 0, the row sum is >= 1, and no output is NaN. The scores are
Q K^T (finite for finite weights and token inputs; |score| < 1e31 keeps score + lowest finite)
plus an additive mask; the pass removes a guard only when that mask is a constant, or a Where
choosing between constants, whose values are all finite (torch.onnx writes masks with float32's
lowest value, not -inf, so a fully masked row is uniform, not NaN). A mask that is fed at run
time, or holds -inf, keeps its guard and the summary says why.

compile runs it on every graph before the recipe's passes (fp32 included), so float and quantized
artifacts are timed on the same attention. The rewrite is a peephole, so it uses onnxscript's
pattern rewriter; the finiteness check on the mask's constants is ours.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qgraph.ir.validate import constant_array


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return constant_array(value)  # a damaged tensor is a QGraphError naming it, as everywhere else
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _is_scores(value: ir.Value | None) -> bool:
    """Q K^T: a MatMul of two run-time values, possibly scaled by constants (Mul/Div) after it."""
    for _ in range(4):
        node = value.producer() if value is not None else None
        if node is None:
            return False
        if node.op_type == "MatMul":
            return all(_constant(v) is None for v in node.inputs)
        if node.op_type not in ("Mul", "Div"):
            return False
        runtime = [v for v in node.inputs if _constant(v) is None]
        if len(runtime) != 1 or not np.all(np.isfinite(_constant(next(v for v in node.inputs if v is not runtime[0])))):
            return False
        value = runtime[0]
    return False


def mask_refusal(scores: ir.Value) -> str | None:
    """None when the Softmax input is finite for finite Q K^T; else why the guard must stay."""
    if _is_scores(scores):
        return None
    node = scores.producer()
    if node is None or node.op_type != "Add":
        return f"the Softmax input comes from {node.op_type if node else 'a graph input'}, not Q K^T (+ mask)"
    terms = list(node.inputs)
    if not any(_is_scores(t) for t in terms):
        return "neither term of the Add before the Softmax is Q K^T"
    for term in [t for t in terms if not _is_scores(t)]:
        producer = term.producer() if term is not None else None
        values = ([_constant(v) for v in producer.inputs[1:]] if producer is not None and producer.op_type == "Where"
                  else [_constant(term)])
        if any(v is None for v in values):
            return f"the mask {term.name} is computed at run time: a row may be masked entirely"
        if not all(np.all(np.isfinite(v)) for v in values):
            return f"the mask {term.name} holds -inf/NaN: a fully masked row would be NaN without the guard"
    return None


class _SoftmaxNanGuard(pattern.RewriteRuleClassBase):
    """Where(IsNaN(Softmax(x)), 0, Softmax(x)) -> Softmax(x) when x is finite for finite inputs."""

    def __init__(self, refused: list[dict]):
        super().__init__(name="drop_softmax_nan_guard", remove_nodes=True)
        self.refused = refused

    def pattern(self, op, x):
        probs = op.Softmax(x, _allow_other_attributes=True, _outputs=["probs"])
        return op.Where(op.IsNaN(probs), 0.0, probs)

    def check(self, context, x: ir.Value, probs: ir.Value, **_) -> bool:
        reason = mask_refusal(x)
        if reason is not None:
            self.refused.append({"candidate": probs.producer().name, "reason": reason})
        return reason is None

    def rewrite(self, op, x: ir.Value, probs: ir.Value, **_):
        # The matched Softmax is removed with the guard: emit it again with its own axis.
        return op.Softmax(x, axis=probs.producer().attributes.get_int("axis", -1))


class DropNanGuardPass(ir.passes.InPlacePass):
    """Remove attention NaN guards that can never fire (finite masks); exact for finite inputs."""

    function_preserving = True

    def __init__(self):
        super().__init__()
        self.removed = 0
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript import rewriter

        rule = _SoftmaxNanGuard.rule(self.refused)
        before = sum(1 for n in model.graph if n.op_type == "IsNaN")
        rewriter.RewritePass(pattern.RewriteRuleSet([rule]))(model)  # in place, as this pass promises
        self.removed = before - sum(1 for n in model.graph if n.op_type == "IsNaN")
        return ir.passes.PassResult(model, modified=self.removed > 0)

    def summary(self) -> dict:
        return {"removed": self.removed, "refused": self.refused}

