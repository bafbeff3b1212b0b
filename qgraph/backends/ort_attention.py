"""ONNX Runtime's fused decoder attention for KV-cache graphs: one GroupQueryAttention per block.

The exported decoder step spends most of a generated token outside its linears: per layer about
seventy small ops (head split, RoPE's slices and negations, the cache Concat, GQA's head repeat,
scale, mask, softmax, merge). ONNX Runtime's com.microsoft GroupQueryAttention does all of it in one
kernel, as onnxruntime-genai's model builder emits it. onnxscript's ort_fusions has a GQA rule, but
it matches only one mask construction and its RoPE rule needs a cos/sin-cache form this export
does not have (0 of 30 blocks matched on SmolLM2), so the rewrite is here, on the attention blocks
`qgraph.ir.attention` finds:

  q, k, v projections [B, S, H*D] -> Reshape -> Transpose(0,2,1,3) -> RoPE on q and k
  k, v -> Concat(past, new) = present -> head repeat -> q k^T (scalar scales) + mask -> Softmax -> @ v
  -> Transpose(0,2,1,3) -> Reshape [B, S, H*D]

becomes GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
cos_cache, sin_cache, position_ids) with do_rotary=1 and the present outputs under their old names.
RoPE must be the rotate-half form (x cos + rotate_half(x) sin) with cos and sin computed from
position_ids alone: the caches are those values evaluated at positions 0..context-1, so any RoPE
scaling the model applies is in them. The mask must be the causal one plus attention_mask padding,
which GQA derives from seqlens_k; a model with a sliding window is left unfused. A block that does
not match keeps its ops and is reported with the reason; `verify_fusion` checks the fused graph
against the unfused one on a prompt and cached decode steps before an artifact records it.

RMSNorm and residual-add + RMSNorm become (Skip)SimplifiedLayerNormalization through onnxscript's
own rules, which do match this export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.ir.attention import LAYOUT_OPS, Attention, find_attention
from qgraph.ir.feeds import CACHE_INPUT, CACHE_OUTPUT
from qgraph.ir.regions import Rejection
from qgraph.ir.rewrite import shared_initializer

MS = "com.microsoft"
SHARE_BUFFER_KEY = "qgraph.past_present_share_buffer"
MAX_POSITIONS_KEY = "qgraph.max_positions"
MIN_POSITIONS = 8192
OWN_DATA_MIN_BYTES = 1 << 16  # the runtime graph's tensors above this go to model.ort.onnx.data
RUNTIME_FILE = "model.ort.onnx"
VERIFY_PROMPT, VERIFY_STEPS = 13, 4
VERIFY_ATOL = 1e-3  # logits are O(10): float reassociation in one fused kernel stays far below this


class _NoMatch(Exception):
    """A block GroupQueryAttention cannot express; the message says why."""


@dataclasses.dataclass
class FusionReport:
    fused: list[str] = dataclasses.field(default_factory=list)
    refused: list[Rejection] = dataclasses.field(default_factory=list)
    norms: int = 0
    skip_norms: int = 0

    def to_dict(self) -> dict:
        return {"attention_fused": len(self.fused), "attention_refused": [dataclasses.asdict(r) for r in self.refused],
                "rms_norms": self.norms, "skip_rms_norms": self.skip_norms}


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value | None) -> float | None:
    a = _const(value)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def _producer(value: ir.Value | None, op_type: str | tuple[str, ...], what: str) -> ir.Node:
    node = value.producer() if value is not None else None
    ops = (op_type,) if isinstance(op_type, str) else op_type
    if node is None or node.op_type not in ops or node.domain not in ("", "ai.onnx"):
        found = "a graph input" if node is None else f"{node.op_type} {node.name!r}"
        raise _NoMatch(f"{what}: expected {' or '.join(ops)}, found {found}")
    return node


def _scaled_chain(value: ir.Value, stop: ir.Value) -> float:
    """The product of the scalar Mul/Div on the layout-only path from `value` back to `stop`."""
    scale = 1.0
    while True:
        value, c = _strip_scale(value)
        scale *= c
        if value is stop:
            return scale
        node = value.producer()
        if node is None:
            raise _NoMatch(f"{value.name!r} is not computed from {stop.name!r} by layout ops and scalar scales")
        if node.op_type not in LAYOUT_OPS:
            raise _NoMatch(f"{node.op_type} {node.name!r} between the cache and q k^T is not a layout op or a scalar scale")
        value = node.inputs[0]


def _head_split(value: ir.Value, what: str) -> ir.Value:
    """x = Transpose(0,2,1,3)(Reshape(lin)): the projection output lin [B, S, H*D]."""
    t = _producer(value, "Transpose", f"{what} head split")
    if tuple(t.attributes.get_ints("perm", ())) != (0, 2, 1, 3):
        raise _NoMatch(f"{what} head split: Transpose {t.name!r} has perm {t.attributes.get_ints('perm')}, not (0, 2, 1, 3)")
    r = _producer(t.inputs[0], "Reshape", f"{what} head split")
    return r.inputs[0]


def _rotate_half_of(value: ir.Value) -> ir.Value | None:
    """x when value = Concat(-x[..., D/2:], x[..., :D/2]) on the last axis, else None."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        return None
    neg, first = (v.producer() for v in node.inputs)
    if neg is None or neg.op_type != "Neg" or first is None or first.op_type != "Slice":
        return None
    second = neg.inputs[0].producer()
    if second is None or second.op_type != "Slice" or second.inputs[0] is not first.inputs[0]:
        return None
    starts = [_const(s.inputs[1]) for s in (first, second)]
    axes = [_const(s.inputs[3]) if len(s.inputs) > 3 else None for s in (first, second)]
    if any(a is None for a in starts) or any(a is None or int(a.reshape(-1)[0]) not in (-1, 3) for a in axes):
        return None
    if int(starts[0].reshape(-1)[0]) != 0 or int(starts[1].reshape(-1)[0]) <= 0:
        return None
    return first.inputs[0]


