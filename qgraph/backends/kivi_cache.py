"""KIVI's stored KV cache: keys and values kept as 2/4/8-bit codes, the newest tokens in float.

A KV-cache graph compiled with `kv_quant` rounds its whole cache afresh each step (the rounding sits after
the cache Concat), so the cache it hands back is still float: the same perplexity as KIVI, none of the
memory. This runtime graph stores what KIVI stores (Liu et al. 2024):

- keys per channel, in groups of `group_size` consecutive tokens; values per token, in groups of
  `group_size` channels; asymmetric codes 0 .. 2^b - 1 packed 8/b per byte along the head dimension,
  with a float16 step and minimum per group (read as code * step + min);
- the newest tokens in float (the residual window): a key group is quantized only once all its tokens
  exist, so its grid never depends on tokens to come.

Per cache tensor the graph takes `past_key_values.N.key` (the float residual, onnxruntime-genai's
name) plus `.codes`, `.step` and `.min` (the stored tokens), dequantizes them with a few elementwise
ops, and attends over [stored, residual, new]; `present.N.key` returns the residual plus the new
tokens. The runner (`KiviCache`) moves whole groups out of the residual into codes whenever it holds
`residual + group_size` tokens, so between `residual` and `residual + group_size - 1` newest tokens
stay float, as in KIVI's reference implementation. The prompt's own pass attends in float (KIVI's
prefill does too); the steps after it read the stored codes.

ONNX Runtime's GroupQueryAttention has a quantized cache of its own (static per-channel scales, no
residual window; int4 costs SmolLM2 +9.9 % perplexity), so KIVI's per-token values and residual are
written here as plain ONNX ops. `verify_kivi` checks the graph against the float graph stepped with a
numpy KIVI cache before an artifact records it.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from qgraph.backends.dynamic_rounding import TINY_STEP
from qgraph.ir.feeds import CACHE_INPUT
from qgraph.ir.rewrite import NodeChain

KIVI_KEY = "qgraph.kivi"
VERIFY_PROMPT, VERIFY_STEPS = 13, 40  # enough steps for several groups to be stored during the check
VERIFY_ATOL = 1e-3
PARTS = ("codes", "step", "min")


@dataclasses.dataclass(frozen=True)
class KiviLayout:
    """How one cache tensor is stored: its role, the bits, and the group size along its quantization axis."""

    role: str  # "key": per channel, groups along tokens; "value": per token, groups along channels
    bits: int
    group: int
    head_dim: int

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def bytes_per_token(self, heads: int) -> float:
        """Codes plus a float16 step and minimum per group, for one token of this tensor."""
        groups = self.head_dim / self.group  # keys: D groups per G tokens; values: D / G groups per token
        return heads * (self.head_dim * self.bits / 8 + groups * 2 * 2)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., D] -> [..., D * bits / 8]: code k * i + j of a byte at bit bits * j (k = 8 / bits)."""
    k = 8 // bits
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, k)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for j in range(k):
        out |= (c[..., j] << np.uint8(bits * j)).astype(np.uint8)
    return out


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    k, mask = 8 // bits, np.uint8(2**bits - 1)
    parts = [(packed >> np.uint8(bits * j)) & mask for j in range(k)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * k)


