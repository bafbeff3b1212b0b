"""rotate: QuaRot's rotations, found on the graph (DESIGN.md section 4).

- R1: one orthogonal Q on the whole residual stream. After every RMSNorm gamma is folded into
  its readers, RMSNorm(x Q) = RMSNorm(x) Q (Q keeps the row norm), so: embedding E <- E Q, every
  residual writer W <- W Q (bias too), every reader B <- Q^T B, lm_head included. A lm_head
  tied to the embedding is untied by cloning (reported with the bytes it adds).
- R2: per-head Hadamard on v_proj's output and o_proj's input, offline; with GQA the same
  head_dim block on every query head that reads a KV head.
- Online Hadamard before the down projection of a gated MLP (the product silu(g) * u has no
  linear source to absorb it): a Kronecker-factored Reshape/MatMul/Transpose chain, never a dense
  C x C matmul when C > 256, and the down weight's rows take H^T.

The stream is walked from the embedding Gather along the residual Adds; its readers are the
norm -> linears regions of the norms on it. Nothing names a layer: a graph whose stream has
another reader (a hidden-state output, a LayerNorm) is refused with the node and the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.ir.hadamard import ONLINE_PREFIX, factors, hadamard, hadamard_factors, random_orthogonal
from qgraph.ir.regions import (
    LinearLayer,
    Region,
    find_embeddings,
    find_linears,
    find_norms,
    find_regions,
    linear_bias,
    weight_array,
)
from qgraph.ir.rewrite import add_initializer, set_constant_input, set_linear_weight, shared_initializer
from qgraph.options import option
from qgraph.passes.registry import PassContext, register

DENSE_LIMIT = 256  # online Hadamards larger than this are applied as two Kronecker factors


def orthogonal(size: int, seed: int) -> tuple[np.ndarray, str]:
    """The rotation for `size` channels: a Hadamard where one is known, else a seeded random Q."""
    try:
        return hadamard(size), "hadamard"
    except ValueError:
        return random_orthogonal(size, seed), "random orthogonal (no known Hadamard order)"


# --------------------------------------------------------------------------------------------
# The residual stream
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Stream:
    gather: ir.Node
    writers: list[tuple[LinearLayer, ir.Value | None, ir.Node | None]]  # (linear, constant bias, node adding it)
    norms: list  # qgraph.ir.regions.Norm on the stream, in graph order


class StreamRefusal(Exception):
    """The residual stream cannot be rotated; the message names the node and why."""


def _rms_reads(norm) -> tuple[ir.Value, set[int]] | None:
    """x of an exported RMSNorm and the nodes inside it that read x: Pow(x) and Mul(x, Reciprocal(..))."""
    for v in norm.output_node.inputs:
        core = v.producer() if v is not None and v is not norm.gamma else None
        if core is None or core.op_type != "Mul":
            continue
        for i in (0, 1):
            recip = core.inputs[1 - i].producer()
            if recip is None or recip.op_type != "Reciprocal":
                continue
            x, readers, frontier = core.inputs[i], {id(core)}, [recip]
            while frontier:  # back through Reciprocal <- Sqrt <- Add(eps) <- ReduceMean <- Pow(x)
                for value in frontier.pop().inputs:
                    node = value.producer() if value is not None else None
                    if node is not None and node.op_type == "Pow" and node.inputs[0] is x:
                        readers.add(id(node))
                    elif node is not None and node.op_type in ("Sqrt", "Add", "ReduceMean", "Cast"):
                        frontier.append(node)
            return x, readers
    return None


def residual_stream(model: ir.Model) -> Stream:
    """The embedding, the linears that write the residual stream and the norms that read it."""
    graph = model.graph
    norms = find_norms(model)
    if any(n.kind == "layernorm" for n in norms):
        raise StreamRefusal("LayerNorm subtracts the mean, which a rotation does not commute with; qgraph does "
                            "not yet bake the mean into the writers (LayerNorm -> RMSNorm)")
    embeddings = find_embeddings(model)
    if len(embeddings) != 1:
        raise StreamRefusal(f"the graph has {len(embeddings)} embedding lookups (Gather of a constant table); R1 "
                            "needs exactly one residual stream source")
    gather = embeddings[0][1]
    by_input: dict[int, list] = {}  # id(x) -> the norms reading x
    norm_readers: set[int] = set()  # the nodes inside those norms that read x
    for norm in norms:
        found = _rms_reads(norm)
        if found is not None:
            by_input.setdefault(id(found[0]), []).append(norm)
            norm_readers |= found[1]
    # A writer's output is its bias Add (or the Gemm adding C), else the linear's own output.
    by_output = {}
    for layer in find_linears(model):
        bias, bias_node = linear_bias(layer)
        by_output[id((bias_node or layer.node).outputs[0])] = (layer, bias, bias_node)
    stream = Stream(gather, [], [])
    frontier, seen = [gather.outputs[0]], set()
    while frontier:
        value = frontier.pop(0)
        if id(value) in seen:
            continue
        seen.add(id(value))
        if value in graph.outputs:
            raise StreamRefusal(f"the residual stream value {value.name} is a graph output: it would leave rotated")
        stream.norms.extend(n for n in by_input.get(id(value), []) if n not in stream.norms)
        for user, index in value.uses():
            if id(user) in norm_readers:
                continue
            if user.op_type == "Mul" and _scalar_constant(user.inputs[1 - index]):
                frontier.append(user.outputs[0])  # a scaled embedding (Gemma) commutes with Q
                continue
            if user.op_type == "Add":
                other = user.inputs[1 - index]
                if id(other) in seen:
                    continue
                writer = by_output.get(id(other))
                if writer is None:
                    what = other.producer().op_type if other.producer() is not None else "a graph input"
                    raise StreamRefusal(f"the residual Add {user.name} adds {other.name} from {what}, not a linear's "
                                        "output: it cannot take the rotation")
                stream.writers.append(writer)
                frontier.append(user.outputs[0])
                continue
            raise StreamRefusal(f"node {user.name} ({user.op_type}) reads the residual stream value {value.name} and "
                                "is neither a residual Add nor an RMSNorm: it does not commute with a rotation")
    if not stream.norms:
        raise StreamRefusal("no RMSNorm reads the residual stream")
    return stream


def _scalar_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.const_value.numpy().size == 1


# --------------------------------------------------------------------------------------------
# Online Hadamard
# --------------------------------------------------------------------------------------------

def _const(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    return shared_initializer(graph, f"{ONLINE_PREFIX}{base}", array)  # one shared copy per size and factor


def rotate_value(graph: ir.Graph, x: ir.Value, size: int, name: str, before: ir.Node | None = None
                 ) -> tuple[ir.Value, np.ndarray]:
    """y = x H on the last axis of `x` (H = A (x) B orthonormal, `size` wide); (y, H).

    The ops go before `before`, or right after x's producer when None. The readers are not rewired:
    the caller points the ones that should see the rotation at y.
    """
    try:
        a, b = hadamard_factors(size)
    except ValueError:  # no Hadamard order: a small dense random orthogonal (the caller refuses large ones)
        a, b = np.ones((1, 1)), random_orthogonal(size, 0)
    if a.shape[0] == 1 and size > DENSE_LIMIT:  # a power of two: split into two Sylvester factors
        half = 1 << (size.bit_length() - 1) // 2
        a, b = hadamard_factors(size // half)[1], hadamard_factors(half)[1]
    y = kron_transform(graph, x, a, b, name, before, dense=a.shape[0] == 1 or size <= DENSE_LIMIT)
    return y, np.kron(a, b)


def kron_transform(graph: ir.Graph, x: ir.Value, a: np.ndarray, b: np.ndarray, name: str, before: ir.Node | None = None,
                   *, dense: bool = False, shared: bool = True) -> ir.Value:
    """y = x (A (x) B) on the last axis of `x`: one MatMul when `dense`, else Reshape/MatMul/Transpose factors.

    shared=True keeps one initializer per size (Hadamards); a learned transform passes False.
    """
    size = a.shape[0] * b.shape[0]
    rank = len(x.shape) if x.shape is not None else 3

    def const(key: str, array: np.ndarray) -> ir.Value:
        return _const(graph, key, array) if shared else add_initializer(graph, f"{ONLINE_PREFIX}{name}.{key}", array)

    nodes: list[ir.Node] = []
    if dense:
        mm = ir.node("MatMul", [x, const(f"{size}", np.kron(a, b).astype(np.float32))])
        nodes.append(mm)
        y = mm.outputs[0]
    else:
        m, p = a.shape[0], b.shape[0]
        split = _const(graph, f"shape.{m}x{p}.r{rank}", np.array([0] * (rank - 1) + [m, p], np.int64))
        merge = _const(graph, f"shape.{size}.r{rank}", np.array([0] * (rank - 1) + [size], np.int64))
        swap = list(range(rank - 1)) + [rank, rank - 1]
        r1 = ir.node("Reshape", [x, split])
        mb = ir.node("MatMul", [r1.outputs[0], const(f"{p}", b.astype(np.float32))])
        t1 = ir.node("Transpose", [mb.outputs[0]], attributes={"perm": swap})
        ma = ir.node("MatMul", [t1.outputs[0], const(f"{m}", a.astype(np.float32))])
        t2 = ir.node("Transpose", [ma.outputs[0]], attributes={"perm": swap})
        r2 = ir.node("Reshape", [t2.outputs[0], merge])
        nodes = [r1, mb, t1, ma, t2, r2]  # X -> A^T X B, read back as x (A (x) B)
        y = r2.outputs[0]
    for i, node in enumerate(nodes):
        node.name = f"{name}.online_hadamard.{i}" if shared else f"{name}.online_transform.{i}"
    y.name, y.shape, y.type = f"{name}.rotated" if shared else f"{name}.transformed", x.shape, x.type
    if before is not None:
        graph.insert_before(before, nodes)
    else:
        graph.insert_after(x.producer(), nodes)
    return y


def insert_online_hadamard(graph: ir.Graph, layer: LinearLayer) -> np.ndarray:
    """y = x H before `layer`, which then reads y; returns H (the caller gives the weight H^T)."""
    y, h = rotate_value(graph, layer.node.inputs[0], layer.in_features, layer.name, layer.node)
    y.name = f"{layer.name}.input_rotated"
    layer.node.replace_input_with(0, y)
    return h


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RotateOptions:
    """Which QuaRot rotations to apply."""

    r1: bool = option(True, "one orthogonal Q on the residual stream (embedding, writers, readers, lm_head)")
    r2: bool = option(True, "per-head Hadamard on v_proj's output / o_proj's input, offline")
    online_down: bool = option(True, "online Hadamard before each gated MLP's down projection")
    online_qk: bool = option(False, "online Hadamard on every attention block's queries and keys after RoPE "
                                    "(Q H (K H)^T = Q K^T), so a quantized KV cache stores rotated keys")
    seed: int = option(0, "seed of the random orthogonal fallback for sizes with no known Hadamard", ge=0)
    spin_steps: int = option(0, "SpinQuant: Cayley SGD steps that learn R1 and R2 from the Hadamard on the recipe's "
                                "activation rounding over calibration samples (0: keep the Hadamard)", ge=0)
    spin_lr: float = option(0.05, "angle of the first Cayley step (it decays linearly to 0)", gt=0)
    spin_tokens: int = option(256, "calibration tokens per rotated input that the SpinQuant loss is measured on", ge=1)


class RotatePass(ir.passes.InPlacePass):
    """R1 + R2 + online Hadamard before down projections; function-preserving in float."""

    function_preserving = True

    def __init__(self, options: RotateOptions = RotateOptions(), *, windows=None, activation_spec=None,
                 progress: bool = True):
        super().__init__()
        self.options = options
        self.windows, self.activation_spec, self.progress = windows, activation_spec, progress
        self.spin: dict = {}
        self._samples: dict = {}  # value name -> calibration token rows, for the SpinQuant loss
        self.r1: dict = {}
        self.r2: list[str] = []
        self.online: list[str] = []
        self.online_qk: list[str] = []
        self.untied_bytes = 0
        self.changed = False  # the untie and the norm fold, which R1 does first
        self.refused: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.options.r1:
            self._r1(model)
        regions, _ = find_regions(model)
        if self.options.r2:
            for region in (r for r in regions if r.kind == "v->o"):
                self._r2(model, region)
        if self.options.online_down:
            for region in (r for r in regions if r.kind == "up->down"):
                for sink in region.sinks:
                    if factors(sink.in_features) is None and sink.in_features > DENSE_LIMIT:
                        self.refused.append({"candidate": sink.name, "reason": f"no known Hadamard of order "
                                             f"{sink.in_features} and a dense online rotation that large is too slow"})
                        continue
                    w = weight_array(sink).astype(np.float64)
                    h = insert_online_hadamard(model.graph, sink)
                    set_linear_weight(model.graph, sink, h.T @ w)  # x H H^T W = x W
                    self.online.append(sink.name)
        if self.options.online_qk:
            self._qk(model)
        modified = bool(self.changed or self.r1.get("writers") or self.r2 or self.online or self.online_qk)
        return ir.passes.PassResult(model, modified=modified)

    def _r1(self, model: ir.Model) -> None:
        from qgraph.passes.fold_norm_affine import FoldNormAffinePass

        graph = model.graph
        head = next((layer for layer in find_linears(model) if layer.role == "lm_head"), None)
        if head is not None and head.node.inputs[1].const_value is None:  # MatMul(x, Transpose(table)): tied
            w = weight_array(head)
            set_linear_weight(graph, head, w)
            self.untied_bytes = int(w.size * 4)
            self.changed = True
        self.changed |= FoldNormAffinePass()(model).modified  # kept even when the stream is refused below
        try:
            stream = residual_stream(model)
        except StreamRefusal as exc:
            self.refused.append({"candidate": "residual stream (R1)", "reason": str(exc)})
            return
        for norm in stream.norms:
            if not np.all(norm.gamma.const_value.numpy() == 1):
                self.refused.append({"candidate": "residual stream (R1)",
                                     "reason": f"norm {norm.name} keeps gamma != 1 after folding (its readers refused "
                                               "the fold), and RMSNorm(x Q) = RMSNorm(x) Q needs gamma = 1"})
                return
        regions, rejected = find_regions(model)
        readers: list[LinearLayer] = []
        for norm in stream.norms:
            region = next((r for r in regions if r.kind == "norm->linears" and r.sources[0].node is norm.output_node),
                          None)
            if region is None:
                reason = next((r.reason for r in rejected if r.candidate == norm.name), "not a norm -> linears region")
                self.refused.append({"candidate": "residual stream (R1)",
                                     "reason": f"the readers of norm {norm.name} cannot take Q^T: {reason}"})
                return
            readers.extend(region.sinks)
        size = stream.gather.inputs[0].shape[1]
        q, kind = orthogonal(int(size), self.options.seed)
        if self._spin_ready():
            # R2's o_proj inputs do not change under R1: they are sampled in the same calibration run.
            o_inputs = [s.node.inputs[0].name for r in regions if r.kind == "v->o" and self.options.r2 for s in r.sinks]
            groups: dict[str, list[LinearLayer]] = {}
            for layer in readers:
                if layer.role == "block":
                    groups.setdefault(layer.node.inputs[0].name, []).append(layer)
            self._sample(model, list(groups) + o_inputs)
            terms = [_term(self._samples[name], layers) for name, layers in groups.items()]
            q, before, after = self._learn(terms, q, blocks=1)
            kind += f" learned by {self.options.spin_steps} Cayley SGD steps (SpinQuant)"
            self.spin["r1"] = {"inputs": len(terms), "error_start": round(before, 6), "error_learned": round(after, 6)}
        table = stream.gather.inputs[0].const_value.numpy().astype(np.float64)
        set_constant_input(graph, stream.gather, 0, table @ q, suffix="rotated")
        for layer, bias, bias_node in stream.writers:
            set_linear_weight(graph, layer, weight_array(layer).astype(np.float64) @ q)
            if bias is not None:  # the Add after the linear, or the Gemm's own C
                b = bias.const_value.numpy().astype(np.float64).reshape(-1)
                set_constant_input(graph, bias_node, list(bias_node.inputs).index(bias), b @ q)
        for layer in readers:
            set_linear_weight(graph, layer, q.T @ weight_array(layer).astype(np.float64))
        self.r1 = {"size": int(size), "matrix": kind, "writers": len(stream.writers), "readers": len(readers),
                   "norms": len(stream.norms)}

    def _r2(self, model: ir.Model, region: Region) -> None:
        graph = model.graph
        head_dim = _head_dim(region)
        if head_dim is None:
            self.refused.append({"candidate": region.name, "reason": "no Reshape on the v -> o path names the head size"})
            return
        index = region.sink_index
        if np.any(index % head_dim != np.arange(len(index)) % head_dim):
            self.refused.append({"candidate": region.name,
                                 "reason": f"o_proj rows do not read whole {head_dim}-wide heads of v in order"})
            return
        h, _ = orthogonal(head_dim, self.options.seed)
        (source,) = region.sources
        v = source.linear
        heads_v, heads_o = region.channels // head_dim, len(index) // head_dim
        if self._spin_ready():
            names = [sink.node.inputs[0].name for sink in region.sinks]
            if any(name not in self._samples for name in names):
                self._sample(model, names)
            terms = [_term(self._samples[sink.node.inputs[0].name], [sink]) for sink in region.sinks]
            h, before, after = self._learn(terms, h, blocks=heads_o)
            self.spin.setdefault("r2", []).append({"region": region.name, "error_start": round(before, 6),
                                                   "error_learned": round(after, 6)})
        set_linear_weight(graph, v, weight_array(v).astype(np.float64) @ np.kron(np.eye(heads_v), h))
        if source.bias is not None:
            b = source.bias.const_value.numpy().astype(np.float64).reshape(-1)
            node = source.bias_node
            set_constant_input(graph, node, list(node.inputs).index(source.bias), b @ np.kron(np.eye(heads_v), h))
        for sink in region.sinks:
            set_linear_weight(graph, sink, np.kron(np.eye(heads_o), h).T @ weight_array(sink).astype(np.float64))
        self.r2.append(region.name)

    def _qk(self, model: ir.Model) -> None:
        """Q -> Q H right before Q K^T and K -> K H where the cache would store it (after RoPE, before GQA's repeat)."""
        from qgraph.ir.attention import find_attention

        blocks, rejected = find_attention(model)
        self.refused.extend({"candidate": r.candidate, "reason": r.reason} for r in rejected)
        if not blocks:
            self.refused.append({"candidate": "online_qk", "reason": "no attention block (softmax(Q K^T) V) in the graph"})
        graph = model.graph
        for block in blocks:
            key, query = block.key, block.scores.inputs[0]
            size = key.channels
            if key.channel_axis != key.rank - 1:
                self.refused.append({"candidate": block.name, "reason": f"the key tensor {key.value.name} keeps its "
                                     "head channels on another axis than the last, which a MatMul rotates"})
                continue
            if factors(size) is None and size > DENSE_LIMIT:
                self.refused.append({"candidate": block.name, "reason": f"no known Hadamard of order {size} and a "
                                     "dense online rotation that large is too slow"})
                continue
            readers = list(key.value.uses())
            rotated_key, _ = rotate_value(graph, key.value, size, f"{block.name}.key")
            for user, index in readers:
                user.replace_input_with(index, rotated_key)
            rotated_query, _ = rotate_value(graph, query, size, f"{block.name}.query", before=block.scores)
            block.scores.replace_input_with(0, rotated_query)
            self.online_qk.append(block.name)

    # SpinQuant ---------------------------------------------------------------------------------

    def _spin_ready(self) -> bool:
        """Whether R1/R2 are learned; a recipe with float activations has nothing to learn them on (reported)."""
        if not self.options.spin_steps:
            return False
        spec = self.activation_spec
        if spec is None or spec.is_float or self.windows is None:
            if not any(r["candidate"] == "spin_steps" for r in self.refused):
                why = "the recipe quantizes no activations" if self.windows is not None else "no calibration data"
                self.refused.append({"candidate": "spin_steps", "reason": f"{why}: the SpinQuant loss rounds the "
                                     "rotated activations, so the Hadamard is kept"})
            return False
        return True

    def _sample(self, model: ir.Model, names: list[str]) -> None:
        from qgraph.calib.stats import collect_stats

        stats = collect_stats(model, names, self.windows, progress=self.progress, sample_tokens=self.options.spin_tokens)
        self._samples.update({name: s.sample_rows for name, s in stats.items()})

    def _learn(self, terms: list, r0: np.ndarray, blocks: int) -> tuple[np.ndarray, float, float]:
        from qgraph.calib.cayley import learn_rotation

        o = self.options
        return learn_rotation(terms, r0, self.activation_spec, blocks=blocks, steps=o.spin_steps, lr=o.spin_lr)

    def summary(self) -> dict:
        return {"r1": self.r1, "r2_regions": len(self.r2), "online_hadamards": len(self.online),
                "online_qk_blocks": len(self.online_qk), "spin": self.spin,
                "untied_lm_head_bytes": self.untied_bytes, "refused": self.refused}


def _term(rows: np.ndarray, layers: list[LinearLayer]):
    """A SpinQuant loss term: the token rows a linear group reads and G = W W^T of its concatenated weights."""
    from qgraph.calib.cayley import RotationTerm

    w = np.concatenate([weight_array(layer).astype(np.float64) for layer in layers], axis=1)
    return RotationTerm(rows, w @ w.T)


def _head_dim(region: Region) -> int | None:
    for node in region.path:
        if node.op_type != "Reshape":
            continue
        shape = node.outputs[0].shape
        if shape is not None and len(shape) == 4 and isinstance(shape[-1], int) and 1 < shape[-1] < region.channels \
                and region.channels % shape[-1] == 0:
            return int(shape[-1])
    return None


@register("rotate", RotateOptions, help="QuaRot R1 (residual stream), R2 (per head) and online Hadamard before down_proj")
def build(options: RotateOptions, ctx: PassContext) -> RotatePass:
    """The rotation for a recipe (data-free unless spin_steps learns it on calibration data)."""
    return RotatePass(options, windows=ctx.windows, activation_spec=ctx.activation_spec, progress=ctx.progress)
