"""Annotate the recipe's layers with QuantSpecs (intent only; backends lower it)."""

from __future__ import annotations

import onnx_ir as ir

from qgraph.ir.convs import ConvLayer, find_convs, quantized_output
from qgraph.ir.qspec import LayerAnnotation, QuantSpec, annotate
from qgraph.ir.regions import LinearLayer, find_linears
from qgraph.passes.split_fused_linears import fused_name
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


def conv_refusal(layer: ConvLayer, rule: LayerRule) -> str | None:
    """Why a convolution stays float under the block rule (None: it is quantized with it)."""
    w, a = rule.weights, rule.activations
    if rule.lowering != "qdq":
        return f"lowering {rule.lowering} has no convolution form (MatMulNBits is a matrix product)"
    if w.granularity not in ("channel", "tensor") or w.format not in ("int8", "int7", "uint8"):
        return f"{w.format} {w.granularity} weights have no ONNX Runtime convolution kernel (QLinearConv takes 8-bit " \
               "weights per tensor or per output channel)"
    if a is not None and (not a.static or a.granularity != "tensor" or a.format not in ("int8", "uint8")):
        return f"{'static' if a.static else 'run-time'} {a.format} per-{a.granularity} activations: QLinearConv takes " \
               "one static 8-bit scale per input tensor"
    return None


def conv_weight_spec(layer: ConvLayer, rule: TensorRule) -> QuantSpec:
    """A convolution's weight rule: channels are output channels (axis 0 of Conv, 1 of ConvTranspose)."""
    if rule.granularity == "channel":
        return QuantSpec(rule.format, "channel", axis=layer.out_axis, symmetric=rule.symmetric, full_range=rule.full_range)
    return QuantSpec(rule.format, "tensor", symmetric=rule.symmetric, full_range=rule.full_range)


class AnnotateLinearsPass(ir.passes.InPlacePass):
    """Mark every layer the recipe selects with its weight/activation QuantSpec.

    Convolutions take the block rule too, where an ONNX Runtime convolution kernel can run it;
    otherwise they stay float and `conv_refused` says why.
    """

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.annotated: dict[str, LayerAnnotation] = {}
        self.skipped: list[str] = []
        self.left_float: list[str] = []
        self.conv_refused: dict[str, str] = {}

    def _rule_for(self, layer: LinearLayer) -> LayerRule | None:
        return self.recipe.lm_head if layer.role == "lm_head" else self.recipe.blocks

    def _note(self, layer: LinearLayer | ConvLayer, rule: LayerRule) -> LayerAnnotation | None:
        """The layer's annotation under its rule; None (and the reason kept) for a convolution it cannot take."""
        a = rule.activations
        activation = activation_spec(a) if a else None
        if isinstance(layer, LinearLayer):
            return LayerAnnotation(layer=layer.name, weight=weight_spec(rule.weights), activation=activation,
                                   lowering=rule.lowering)
        reason = conv_refusal(layer, rule)
        if reason is not None:
            self.conv_refused[layer.name] = reason
            return None
        output = quantized_output(layer, through_activation=not a.symmetric) if a else None
        return LayerAnnotation(layer=layer.name, weight=conv_weight_spec(layer, rule.weights), activation=activation,
                               lowering="qdq", output=output.name if output is not None else None)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        skip, named = set(self.recipe.skip), set()
        layers: list[LinearLayer | ConvLayer] = [*find_linears(model), *find_convs(model)]
        for layer in layers:
            rule = self._rule_for(layer) if isinstance(layer, LinearLayer) else self.recipe.blocks
            # A fused projection split for the region passes (qkv_proj.part0..2) is skipped under its own name too.
            hit = {layer.name, fused_name(layer.name)} & skip
            if hit:
                named |= hit
                self.skipped.append(layer.name)
                continue
            note = self._note(layer, rule) if rule is not None and rule.weights is not None else None
            if note is None:
                self.left_float.append(layer.name)
                continue
            annotate(layer.node, note)
            self.annotated[layer.name] = note
        unknown = skip - named
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
            **({"convs_left_float": self.conv_refused} if self.conv_refused else {}),
        }
