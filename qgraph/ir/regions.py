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

from qgraph.ir.feeds import CACHE_INPUT, CACHE_OUTPUT
from qgraph.ir.hadamard import ONLINE_PREFIX
from qgraph.ir.rewrite import add_initializer
from qgraph.ir.validate import check_nodes, constant_array

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
    # An initializer that is also a graph input is only a default: the caller may feed another value.
    return None if value is None or value.is_graph_input() else value.const_value


def _matrix(value: ir.Value | None) -> bool:
    """A constant 2-D weight whose declared shape is its data's (a damaged file may say otherwise)."""
    c = _const(value)
    dims = list(value.shape or ()) if c is not None else []
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and dims == list(c.shape)


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    if node.op_type == "MatMul" and len(node.inputs[1].shape or ()) == 2:
        if _matrix(node.inputs[1]):
            return node.inputs[1], False
        # A tied weight read as MatMul(x, Transpose(table)), e.g. lm_head sharing the embedding.
        t = _producer(node.inputs[1], "Transpose")
        if t is not None and _matrix(t.inputs[0]) and list(t.attributes.get_ints("perm", [1, 0])) == [1, 0]:
            return t.inputs[0], True
    if node.op_type == "Gemm" and _matrix(node.inputs[1]):
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
    check_nodes(model)
    return _linears(model)


def _linears(model: ir.Model) -> list[LinearLayer]:
    graph = model.graph
    vocab = _embedding_rows(graph)
    layers: list[LinearLayer] = []
    for node in graph:
        found = _weight_of(node)
        if found is None:
            continue
        weight, transposed = found
        if weight.name and weight.name.startswith(ONLINE_PREFIX):
            continue  # an online Hadamard factor inserted by rotate, not a model layer
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
    check_nodes(model)
    return _norms(model)


def _norms(model: ir.Model) -> list[Norm]:
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
    check_nodes(model)
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
    w = constant_array(layer.weight).astype(np.float32)
    return w.T if layer.transposed else w


# ---------------------------------------------------------------------------------------------
# Channel regions: sources -> channel-preserving path -> sinks (DESIGN.md section 3).
#
# A region is found by following one source's output channels forward. Along the path each
# tensor carries an index array `idx` of the tensor's rank: idx[...] is the source channel held
# at that position, with size 1 on every axis the channel does not depend on (batch, tokens,
# the query heads that repeat one KV head). Data-movement ops (Reshape, Transpose, Unsqueeze,
# Expand) move idx exactly like the tensor; a sink reads row j from source channel idx[j].
# ---------------------------------------------------------------------------------------------

SourceKind = Literal["rmsnorm", "layernorm", "linear", "mul", "gated_product"]
RegionKind = Literal["norm->linears", "linear->linear", "up->down", "v->o", "mul->linears"]
_Step = list[tuple[ir.Value, np.ndarray]]  # the outputs a path op passes the channels to, with their idx

# Elementwise ops that may appear between a gate linear and the product Mul (SiLU, GELU, ...).
_ACTIVATION_OPS = {
    "Sigmoid", "Mul", "Add", "Sub", "Div", "Erf", "Tanh", "Gelu", "Relu", "Pow", "Softplus", "Exp", "Neg",
    "HardSigmoid", "HardSwish", "Identity", "Cast",
}
_SYMBOL_SIZES = (7, 11, 13, 17, 19, 23, 29, 31)  # stand-ins for symbolic dims (seq...) when moving idx


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """An op whose output channels can absorb a transform (norm affine, linear columns, constant Mul)."""

    kind: SourceKind
    node: ir.Node  # the node whose output carries the channels (for a gated product: the up linear)
    name: str
    gamma: ir.Value | None = None  # norm scale / the constant per-channel factor of a Mul
    beta: ir.Value | None = None  # LayerNorm bias
    weight: ir.Value | None = None  # linear source: its constant weight ([in, out] unless linear.transposed)
    bias: ir.Value | None = None  # linear source: constant bias added right after, if any
    bias_node: ir.Node | None = None  # the Add (or the Gemm itself) that adds the bias
    linear: LinearLayer | None = None  # kind linear, and the up-projection of a gated product
    gate: LinearLayer | None = None  # kind gated_product: the gate linear (act(gate) * up)


