"""kv_quant: KIVI's asymmetric low-bit quantization of every attention block's keys and values.

Keys are quantized per channel (each head-dim channel gets its own min/max over a group of
`group_size` consecutive tokens: key outliers sit in fixed channels), values per token (each token's
head vector in groups of `group_size` channels). Both are asymmetric: step (max - min) / (2^b - 1),
codes round((x - min) / step) clipped to [0, 2^b - 1], dequantized as code * step + min, as KIVI's
reference kernels do. The tensors are found on the graph (qgraph.ir.attention: after the k/v
projections and RoPE, before GQA's head repeat), never by layer name.

In this logits-only graph every position is quantized; the rounding is qgraph.backends.dynamic_rounding's
float ops, which both backends run. One consequence: a key's group spans up to group_size - 1 later
tokens, so its grid depends on them; a KV-cache graph avoids that with KIVI's float residual window
(the incomplete group stays float).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from qgraph.backends.dynamic_rounding import fake_quantize, insert_rounding
from qgraph.ir.attention import Attention, CachedTensor, find_attention
from qgraph.ir.feeds import token_feeds
from qgraph.ir.qspec import QuantSpec
from qgraph.options import option
from qgraph.passes.registry import PassContext, register

KV_SPEC_KEY = "qgraph.kv_spec"


@dataclasses.dataclass(frozen=True)
class KVQuantOptions:
    """KIVI's cache quantization."""

    bits: Literal[2, 4, 8] = option(4, "bits per key and value element (asymmetric codes 0 .. 2^bits - 1)")
    group_size: int = option(32, "tokens sharing a key channel's step; channels sharing a value token's step", ge=1)
    keys: bool = option(True, "quantize the keys (per channel, groups along tokens)")
    values: bool = option(True, "quantize the values (per token, groups along channels)")
    residual: int = option(128, "KV-cache artifacts: the newest tokens kept in float (KIVI's residual window R); "
                                "older ones are stored as codes", ge=0)


def kivi_spec(bits: int, axis: int, group_size: int) -> QuantSpec:
    """The QuantSpec of one cached tensor: asymmetric, dynamic, `group_size` elements along `axis` per step."""
    fmt = {2: "uint2", 4: "uint4", 8: "uint8"}[bits]
    return QuantSpec(format=fmt, granularity="block", axis=axis, block_size=group_size, symmetric=False, static=False)


class KVQuantPass(ir.passes.InPlacePass):
    """Insert KIVI's key (per channel) and value (per token) rounding after each attention block's K and V."""

    function_preserving = False

    def __init__(self, options: KVQuantOptions = KVQuantOptions(), windows=None, probe=None):
        super().__init__()
        self.options = options
        self.windows = windows
        self.probe = probe
        self.blocks: list[dict] = []
        self.refused: list[dict] = []
        self.bytes_per_token = 0.0
        self.reason = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks, rejected = find_attention(model, self.probe)
        self.refused = [dataclasses.asdict(r) for r in rejected]
        if not blocks:  # left alone and said why, as every pass does (report.json, `qgraph compile` output)
            self.reason = "no attention block (softmax(Q K^T) V) in the graph: there is no KV cache to quantize"
            return ir.passes.PassResult(model, modified=False)
        error = self._errors(model, blocks)
        o = self.options
        done: set[int] = set()  # GQA blocks never share K, but a graph may read one tensor twice
        for block in blocks:
            entry = {"block": block.name}
            for role, tensor, axis in (("key", block.key, block.key.token_axis),
                                       ("value", block.value, block.value.channel_axis)):
                if not getattr(o, f"{role}s") or id(tensor.value) in done:
                    continue
                done.add(id(tensor.value))
                spec = kivi_spec(o.bits, axis, o.group_size if role == "key" else min(o.group_size, tensor.channels))
                tensor.value.meta[KV_SPEC_KEY] = spec
                insert_rounding(model.graph, tensor.value, axis=axis, rank=tensor.rank, group_size=spec.block_size,
                                bits=o.bits, base=f"{tensor.value.name}.kivi")
                entry[role] = {"tensor": tensor.value.name, "spec": spec.describe(),
                               **({"sqnr_db": error[(block.name, role)]} if (block.name, role) in error else {})}
            self.blocks.append(entry)
        self.bytes_per_token = _cache_bytes_per_token(blocks, o)
        return ir.passes.PassResult(model, modified=bool(self.blocks))

    def _errors(self, model: ir.Model, blocks: list[Attention]) -> dict[tuple[str, str], float]:
        """SQNR (dB) of each K and V's rounding on one calibration window, from the float graph."""
        if self.windows is None:
            return {}
        from qgraph.backends.onnx_qdq import session_with_outputs

        names = list(dict.fromkeys(t.value.name for b in blocks for t in (b.key, b.value)))
        session = session_with_outputs(model, names, threads=2, optimize=False)
        feeds = token_feeds(session.get_inputs(), self.windows.ids[:1])
        arrays = dict(zip(names, session.run(names, feeds), strict=True))
        o, out = self.options, {}
        for b in blocks:
            for role, t, axis, g in (("key", b.key, b.key.token_axis, o.group_size),
                                     ("value", b.value, b.value.channel_axis, min(o.group_size, b.value.channels))):
                x = arrays[t.value.name].astype(np.float64)
                noise = x - fake_quantize(x, axis, g, o.bits)
                signal, err = float(np.sum(x**2)), float(np.sum(noise**2))
                # None: an all-zero tensor (dead heads) or one the rounding left exact; JSON has no inf.
                out[(b.name, role)] = round(10 * np.log10(signal / err), 2) if signal > 0 and err > 0 else None
        return out

    def summary(self) -> dict:
        o = self.options
        return {"bits": o.bits, "group_size": o.group_size, "keys": o.keys, "values": o.values, "residual": o.residual,
                "blocks": self.blocks, "refused": self.refused,
                "cache_bytes_per_token": self.bytes_per_token, "reason": self.reason}


def _cache_bytes_per_token(blocks: list[Attention], o: KVQuantOptions) -> float:
    """Bytes one token adds to a cache of these tensors: codes plus a float16 step and minimum per group."""
    total = 0.0
    for b in blocks:
        for role, t in (("key", b.key), ("value", b.value)):
            width = t.channels * _heads(t)
            if not getattr(o, f"{role}s"):
                total += width * 4  # float32
                continue
            groups_per_token = width / o.group_size if role == "key" else width / min(o.group_size, t.channels)
            total += width * o.bits / 8 + groups_per_token * 2 * 2
    return total


def _heads(t: CachedTensor) -> int:
    shape = t.value.shape
    dims = [d for i, d in enumerate(shape or []) if i not in (t.token_axis, t.channel_axis)]
    known = [d for d in dims if isinstance(d, int)]
    # [batch, heads, tokens, head_dim] or [batch, tokens, heads, head_dim]: batch is 1 in these exports.
    return int(np.prod(known)) if known else 1


@register("kv_quant", KVQuantOptions,
          help="KIVI cache quantization: keys per channel (groups along tokens), values per token, asymmetric",
          keeps_weights=True)
def build(options: KVQuantOptions, ctx: PassContext) -> KVQuantPass:
    """The KV rounding for a recipe; the calibration windows only serve the per-block error report."""
    return KVQuantPass(options, ctx.windows)