def _rope(value: ir.Value, what: str) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(x, cos, sin) when value = x * cos + rotate_half(x) * sin."""
    add = _producer(value, "Add", f"{what} RoPE")
    muls = [_producer(v, "Mul", f"{what} RoPE") for v in add.inputs]
    for rot_mul, plain_mul in (muls, muls[::-1]):
        for i in (0, 1):
            x = _rotate_half_of(rot_mul.inputs[i])
            if x is None:
                continue
            sin = rot_mul.inputs[1 - i]
            for j in (0, 1):
                if plain_mul.inputs[j] is x:
                    return x, plain_mul.inputs[1 - j], sin
    raise _NoMatch(f"{what} RoPE: {add.name!r} is not x * cos + rotate_half(x) * sin")


def _cache_concat(cached: ir.Value, graph: ir.Graph, what: str) -> tuple[ir.Value, ir.Value]:
    """(past input, new tensor) of the Concat that makes present.N.{key,value}."""
    cat = _producer(cached, "Concat", f"{what} cache")
    if len(cat.inputs) != 2 or cat.attributes.get_int("axis", 0) not in (2, -2):
        raise _NoMatch(f"{what} cache: Concat {cat.name!r} is not Concat(past, new) on the token axis")
    past, new = cat.inputs
    if past not in graph.inputs or not CACHE_INPUT.match(past.name or ""):
        raise _NoMatch(f"{what} cache: {cat.name!r} does not read a past_key_values input")
    if cached not in graph.outputs or not CACHE_OUTPUT.match(cached.name or ""):
        raise _NoMatch(f"{what} cache: {cached.name!r} is not a present output")
    return past, new


def _merged_output(mix: ir.Node) -> ir.Value:
    """The [B, S, H*D] value after P V's Transpose(0,2,1,3) and Reshape."""
    users = [u for u, _ in mix.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "Transpose" or tuple(users[0].attributes.get_ints("perm", ())) != (0, 2, 1, 3):
        raise _NoMatch(f"the output of {mix.name!r} is not merged back by one Transpose(0, 2, 1, 3)")
    users = [u for u, _ in users[0].outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "Reshape":
        raise _NoMatch(f"the heads after {mix.name!r} are not merged by one Reshape")
    return users[0].outputs[0]


def _strip_scale(value: ir.Value) -> tuple[ir.Value, float]:
    """(x, c) when value is x multiplied or divided by scalar constants (c their product)."""
    scale = 1.0
    while (node := value.producer()) is not None and node.op_type in ("Mul", "Div") and len(node.inputs) == 2:
        a, b = node.inputs
        if (c := _scalar(b)) is not None:
            scale, value = (scale * c if node.op_type == "Mul" else scale / c), a
        elif node.op_type == "Mul" and (c := _scalar(a)) is not None:
            scale, value = scale * c, b
        else:
            break
    return value, scale


def _mask_scale(att: Attention) -> float:
    """The scalar scale between q k^T and the Softmax; the additive mask there is taken as GQA's causal one."""
    softmax = _producer(att.mix.inputs[0], "Softmax", f"P V {att.mix.name!r}")
    if softmax.attributes.get_int("axis", -1) not in (-1, 3):
        raise _NoMatch(f"Softmax {softmax.name!r} is not over the last axis")
    scores = att.scores.outputs[0]
    value, scale = _strip_scale(softmax.inputs[0])
    while value is not scores:
        node = _producer(value, "Add", "between q k^T and the Softmax (GQA applies only a scale and the causal mask)")
        a, b = node.inputs
        carries = a is scores or (a.producer() is not None and a.producer().op_type in ("Mul", "Div", "Add"))
        value, c = _strip_scale(a if carries else b)
        scale *= c
    return scale


@dataclasses.dataclass
class _Block:
    name: str
    q: ir.Value
    k: ir.Value
    v: ir.Value
    past_k: ir.Value
    past_v: ir.Value
    present_k: ir.Value
    present_v: ir.Value
    out: ir.Value
    cos: ir.Value
    sin: ir.Value
    heads: int
    kv_heads: int
    head: int
    scale: float


def _match(att: Attention, graph: ir.Graph) -> _Block:
    past_k, k_new = _cache_concat(att.key.value, graph, "key")
    past_v, v_new = _cache_concat(att.value.value, graph, "value")
    k_x, cos, sin = _rope(k_new, "key")
    q_roped, q_scale = _strip_scale(att.scores.inputs[0])
    q_x, q_cos, q_sin = _rope(q_roped, "query")
    if q_cos is not cos or q_sin is not sin:
        raise _NoMatch("query and key are rotated with different cos/sin tensors")
    k_scale = _scaled_chain(att.scores.inputs[1], att.key.value)
    if _scaled_chain(att.mix.inputs[1], att.value.value) != 1.0:
        raise _NoMatch("V is scaled between the cache and P V")
    q, k, v = _head_split(q_x, "query"), _head_split(k_x, "key"), _head_split(v_new, "value")
    return _Block(att.name, q, k, v, past_k, past_v, att.key.value, att.value.value, _merged_output(att.mix), cos, sin,
                  0, 0, att.key.channels, q_scale * k_scale * _mask_scale(att))


def _width(value: ir.Value) -> int | None:
    shape = value.shape
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None


def _set_heads(model: ir.Model, blocks: list[_Block]) -> list[tuple[_Block, str]]:
    """Head counts from the projections' widths (shape inference or, where a contrib op left none, one probe run)."""
    from qgraph.ir.attention import _ort_probe

    unknown = [x for b in blocks for x in (b.q, b.k, b.v) if _width(x) is None]
    probed = {n: s[-1] for n, s in _ort_probe(model, list(dict.fromkeys(x.name for x in unknown)), 11).items()} if unknown else {}
    bad = []
    for b in blocks:
        dims = [_width(x) or probed[x.name] for x in (b.q, b.k, b.v)]
        if any(d % b.head for d in dims) or dims[1] != dims[2]:
            bad.append((b, f"projection widths {dims} are not multiples of the head size {b.head} with k and v alike"))
            continue
        b.heads, b.kv_heads = dims[0] // b.head, dims[1] // b.head
    return bad


def _zero_point_shift(value: ir.Value) -> tuple[ir.Node, ir.Value | None, np.ndarray | None] | None:
    """The MatMulNBits making `value`, with the block-sum term of a float-zero-point layer (sums, shift) if any.

    A float-zero-point layer lowers to Add(MatMulNBits(x), MatMul(block_sums(x), shift)) (onnx_qdq); a
    plain one is its MatMulNBits alone. None for anything else.
    """
    node = value.producer()
    if node is not None and node.op_type == "MatMulNBits" and node.domain == MS:
        return node, None, None
    if node is None or node.op_type != "Add" or node.domain != "":
        return None
    a, b = (i.producer() if i is not None else None for i in node.inputs)
    if b is not None and b.op_type == "MatMulNBits":
        a, b = b, a
    if a is None or a.op_type != "MatMulNBits" or a.domain != MS or b is None or b.op_type != "MatMul":
        return None
    shift = _const(b.inputs[1])
    return (a, b.inputs[0], shift) if shift is not None else None


def _packed_projection(graph: ir.Graph, block: _Block) -> ir.Value | None:
    """One MatMulNBits for q, k and v when all three are MatMulNBits of the same input and format (None otherwise).

    GroupQueryAttention takes the packed [B, S, (H + 2 Hkv) D] output as its query: one int4 GEMV
    of 960 rows instead of three (576, 192, 192) per token, as the model builder packs them. The
    packed weight, scales and zero points are the three concatenated along N, row for row; float
    zero points' block-sum terms (w4a16-q41) are packed alike into one MatMul and one Add.
    """
    found = [_zero_point_shift(v) for v in (block.q, block.k, block.v)]
    if any(f is None for f in found):
        return None
    nodes = [f[0] for f in found]
    sums = {id(f[1]) for f in found}
    if len(sums) != 1 or (found[0][1] is None) != (found[0][2] is None):
        return None
    first = nodes[0]
    same = ("K", "bits", "block_size", "accuracy_level")
    if any(n.inputs[0] is not first.inputs[0] or len(n.inputs) != len(first.inputs) or
           any(n.attributes.get_int(a) != first.attributes.get_int(a) for a in same) for n in nodes[1:]):
        return None
    arrays = []
    for i in range(1, len(first.inputs)):
        parts = [_const(n.inputs[i]) if n.inputs[i] is not None else None for n in nodes]
        if all(p is None for p in parts):
            arrays.append(None)
            continue
        if any(p is None for p in parts) or len({p.dtype for p in parts}) != 1:
            return None
        # Scales and zero points may be flat (N-major): the rows of each node follow one another either way.
        arrays.append(np.concatenate(parts, axis=0))
    name = f"{block.name}.qkv_proj"
    inputs = [first.inputs[0]] + [None if a is None else shared_initializer(graph, f"{name}.input{i + 1}", a)
                                  for i, a in enumerate(arrays)]
    attrs = {a.name: a.value for a in first.attributes.values()}
    attrs["N"] = sum(n.attributes.get_int("N") for n in nodes)
    packed = ir.node("MatMulNBits", inputs, attributes=attrs, domain=MS, name=name)
    graph.insert_before(first, packed)
    out = packed.outputs[0]
    if found[0][1] is not None:
        shift = shared_initializer(graph, f"{name}.zero_point_shift", np.concatenate([f[2] for f in found], axis=1))
        term = ir.node("MatMul", [found[0][1], shift], name=f"{name}.zero_point_shift")
        total = ir.node("Add", [out, term.outputs[0]], name=f"{name}.with_zero_points")
        graph.insert_after(packed, [term, total])
        out.name = f"{name}.int4"
        out = total.outputs[0]
    out.name = f"{name}.output"
    return out


def _rotary_caches(graph: ir.Graph, cos: ir.Value, sin: ir.Value, positions: ir.Value, length: int,
                   head: int) -> tuple[np.ndarray, np.ndarray]:
    """GQA's cos/sin caches [length, head/2]: the graph's own cos and sin at positions 0..length-1."""
    from qgraph.backends.onnx_qdq import session_from_model

    try:
        sub = ir.convenience.extract(graph, inputs=[positions], outputs=[cos, sin])
    except ValueError:
        raise _NoMatch("RoPE's cos/sin are not computed from position_ids alone") from None
    model = ir.Model(sub, ir_version=10)
    model.opset_imports.update(graph.opset_imports)
    session = session_from_model(model, threads=1, optimize=False)
    feeds = {sub.inputs[0].name: np.arange(length, dtype=np.int64)[None, :]}
    c, s = (a.reshape(length, -1) for a in session.run(None, feeds))
    if c.shape[1] != head:
        raise _NoMatch(f"RoPE covers {c.shape[1]} of {head} head channels (partial rotary)")
    half = head // 2
    if not (np.allclose(c[:, :half], c[:, half:]) and np.allclose(s[:, :half], s[:, half:])):
        raise _NoMatch("cos/sin are not the rotate-half layout (both halves equal)")
    return np.ascontiguousarray(c[:, :half], np.float32), np.ascontiguousarray(s[:, :half], np.float32)


def _sequence_lengths(graph: ir.Graph, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
    """seqlens_k = sum(attention_mask, 1) - 1 (int32 [B]) and total_sequence_length (int32 scalar), as GQA wants."""
    one = shared_initializer(graph, "qgraph.gqa.one", np.array([1], np.int64))
    total_sum = ir.node("ReduceSum", [mask, one], attributes={"keepdims": 0}, name="qgraph.gqa.mask_sum")
    minus = ir.node("Sub", [total_sum.outputs[0], shared_initializer(graph, "qgraph.gqa.one_scalar", np.array(1, np.int64))],
                    name="qgraph.gqa.past_plus_seq_minus_one")
    seqlens = ir.node("Cast", [minus.outputs[0]], attributes={"to": ir.DataType.INT32}, name="qgraph.gqa.seqlens_k")
    shape = ir.node("Shape", [mask], attributes={"start": 1, "end": 2}, name="qgraph.gqa.mask_width")
    squeeze = ir.node("Squeeze", [shape.outputs[0]], name="qgraph.gqa.total_length_i64")
    total = ir.node("Cast", [squeeze.outputs[0]], attributes={"to": ir.DataType.INT32}, name="qgraph.gqa.total_length")
    nodes = [total_sum, minus, seqlens, shape, squeeze, total]
    graph.extend(nodes)
    seqlens.outputs[0].name, total.outputs[0].name = "qgraph.gqa.seqlens_k", "qgraph.gqa.total_sequence_length"
    return seqlens.outputs[0], total.outputs[0]


def fuse_attention(model: ir.Model, *, context: int = 4096, sliding_window: int | None = None) -> FusionReport:
    """Rewrite, in place, every matching attention block of a KV-cache graph into GroupQueryAttention.

    `context` sizes the cos/sin caches (positions beyond it are out of range for the fused graph);
    a `sliding_window` (from the model's config) leaves every block unfused, since GQA's causal mask
    would not apply it on prompts longer than the window.
    """
    report = FusionReport()
    graph = model.graph
    names = {v.name: v for v in graph.inputs}
    if "attention_mask" not in names or "position_ids" not in names:
        report.refused.append(Rejection("graph", "no attention_mask / position_ids inputs (not a KV-cache decoder graph)"))
        return report
    blocks, rejected = find_attention(model)
    report.refused += rejected
    if sliding_window:
        report.refused += [Rejection(b.name, f"sliding window of {sliding_window} tokens: GQA's local_window_size "
                                             "is not verified here, the block stays unfused") for b in blocks]
        return report
    matched: list[_Block] = []
    for att in blocks:
        try:
            matched.append(_match(att, graph))
        except _NoMatch as exc:
            report.refused.append(Rejection(att.name, str(exc)))
    if not matched:
        return report
    for block, reason in _set_heads(model, matched):
        matched.remove(block)
        report.refused.append(Rejection(block.name, reason))
    caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
    seqlens = total = None
    for block in matched:
        key = (id(block.cos), id(block.sin))
        if key not in caches:
            try:
                c, s = _rotary_caches(graph, block.cos, block.sin, names["position_ids"], context, block.head)
            except _NoMatch as exc:
                report.refused.append(Rejection(block.name, str(exc)))
                continue
            i = len(caches)
            caches[key] = (shared_initializer(graph, f"qgraph.gqa.cos_cache.{i}", c),
                           shared_initializer(graph, f"qgraph.gqa.sin_cache.{i}", s))
        if seqlens is None:
            seqlens, total = _sequence_lengths(graph, names["attention_mask"])
        cos_cache, sin_cache = caches[key]
        qkv = _packed_projection(graph, block)
        gqa = ir.node("GroupQueryAttention",
                      [*((qkv, None, None) if qkv is not None else (block.q, block.k, block.v)),
                       block.past_k, block.past_v, seqlens, total, cos_cache, sin_cache, names["position_ids"]],
                      attributes={"num_heads": block.heads, "kv_num_heads": block.kv_heads, "do_rotary": 1,
                                  "rotary_interleaved": 0, "scale": float(block.scale)},
                      domain=MS, num_outputs=3, name=f"{block.name}.GroupQueryAttention")
        graph.insert_after(block.out.producer(), gqa)
        out, present_k, present_v = gqa.outputs
        ir.convenience.replace_all_uses_with(block.out, out)
        for old, new in ((block.present_k, present_k), (block.present_v, present_v)):
            i = list(graph.outputs).index(old)
            name = old.name
            old.name = f"{name}.unfused"
            new.name, new.shape, new.type = name, old.shape, old.type
            graph.outputs[i] = new
        out.name, out.shape, out.type = f"{block.name}.attention", block.out.shape, block.out.type
        report.fused.append(block.name)
    if report.fused:
        model.opset_imports.setdefault(MS, 1)
    model.graph.sort()
    report.norms, report.skip_norms = _fuse_norms(model)
    model.graph.sort()  # the shared seqlens / caches nodes were appended after their first reader
    return report


def _contrib_shapes(model: ir.Model) -> None:
    """Output shapes for MatMulNBits (ONNX shape inference does not know contrib ops): the input's with N last.

    Also the block-sum term of float zero points after it (MatMul by a constant, Add of equal shapes), so
    that the skip-norm rule sees the residual Add's shapes.
    """
    for node in model.graph:  # sorted: producers first
        out = node.outputs[0] if node.outputs else None
        if out is None or out.shape is not None:
            continue
        x = node.inputs[0] if node.inputs else None
        if x is None or x.shape is None:
            continue
        if node.op_type == "MatMulNBits" and node.attributes.get_int("N") is not None:
            out.shape, out.type = ir.Shape([*x.shape[:-1], node.attributes.get_int("N")]), x.type
        elif node.op_type == "MatMul" and node.domain == "" and (w := _const(node.inputs[1])) is not None and w.ndim == 2:
            out.shape, out.type = ir.Shape([*x.shape[:-1], w.shape[1]]), x.type
        elif node.op_type == "Add" and node.domain == "" and node.inputs[1].shape is not None and \
                list(node.inputs[1].shape) == list(x.shape):
            out.shape, out.type = x.shape, x.type


def _fuse_norms(model: ir.Model) -> tuple[int, int]:
    """RMSNorm -> SimplifiedLayerNormalization, Add + RMSNorm -> SkipSimplifiedLayerNormalization (onnxscript's rules)."""
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    _contrib_shapes(model)  # the skip rule checks both Add inputs' shapes
    norms = fuse_rms_normalization(model)
    skips = fuse_skip_rms_normalization(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the unfused blocks' and norms' old ops
    return int(norms), int(skips)



def _accuracy_levels(model: ir.Model, level: int) -> dict[str, int]:
    """Set every MatMulNBits' accuracy_level; returns the old levels by node name."""
    old = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            old[node.name] = node.attributes.get_int("accuracy_level", 0)
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    return old


def _restore_levels(model: ir.Model, old: dict[str, int]) -> None:
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.name in old:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", old[node.name])


def _without_activation_rounding(model: ir.Model) -> ir.Model:
    """A copy whose activation QuantizeLinear -> DequantizeLinear pairs are bypassed (weights stay as stored)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    if not any(n.op_type == "QuantizeLinear" for n in model.graph):
        return model
    copy = model.clone()  # the tensors are shared, not copied
    bypassed = 0
    for node in list(copy.graph):
        q = node.inputs[0].producer() if node.op_type == "DequantizeLinear" and node.inputs[0] is not None else None
        if q is not None and q.op_type == "QuantizeLinear" and node.outputs[0] not in copy.graph.outputs:
            ir.convenience.replace_all_uses_with(node.outputs[0], q.inputs[0])
            bypassed += 1
    if bypassed:
        RemoveUnusedNodesPass()(copy)
    return copy


def _decode_outputs(model: ir.Model, ids: np.ndarray, optimize: bool = True) -> tuple[np.ndarray, dict]:
    """Logits of a VERIFY_PROMPT-token prompt and then one cached step per remaining id, and the final cache."""
    from qgraph.backends.onnx_qdq import session_from_model
    from qgraph.generate import Decoder

    decoder = Decoder(session_from_model(model, threads=2, optimize=optimize), share_buffer=False)
    logits, cache = decoder.step(ids[:, :VERIFY_PROMPT], decoder.start(), 0)
    rows = [logits]
    for t in range(VERIFY_PROMPT, ids.shape[1]):
        logits, cache = decoder.step(ids[:, t:t + 1], cache, t)
        rows.append(logits)
    return np.concatenate(rows, axis=1), cache


def _max_difference(a: tuple[np.ndarray, dict], b: tuple[np.ndarray, dict]) -> float:
    """Max |logit difference|, and of each cache tensor relative to its magnitude when that exceeds 1 (a migrated
    V cache holds values in activation-step units, hundreds, whose float rounding is larger in absolute terms)."""
    (la, ca), (lb, cb) = a, b
    caches = (np.abs(ca[k] - cb[k]).max() / max(1.0, float(np.abs(ca[k]).max(initial=0))) for k in ca)
    return float(max(np.abs(la - lb).max(), *caches))


def verify_fusion(reference: ir.Model, fused: ir.Model, *, seed: int = 0) -> tuple[float, float]:
    """(check, as compiled): max |logit and present difference| of the fused graph against the unfused one
    over a prompt and cached steps.

    The check runs both graphs with their activations unrounded: MatMulNBits at accuracy_level 0 (float
    activations) and every activation QuantizeLinear -> DequantizeLinear bypassed. Rounded activations
    turn a last-bit difference of a fused op into a whole code step of some activation (and the next
    layer's input moves with it), so a comparison with rounding measures the rounding, not the rewrite.
    The second number is the same comparison of the graphs as compiled, for the report.
    """
    logits = reference.graph.outputs[0].shape
    vocab = logits[-1] if logits is not None and isinstance(logits[-1], int) else 100
    ids = np.random.default_rng(seed).integers(0, max(2, min(vocab, 1000)), size=(1, VERIFY_PROMPT + VERIFY_STEPS))
    unrounded = []
    for model in (reference, fused):
        old = _accuracy_levels(model, 0)
        try:
            # ORT's optimizer would fold DequantizeLinear(W) -> MatMul into MatMulNBits, whose default
            # accuracy level rounds the float activations again: the check runs the graphs as written
            unrounded.append(_decode_outputs(_without_activation_rounding(model), ids, optimize=False))
        finally:
            _restore_levels(model, old)
    compiled = [_decode_outputs(model, ids) for model in (reference, fused)]
    return _max_difference(*unrounded), _max_difference(*compiled)


def runtime_graph(model: ir.Model, decoder: dict | None) -> tuple[ir.Model | None, dict]:
    """The fused copy of a KV-cache graph ONNX Runtime runs (None when no block fused or the check failed), and its report.

    The copy shares the weights of `model`; `model` itself is not changed.
    """
    decoder = decoder or {}
    fused = model.clone()
    # Positions the cos/sin caches cover: the model's context, and at least MIN_POSITIONS (the unfused
    # graph computes RoPE at any position; a model with a short declared context still runs longer).
    positions = max(int(decoder.get("context_length") or 0), MIN_POSITIONS)
    report = fuse_attention(fused, context=positions, sliding_window=decoder.get("sliding_window"))
    out = report.to_dict()
    if not report.fused:
        return None, out
    err, as_compiled = verify_fusion(model, fused)
    out["verified_max_abs_diff"] = err  # activations unrounded (verify_fusion says why)
    out["as_compiled_max_abs_diff"] = as_compiled
    if not np.isfinite(err) or err > VERIFY_ATOL:
        out["refused"] = f"the fused graph differs from the unfused one by {err:.3g} (> {VERIFY_ATOL}): kept unfused"
        return None, out
    fused.metadata_props[SHARE_BUFFER_KEY] = "1"
    fused.metadata_props[MAX_POSITIONS_KEY] = str(positions)
    out["max_positions"] = positions
    return fused, out


def save_runtime_graph(runtime: ir.Model, path: Path, saved_model: Path) -> list[Path]:
    """Write the runtime graph beside the artifact's saved model.onnx, reading the same weights file.

    Initializers model.onnx stores in model.onnx.data are written as references to those bytes (the
    graphs share every weight); the runtime graph's own large tensors (packed q/k/v weights) go to
    model.ort.onnx.data, the small ones (cos/sin caches, constants) inline. Returns the files written.
    """
    saved = ir.load(saved_model)
    data = path.with_name(path.name + ".data")
    swapped: dict[str, ir.TensorProtocol] = {}
    offset = 0
    with open(data, "wb") as f:
        for name, value in runtime.graph.initializers.items():
            tensor = value.const_value
            src = saved.graph.initializers.get(name)
            if src is not None and isinstance(src.const_value, ir.ExternalTensor):
                swapped[name], value.const_value = tensor, src.const_value
            elif tensor is not None and tensor.nbytes > max(OWN_DATA_MIN_BYTES, 1024):  # never a shape or axes constant
                raw = tensor.tobytes()
                offset += -offset % 64  # aligned, as onnx_ir aligns external data
                f.seek(offset)
                f.write(raw)
                swapped[name] = tensor
                value.const_value = ir.ExternalTensor(data.name, offset=offset, length=len(raw), dtype=tensor.dtype,
                                                      shape=tensor.shape, name=name, base_dir=path.parent)
                offset += len(raw)
    try:
        proto = ir.serde.serialize_model(runtime)
    finally:
        for name, tensor in swapped.items():
            runtime.graph.initializers[name].const_value = tensor
    path.write_bytes(proto.SerializeToString())
    if offset == 0:
        data.unlink()
        return [path]
    return [path, data]
