"""Recognisers on the captured graph: linear layers, norms, embeddings.

Every pattern qgraph looks for lives here, so a pass asks one place "what is this node?"
and gets a reason when the answer is no. Channel regions (sources -> path -> sinks) build on
these recognisers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

Role = Literal["block", "lm_head"]
_BLOCK_NAME = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")


@dataclasses.dataclass
class LinearLayer:
    """A MatMul/Gemm whose second input is a constant weight: Y = X @ W (+ b)."""

    name: str
    node: ir.Node
    weight: ir.Value
    in_features: int
    out_features: int
    role: Role
    transposed: bool = False  # Gemm with transB=1 stores W as [out, in]

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]


@dataclasses.dataclass
class Norm:
    """A normalisation: the exporter's decomposed RMSNorm or a LayerNormalization node."""

    name: str
    kind: Literal["rmsnorm", "layernorm"]
    output_node: ir.Node
    gamma: ir.Value | None
    beta: ir.Value | None


def _const(value: ir.Value | None) -> ir.TensorProtocol | None:
    return None if value is None else value.const_value


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    if node.op_type == "MatMul" and len(node.inputs[1].shape or ()) == 2:
        if _const(node.inputs[1]) is not None:
            return node.inputs[1], False
        # A tied weight read as MatMul(x, Transpose(table)), e.g. lm_head sharing the embedding.
        t = _producer(node.inputs[1], "Transpose")
        if t is not None and _const(t.inputs[0]) is not None and list(t.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            return t.inputs[0], True
    if node.op_type == "Gemm" and _const(node.inputs[1]) is not None:
        return node.inputs[1], bool(node.attributes.get_int("transB", 0))
    return None


def _embedding_rows(graph: ir.Graph) -> set[int]:
    rows = set()
    for node in graph:
        if node.op_type == "Gather" and _const(node.inputs[0]) is not None and node.inputs[0].shape:
            rows.add(node.inputs[0].shape[0])
    return rows


def _feeds_output_directly(node: ir.Node, graph: ir.Graph) -> bool:
    """True when the node's output reaches a graph output without passing another MatMul/Gemm."""
    outputs = set(graph.outputs)
    frontier = list(node.outputs)
    seen: set[int] = set()
    while frontier:
        value = frontier.pop()
        if value in outputs:
            return True
        for user, _ in value.uses():
            if id(user) in seen or user.op_type in ("MatMul", "Gemm"):
                continue
            seen.add(id(user))
            frontier.extend(user.outputs)
    return False


def find_linears(model: ir.Model) -> list[LinearLayer]:
    """Every MatMul/Gemm with a constant weight, in graph order, with its role.

    The head is the last such layer feeding a graph output whose width is the embedding
    table's row count (a vocabulary); every other constant-weight linear is a block linear.
    Activation x activation MatMuls (attention scores, Softmax x V) have no constant weight
    and are never listed.
    """
    graph = model.graph
    vocab = _embedding_rows(graph)
    layers: list[LinearLayer] = []
    for node in graph:
        found = _weight_of(node)
        if found is None:
            continue
        weight, transposed = found
        shape = weight.shape
        k, n = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
        layers.append(LinearLayer(node.name or weight.name, node, weight, int(k), int(n), "block", transposed))
    for layer in reversed(layers):
        named_head = "lm_head" in layer.name or (
            layer.out_features in vocab and not _BLOCK_NAME.search(layer.name)
        )
        if named_head and _feeds_output_directly(layer.node, graph):
            layer.role = "lm_head"
            break
    return layers


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _match_rms_core(value: ir.Value) -> bool:
    """value = x * 1/sqrt(mean(x^2) + eps), as the exporter decomposes it."""
    mul = _producer(value, "Mul")
    if mul is None:
        return False
    for i in (0, 1):
        recip = _producer(mul.inputs[i], "Reciprocal")
        sqrt = _producer(recip.inputs[0], "Sqrt") if recip else None
        add = _producer(sqrt.inputs[0], "Add") if sqrt else None
        if add is None:
            continue
        for a in add.inputs:
            mean = _producer(a, "ReduceMean")
            if mean is not None and _producer(mean.inputs[0], "Pow") is not None:
                return True
    return False


def find_norms(model: ir.Model) -> list[Norm]:
    """RMSNorms (decomposed Pow..Mul(gamma)) and LayerNormalization nodes, in graph order."""
    norms: list[Norm] = []
    for node in model.graph:
        if node.op_type == "LayerNormalization":
            gamma = node.inputs[1] if len(node.inputs) > 1 else None
            beta = node.inputs[2] if len(node.inputs) > 2 else None
            name = gamma.name if gamma is not None else node.name
            norms.append(Norm(_strip_param(name), "layernorm", node, gamma, beta))
        elif node.op_type == "Mul":
            for i in (0, 1):
                gamma, other = node.inputs[i], node.inputs[1 - i]
                c = _const(gamma)
                if c is not None and len(gamma.shape or ()) == 1 and _match_rms_core(other):
                    norms.append(Norm(_strip_param(gamma.name), "rmsnorm", node, gamma, None))
                    break
    return norms


def find_embeddings(model: ir.Model) -> list[tuple[str, ir.Node]]:
    """Gather nodes that look up rows of a constant table."""
    return [
        (_strip_param(n.inputs[0].name), n)
        for n in model.graph
        if n.op_type == "Gather" and _const(n.inputs[0]) is not None and len(n.inputs[0].shape or ()) == 2
    ]


def _strip_param(name: str) -> str:
    name = name.removeprefix("net.")
    return name.removesuffix(".weight")


def weight_array(layer: LinearLayer) -> np.ndarray:
    """The layer's weight as a float32 [in, out] array."""
    w = layer.weight.const_value.numpy().astype(np.float32)
    return w.T if layer.transposed else w
