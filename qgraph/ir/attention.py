"""Attention blocks found on the graph: the key and value tensors a KV cache would hold.

softmax(Q K^T) V is found from its two MatMuls: the one that reads a Softmax (P V) and the one
whose output reaches that Softmax through the score's scale, mask and soft-cap ops (Q K^T). Each of
K and V is then followed back through layout-only ops -- Reshape, Transpose, Unsqueeze, Squeeze,
Expand (GQA's head repeat), a Mul or Div by a scalar constant (SDPA's split 1/sqrt(d) scale) -- to
the earliest value that is still the whole tensor: after the k/v projections' head split and RoPE,
before any head repeat, which is where a cache stores it.

Axes are found by size on one probe run of the graph, not assumed: the token axis is the one as
long as the probe (a prime length no other axis has), the channel axis the one of the head size
read from the MatMul (Q's last axis for K, V's last axis for V). A value whose sizes leave the
axes ambiguous ends the walk.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.ir.feeds import token_feeds
from qgraph.ir.regions import Rejection

LAYOUT_OPS = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity"}
# Between Q K^T and the Softmax: scale, additive mask, soft-capping (tanh), dtype casts.
SCORE_OPS = {"Add", "Mul", "Div", "Where", "Tanh", "Cast", "Sub"}
PROBE_LENGTHS = (11, 13, 17, 19, 23, 29, 31, 37)


@dataclasses.dataclass(frozen=True)
class CachedTensor:
    """A key or value tensor as a cache would store it, with its token and channel axes."""

    value: ir.Value
    token_axis: int
    channel_axis: int
    rank: int
    channels: int  # head size


@dataclasses.dataclass(frozen=True)
class Attention:
    """One softmax(Q K^T) V: its two MatMuls and the key and value tensors they read."""

    name: str
    scores: ir.Node  # Q K^T
    mix: ir.Node  # P V
    key: CachedTensor
    value: CachedTensor


def _is_scalar_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1


def _layout_input(node: ir.Node) -> ir.Value | None:
    """The tensor a layout-only node moves (None: the node computes something)."""
    if node.op_type in LAYOUT_OPS:
        return node.inputs[0]
    if node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
        a, b = node.inputs
        if _is_scalar_constant(b):
            return a
        if node.op_type == "Mul" and _is_scalar_constant(a):
            return b
    return None


def _chain(start: ir.Value) -> list[ir.Value]:
    """start and the values it is moved from by layout-only ops, nearest first."""
    out = [start]
    while (node := out[-1].producer()) is not None and (src := _layout_input(node)) is not None:
        out.append(src)
    return out


def _scores_matmul(softmax: ir.Node) -> ir.Node | None:
    value = softmax.inputs[0]
    for _ in range(8):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node if all(v is not None and v.const_value is None for v in node.inputs) else None
        if node.op_type not in SCORE_OPS:
            return None
        # Follow the input that carries the scores, not the mask or the constant.
        inputs = [v for v in node.inputs if v is not None and v.const_value is None]
        if node.op_type == "Where":
            inputs = inputs[1:]  # skip the condition
        value = next((v for v in inputs if v.producer() is not None and v.producer().op_type in SCORE_OPS | {"MatMul"}),
                     None)
    return None


def _mix_matmul(softmax: ir.Node) -> ir.Node | None:
    value = softmax.outputs[0]
    for _ in range(4):
        users = [u for u, _ in value.uses()]
        for user in users:
            if user.op_type == "MatMul" and user.inputs[0] is value and user.inputs[1].const_value is None:
                return user
        # A NaN guard or a cast between the Softmax and its MatMul.
        nxt = [u for u in users if u.op_type in ("Where", "Cast", "Identity", "Dropout")]
        if len(nxt) != 1:
            return None
        value = nxt[0].outputs[0]
    return None


def find_attention(model: ir.Model, probe=None) -> tuple[list[Attention], list[Rejection]]:
    """Every softmax(Q K^T) V in the graph with its cached K and V; the blocks it could not read, with why.

    probe(values, length) -> {name: shape} runs the graph on `length` tokens and returns the
    concrete shapes of the named values (default: ONNX Runtime on the float graph).
    """
    graph = model.graph
    found: list[tuple[ir.Node, ir.Node, ir.Node]] = []
    rejected: list[Rejection] = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        scores, mix = _scores_matmul(node), _mix_matmul(node)
        if scores is None or mix is None:
            rejected.append(Rejection(node.name, "no MatMul of two computed tensors before this Softmax and after it "
                                                 "(not a softmax(Q K^T) V)"))
            continue
        found.append((node, scores, mix))
    if not found:
        return [], rejected
    chains = {id(s): (_chain(s.inputs[1]), _chain(m.inputs[1])) for _, s, m in found}
    wanted = [s.inputs[0] for _, s, _ in found] + [v for k, vv in chains.values() for v in (*k, *vv)]
    length, shapes = _probe_shapes(model, wanted, probe)
    out: list[Attention] = []
    for softmax, scores, mix in found:
        k_chain, v_chain = chains[id(scores)]
        head_k = shapes[scores.inputs[0].name][-1]
        head_v = shapes[mix.inputs[1].name][-1]
        key = _cached(k_chain, shapes, length, head_k)
        value = _cached(v_chain, shapes, length, head_v)
        if key is None or value is None:
            what = "key" if key is None else "value"
            rejected.append(Rejection(scores.name, f"the {what} tensor read by {(scores if key is None else mix).name} "
                                                   f"has no single axis of {length} tokens and one of the head size "
                                                   f"{head_k if key is None else head_v}"))
            continue
        out.append(Attention(scores.name or softmax.name, scores, mix, key, value))
    return out, rejected


def _cached(chain: list[ir.Value], shapes: dict, length: int, head: int) -> CachedTensor | None:
    best = None
    for v in chain:
        shape = shapes[v.name]
        tokens, heads = [i for i, d in enumerate(shape) if d == length], [i for i, d in enumerate(shape) if d == head]
        if len(tokens) != 1 or len(heads) != 1 or length == head:
            break
        best = CachedTensor(v, tokens[0], heads[0], len(shape), int(head))
    return best


def _probe_shapes(model: ir.Model, values: list[ir.Value], probe) -> tuple[int, dict[str, tuple[int, ...]]]:
    dims = {d for v in values if v.shape is not None for d in v.shape if isinstance(d, int)}
    first = model.graph.inputs[0]
    fixed = first.shape[1] if first.shape is not None and len(first.shape) > 1 and isinstance(first.shape[1], int) else None
    length = fixed or next((n for n in PROBE_LENGTHS if n not in dims), PROBE_LENGTHS[-1])
    names = list(dict.fromkeys(v.name for v in values))
    return length, (probe or _ort_probe)(model, names, length)


def _ort_probe(model: ir.Model, names: list[str], length: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the named values on one run: every input batch 1, its second axis `length` where dynamic."""
    from qgraph.backends.onnx_qdq import session_with_outputs

    feeds = {}
    for v in model.graph.inputs:
        dims = [d if isinstance(d, int) else (length if i == 1 else 1) for i, d in enumerate(v.shape or [])]
        dtype = v.dtype.numpy() if v.dtype is not None else np.float32
        feeds[v.name] = np.ones(dims, dtype=dtype)  # token id 1, an all-ones mask, or unit floats
    feeds.update(token_feeds(model.graph.inputs, feeds[model.graph.inputs[0].name]))  # a KV graph: mask, positions, empty past
    session = session_with_outputs(model, names, threads=1, optimize=False)
    outs = session.run(names, feeds)
    return {n: tuple(int(d) for d in a.shape) for n, a in zip(names, outs, strict=True)}
