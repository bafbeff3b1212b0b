"""Random small graphs in the shapes qgraph recognises, built directly with onnx_ir (milliseconds, no export).

A GraphSpec is plain data drawn by hypothesis, so a failing example prints as the spec that builds it.
build() writes the ops the torch exporter writes: token ids [1, T] -> Gather -> blocks -> logits (or
hidden states); RMSNorm decomposed as Pow -> ReduceMean -> Add -> Sqrt -> Reciprocal -> Mul -> Mul(gamma);
nn.Linear as MatMul (+ Add bias) on [1, T, C], or as Gemm (transB either way, bias as C) on [T, C] tokens;
attention with GQA as Reshape/Transpose, rotate_half RoPE, repeat_kv (Unsqueeze -> Expand -> Reshape),
Softmax(Q K^T) V, and the head concat back to [.., H * d]. Sizes are small and odd on purpose.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from hypothesis import strategies as st

from qgraph.ir.rewrite import add_initializer

SEQ = "seq"  # the symbolic sequence dim, named as the exporter's dynamic shape


@dataclasses.dataclass(frozen=True)
class Block:
    """One residual block: f is attention, a gated MLP, a plain MLP or a reshape round trip."""

    kind: str  # attention | gated_mlp | mlp | reshape
    norm: str  # rmsnorm | layernorm | layernorm_nobeta | none
    post_norm: bool  # x = norm(x + f(x)) (BERT) instead of x + f(norm(x)) (Llama)
    residual: bool
    bias: bool
    channel_mul: bool  # f reads h * c, c a constant per-channel vector
    heads: int = 1
    kv_heads: int = 1
    head_dim: int = 1
    rope: bool = False
    mask: bool = False
    width: int = 1  # MLP width; a reshape block's [a, b] grid is [width, heads]
    act: str = "relu"  # mlp: relu | gelu | none; gated_mlp: silu | gelu


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    vocab: int
    dim: int
    seq: int | None  # None: symbolic (exported with a dynamic sequence length)
    gemm: bool  # tokens as [T, C] and every linear a Gemm
    blocks: tuple[Block, ...]
    final_norm: str
    head: str  # untied | tied | none (encoder: the hidden states are the output)
    gamma: str  # random | ones_shared (the exporter deduplicates equal all-ones gammas)
    dead: str  # none | gamma | weight_row | weight_col: one channel that is exactly zero
    seed: int

    @property
    def length(self) -> int:
        """The token length to feed: the static one, else a length that is not a stand-in size."""
        return self.seq or 10


NORMS = ("rmsnorm", "layernorm", "layernorm_nobeta", "none")


@st.composite
def blocks(draw, gemm: bool, static: bool) -> Block:
    kind = draw(st.sampled_from(("attention", "gated_mlp", "mlp", "reshape")))
    common = {
        "kind": kind, "norm": draw(st.sampled_from(NORMS)), "post_norm": draw(st.booleans()),
        "residual": draw(st.booleans()), "bias": draw(st.booleans()), "channel_mul": draw(st.booleans()),
    }
    if kind == "attention":
        kv, d = draw(st.integers(1, 3)), draw(st.integers(1, 9))
        return Block(**common, heads=kv * draw(st.integers(1, 3)), kv_heads=kv, head_dim=d,
                     rope=d > 1 and draw(st.booleans()), mask=static and draw(st.booleans()))
    if kind == "reshape":
        return Block(**common, width=draw(st.integers(2, 5)), heads=draw(st.integers(2, 5)))
    acts = ("silu", "gelu") if kind == "gated_mlp" else ("relu", "gelu", "none")
    return Block(**common, width=draw(st.integers(3, 41)), act=draw(st.sampled_from(acts)))


@st.composite
def graph_specs(draw) -> GraphSpec:
    gemm = draw(st.booleans())
    seq = draw(st.one_of(st.none(), st.integers(5, 13)))
    return GraphSpec(
        vocab=draw(st.integers(11, 61)), dim=draw(st.integers(3, 23)), seq=seq, gemm=gemm,
        blocks=tuple(draw(st.lists(blocks(gemm, seq is not None), min_size=1, max_size=3))),
        final_norm=draw(st.sampled_from(NORMS)), head=draw(st.sampled_from(("untied", "tied", "none"))),
        gamma=draw(st.sampled_from(("random", "ones_shared"))),
        dead=draw(st.sampled_from(("none", "gamma", "weight_row", "weight_col"))), seed=draw(st.integers(0, 2**16)),
    )


class _Builder:
    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.t = spec.seq if spec.seq is not None else SEQ
        ids = ir.Value(name="input_ids", shape=ir.Shape([1, self.t]), type=ir.TensorType(ir.DataType.INT64))
        self.graph = ir.Graph([ids], [], nodes=[], opset_imports={"": 21}, name="random")
        self.count = 0
        self.ones: ir.Value | None = None

    # ---- primitives ----------------------------------------------------------------------------

    def const(self, name: str, array) -> ir.Value:
        return add_initializer(self.graph, name, np.asarray(array))

    def ints(self, values) -> ir.Value:
        return self.const("val_ints", np.asarray(values, dtype=np.int64))

    def scalar(self, x: float) -> ir.Value:
        return self.const("val_scalar", np.asarray(x, dtype=np.float32))

    def op(self, op_type: str, inputs: list, shape: list, *, name: str | None = None, **attributes) -> ir.Value:
        self.count += 1
        node = ir.node(op_type, inputs, attributes=attributes or None, name=name or f"node_{op_type}_{self.count}")
        self.graph.append(node)
        out = node.outputs[0]
        out.name, out.shape, out.type = f"v{self.count}", ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT)
        return out

    def reshape(self, x: ir.Value, shape: list) -> ir.Value:
        """Reshape to `shape` (the symbolic dim written as -1, as a dynamic export cannot fix it)."""
        target = [-1 if d == SEQ else d for d in shape]
        return self.op("Reshape", [x, self.ints(target)], shape, allowzero=0 if SEQ in shape else 1)

    def weight(self, rows: int, cols: int) -> np.ndarray:
        return (self.rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    def vector(self, n: int, lo: float = 0.5, hi: float = 2.0) -> np.ndarray:
        return self.rng.uniform(lo, hi, n).astype(np.float32) * self.rng.choice([-1.0, 1.0], n).astype(np.float32)

    # ---- layers --------------------------------------------------------------------------------

    def linear(self, x: ir.Value, out: int, name: str, bias: bool, w: np.ndarray | None = None) -> ir.Value:
        shape = list(x.shape)
        w = self.weight(int(shape[-1]), out) if w is None else w
        b = self.const(f"{name}.bias", (0.1 * self.rng.standard_normal(out)).astype(np.float32)) if bias else None
        if self.spec.gemm:
            trans_b = bool(self.rng.integers(2))
            inputs = [x, self.const(f"{name}.weight", w.T.copy() if trans_b else w)] + ([b] if b is not None else [])
            return self.op("Gemm", inputs, [shape[0], out], name=name, transB=int(trans_b))
        y = self.op("MatMul", [x, self.const(f"{name}.weight", w)], shape[:-1] + [out], name=name)
        if b is None:
            return y
        return self.op("Add", [y, b] if self.rng.integers(2) else [b, y], shape[:-1] + [out])

    def norm(self, x: ir.Value, kind: str, name: str) -> ir.Value:
        shape, c = list(x.shape), int(x.shape[-1])
        if kind == "none":
            return x
        if self.spec.gamma == "ones_shared":
            if self.ones is None:
                self.ones = self.const("ones.weight", np.ones(c, np.float32))
            gamma = self.ones
        else:
            gamma = self.const(f"{name}.weight", self.vector(c))
        if kind.startswith("layernorm"):
            inputs = [x, gamma]
            if kind == "layernorm":
                inputs.append(self.const(f"{name}.bias", (0.3 * self.rng.standard_normal(c)).astype(np.float32)))
            return self.op("LayerNormalization", inputs, shape, axis=-1, epsilon=1e-5)
        pow_ = self.op("Pow", [x, self.scalar(2.0)], shape)
        mean = self.op("ReduceMean", [pow_, self.ints([-1])], shape[:-1] + [1], keepdims=1)
        add = self.op("Add", [mean, self.scalar(1e-6)], shape[:-1] + [1])
        recip = self.op("Reciprocal", [self.op("Sqrt", [add], shape[:-1] + [1])], shape[:-1] + [1])
        core = self.op("Mul", [x, recip], shape)
        return self.op("Mul", [gamma, core] if self.rng.integers(2) else [core, gamma], shape)

    def heads_first(self, x: ir.Value, heads: int, d: int) -> ir.Value:
        """[.., T, heads * d] -> [1, heads, T, d]."""
        view = self.reshape(x, [1, self.t, heads, d])
        return self.op("Transpose", [view], [1, heads, self.t, d], perm=[0, 2, 1, 3])

    def rope(self, x: ir.Value) -> ir.Value:
        """x * cos + rotate_half(x) * sin, rotate_half as Slice / Neg / Concat."""
        shape = list(x.shape)
        d = int(shape[-1])
        half = d // 2
        cos = self.const("cos", self.rng.uniform(-1, 1, (1, 1, 1, d)).astype(np.float32))
        sin = self.const("sin", self.rng.uniform(-1, 1, (1, 1, 1, d)).astype(np.float32))
        lo = self.op("Slice", [x, self.ints([0]), self.ints([half]), self.ints([-1])], shape[:-1] + [half])
        hi = self.op("Slice", [x, self.ints([half]), self.ints([d]), self.ints([-1])], shape[:-1] + [d - half])
        rotated = self.op("Concat", [self.op("Neg", [hi], shape[:-1] + [d - half]), lo], shape, axis=-1)
        return self.op("Add", [self.op("Mul", [x, cos], shape), self.op("Mul", [rotated, sin], shape)], shape)

    def attention(self, h: ir.Value, b: Block, p: str) -> ir.Value:
        heads, kv, d, t = b.heads, b.kv_heads, b.head_dim, self.t
        rep = heads // kv
        q = self.heads_first(self.linear(h, heads * d, f"{p}.self_attn.q_proj", b.bias), heads, d)
        k = self.heads_first(self.linear(h, kv * d, f"{p}.self_attn.k_proj", b.bias), kv, d)
        v = self.heads_first(self.linear(h, kv * d, f"{p}.self_attn.v_proj", b.bias), kv, d)
        if b.rope:
            q, k = self.rope(q), self.rope(k)

        def repeat(x: ir.Value) -> ir.Value:  # repeat_kv: [1, kv, T, d] -> [1, heads, T, d]
            if rep == 1:
                return x
            up = self.op("Unsqueeze", [x, self.ints([2])], [1, kv, 1, t, d])
            wide = self.op("Expand", [up, self.ints([1, 1, rep, 1, 1])], [1, kv, rep, t, d])
            return self.reshape(wide, [1, heads, t, d])

        k, v = repeat(k), repeat(v)
        kt = self.op("Transpose", [k], [1, heads, d, t], perm=[0, 1, 3, 2])
        scores = self.op("MatMul", [q, kt], [1, heads, t, t], name=f"{p}.self_attn")
        scores = self.op("Mul", [scores, self.scalar(d**-0.5)], [1, heads, t, t])
        if b.mask:
            causal = np.triu(np.full((t, t), -np.inf, np.float32), 1)[None, None]
            scores = self.op("Add", [scores, self.const("mask", causal)], [1, heads, t, t])
        probs = self.op("Softmax", [scores], [1, heads, t, t], axis=-1)
        ctx = self.op("MatMul", [probs, v], [1, heads, t, d])
        merged = self.op("Transpose", [ctx], [1, t, heads, d], perm=[0, 2, 1, 3])
        shape = list(h.shape)
        concat = self.reshape(merged, shape[:-1] + [heads * d])
        return self.linear(concat, int(shape[-1]), f"{p}.self_attn.o_proj", b.bias)

    def mlp(self, h: ir.Value, b: Block, p: str) -> ir.Value:
        shape, c = list(h.shape), int(h.shape[-1])
        wide = shape[:-1] + [b.width]
        if b.kind == "gated_mlp":
            gate = self.linear(h, b.width, f"{p}.mlp.gate_proj", b.bias)
            if b.act == "silu":
                act = self.op("Mul", [gate, self.op("Sigmoid", [gate], wide)], wide)
            else:
                act = self.op("Gelu", [gate], wide)
            up = self.linear(h, b.width, f"{p}.mlp.up_proj", b.bias)
            inner = self.op("Mul", [act, up] if self.rng.integers(2) else [up, act], wide)
        else:
            inner = self.linear(h, b.width, f"{p}.mlp.fc1", b.bias)
            if b.act != "none":
                inner = self.op({"relu": "Relu", "gelu": "Gelu"}[b.act], [inner], wide)
        return self.linear(inner, c, f"{p}.mlp.{'down_proj' if b.kind == 'gated_mlp' else 'fc2'}", b.bias)

    def reshape_block(self, h: ir.Value, b: Block, p: str) -> ir.Value:
        """linear -> [.., a, b] -> swap the two -> [.., b * a] -> linear: the channels arrive permuted."""
        shape, c = list(h.shape), int(h.shape[-1])
        a, bb = b.width, b.heads
        y = self.linear(h, a * bb, f"{p}.proj_in", b.bias)
        grid = self.reshape(y, shape[:-1] + [a, bb])
        perm = list(range(len(shape) + 1))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        swapped = self.op("Transpose", [grid], shape[:-1] + [bb, a], perm=perm)
        return self.linear(self.reshape(swapped, shape[:-1] + [a * bb]), c, f"{p}.proj_out", b.bias)

    def block(self, x: ir.Value, b: Block, i: int) -> ir.Value:
        p = f"model.layers.{i}"
        h = x if b.post_norm else self.norm(x, b.norm, f"{p}.input_layernorm")
        if b.channel_mul:
            h = self.op("Mul", [h, self.const(f"{p}.scale", self.vector(int(h.shape[-1])))], list(h.shape))
        f = {"attention": self.attention, "reshape": self.reshape_block}.get(b.kind, self.mlp)(h, b, p)
        y = self.op("Add", [x, f], list(x.shape)) if b.residual else f
        return self.norm(y, b.norm, f"{p}.post_layernorm") if b.post_norm else y

    def build(self) -> ir.Model:
        spec = self.spec
        table = self.const("embed_tokens.weight", self.rng.standard_normal((spec.vocab, spec.dim)).astype(np.float32))
        x = self.op("Gather", [table, self.graph.inputs[0]], [1, self.t, spec.dim], name="node_embedding", axis=0)
        if spec.gemm:
            x = self.reshape(x, [self.t, spec.dim])
        for i, b in enumerate(spec.blocks):
            x = self.block(x, b, i)
        x = self.norm(x, spec.final_norm, "model.norm")
        if spec.head == "untied":
            x = self.linear(x, spec.vocab, "lm_head", False)
        elif spec.head == "tied" and spec.gemm:  # lm_head reads the embedding table itself
            x = self.op("Gemm", [x, table], [self.t, spec.vocab], name="lm_head", transB=1)
        elif spec.head == "tied":
            tt = self.op("Transpose", [table], [spec.dim, spec.vocab], perm=[1, 0])
            x = self.op("MatMul", [x, tt], [1, self.t, spec.vocab], name="lm_head")
        x.name = "logits" if spec.head != "none" else "last_hidden_state"
        self.graph.outputs.append(x)
        model = ir.Model(self.graph, ir_version=10)
        _kill_channel(model, spec.dead)
        return model


def _kill_channel(model: ir.Model, how: str) -> None:
    """Make one channel exactly zero: a gamma entry (with its beta), a weight row or a weight column."""
    if how == "none":
        return
    from qgraph.ir.regions import find_linears, find_norms

    if how == "gamma":
        for norm in find_norms(model):
            for v in (norm.gamma, norm.beta):
                if v is not None and v.name != "ones.weight":
                    a = v.const_value.numpy().copy()
                    a[0] = 0.0
                    v.const_value = ir.tensor(a, name=v.name)
        return
    layers = [layer for layer in find_linears(model) if layer.weight.name != "embed_tokens.weight"]
    for layer in layers[:2]:
        w = layer.weight.const_value.numpy().copy()
        axis = (0 if how == "weight_row" else 1) ^ int(layer.transposed)
        np.moveaxis(w, axis, 0)[0] = 0.0
        layer.weight.const_value = ir.tensor(w, name=layer.weight.name)


def build(spec: GraphSpec) -> ir.Model:
    """The onnx_ir Model a spec describes; its input is token ids [1, T], its first output float."""
    return _Builder(spec).build()


# ---- exported transformers decoders: the real exporter's output, at seconds per example ---------------


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    """A tiny Llama / Mistral / Qwen2 (q/k/v biases) decoder: GQA, odd hidden sizes, tied or not."""

    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int  # even: rotate_half splits it in two
    intermediate: int
    layers: int
    tie: bool
    vocab: int
    seq: int
    seed: int


@st.composite
def config_specs(draw) -> ConfigSpec:
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    return ConfigSpec(  # transformers wants hidden % heads == 0; head_dim is free (Qwen3-style) and may differ
        family=draw(st.sampled_from(("llama", "mistral", "qwen2"))), hidden=heads * draw(st.integers(1, 7)),
        heads=heads, kv_heads=kv, head_dim=2 * draw(st.integers(1, 4)),
        intermediate=draw(st.integers(3, 50)), layers=draw(st.integers(1, 2)), tie=draw(st.booleans()),
        vocab=draw(st.integers(11, 97)), seq=draw(st.integers(3, 12)), seed=draw(st.integers(0, 2**16)),
    )


def export_config(spec: ConfigSpec) -> ir.Model:
    """Export the decoder a ConfigSpec describes (static length spec.seq), norms and biases made non-trivial."""
    import torch
    import transformers

    import qgraph
    from qgraph.ir.capture import CausalLMLogits

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[spec.family]
    config = getattr(transformers, f"{names}Config")(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=64, tie_word_embeddings=spec.tie, use_cache=False,
        sliding_window=None,
    )
    torch.manual_seed(spec.seed)
    module = getattr(transformers, f"{names}ForCausalLM")(config).eval()
    with torch.no_grad():  # random-init norms are all ones and biases zero: give them values to fold
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    ids = (torch.arange(spec.seq).reshape(1, spec.seq) * 7) % spec.vocab
    return qgraph.load(CausalLMLogits(module), example_inputs=(ids,), progress=False).model
