"""Cut a captured graph into parts (prologue, one part per repeated block, epilogue) and join parts back.

The streaming compile (qgraph.streaming) compiles one part at a time: a part is extracted as a
standalone model whose inputs are the values it reads from earlier parts (hidden state, rotary
cos/sin, mask) and whose outputs are the values later parts read. Blocks are found from the
exporter's module scopes: the numbered children of the module list that holds most nodes
(`model.layers.0`, `model.layers.1`, ...), so no per-architecture layer map is written here.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import onnx_ir as ir

from qgraph.errors import QGraphError

SCOPE_KEY = "qgraph.scope"  # node.meta: the module path list the exporter recorded (set at capture)
_NUMBERED = re.compile(r"^(.+)\.(\d+)$")


@dataclasses.dataclass
class Part:
    """Nodes of one part (by position in the graph), the boundary values it reads and writes."""

    name: str
    nodes: list[int]
    inputs: list[str]
    outputs: list[str]
    shared: list[str] = dataclasses.field(default_factory=list)  # large initializers other parts read too


SHARED_SUFFIX = "__read_elsewhere"


def _block_of(node: ir.Node) -> tuple[str, int] | None:
    for path in node.meta.get(SCOPE_KEY, ()):
        m = _NUMBERED.match(path)
        if m:
            return m.group(1), int(m.group(2))
    return None


def _wrapper_stripped(prefix: str) -> str:
    return prefix.split(".", 1)[1] if prefix.startswith("net.") else prefix


def partition(model: ir.Model) -> list[Part]:
    """Prologue, blocks in order, epilogue. Raises when the graph has no repeated blocks or they interleave."""
    nodes = list(model.graph)
    for node in nodes:
        if any(a.type == ir.AttributeType.GRAPH or a.type == ir.AttributeType.GRAPHS for a in node.attributes.values()):
            raise QGraphError(f"node {node.name or node.op_type!r} holds a subgraph ({node.op_type})",
                              "streaming compiles straight-line graphs; compile without --stream")
    blocks = [_block_of(n) for n in nodes]
    lists = Counter(b[0] for b in blocks if b is not None)
    if not lists:
        raise QGraphError("no repeated blocks found in the graph (no numbered module scopes such as model.layers.0)",
                          "streaming needs a torch / Hugging Face capture of a model built from a list of blocks; "
                          "compile without --stream")
    prefix = lists.most_common(1)[0][0]
    index = [b[1] if b is not None and b[0] == prefix else None for b in blocks]
    # Nodes outside the blocks: epilogue when they read (transitively) from a block, prologue otherwise.
    late: set[int] = set()
    position = {id(n): i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        if index[i] is not None:
            continue
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and (index[position[id(p)]] is not None or position[id(p)] in late):
                late.add(i)
                break
    numbers = sorted({i for i in index if i is not None})
    groups: dict[str, list[int]] = {"prologue": []}
    for b in numbers:
        groups[f"{_wrapper_stripped(prefix)}.{b}"] = []
    groups["epilogue"] = []
    for i in range(len(nodes)):
        key = "epilogue" if i in late else "prologue" if index[i] is None else f"{_wrapper_stripped(prefix)}.{index[i]}"
        groups[key].append(i)
    order = list(groups)
    owner = {i: order.index(k) for k, members in groups.items() for i in members}
    cheap = _data_free(nodes, position)
    parts = []
    for k, name in enumerate(order):
        members = set(groups[name])
        reads: list[str] = []
        stack = [v for i in groups[name] for v in nodes[i].inputs]
        while stack:
            v = stack.pop()
            if v is None or v.is_initializer() or v.name in reads:
                continue
            p = v.producer()
            if p is None:
                if v.const_value is None:  # a graph input
                    reads.append(v.name)
                continue
            j = position[id(p)]
            if j in members:
                continue
            if cheap[j]:  # shapes, positions, masks, rotary tables: recomputed here from the graph inputs
                members.add(j)
                stack.extend(p.inputs)
                continue
            if owner[j] > k:
                raise QGraphError(f"part {name} reads {v.name!r}, which the later part {order[owner[j]]} computes",
                                  "the blocks of this graph are not in sequence; compile without --stream")
            reads.append(v.name)
        parts.append(Part(name, sorted(members), reads, []))
    graph_outputs = {v.name for v in model.graph.outputs}
    read = {name for p in parts for name in p.inputs}
    for p in parts:  # drop what a part would compute for nobody (a recomputable chain left in the prologue)
        live: set[int] = set()
        members = set(p.nodes)
        for i in sorted(p.nodes, reverse=True):
            if any(o.name in graph_outputs or o.name in read or any(
                    position[id(u.node)] in live and position[id(u.node)] in members for u in o.uses())
                   for o in nodes[i].outputs):
                live.add(i)
        p.nodes = sorted(live)
    readers: dict[str, set[int]] = {}
    for k, p in enumerate(parts):
        for i in p.nodes:
            for v in nodes[i].inputs:
                if v is not None and v.is_initializer() and v.const_value is not None and v.const_value.size > _SMALL_CONSTANT:
                    readers.setdefault(v.name, set()).add(k)
    for k, p in enumerate(parts):
        p.shared = sorted(name for name, ks in readers.items() if k in ks and len(ks) > 1)
    for k, p in enumerate(parts):
        p.outputs = [o.name for i in groups[order[k]] for o in nodes[i].outputs if o.name in graph_outputs or o.name in read]
    return [p for p in parts if p.nodes]


# A computation is recomputed by each part that needs it, rather than passed between parts, unless it
# combines a graph input with a large constant (the embedding lookup) or reads a block's output.
# Recomputed: shape arithmetic, position ids, the causal mask, rotary cos/sin (graph inputs and small
# constants), and weight-only chains such as the lm_head's Transpose (constants only; folded in the part).
_SMALL_CONSTANT = 4096


def _data_free(nodes: list[ir.Node], position: dict[int, int]) -> list[bool]:
    """Per node: whether the part that reads its output can recompute it (see the comment above)."""
    cheap = [False] * len(nodes)
    from_input = [False] * len(nodes)
    heavy = [False] * len(nodes)
    for i, node in enumerate(nodes):  # graph order is topological
        ok = True
        for v in node.inputs:
            if v is None:
                continue
            p = v.producer()
            if p is not None:
                j = position[id(p)]
                ok = ok and cheap[j]
                from_input[i] |= from_input[j]
                heavy[i] |= heavy[j]
            elif v.const_value is not None:
                heavy[i] |= v.const_value.size > _SMALL_CONSTANT
            else:
                from_input[i] = True
        cheap[i] = ok and not (from_input[i] and heavy[i])
    return cheap


def extract(model: ir.Model, part: Part) -> ir.Model:
    """The part as a standalone model: boundary reads become graph inputs, boundary writes graph outputs.

    Initializers are shared with `model` (onnx_ir's clone shares tensors), so no weight is copied. A large
    initializer another part reads too (a tied embedding table) also feeds an Identity output named
    `<name>__read_elsewhere`: the passes then see what the whole graph shows them, a weight with a reader
    outside their region, which they must not change in place. `append_part` drops those outputs.
    """
    sub = model.clone()
    graph = sub.graph
    nodes = list(graph)
    keep = set(part.nodes)
    produced = {o.name: o for n in nodes for o in n.outputs}
    originals = {v.name: v for v in graph.inputs}
    inputs = []
    for name in part.inputs:
        if name in originals:
            inputs.append(originals[name])
            continue
        outer = produced[name]
        inner = ir.Value(name=name, type=outer.type, shape=outer.shape)
        outer.name = f"{name}__outer"
        outer.replace_all_uses_with(inner)
        inputs.append(inner)
    outputs = [produced[name] for name in part.outputs]
    graph.outputs.clear()
    graph.inputs.clear()
    dropped = [n for i, n in enumerate(nodes) if i not in keep]
    graph.remove(dropped, safe=False)
    for node in dropped:  # a removed node still counts as a use of its inputs until it lets go of them
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
    graph.inputs.extend(inputs)
    graph.outputs.extend(outputs)
    for name in part.shared:
        pin = ir.node("Identity", [graph.initializers[name]], name=f"{name}{SHARED_SUFFIX}")
        pin.outputs[0].name = f"{name}{SHARED_SUFFIX}"
        graph.append(pin)
        graph.outputs.append(pin.outputs[0])
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        del graph.initializers[name]
    return sub


def append_part(whole: ir.Model, part: ir.Model, tag: str) -> None:
    """Move a compiled part's nodes and initializers into `whole`, wiring its inputs to values already there.

    Value and node names the part made that `whole` already uses (exporter counters, a pass's generic
    helper names) get `__<tag>` appended.
    """
    graph = whole.graph
    known: dict[str, ir.Value] = {v.name: v for v in graph.inputs}
    for node in graph:
        for o in node.outputs:
            known[o.name] = o
    for name, v in graph.initializers.items():
        known[name] = v
    node_names = {n.name for n in graph}
    for v in part.graph.inputs:
        if v.name not in known:
            raise QGraphError(f"part {tag} reads {v.name!r}, which no earlier part writes",
                              "this is a qgraph bug: report it with the model")
        v.replace_all_uses_with(known[v.name])
    for name, v in list(part.graph.initializers.items()):
        del part.graph.initializers[name]
        if name in known:
            v.name = f"{name}__{tag}"
        graph.register_initializer(v)
        known[v.name] = v
    pins = [v.producer() for v in part.graph.outputs if v.name.endswith(SHARED_SUFFIX)]
    boundary = {id(v) for v in part.graph.outputs if not v.name.endswith(SHARED_SUFFIX)}
    part.graph.outputs.clear()
    part.graph.remove(pins, safe=True)
    moved = list(part.graph)
    part.graph.remove(moved, safe=False)
    for node in moved:
        if node.name and node.name in node_names:
            node.name = f"{node.name}__{tag}"
        node_names.add(node.name)
        for o in node.outputs:
            if o.name in known and id(o) not in boundary:
                o.name = f"{o.name}__{tag}"
            known[o.name] = o
    graph.extend(moved)
