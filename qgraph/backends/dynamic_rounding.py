"""Run-time group rounding written as float ops: dynamic steps computed from each group's own values.

Used where ONNX Runtime has no kernel for the quantization a recipe asks for: KIVI's asymmetric
2/4-bit KV cache (ONNX has no 2-bit type, and QuantizeLinear takes no float minimum) and 4-bit
per-token activations (no int4 x int4 GEMM). Groups run along one axis (the last one may be
partial: the tensor is edge-padded and sliced back, so a dynamic token axis works); every op is a
standard one both backends run. `fake_quantize` is the numpy reference the tests hold it to.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.ir.feeds import CACHE_OUTPUT
from qgraph.ir.rewrite import NodeChain

TINY_STEP = np.float32(1e-30)  # an all-equal (or all-zero) group rounds to itself; no 0 / 0


def fake_quantize(x: np.ndarray, axis: int, group_size: int, bits: int, *, symmetric: bool = False,
                  clip: float = 1.0) -> np.ndarray:
    """numpy reference: groups of `group_size` along `axis` (the last one partial).

    asymmetric: step (max - min) / (2^b - 1), codes round((x - min) / step) in [0, 2^b - 1], read as code * step + min.
    symmetric: step clip * max|x| / (2^(b-1) - 1), codes round(x / step) in [-2^(b-1), 2^(b-1) - 1].
    """
    xt = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    n = xt.shape[-1]
    pad = (-n) % group_size
    xp = np.concatenate([xt, np.repeat(xt[..., -1:], pad, axis=-1)], axis=-1) if pad else xt
    g = xp.reshape(*xp.shape[:-1], -1, group_size)
    if symmetric:
        qmax = np.float32(2 ** (bits - 1) - 1)
        raw = np.abs(g).max(axis=-1, keepdims=True) * np.float32(clip / qmax)
        step = np.maximum(raw, TINY_STEP)
        # A group whose step would be below TINY_STEP (all |x| < 1.3e-28 at 8 bits) rounds to zero: on the
        # floored step's grid a code could land past the group's largest magnitude.
        y = np.where(raw < TINY_STEP, np.float32(0), np.clip(np.round(g / step), -qmax - 1, qmax) * step)
    else:
        qmax = np.float32(2**bits - 1)
        lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
        step = np.maximum((hi - lo) / qmax, TINY_STEP)
        y = np.clip(np.round((g - lo) / step), 0, qmax) * step + lo
    return np.moveaxis(y.reshape(xp.shape)[..., :n], -1, axis)


def insert_rounding(graph: ir.Graph, x: ir.Value, *, axis: int, rank: int, group_size: int, bits: int,
                    symmetric: bool = False, clip: float = 1.0, readers=None, base: str | None = None) -> ir.Value:
    """Nodes after x computing fake_quantize(x, ...); `readers` ((node, input index); default every reader) read them.

    A graph output that is x becomes the rounded value too (a cache output stores what attention reads).
    """
    readers = list(x.uses()) if readers is None else list(readers)
    chain = NodeChain(graph, base or f"{x.name}.rounding")
    op, const, nodes = chain.op, chain.const, chain.nodes

    r, g = rank, group_size
    axis = axis % r
    perm = [i for i in range(r) if i != axis] + [axis]
    moved = op("Transpose", [x], "moved", perm=perm) if axis != r - 1 else x
    size = x.shape[axis] if x.shape is not None and len(x.shape) == r else None
    whole = isinstance(size, int) and size % g == 0
    if whole:
        padded = moved
    else:
        length = op("Shape", [moved], "length", start=r - 1, end=r)
        rest = op("Mod", [length, const("group", np.array([g]))], "rest")
        pad = op("Mod", [op("Sub", [const("group_n", np.array([g])), rest], "short"), const("group_m", np.array([g]))],
                 "pad")
        pads = op("Concat", [const("no_pad", np.zeros(2 * r - 1, dtype=np.int64)), pad], "pads", axis=0)
        padded = op("Pad", [moved, pads], "padded", mode="edge")
    groups = op("Reshape", [padded, const("grouped", np.array([0] * (r - 1) + [-1, g]))], "groups")
    last = const("last", np.array([-1]))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = op("ReduceMax", [op("Abs", [groups], "abs"), last], "amax", keepdims=1)
        raw = op("Mul", [amax, const("per_code", np.float32(clip / qmax))], "raw_step")
        tiny = const("tiny", TINY_STEP)
        step = op("Max", [raw, tiny], "step")
        codes = op("Clip", [op("Round", [op("Div", [groups, step], "units")], "rounded"),
                            const("qmin", np.float32(-qmax - 1)), const("qmax", np.float32(qmax))], "codes")
        y = op("Where", [op("Less", [raw, tiny], "flushed"), const("zero", np.float32(0)),
                         op("Mul", [codes, step], "scaled")], "dq_groups")
    else:
        lo = op("ReduceMin", [groups, last], "min", keepdims=1)
        hi = op("ReduceMax", [groups, last], "max", keepdims=1)
        qmax = const("qmax", np.float32(2**bits - 1))
        step = op("Max", [op("Div", [op("Sub", [hi, lo], "span"), qmax], "raw_step"), const("tiny", TINY_STEP)], "step")
        codes = op("Clip", [op("Round", [op("Div", [op("Sub", [groups, lo], "offset"), step], "units")], "rounded"),
                            const("zero", np.float32(0)), qmax], "codes")
        y = op("Add", [op("Mul", [codes, step], "scaled"), lo], "dq_groups")
    y = op("Reshape", [y, const("flat", np.array([0] * (r - 1) + [-1]))], "dq_padded")
    if not whole:
        y = op("Slice", [y, const("start", np.array([0])), length, const("axis", np.array([r - 1]))], "dq_moved")
    if axis != r - 1:
        y = op("Transpose", [y], "dq", perm=[int(i) for i in np.argsort(perm)])
    y.shape, y.type = x.shape, x.type
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    else:
        graph.insert_before(graph.node(0), nodes)
    for user, index in readers:
        user.replace_input_with(index, y)
    if x in graph.outputs and not CACHE_OUTPUT.match(x.name or ""):
        graph.outputs[graph.outputs.index(x)] = y
    # A KV-cache graph's present.N.* output stays the float cache: each step rounds the whole cache
    # afresh for its attention, as the logits graph rounds every position, instead of rounding
    # already-rounded entries again with a new group's step.
    return y
