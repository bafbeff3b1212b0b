"""Annotate the recipe's layers with QuantSpecs (intent only; backends lower it)."""

from __future__ import annotations

import onnx_ir as ir

from qgraph.ir.qspec import LayerAnnotation, QuantSpec, annotate
from qgraph.ir.regions import LinearLayer, find_linears
from qgraph.recipes import LayerRule, Recipe, TensorRule


def weight_spec(rule: TensorRule) -> QuantSpec:
    """Bind a weight rule to the logical [in, out] weight: channels are outputs, groups run along inputs."""
    if rule.granularity == "channel":
        return QuantSpec(rule.format, "channel", axis=1, symmetric=rule.symmetric, full_range=rule.full_range,
                         float_zero_point=rule.float_zero_point)
    if rule.granularity == "group":
        return QuantSpec(rule.format, "block", axis=0, block_size=rule.group_size, symmetric=rule.symmetric,
                         full_range=rule.full_range, float_zero_point=rule.float_zero_point)
    return QuantSpec(rule.format, "tensor", symmetric=rule.symmetric, full_range=rule.full_range)


def activation_spec(rule: TensorRule) -> QuantSpec:
    """Bind an activation rule: per tensor, per channel along the last (feature) axis, per token, per token group."""
    if rule.granularity == "channel":
        return QuantSpec(rule.format, "channel", axis=-1, symmetric=rule.symmetric, static=rule.static)
    if rule.granularity == "token":
        return QuantSpec(rule.format, "token", axis=-1, symmetric=rule.symmetric, static=False, clip=rule.clip)
    if rule.granularity == "group":  # a token's channels in groups (dynamic only: checked by the recipe)
        return QuantSpec(rule.format, "block", axis=-1, block_size=rule.group_size, symmetric=rule.symmetric,
                         static=rule.static, clip=rule.clip)
    return QuantSpec(rule.format, "tensor", symmetric=rule.symmetric, static=rule.static)


class AnnotateLinearsPass(ir.passes.InPlacePass):
    """Mark every layer the recipe selects with its weight/activation QuantSpec."""

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.annotated: dict[str, LayerAnnotation] = {}
        self.skipped: list[str] = []
        self.left_float: list[str] = []

    def _rule_for(self, layer: LinearLayer) -> LayerRule | None:
        return self.recipe.lm_head if layer.role == "lm_head" else self.recipe.blocks

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        skip = set(self.recipe.skip)
        for layer in find_linears(model):
            rule = self._rule_for(layer)
            if layer.name in skip:
                self.skipped.append(layer.name)
                continue
            if rule is None or rule.weights is None:
                self.left_float.append(layer.name)
                continue
            note = LayerAnnotation(
                layer=layer.name,
                weight=weight_spec(rule.weights),
                activation=activation_spec(rule.activations) if rule.activations else None,
                lowering=rule.lowering,
            )
            annotate(layer.node, note)
            self.annotated[layer.name] = note
        unknown = skip - set(self.skipped)
        if unknown:
            from qgraph.errors import QGraphError

            raise QGraphError(
                f"recipe {self.recipe.name}: layers.skip names layers not in the graph: {sorted(unknown)[:5]}",
                "use names that `qgraph inspect MODEL` lists",
            )
        return ir.passes.PassResult(model, modified=bool(self.annotated))

    def summary(self) -> dict:
        return {
            "annotated": len(self.annotated),
            "skipped_by_recipe": self.skipped,
            "left_float": self.left_float,
        }
