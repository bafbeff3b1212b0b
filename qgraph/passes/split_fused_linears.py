"""split_fused_linears: a fused projection whose output is cut by Split / Slice becomes one linear per part.

Phi-3's qkv_proj and gate_up_proj, GPT-2's c_attn (Conv1D: a Gemm, a Reshape, a Split) and Falcon's
query_key_value (a Reshape to heads, a Split along them) compute several layers in one MatMul and cut
the result. A channel region cannot pass the cut: q and k go on to RoPE and the scores, v to o_proj,
so a scale on the fused output has nowhere to go for q and k. Cut the weight instead:

    Split(Reshape(X @ W + b)) -> Reshape_i(X @ W[:, lo_i:hi_i] + b[lo_i:hi_i])

Exact in float (each part's columns are the same dot products), so v -> o_proj, up -> down and the
norm -> q, k, v regions appear as in a Llama, and every region pass works unchanged. The cut must fall
on whole units of the channel axis: the last axis, or the first of the trailing axes a Reshape splits
it into (Falcon's heads). A linear whose output anything else reads stays fused (listed in the summary
with the reason). This rewrite is written by hand: onnxscript's rewriter matches fixed patterns, and
the cut here depends on the Split sizes, Slice bounds and the Reshape's trailing dims.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from qgraph.ir.regions import LinearLayer, find_linears, linear_bias, weight_array
from qgraph.ir.rewrite import NodeChain
from qgraph.ir.validate import constant_array

_INT64_MAX = np.iinfo(np.int64).max


class SplitFusedLinearsPass(ir.passes.InPlacePass):
    """One linear per Split / Slice part of a fused projection (verified: function-preserving)."""

    function_preserving = True

    def __init__(self):
        super().__init__()
        self.split: dict[str, list[str]] = {}  # fused linear -> its parts '<name>.part<i> [lo:hi]'
        self.kept: dict[str, str] = {}  # fused linear left as it is -> why

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for layer in find_linears(model):
            if layer.role != "block":
                continue
            cut = _cut(layer)
            if isinstance(cut, str):
                if cut:
                    self.kept[layer.name] = cut
                continue
            self.split[layer.name] = _split(model.graph, layer, *cut)
        return ir.passes.PassResult(model, modified=bool(self.split))

    def summary(self) -> dict:
        return {"linears_split": len(self.split), "parts": self.split, **({"kept_fused": self.kept} if self.kept else {})}


def has_fused_linears(model: ir.Model) -> bool:
    """A block linear whose output a Split / Slice cuts (possibly after a Reshape)."""
    return any(layer.role == "block" and not isinstance(_cut(layer), str) for layer in find_linears(model))


def regions_as_compiled(model: ir.Model):
    """(regions, rejected, split pass) on a copy with fused projections split, as a recipe with passes sees them."""
    from qgraph.ir.regions import find_regions

    model = model.clone()
    split = SplitFusedLinearsPass()
    split(model)
    return (*find_regions(model), split)


def fused_name(name: str) -> str:
    """The fused projection a part came from ('qkv_proj.part2' -> 'qkv_proj'); other names unchanged."""
    return re.sub(r"\.part\d+$", "", name)


def _cut(layer: LinearLayer):
    """(carrier, reshape, axis, unit, parts) when the layer's output is only cut into parts, else a reason
    ('' when nothing cuts it at all: an ordinary linear)."""
    bias, bias_node = linear_bias(layer)
    out = bias_node.outputs[0] if bias_node is not None else layer.node.outputs[0]
    if layer.transposed and layer.node.op_type == "MatMul":
        return ""  # reads a shared table through a Transpose (a tied head), never a fused projection
    uses = list(out.uses())
    reshape = uses[0].node if len(uses) == 1 and uses[0].node.op_type == "Reshape" and uses[0].idx == 0 else None
    carrier = reshape.outputs[0] if reshape is not None else out
    cutters = [u.node for u in carrier.uses()]
    if not cutters or not any(n.op_type in ("Split", "Slice") for n in cutters):
        return ""
    if out.is_graph_output() or carrier.is_graph_output():
        return "its output is a graph output"
    if bias is not None and bias.const_value is not None and bias.const_value.size != layer.out_features:
        return f"its bias {bias.name} is not one value per output channel"
    dims = list(carrier.shape or [])
    if not dims or (reshape is None and dims[-1] != layer.out_features):
        return f"the shape of {carrier.name} is unknown"
    axis = _unit_axis(dims, layer.out_features) if reshape is not None else len(dims) - 1
    if axis is None:
        return f"Reshape {reshape.name} does not split the channel axis into static trailing axes"
    unit = layer.out_features // int(dims[axis])
    parts = []
    for node in cutters:
        found = _parts(node, axis, len(dims), int(dims[axis]))
        if isinstance(found, str):
            return found
        parts += [(value, lo * unit, hi * unit) for value, lo, hi in found]
    if any(value.is_graph_output() for value, _, _ in parts):
        return "a part is a graph output"
    return carrier, reshape, axis, unit, parts


def _unit_axis(dims: list, channels: int) -> int | None:
    """The first of the static trailing axes whose sizes multiply to the channel count."""
    size = 1
    for axis in range(len(dims) - 1, -1, -1):
        if not isinstance(dims[axis], int):
            return None
        size *= dims[axis]
        if size == channels:
            return axis
        if size > channels:
            return None
    return None


def _parts(node: ir.Node, axis: int, rank: int, size: int):
    """[(output, lo, hi)] along `axis` in units of that axis, or the reason the node is not a clean cut."""
    name = f"{node.name} ({node.op_type})"
    if node.op_type == "Split":
        if node.attributes.get_int("axis", 0) % rank != axis:
            return f"{name} cuts another axis than the channels'"
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            if node.inputs[1].const_value is None:
                return f"{name} has run-time split sizes"
            sizes = [int(s) for s in constant_array(node.inputs[1]).reshape(-1)]
        else:  # opset 18: num_outputs equal parts, the last one smaller
            count = len(node.outputs)
            step = -(-size // count)
            sizes = [min(step, size - i * step) for i in range(count)]
        bounds = np.cumsum([0, *sizes])
        return [(out, int(bounds[i]), int(bounds[i + 1])) for i, out in enumerate(node.outputs)]
    if node.op_type == "Slice":
        consts = [v.const_value is not None if v is not None else True for v in node.inputs[1:]]
        if not all(consts):
            return f"{name} has run-time bounds"
        starts, ends = (int(constant_array(node.inputs[i]).reshape(-1)[0]) for i in (1, 2))
        axes = constant_array(node.inputs[3]).reshape(-1) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
        steps = constant_array(node.inputs[4]).reshape(-1) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if len(axes) != 1 or int(axes[0]) % rank != axis or int(steps[0]) != 1:
            return f"{name} is not a unit-step slice of the channel axis"
        lo, hi = (min(max(b + size if b < 0 else b, 0), size) for b in (starts, min(ends, _INT64_MAX)))
        return [(node.outputs[0], lo, hi)] if hi > lo else f"{name} is empty"
    return f"{name} also reads the fused output"


def _split(graph: ir.Graph, layer: LinearLayer, carrier: ir.Value, reshape: ir.Node | None, axis: int, unit: int,
           parts: list) -> list[str]:
    node = layer.node
    bias, bias_node = linear_bias(layer)
    w = weight_array(layer)
    b = constant_array(bias).reshape(-1) if bias is not None else None
    first = reshape or next(u.node for u in carrier.uses())
    chain = NodeChain(graph, layer.name)
    if reshape is not None and reshape.inputs[1].const_value is None:
        head = chain.op("Slice", [reshape.inputs[1], chain.const("shape_head_start", np.array([0])),
                                  chain.const("shape_head_end", np.array([axis]))], "shape_head")
    names, cutters = [], {id(u.node): u.node for u in carrier.uses()}
    out_dims = list((bias_node or node).outputs[0].shape)

    def shaped(v: ir.Value, width: int) -> ir.Value:  # the region walk reads ranks and the channel size
        v.shape, v.type = ir.Shape([*out_dims[:-1], width]), node.outputs[0].type
        return v

    for i, (value, lo, hi) in enumerate(parts):
        if not list(value.uses()):
            continue  # a part nobody reads: its columns are dropped
        part = f"part{i}"
        w_part = w[:, lo:hi]
        stored = np.ascontiguousarray(w_part.T if layer.transposed else w_part)
        inputs = [node.inputs[0], chain.const(f"{part}.weight", stored.astype(constant_array(layer.weight).dtype))]
        if node.op_type == "Gemm" and b is not None:
            inputs.append(chain.const(f"{part}.bias", b[lo:hi]))
        attrs = {k: a.value for k, a in node.attributes.items()}
        y = shaped(chain.op(node.op_type, inputs, part, **attrs), hi - lo)
        if bias_node is not None and bias_node.op_type == "Add":
            y = shaped(chain.op("Add", [y, chain.const(f"{part}.bias", b[lo:hi])], f"{part}.bias_add"), hi - lo)
        if reshape is not None:
            trailing = np.array([(hi - lo) // unit, *(int(d) for d in carrier.shape[axis + 1:])], dtype=np.int64)
            if reshape.inputs[1].const_value is not None:
                target = chain.const(f"{part}.shape",
                                     np.concatenate([constant_array(reshape.inputs[1]).reshape(-1)[:axis], trailing]))
            else:
                target = chain.op("Concat", [head, chain.const(f"{part}.trailing", trailing)], f"{part}.shape", axis=0)
            y = chain.op("Reshape", [y, target], f"{part}.reshape", **{k: a.value for k, a in reshape.attributes.items()})
        y.shape, y.type = value.shape, value.type
        ir.convenience.replace_all_uses_with(value, y)
        names.append(f"{layer.name}.{part} [{lo}:{hi}]")
    graph.insert_before(first, chain.nodes)
    dead = [*cutters.values(), *([reshape] if reshape is not None else []),
            *([bias_node] if bias_node is not None and bias_node is not node else []), node]
    graph.remove(dead, safe=True)
    for value in (layer.weight, bias):
        if value is not None and value.name in graph.initializers and not list(value.uses()):
            graph.initializers.pop(value.name)
    return names