def quantize(x: np.ndarray, layout: KiviLayout) -> dict[str, np.ndarray]:
    """Store x [B, H, n, D] (keys: n a multiple of the group): {'codes' packed uint8, 'step', 'min' float16}."""
    b, h, n, d = x.shape
    g = layout.group
    groups = x.reshape(b, h, n // g, g, d) if layout.role == "key" else x.reshape(b, h, n, d // g, g)
    axis = 3 if layout.role == "key" else 4
    lo = groups.min(axis=axis, keepdims=True).astype(np.float16)
    hi = groups.max(axis=axis, keepdims=True)
    qmax = np.float32(2**layout.bits - 1)
    # The grid is the stored float16 one, so decoding reads exactly the codes' values.
    step = np.maximum((hi - lo.astype(np.float32)) / qmax, TINY_STEP).astype(np.float16)
    step = np.where(step.astype(np.float32) > 0, step, np.finfo(np.float16).tiny).astype(np.float16)
    codes = np.clip(np.round((groups - lo.astype(np.float32)) / step.astype(np.float32)), 0, qmax)
    return {"codes": pack(codes.reshape(b, h, n, d), layout.bits),
            "step": np.squeeze(step, axis=axis), "min": np.squeeze(lo, axis=axis)}


def dequantize(stored: dict[str, np.ndarray], layout: KiviLayout) -> np.ndarray:
    """The float [B, H, n, D] that `quantize` stored, as the graph computes it (code * step + min, float32)."""
    codes = unpack(stored["codes"], layout.bits).astype(np.float32)
    b, h, n, d = codes.shape
    step, lo = (stored[p].astype(np.float32) for p in ("step", "min"))
    if layout.role == "key":
        y = codes.reshape(b, h, n // layout.group, layout.group, d) * step[:, :, :, None] + lo[:, :, :, None]
    else:
        y = codes.reshape(b, h, n, d // layout.group, layout.group) * step[..., None] + lo[..., None]
    return y.reshape(b, h, n, d)


class KiviCache:
    """The runner's side: per cache tensor the float residual (fed as past_key_values.N.*) and the stored codes."""

    def __init__(self, empty: dict[str, np.ndarray], layouts: dict[str, KiviLayout], residual: int):
        self.layouts, self.residual_tokens = layouts, residual
        self.residual = dict(empty)
        self.stored = {n: self._empty_store(a, layouts[n]) for n, a in empty.items()}
        self.length = 0

    @staticmethod
    def _empty_store(a: np.ndarray, layout: KiviLayout) -> dict[str, np.ndarray]:
        b, h, _, d = a.shape
        groups = d if layout.role == "key" else d // layout.group
        return {"codes": np.zeros((b, h, 0, d * layout.bits // 8), np.uint8),
                "step": np.zeros((b, h, 0, groups), np.float16), "min": np.zeros((b, h, 0, groups), np.float16)}

    def feeds(self) -> dict[str, np.ndarray]:
        return {f"{n}.{p}": s[p] for n, s in self.stored.items() for p in PARTS}

    def absorb(self, present: dict[str, np.ndarray], length: int) -> None:
        """Take a step's residual + new tokens; store whole groups while more than `residual` tokens remain float."""
        self.residual, self.length = present, length
        group = max(layout.group if layout.role == "key" else 1 for layout in self.layouts.values())
        held = next(iter(present.values())).shape[2] if present else 0
        if held < self.residual_tokens + group:
            return
        move = (held - self.residual_tokens) // group * group
        for name, x in present.items():
            new = quantize(np.ascontiguousarray(x[:, :, :move], dtype=np.float32), self.layouts[name])
            self.stored[name] = {p: np.concatenate([self.stored[name][p], new[p]], axis=2) for p in PARTS}
            self.residual[name] = np.ascontiguousarray(x[:, :, move:])

    def nbytes(self) -> int:
        return sum(a.nbytes for s in self.stored.values() for a in s.values()) + sum(a.nbytes for a in self.residual.values())

    def keys(self):
        return self.residual.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        """The whole cache tensor in float: stored tokens decoded, then the residual."""
        return np.concatenate([dequantize(self.stored[name], self.layouts[name]), self.residual[name]], axis=2)


def layouts_of(model: ir.Model) -> tuple[dict[str, KiviLayout], int] | None:
    """The stored-cache layouts and residual window a KIVI runtime graph records in its metadata, or None."""
    meta = model.metadata_props.get(KIVI_KEY) if isinstance(model, ir.Model) else model.get(KIVI_KEY)
    if not meta:
        return None
    spec = json.loads(meta)
    return {n: KiviLayout(**v) for n, v in spec["tensors"].items()}, int(spec["residual"])


def _rounding_output(graph: ir.Graph, x: ir.Value) -> ir.Value | None:
    """The last value of kv_quant's rounding after x (its nodes are named '<x>.kivi.*'), read outside it."""
    prefix = f"{x.name}.kivi."
    nodes = [n for n in graph if n.name and n.name.startswith(prefix)]
    inside = {id(n) for n in nodes}
    for node in nodes:
        out = node.outputs[0]
        if out in graph.outputs or any(id(u.node) not in inside for u in out.uses()):
            return out
    return None


def _decode_nodes(graph: ir.Graph, name: str, layout: KiviLayout, codes: ir.Value, step: ir.Value, lo: ir.Value):
    """code * step + min over the stored tokens: [B, H, stored, D] float."""
    chain = NodeChain(graph, name)
    op, const, nodes = chain.op, chain.const, chain.nodes

    bits, d, g = layout.bits, layout.head_dim, layout.group
    if bits == 8:
        unpacked = codes
    else:
        mask, last = const("mask", np.uint8(2**bits - 1)), const("last", np.array([-1]))
        parts = []
        for j in range(8 // bits):
            shifted = op("BitShift", [codes, const(f"by{j}", np.uint8(bits * j))], f"shift{j}", direction="RIGHT") \
                if j else codes
            parts.append(op("Unsqueeze", [op("BitwiseAnd", [shifted, mask], f"part{j}"), last], f"part{j}_axis"))
        pairs = op("Concat", parts, "parts", axis=-1)
        unpacked = op("Reshape", [pairs, const("flat", np.array([0, 0, 0, d]))], "unpacked")
    values = op("Cast", [unpacked], "values", to=ir.DataType.FLOAT)
    step32 = op("Cast", [step], "step32", to=ir.DataType.FLOAT)
    lo32 = op("Cast", [lo], "min32", to=ir.DataType.FLOAT)
    if layout.role == "key":  # [B, H, n / G, G, D]: no -1, so an empty store reshapes too
        shape = op("Concat", [op("Shape", [step], "groups", start=0, end=3), const("group_dims", np.array([g, d]))],
                   "grouped_shape", axis=0)
        axis = const("group_axis", np.array([3]))
    else:  # [B, H, n, D / G, G]
        shape = const("grouped_shape", np.array([0, 0, 0, d // g, g]))
        axis = const("group_axis", np.array([4]))
    grouped = op("Reshape", [values, shape], "grouped")
    scaled = op("Mul", [grouped, op("Unsqueeze", [step32, axis], "step_b")], "scaled")
    decoded = op("Add", [scaled, op("Unsqueeze", [lo32, axis], "min_b")], "decoded_groups")
    out = op("Reshape", [decoded, op("Shape", [values], "stored_shape")], "decoded")
    return nodes, out


def kivi_runtime_graph(model: ir.Model, *, bits: int, group_size: int, residual: int) -> tuple[ir.Model | None, dict]:
    """The stored-cache copy of a KV-cache graph with kv_quant rounding, and its report (None and the reason if not)."""
    graph_inputs = [v for v in model.graph.inputs if CACHE_INPUT.match(v.name)]
    if not graph_inputs:
        return None, {"refused": "the graph has no past_key_values inputs"}
    if bits not in (2, 4, 8):
        return None, {"refused": f"{bits}-bit codes do not pack into bytes"}
    kivi = model.clone()
    graph = kivi.graph
    layouts: dict[str, KiviLayout] = {}
    for past in [v for v in graph.inputs if CACHE_INPUT.match(v.name)]:
        role = CACHE_INPUT.match(past.name).group(2)
        concat = next((u.node for u in past.uses() if u.node.op_type == "Concat" and u.idx == 0), None)
        shape = past.shape
        if concat is None or len(concat.inputs) != 2 or shape is None or len(shape) != 4 or not isinstance(shape[3], int):
            return None, {"refused": f"{past.name!r}: expected Concat(past, new) on a [batch, heads, past, head_dim] cache"}
        d, heads = shape[3], shape[1]
        g = group_size if role == "key" else min(group_size, d)
        if d % (8 // bits) or (role == "value" and d % g):
            return None, {"refused": f"{past.name!r}: head dim {d} does not split into {8 // bits} codes per byte "
                                     f"and groups of {g}"}
        layout = KiviLayout(role, bits, g, d)
        layouts[past.name] = layout
        full = concat.outputs[0]
        rounded = _rounding_output(graph, full)
        if rounded is None:
            return None, {"refused": f"{full.name!r} has no kv_quant rounding: the cache is not quantized"}
        # attention reads the cache as stored (codes decoded + float residual), not rounded afresh
        ir.convenience.replace_all_uses_with(rounded, full)
        outputs = list(graph.outputs)
        present_index = next(i for i, v in enumerate(outputs) if v is rounded or v is full)
        present_name = outputs[present_index].name
        outputs[present_index].name = f"{present_name}.whole"
        # the new inputs: the float residual keeps the past's name, the stored tokens come in three parts
        stored_len, groups = f"{past.name}.stored", d if role == "key" else d // g
        token_dim = f"{past.name}.groups" if role == "key" else stored_len
        parts = {
            "codes": ir.Value(name=f"{past.name}.codes", type=ir.TensorType(ir.DataType.UINT8),
                              shape=ir.Shape([shape[0], heads, stored_len, d * bits // 8])),
            "step": ir.Value(name=f"{past.name}.step", type=ir.TensorType(ir.DataType.FLOAT16),
                             shape=ir.Shape([shape[0], heads, token_dim, groups])),
            "min": ir.Value(name=f"{past.name}.min", type=ir.TensorType(ir.DataType.FLOAT16),
                            shape=ir.Shape([shape[0], heads, token_dim, groups])),
        }
        resid = ir.Value(name=past.name, type=past.type, shape=ir.Shape([shape[0], heads, f"{past.name}.residual", d]))
        past.name = f"{past.name}.whole"
        nodes, decoded = _decode_nodes(graph, f"{resid.name}.kivi_store", layout, parts["codes"], parts["step"],
                                       parts["min"])
        whole = ir.node("Concat", [decoded, resid], attributes={"axis": 2}, name=f"{resid.name}.with_stored")
        whole.outputs[0].name, whole.outputs[0].type = f"{resid.name}.with_stored", past.type
        present = ir.node("Concat", [resid, concat.inputs[1]], attributes={"axis": 2}, name=present_name)
        present.outputs[0].name, present.outputs[0].type = present_name, past.type
        present.outputs[0].shape = ir.Shape([shape[0], heads, f"{present_name}.residual", d])
        graph.extend([*nodes, whole, present])
        ir.convenience.replace_all_uses_with(past, whole.outputs[0])
        i = list(graph.inputs).index(past)
        graph.inputs.pop(i)
        for j, value in enumerate([resid, *parts.values()]):
            graph.inputs.insert(i + j, value)
        graph.outputs[present_index] = present.outputs[0]
    ir.passes.common.RemoveUnusedNodesPass()(kivi)
    graph.sort()
    kivi.metadata_props[KIVI_KEY] = json.dumps(
        {"residual": residual, "tensors": {n: dataclasses.asdict(v) for n, v in layouts.items()}})
    heads = {v.name: v.shape[1] for v in graph_inputs}
    report = {"kivi_tensors": len(layouts), "bits": bits, "group_size": group_size, "residual_tokens": residual,
              "stored_bytes_per_token": round(sum(l.bytes_per_token(heads[n]) for n, l in layouts.items()), 2),
              "float_bytes_per_token": sum(heads[n] * l.head_dim * 4 for n, l in layouts.items())}
    return kivi, report


def _float_cache_graph(model: ir.Model) -> ir.Model:
    """A copy of the kv_quant KV-cache graph with its rounding bypassed: attention reads the cache as fed."""
    copy = model.clone()
    for v in [v for v in copy.graph.inputs if CACHE_INPUT.match(v.name)]:
        concat = next(u.node for u in v.uses() if u.node.op_type == "Concat")
        rounded = _rounding_output(copy.graph, concat.outputs[0])
        if rounded is not None:
            ir.convenience.replace_all_uses_with(rounded, concat.outputs[0])
            outputs = list(copy.graph.outputs)
            if rounded in outputs:
                name = rounded.name
                rounded.name, concat.outputs[0].name = f"{name}.rounded", name
                copy.graph.outputs[outputs.index(rounded)] = concat.outputs[0]
    ir.passes.common.RemoveUnusedNodesPass()(copy)
    return copy


def simulate(float_session, ids: np.ndarray, prompt: int, layouts: dict[str, KiviLayout], residual: int) -> np.ndarray:
    """Logits of KIVI's cached decode computed without the stored-cache graph: the float-cache graph stepped with
    a numpy cache whose tokens outside the residual window are replaced by their stored (decoded) values."""
    from qgraph.generate import Decoder

    decoder = Decoder(float_session, share_buffer=False)
    cache = KiviCache(decoder.start(ids.shape[0]), layouts, residual)
    logits, present = decoder.step(ids[:, :prompt], {n: cache[n] for n in cache.keys()}, 0)
    rows = [logits]
    for t in range(prompt, ids.shape[1] + 1):
        stored = next(iter(cache.stored.values()))["codes"].shape[2]
        cache.absorb({n: a[:, :, stored:] for n, a in present.items()}, t)
        if t == ids.shape[1]:
            break
        logits, present = decoder.step(ids[:, t:t + 1], {n: cache[n] for n in cache.keys()}, t)
        rows.append(logits)
    return np.concatenate(rows, axis=1)


def verify_kivi(model: ir.Model, kivi: ir.Model, *, seed: int = 0) -> float:
    """Max |logit difference| of the stored-cache graph against `simulate` on the float-cache graph, residual 0."""
    from qgraph.backends.onnx_qdq import session_from_model
    from qgraph.generate import Decoder, cached_forward

    layouts, _ = layouts_of(kivi)
    vocab = model.graph.outputs[0].shape[-1] if model.graph.outputs[0].shape is not None else 100
    ids = np.random.default_rng(seed).integers(0, max(2, min(vocab if isinstance(vocab, int) else 100, 1000)),
                                               size=(1, VERIFY_PROMPT + VERIFY_STEPS))
    want = simulate(session_from_model(_float_cache_graph(model)), ids, VERIFY_PROMPT, layouts, residual=0)
    decoder = Decoder(session_from_model(kivi), kivi_residual=0)
    got = cached_forward(decoder, VERIFY_PROMPT)(ids)
    return float(np.abs(got - want).max())


def stored_cache_graph(model: ir.Model, kv_summary: dict) -> tuple[ir.Model | None, dict]:
    """compile's step for a kv_quant KV-cache graph: the KIVI runtime graph, checked (None and why when refused)."""
    if not (kv_summary.get("keys", True) and kv_summary.get("values", True)):
        return None, {"refused": "kv_quant quantizes only keys or only values: the stored cache holds both"}
    kivi, report = kivi_runtime_graph(model, bits=kv_summary["bits"], group_size=kv_summary["group_size"],
                                      residual=kv_summary.get("residual", 128))
    if kivi is None:
        return None, report
    err = verify_kivi(model, kivi)
    report["verified_max_abs_diff"] = err
    if not np.isfinite(err) or err > VERIFY_ATOL:
        report["refused"] = f"the stored-cache graph differs from the float graph with a KIVI cache by {err:.3g}"
        return None, report
    return kivi, report