@dataclasses.dataclass(frozen=True, eq=False)
class Region:
    """Sources whose output channels reach only constant-weight sinks through channel-preserving ops."""

    name: str
    kind: RegionKind
    channels: int  # C, the size of the source channel axis
    sources: list[Source]
    path: list[ir.Node]  # channel-preserving ops between the sources and the sinks
    sinks: list[LinearLayer]
    sink_index: np.ndarray  # int64 [sink in_features]: the source channel each sink input row reads
    sharing: int = 1  # v->o: query heads per KV head (GQA n_rep); 1 otherwise
    # Per-channel constants of the sources (gamma, beta, bias) that nodes outside the region also
    # read (the exporter deduplicates equal initializers, e.g. all-ones gammas): call unshare()
    # before changing them in place.
    shared: list[ir.Value] = dataclasses.field(default_factory=list)

    @property
    def input(self) -> ir.Value:
        """The activation the sinks read (what their input quantizer sees)."""
        return self.sinks[0].node.inputs[0]

    @property
    def diagonal_only(self) -> bool:
        """True when the path commutes with positive diagonal scales only (a gated product, ReLU), not rotations."""
        return self.kind == "up->down" or any(n.op_type == "Relu" for n in self.path)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A would-be source that is not a region, and why."""

    candidate: str
    reason: str


class _Reject(Exception):
    """Raised while following a candidate's channels; the message is the rejection reason."""


