"""Checks on a captured graph before it is compiled: what qgraph refuses, and what it leaves in float.

Refused (QGraphError naming the node or initializer): ops from a domain ONNX Runtime does not know
(qgraph runs every graph it compiles there), non-finite weights (no scale can be computed from
them), and graph inputs besides the token ids that have no value when calibration has to run the
graph. Left in float and listed in the report: linears inside control flow (If / Loop / Scan bodies)
and linears whose weight is a graph input (fed at run time, so not a constant to quantize).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.ir.feeds import fed_from_ids, reads_tokens

# The default ONNX domain (two spellings), ONNX-ML and ONNX Runtime's contrib ops (MatMulNBits, ...).
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
# What qgraph.backends.ort_attention writes into a runtime graph (and onnxruntime-genai's builder emits).
FUSED_FOR_RUNTIME = frozenset({"GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                               "MultiHeadAttention", "RotaryEmbedding"})


def _nodes(graph: ir.Graph, where: str | None = None) -> Iterator[tuple[ir.Node, str | None]]:
    """Every node with the control-flow body it sits in (None for the main graph), subgraphs included."""
    for node in graph:
        yield node, where
        for attr in node.attributes.values():
            bodies = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for body in bodies:
                yield from _nodes(body, f"the {attr.name} of {node.op_type} {node.name!r}")


def extra_inputs(model: ir.Model) -> list[str]:
    """Graph inputs after the token ids with no default value: qgraph has nothing to feed them.

    A KV-cache graph's mask, positions and past are fed from the ids (`qgraph.ir.feeds`)."""
    return [v.name for v in model.graph.inputs[1:] if v.const_value is None and not fed_from_ids(v.name)]


def check_compilable(model: ir.Model, *, runs_graph: bool) -> None:
    """Raise QGraphError for a graph qgraph cannot compile; runs_graph: the recipe calibrates or verifies."""
    functions = {(f.domain, f.name) for f in model.functions.values()}
    for node, where in _nodes(model.graph):
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in functions:
            inside = f" (in {where})" if where else ""
            raise QGraphError(
                f"node {node.name!r}{inside} is {node.domain}::{node.op_type}, an op domain ONNX Runtime does not know",
                "export the model with standard ONNX ops (or ONNX Runtime's com.microsoft ops): "
                "qgraph runs every graph it compiles in ONNX Runtime",
            )
        if node.op_type in FUSED_FOR_RUNTIME:  # SimplifiedLayerNormalization sits in the ONNX domain in ORT
            raise QGraphError(
                f"node {node.name!r} is ONNX Runtime's fused {node.op_type}: this is a runtime graph "
                "(model.ort.onnx or an onnxruntime-genai folder's model), whose attention and norms qgraph's passes cannot read",
                "compile from the artifact's model.onnx (same weights, unfused), the checkpoint or the .gguf",
            )
    for value, what in _weights(model):
        _check_finite(value, what)
    missing = extra_inputs(model)
    if runs_graph and missing and reads_tokens(model.graph.inputs):  # tensor models: a feed per input (calib.tensors)
        several = len(missing) > 1
        raise QGraphError(
            f"graph input{'s' if several else ''} {', '.join(map(repr, missing))} {'have' if several else 'has'} no "
            f"value, and calibration feeds only the token ids ({model.graph.inputs[0].name!r})",
            f"store {'them' if several else 'it'} as initializers (default values), or use a recipe without "
            "calibration (fp32, w4a16)",
        )


def _weights(model: ir.Model) -> Iterator[tuple[ir.Value, str]]:
    """The constants qgraph quantizes or folds into: linear weights and biases, embedding tables, norm affines."""
    from qgraph.ir.regions import find_embeddings, find_linears, find_norms, linear_bias

    seen: set[int] = set()

    def new(value: ir.Value | None) -> bool:
        fresh = value is not None and value.const_value is not None and id(value) not in seen
        if fresh:
            seen.add(id(value))
        return fresh

    for layer in find_linears(model):
        if new(layer.weight):
            yield layer.weight, f"the weight of linear {layer.name!r}"
        bias, _ = linear_bias(layer)
        if new(bias):
            yield bias, f"the bias of linear {layer.name!r}"
    for name, node in find_embeddings(model):
        if new(node.inputs[0]):
            yield node.inputs[0], f"the embedding table {name!r}"
    for norm in find_norms(model):
        for value, part in ((norm.gamma, "scale"), (norm.beta, "bias")):
            if new(value):
                yield value, f"the {part} of norm {norm.name!r}"


def _check_finite(value: ir.Value, what: str) -> None:
    array = value.const_value.numpy()
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    first = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
    raise QGraphError(
        f"initializer {value.name!r} ({what}) has {nan} NaN and {inf} infinite values (first at index {first})",
        "fix the source model's weights: no quantization scale can be computed from non-finite values",
    )


def left_in_float(model: ir.Model) -> list[dict]:
    """MatMul / Gemm nodes qgraph does not quantize although they may carry a weight, with the reason."""
    from qgraph.ir.regions import find_linears

    linears = {id(layer.node) for layer in find_linears(model)}
    notes = []
    for node, where in _nodes(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or id(node) in linears:
            continue
        name = node.name or node.outputs[0].name
        weight = node.inputs[1]
        if where is not None:
            notes.append({"node": name, "reason": f"inside {where}: qgraph quantizes linears of the main graph only"})
        elif weight is not None and weight.is_graph_input():
            notes.append({"node": name, "reason": f"its weight {weight.name!r} is a graph input (fed at run time), "
                                                  "not a constant"})
    return notes


def external_data_problem(path: str | Path) -> str | None:
    """What is wrong with an .onnx file's external data (a file missing or too short), or None.

    Reads only the graph, not the data, so it is cheap enough to run when a load has failed.
    """
    try:
        model = ir.load(path)
    except Exception:  # the .onnx itself is damaged: the caller's message says so
        return None
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data = Path(tensor.path)
        if not data.is_file():
            return f"its external data file {str(data)!r} (initializer {value.name!r}) is missing"
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
        size = data.stat().st_size
        if size < end:
            return (f"its external data file {str(data)!r} is truncated: {size} bytes, initializer {value.name!r} "
                    f"ends at byte {end}")
    return None