@dataclasses.dataclass
class _Context:
    """Graph facts shared by every candidate's walk."""

    linears: dict[int, LinearLayer]  # id(node) -> layer
    linear_outputs: dict[int, LinearLayer]  # id(value) -> layer, for the linear output and its bias Add
    symbols: dict[str, int] = dataclasses.field(default_factory=dict)
    # id(value) -> its dims at the stand-in sizes, where a walk computed them (a dynamic reshape's output
    # has no static shape to read; the ops after it do not either)
    dims: dict[int, list[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Walk:
    """What following one source's channels found."""

    path: list[ir.Node] = dataclasses.field(default_factory=list)
    sinks: list[tuple[LinearLayer, np.ndarray]] = dataclasses.field(default_factory=list)
    gates: list[LinearLayer] = dataclasses.field(default_factory=list)
    attention: bool = False  # passed Softmax(..) x V as the V operand


def find_regions(model: ir.Model) -> tuple[list[Region], list[Rejection]]:
    """Every channel region of the graph, and every candidate source that is not one (with a reason).

    Candidates, in graph order: norms (RMSNorm's Mul(gamma), LayerNormalization), constant-weight
    linears (with a bias Add right after, if any), and Muls by a constant per-channel vector.
    """
    check_nodes(model)
    graph = model.graph
    layers = _linears(model)
    ctx = _Context({id(l.node): l for l in layers}, {})
    for layer in layers:  # a gate is recognised by its output, with or without the bias Add
        ctx.linear_outputs[id(layer.node.outputs[0])] = layer
        ctx.linear_outputs[id(_bias_after(layer)[0])] = layer
    norms = _norms(model)
    norm_names = [n.name for n in norms]
    norms_by_node = {id(n.output_node): n for n in norms}
    regions: list[Region] = []
    rejections: dict[str, Rejection] = {}
    for node in graph:
        candidate = _candidate(node, ctx, norms_by_node, norm_names)
        if candidate is None:
            continue
        name, build = candidate
        try:
            regions.append(build(name))
        except _Reject as exc:
            rejections.setdefault(name, Rejection(name, str(exc)))
    return regions, list(rejections.values())


def _candidate(node: ir.Node, ctx: _Context, norms_by_node: dict[int, Norm], norm_names: list[str]):
    """(name, builder) when the node is a would-be source, else None."""
    norm = norms_by_node.get(id(node))
    if norm is not None:
        # Equal gammas may be one deduplicated initializer: then the gamma name does not say which norm.
        name = norm.name if norm_names.count(norm.name) == 1 else f"{norm.kind} {node.name}"
        return name, lambda n: _norm_region(norm, n, ctx)
    layer = ctx.linears.get(id(node))
    if layer is not None:
        return layer.name, lambda n: _linear_region(layer, n, ctx)
    if node.op_type == "Mul" and _channel_factor(node) is not None:
        return node.name, lambda n: _mul_region(node, n, ctx)
    return None


# ---- the three source kinds ---------------------------------------------------------------


def _norm_region(norm: Norm, name: str, ctx: _Context) -> Region:
    node = norm.output_node
    if norm.kind == "layernorm" and node.attributes.get_int("axis", -1) not in (-1, _rank(node.inputs[0]) - 1):
        raise _Reject("LayerNormalization does not normalise over the last (channel) axis")
    if norm.gamma is None or norm.gamma.const_value is None:
        raise _Reject("the norm has no constant scale (gamma) to absorb the transform")
    if norm.beta is not None and norm.beta.const_value is None:
        raise _Reject(f"the norm bias {norm.beta.name} is not constant")
    if not isinstance((list(norm.gamma.shape or ()) or [None])[-1], int):
        raise _Reject(f"the norm scale {norm.gamma.name} is not a per-channel vector")
    channels = int(norm.gamma.shape[-1])
    walk = _follow(node.outputs[0], channels, ctx, "the norm output")
    source = Source(norm.kind, node, name, gamma=norm.gamma, beta=norm.beta)
    shared = [v for v in (norm.gamma, norm.beta) if v is not None and _other_readers(v, {id(node)})]
    return _region(name, "norm->linears", channels, source, walk, shared)


def _linear_region(layer: LinearLayer, name: str, ctx: _Context) -> Region:
    out, bias, bias_node = _bias_after(layer)
    if bias is not None and (bias.const_value is None or not _is_channel_vector(bias, layer.out_features)):
        raise _Reject(f"bias {bias.name} is not a constant per-channel vector")
    walk = _follow(out, layer.out_features, ctx, "the output")
    tied = _other_readers(layer.weight, _own_weight_readers(layer))
    if tied:
        raise _Reject(f"weight {layer.weight.name} is shared with node {tied[0].name} ({tied[0].op_type}) (tied): clone it first")
    if len(walk.gates) > 1:
        raise _Reject("the output is multiplied by more than one gate")
    gated = bool(walk.gates)
    kind: RegionKind = "up->down" if gated else "v->o" if walk.attention else "linear->linear"
    source = Source(
        "gated_product" if gated else "linear", layer.node, name, weight=layer.weight, bias=bias,
        bias_node=bias_node, linear=layer, gate=walk.gates[0] if gated else None,
    )
    shared = [bias] if bias is not None and _other_readers(bias, {id(bias_node)}) else []
    return _region(name, kind, layer.out_features, source, walk, shared)


def _mul_region(node: ir.Node, name: str, ctx: _Context) -> Region:
    factor = _channel_factor(node)
    channels = int(factor.shape[-1])
    walk = _follow(node.outputs[0], channels, ctx, "the output")
    shared = [factor] if _other_readers(factor, {id(node)}) else []
    return _region(name, "mul->linears", channels, Source("mul", node, name, gamma=factor), walk, shared)


def _region(name: str, kind: RegionKind, channels: int, source: Source, walk: _Walk, shared: list[ir.Value]) -> Region:
    if not walk.sinks:
        raise _Reject("no constant-weight linear reads the channels")
    sink_index = walk.sinks[0][1]
    if any(not np.array_equal(idx, sink_index) for _, idx in walk.sinks[1:]):
        raise _Reject("the sinks read the channels in different orders")
    reads = np.bincount(sink_index, minlength=channels)
    sharing = int(reads[0]) if kind == "v->o" and np.all(reads == reads[0]) else 1
    sinks = [layer for layer, _ in walk.sinks]
    return Region(_region_name(name, sinks), kind, channels, [source], walk.path, sinks, sink_index, sharing, shared)


def _region_name(source: str, sinks: list[LinearLayer]) -> str:
    """'model.layers.0.input_layernorm -> q_proj,k_proj,v_proj': sink names without the parts the reader knows."""
    names = [s.name for s in sinks]
    layer = _common_prefix([source, *names])  # e.g. 'model.layers.0.'
    if not layer:  # the source name says nothing about the layer: spell out the first sink
        return f"{source} -> {names[0]}" + "".join("," + n[len(_common_prefix(names)):] for n in names[1:])
    group = _common_prefix(names) if len(names) > 1 else layer  # e.g. 'model.layers.0.self_attn.'
    return f"{source} -> {','.join(n[len(group):] for n in names)}"


def _common_prefix(names: list[str]) -> str:
    """The longest dotted prefix ('a.b.') shared by all names, never a whole name."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for column in zip(*parts, strict=False):  # stops at the shortest name
        if len(set(column)) > 1:
            break
        common.append(column[0])
    return "".join(c + "." for c in common)


def _bias_after(layer: LinearLayer) -> tuple[ir.Value, ir.Value | None, ir.Node | None]:
    """(output carrying the channels, constant bias, node adding it): Gemm's C or a lone Add right after."""
    node = layer.node
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        return node.outputs[0], node.inputs[2], node
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        if other is not None and other.const_value is not None and _is_channel_vector(other, layer.out_features):
            return add.outputs[0], other, add
    return node.outputs[0], None, None


def _channel_factor(node: ir.Node) -> ir.Value | None:
    """The constant per-channel vector of Mul(x, c) with c of shape [..1, C], C > 1."""
    for value in node.inputs:
        dims = list(value.shape or ()) if value is not None and value.const_value is not None else []
        if dims and isinstance(dims[-1], int) and dims[-1] > 1 and _is_channel_vector(value, dims[-1]):
            return value
    return None


def _is_channel_vector(value: ir.Value, channels: int) -> bool:
    dims = list(value.shape or ())
    return bool(dims) and dims[-1] == channels and all(d == 1 for d in dims[:-1])


def _own_weight_readers(layer: LinearLayer) -> set[int]:
    """The linear node itself, plus the Transpose it reads a tied weight through."""
    own = {id(layer.node)}
    t = layer.node.inputs[1].producer()
    if t is not None and t.op_type == "Transpose":
        own.add(id(t))
    return own


def _other_readers(value: ir.Value, own: set[int]) -> list[ir.Node]:
    return [n for n, _ in value.uses() if id(n) not in own]


def linear_bias(layer: LinearLayer) -> tuple[ir.Value | None, ir.Node | None]:
    """The constant bias added right after a linear (Gemm's C or a lone Add) and the node adding it."""
    _, bias, node = _bias_after(layer)
    return bias, node


# Ops a channel-wise shift passes unchanged: data movement only (anything scaling or mixing values
# would change the shift; Softmax(..) x V is handled apart, its rows sum to one).
_SHIFT_MOVES = {"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Identity", "Dropout"}


def _softmax_rows(value: ir.Value) -> bool:
    """True when value is Softmax over its last axis, possibly behind Where(IsNaN(p), 0, p) / Dropout / Cast."""
    node = value.producer()
    while node is not None and node.op_type in ("Where", "Dropout", "Identity", "Cast"):
        if node.op_type == "Where":  # SDPA's guard for fully masked rows: Where(IsNaN(p), 0, p)
            if node.inputs[1].const_value is None or np.any(constant_array(node.inputs[1]) != 0):
                return False
        node = node.inputs[-1 if node.op_type == "Where" else 0].producer()
    return (node is not None and node.op_type == "Softmax"
            and node.attributes.get_int("axis", -1) in (-1, _rank(node.outputs[0]) - 1))


def shift_refusal(region: Region) -> str | None:
    """Why the region cannot absorb a channel-wise shift without a new node, or None when it can.

    Sources subtract z through their own bias term (LayerNorm beta, a linear's bias); every sink adds
    z @ B to its bias; the path must carry a shift unchanged (data movement, Softmax(..) x V).
    """
    for src in region.sources:
        term = src.beta if src.kind == "layernorm" else src.bias if src.kind == "linear" else None
        if term is None:
            what = {"layernorm": "LayerNorm without beta", "linear": "linear without bias"}.get(src.kind, src.kind)
            return (f"source {src.name} ({what}) has no bias term to absorb the shift "
                    "(a shift would cost a runtime Add: ORT's int8 kernels take one zero point per tensor)")
    for node in region.path:
        if node.op_type in _SHIFT_MOVES:
            continue
        if node.op_type == "MatMul" and _softmax_rows(node.inputs[0]):
            continue
        return f"{node.name} ({node.op_type}) on the path does not carry a shift unchanged"
    for sink in region.sinks:
        if linear_bias(sink)[0] is None:
            return f"sink {sink.name} has no bias to take z @ B (a new Add node would be needed)"
    return None


def refreshed(region: Region) -> Region:
    """The region with its linear sources' biases read again from the graph.

    A linear's bias is a sink constant of the region before it (a shift adds to it) and a source
    constant of its own region. When that bias was shared (an exporter deduplicates equal tensors:
    every all-zero bias of a random checkpoint is one initializer), the earlier rewrite gave the Add
    its own new value, so the record found with the regions no longer names what the Add reads.
    """
    sources, stale = [], set()
    for source in region.sources:
        if source.linear is not None and source.bias is not None:
            _, bias, bias_node = _bias_after(source.linear)
            if bias is not source.bias:
                stale.add(id(source.bias))
                source = dataclasses.replace(source, bias=bias, bias_node=bias_node)
        sources.append(source)
    if not stale:
        return region
    shared = [v for v in region.shared if id(v) not in stale]
    shared += [s.bias for s in sources if s.bias is not None and s.linear is not None and
               _other_readers(s.bias, {id(s.bias_node)}) and all(s.bias is not v for v in shared)]
    return dataclasses.replace(region, sources=sources, shared=shared)


def unshare(graph: ir.Graph, region: Region) -> Region:
    """Give the region's sources private copies of their shared per-channel constants; returns the updated region.

    A pass calls this before changing gamma, beta or a bias in place, so nodes outside the region
    (other norms reading a deduplicated all-ones gamma, say) keep their values.
    """
    region = refreshed(region)
    copies: dict[int, ir.Value] = {}
    for value in region.shared:
        copies[id(value)] = add_initializer(graph, f"{value.name}.copy", value.const_value.numpy().copy())
    sources = []
    for source in region.sources:
        for node in {id(n): n for n in (source.node, source.bias_node) if n is not None}.values():
            for i, value in enumerate(node.inputs):
                if value is not None and id(value) in copies:
                    node.replace_input_with(i, copies[id(value)])
        fields = {f: getattr(source, f) for f in ("gamma", "beta", "bias")}
        sources.append(dataclasses.replace(source, **{f: copies[id(v)] for f, v in fields.items() if id(v) in copies}))
    return dataclasses.replace(region, sources=sources, shared=[])


# ---- following the channels -----------------------------------------------------------------


def _follow(start: ir.Value, channels: int, ctx: _Context, what: str) -> _Walk:
    """Walk every use of the source channels until constant-weight sinks; raise _Reject on anything else."""
    rank = _rank(start)
    if rank < 1 or start.shape[-1] != channels:
        raise _Reject(f"{start.name} has no channel axis of size {channels} last")
    walk = _Walk()
    queue = [(start, np.arange(channels, dtype=np.int64).reshape((1,) * (rank - 1) + (channels,)))]
    seen = {id(start)}
    while queue:
        value, idx = queue.pop(0)  # breadth first: the path lists ops in graph order
        if value.is_graph_output() and not CACHE_OUTPUT.match(value.name):
            raise _Reject(f"{what} reaches the graph output {value.name}")
        uses = {n.op_type for n, _ in value.uses()}
        if {"Slice", "Mul"} <= uses:  # say why, rather than naming whichever op comes first
            raise _Reject(f"{value.name} enters a rotary embedding: rotate_half (Slice/Neg/Concat) mixes channel pairs")
        for node, index in list(value.uses()):
            for out, out_idx in _through(node, index, value, idx, start, walk, ctx, what):
                if id(out) not in seen:
                    seen.add(id(out))
                    queue.append((out, _canonical(out_idx)))
    return walk


def _through(
    node: ir.Node, index: int, value: ir.Value, idx: np.ndarray, start: ir.Value, walk: _Walk, ctx: _Context, what: str
) -> _Step:
    """Follow one use: a sink (returns []), a path op (returns its output with idx moved), or _Reject."""
    op, name = node.op_type, f"{node.name} ({node.op_type})"
    layer = ctx.linears.get(id(node))
    if layer is not None and index == 0:
        walk.sinks.append((layer, _sink_index(layer, idx)))
        return []
    if op in ("MatMul", "Gemm"):
        return _through_matmul(node, index, idx, start, walk, name)
    if op in ("Shape", "Size"):  # reads the dims only, which a channel-wise scale or shift leaves alone
        return []
    try:
        moved = _move(node, value, idx, ctx, name)
    except (ValueError, IndexError):  # numpy's verdict on a perm / axes / target that does not fit the tensor
        raise _Reject(f"cannot follow the channel axis through {name}: its axes or shapes do not fit its input") from None
    if moved is not None:
        walk.path.append(node)
        return [(node.outputs[0], moved)]
    if op == "Mul":
        return _through_product(node, index, idx, start, walk, ctx, name)
    if op == "Div" and index == 0 and _is_scalar(node.inputs[1]):
        walk.path.append(node)
        return [(node.outputs[0], _to_rank(idx, _rank(node.outputs[0])))]
    if op in ("Add", "Sub"):
        other = node.inputs[1 - index]
        if other is not None and other.const_value is not None:
            raise _Reject(f"consumer {name} adds constant {other.name} on the path (not a bias the source owns)")
        stream = "the norm output is the residual stream (post-norm)" if what == "the norm output" else (
            "it joins the residual stream")
        raise _Reject(f"consumer {name} is not a sink: {stream}")
    if op == "Concat" and _appends_to_cache(node, index, idx):
        walk.path.append(node)
        return [(node.outputs[0], _to_rank(idx, _rank(node.outputs[0])))]
    if op == "Relu":  # commutes with positive diagonal scales only; passes decide by region kind
        walk.path.append(node)
        return [(node.outputs[0], idx)]
    raise _Reject(_stop_reason(node, value, name))


_NONLINEAR = {"Sigmoid", "Tanh", "Erf", "Gelu", "Softplus", "Exp", "Log", "Sin", "Cos", "HardSigmoid", "HardSwish",
              "Elu", "Selu", "LeakyRelu", "PRelu", "Mish", "Clip", "Abs", "Sqrt", "Reciprocal"}


def _stop_reason(node: ir.Node, value: ir.Value, name: str) -> str:
    """Why a channel transform cannot pass `node`: the op, and what it would break."""
    op = node.op_type
    readers = {n.op_type for n, _ in value.uses()}
    if op == "LayerNormalization" or (op in ("Pow", "ReduceMean", "Mul") and _feeds_mean_of_square(value)):
        return (f"enters a norm at {name}: a norm divides by the channels' RMS, which a per-channel scale changes "
                "(its own scale is a region source instead; q/k norms and post-norms stop here)")
    if op == "Pow" and readers & {"Mul", "Add"} and _reaches(node.outputs[0], {"Tanh"}, 4):
        return f"enters GELU (tanh form) at {name}: a nonlinear activation does not commute with a channel scale"
    if op in _NONLINEAR:
        return f"enters the nonlinear {op} at {name}: it does not commute with a channel scale (ReLU does, for positive ones)"
    if op in ("Split", "Slice", "Gather"):
        return (f"is cut by {name}: its parts go to different consumers (split_fused_linears cuts a projection's "
                "weight where the cut falls on whole channel units)")
    if op == "Concat":
        return f"is concatenated with other tensors at {name}"
    if op == "Softmax":
        return f"enters Softmax at {name}, which mixes the channels"
    if op.startswith("Reduce"):
        return f"is reduced over by {name}"
    return f"unknown/non-commuting op {name} on the path"


def _feeds_mean_of_square(value: ir.Value) -> bool:
    """value (or its square) is averaged over the channels: the RMSNorm decomposition Pow -> ReduceMean."""
    for node, _ in value.uses():
        if node.op_type == "ReduceMean" or (node.op_type in ("Pow", "Mul") and _reaches(node.outputs[0], {"ReduceMean"}, 1)):
            return True
    return False


def _reaches(value: ir.Value, ops: set[str], depth: int) -> bool:
    """A node of one of `ops` reads value within `depth` steps."""
    for node, _ in value.uses():
        if node.op_type in ops or (depth > 1 and any(_reaches(o, ops, depth - 1) for o in node.outputs)):
            return True
    return False


def _appends_to_cache(node: ir.Node, index: int, idx: np.ndarray) -> bool:
    """Concat(past, new) along the tokens of a KV-cache graph: the channels keep their axis.

    The cache (present.N.*) then holds the transformed channels, and the next step's past, which
    this same graph wrote, holds them too: a scale, shift or rotation on the path stays exact over
    a whole generation. Only for a past that is a cache graph input, and an axis off the channels.
    """
    others = [v for i, v in enumerate(node.inputs) if i != index]
    if not others or not all(v is not None and v.is_graph_input() and CACHE_INPUT.match(v.name) for v in others):
        return False
    rank = _rank(node.inputs[index])
    idx = _to_rank(idx, rank)
    axis = node.attributes.get_int("axis", 0) % max(rank, 1)
    return idx.ndim == rank and idx.shape[axis] == 1


def _sink_index(layer: LinearLayer, idx: np.ndarray) -> np.ndarray:
    """The source channel read by each input row of a sink; the channels must vary along the last axis only."""
    idx = _canonical(idx)
    if any(d != 1 for d in idx.shape[:-1]) or idx.shape[-1] != layer.in_features:
        raise _Reject(f"sink {layer.name} reads the channels across several axes")
    if layer.node.op_type == "Gemm" and layer.node.attributes.get_int("transA", 0):
        raise _Reject(f"sink {layer.name} is a Gemm with transA=1")
    readers = _other_readers(layer.weight, _own_weight_readers(layer))
    gathers = [n for n in readers if n.op_type == "Gather"]
    if gathers:
        raise _Reject(f"sink {layer.name} weight {layer.weight.name} is tied to the embedding table "
                      f"(read by Gather {gathers[0].name}): clone it first")
    if readers:
        raise _Reject(f"sink {layer.name} weight {layer.weight.name} is shared with node {readers[0].name} "
                      f"({readers[0].op_type}) (tied): clone it first")
    return idx.reshape(-1).astype(np.int64)


def _through_matmul(node: ir.Node, index: int, idx: np.ndarray, start: ir.Value, walk: _Walk, name: str) -> _Step:
    """Activation x activation MatMul: the channels may only be the V operand of Softmax(..) x V."""
    if index != 1 or node.op_type == "Gemm":
        weight = node.inputs[1]
        raise _Reject(f"consumer {name} is not a sink: non-constant weight {weight.name} (activation x activation)")
    if idx.ndim < 2 or idx.shape[-2] != 1:
        raise _Reject(f"consumer {name} contracts the channel axis with another activation (attention scores)")
    if _depends_on(node.inputs[0], start):
        raise _Reject(f"consumer {name} multiplies the channels with a tensor computed from them")
    walk.path.append(node)
    walk.attention = True
    return [(node.outputs[0], _to_rank(idx, _rank(node.outputs[0])))]


def _through_product(
    node: ir.Node, index: int, idx: np.ndarray, start: ir.Value, walk: _Walk, ctx: _Context, name: str
) -> _Step:
    """Mul by a scalar constant, or the gated product act(gate) * up (linear in up: diagonal scales commute)."""
    other = node.inputs[1 - index]
    if other is not None and other.const_value is not None:
        if not _is_scalar(other):
            raise _Reject(f"consumer {name} multiplies by constant {other.name} that is not a scalar")
        walk.path.append(node)
        return [(node.outputs[0], _to_rank(idx, _rank(node.outputs[0])))]
    gate = _gate_of(other, ctx)
    if gate is None:
        raise _Reject(f"consumer {name} multiplies by {other.name}, which is not a gate activation of a linear")
    if _depends_on(other, start):
        raise _Reject(f"consumer {name} multiplies the channels with a tensor computed from them")
    walk.gates.append(gate)
    walk.path.append(node)
    return [(node.outputs[0], _to_rank(idx, _rank(node.outputs[0])))]


def _is_scalar(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.size == 1


def _gate_of(value: ir.Value, ctx: _Context, limit: int = 32) -> LinearLayer | None:
    """The one linear whose output `value` is an elementwise activation of (silu: g * Sigmoid(g)), else None."""
    leaves, stack, seen = set(), [value], set()
    while stack and len(seen) < limit:
        v = stack.pop()
        if id(v) in seen or v.const_value is not None:
            continue
        seen.add(id(v))
        if id(v) in ctx.linear_outputs:
            leaves.add(id(v))
            continue
        producer = v.producer()
        if producer is None or producer.op_type not in _ACTIVATION_OPS:
            return None
        stack.extend(i for i in producer.inputs if i is not None)
    return ctx.linear_outputs[next(iter(leaves))] if len(leaves) == 1 and not stack else None


def _depends_on(value: ir.Value, target: ir.Value) -> bool:
    """True when `target` is an ancestor of `value` (or value itself)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is target:
            return True
        if id(v) in seen or v.producer() is None:
            continue
        seen.add(id(v))
        stack.extend(i for i in v.producer().inputs if i is not None)
    return False


# ---- moving the channel index through data-movement ops ------------------------------------


def _move(node: ir.Node, value: ir.Value, idx: np.ndarray, ctx: _Context, name: str) -> np.ndarray | None:
    """idx after Transpose/Reshape/Unsqueeze/Squeeze/Expand/Identity, or None for any other op."""
    op = node.op_type
    if op == "Identity" or (op == "Dropout" and len(node.outputs) == 1):
        return idx
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        perm = list(perm) if perm is not None else list(range(idx.ndim))[::-1]
        if id(value) in ctx.dims:
            ctx.dims[id(node.outputs[0])] = [ctx.dims[id(value)][p] for p in perm]
        return idx.transpose(perm)
    if op == "Unsqueeze":
        axes = sorted(a % (idx.ndim + len(_axes(node))) for a in _axes(node))
        for a in axes:
            idx = np.expand_dims(idx, a)
        return idx
    if op == "Squeeze":
        return _squeeze(node, value, idx, ctx, name)
    if op == "Expand":  # broadcasting never widens the channel axes (they are > 1), it may add leading axes
        return _to_rank(idx, _rank(node.outputs[0]))
    if op == "Reshape":
        return _reshape(node, value, idx, ctx, name)
    return None


def _reshape(node: ir.Node, value: ir.Value, idx: np.ndarray, ctx: _Context, name: str) -> np.ndarray:
    """Materialise idx at the input's concrete shape (symbolic dims -> stand-in sizes) and reshape it."""
    last_in, last_out = (list(v.shape or [None])[-1] for v in (value, node.outputs[0]))
    if isinstance(last_in, int) and last_in == last_out and last_in > 1 and _canonical(idx).shape[:-1] == (1,) * (idx.ndim - 1):
        # The channels vary along the last axis only and the reshape keeps that axis (it regroups the
        # leading ones, e.g. Conv1D's [batch*seq, C] <-> [batch, seq, C]): element i of a row stays at i.
        return _to_rank(_canonical(idx).reshape(-1), _rank(node.outputs[0]))
    dims = _concrete_dims(value, ctx, name)
    target = _shape_arithmetic(node.inputs[1], ctx)  # a constant, or computed from Shape (dynamic batch)
    if target is not None:
        shape = [int(d) for d in target.reshape(-1)]
        if not node.attributes.get_int("allowzero", 0):
            shape = [dims[i] if d == 0 else d for i, d in enumerate(shape)]
    else:
        shape = _concrete_dims(node.outputs[0], ctx, name)
    try:
        moved = np.broadcast_to(idx, dims).reshape(shape)
    except ValueError:
        raise _Reject(f"cannot follow the channel axis through {name}") from None
    ctx.dims[id(node.outputs[0])] = list(moved.shape)
    return moved


_SHAPE_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide, "Max": np.maximum,
              "Min": np.minimum}


def _shape_arithmetic(value: ir.Value | None, ctx: _Context, depth: int = 0) -> np.ndarray | None:
    """A reshape target's value at the stand-in sizes: constants and Shape -> Slice / Gather / Concat / arithmetic
    (how the exporter writes a dynamic-batch view). None when it reads anything else."""
    if value is None or depth > 16:
        return None
    if value.const_value is not None:
        return constant_array(value)
    node = value.producer()
    if node is None:
        return None
    op = node.op_type
    if op == "Shape":
        try:
            dims = _concrete_dims(node.inputs[0], ctx, node.name)
        except _Reject:
            return None
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(dims))
        return np.array(dims[start:end], dtype=np.int64)
    args = [_shape_arithmetic(v, ctx, depth + 1) if v is not None else None for v in node.inputs]
    if not args or any(a is None for a in args[:1]):
        return None
    try:
        if op in ("Identity", "Cast"):
            return args[0].astype(np.int64)
        if op in _SHAPE_OPS and args[1] is not None:
            return _SHAPE_OPS[op](args[0], args[1]).astype(np.int64)
        if op == "Concat" and all(a is not None for a in args):
            return np.concatenate([a.reshape(-1) for a in args])
        if op == "Gather" and args[1] is not None:
            return np.take(args[0], args[1], axis=node.attributes.get_int("axis", 0))
        if op == "Unsqueeze" and args[1] is not None:
            return args[0].reshape(-1) if args[0].ndim == 0 else args[0]
        if op == "Squeeze":
            return args[0].reshape(-1)[:1].reshape(()) if args[0].size == 1 else args[0]
        if op == "Slice" and all(a is not None for a in args[1:3]):
            axes = args[3] if len(args) > 3 and args[3] is not None else [0]
            steps = args[4] if len(args) > 4 and args[4] is not None else [1]
            if len(axes) == 1 and args[0].ndim == 1:
                return args[0][int(args[1][0]):int(min(args[2][0], np.iinfo(np.int64).max)):int(steps[0])]
    except (ValueError, IndexError, TypeError):
        return None
    return None


def _squeeze(node: ir.Node, value: ir.Value, idx: np.ndarray, ctx: _Context, name: str) -> np.ndarray:
    axes = _axes(node)
    if not axes:
        axes = [i for i, d in enumerate(_concrete_dims(value, ctx, name)) if d == 1]
    return idx.squeeze(tuple(a % idx.ndim for a in axes))


def _axes(node: ir.Node) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        return [int(a) for a in constant_array(node.inputs[1]).reshape(-1)]
    return list(node.attributes.get_ints("axes", []))


def _concrete_dims(value: ir.Value, ctx: _Context, name: str) -> list[int]:
    """The value's dims with each named symbolic dim replaced by one stand-in size (the same per name)."""
    if id(value) in ctx.dims:
        return ctx.dims[id(value)]
    if value.shape is None:
        raise _Reject(f"unknown shape of {value.name} at {name}")
    dims = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        elif d.value is None:
            raise _Reject(f"unknown shape of {value.name} at {name}")
        else:
            dims.append(ctx.symbols.setdefault(d.value, _SYMBOL_SIZES[len(ctx.symbols) % len(_SYMBOL_SIZES)]))
    return dims


def _canonical(idx: np.ndarray) -> np.ndarray:
    """Shrink every axis along which the channel does not change to size 1."""
    for axis in range(idx.ndim):
        if idx.shape[axis] > 1:
            first = np.take(idx, [0], axis=axis)
            if np.array_equal(np.broadcast_to(first, idx.shape), idx):
                idx = first
    return idx


def _to_rank(idx: np.ndarray, rank: int) -> np.ndarray:
    """Broadcasting to a higher rank adds leading axes."""
    return idx.reshape((1,) * (rank - idx.ndim) + idx.shape) if rank > idx.ndim else idx


def _rank(value: ir.Value) -> int:
    if value.shape is None:
        raise _Reject(f"unknown rank of {value.name}")
    return len(value.shape)
