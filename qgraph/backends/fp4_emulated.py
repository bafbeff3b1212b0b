"""FP4 E2M1 lowered into ops ONNX Runtime runs (ORT 1.32 CPU has no float4e2m1 Q/DQ kernel).

Weights: the E2M1 codes (4 bits each, two per byte) are unpacked with BitwiseAnd/BitShift, read
through a 16-entry value table with Gather, and multiplied by the per-channel or per-block scales.
All inputs are constants, so ORT folds this chain into a float weight when the session starts.
Activations: y = clip(x / s, -6, 6) is rounded to the E2M1 grid in elementwise ops and multiplied
back by s. The grid is uniform inside each binade (step 0.5 below 2, 1 below 4, 2 up to 6), so
Round(y / step) * step -- ONNX Round is round-half-to-even -- gives E2M1's ties-to-even exactly,
signed zeros included. Both forms match qgraph.quantize's ml_dtypes reference bit for bit.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.ir.qspec import LayerAnnotation, QuantSpec, range_of
from qgraph.ir.regions import weight_array
from qgraph.ir.rewrite import add_initializer
from qgraph.quantize import qparams_from_range, quantize_tensor

FORMAT = "fp4_e2m1"
KERNEL = ("fp4-emulated: E2M1 codes -> Gather(16-value table) x scales (folded to a float weight by ORT), "
          "activations rounded to E2M1 in elementwise ops, float MatMul")
# Value of every 4-bit code (sign bit 3): 0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, ... -6.
E2M1_VALUES = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def pack_codes(q: np.ndarray, rows: int) -> np.ndarray:
    """E2M1 values [K, N] -> uint8 [rows / 2, N]: rows padded with +0, low nibble row r, high nibble row r + rows/2.

    Halves rather than neighbours so unpacking is one Concat, no interleave.
    """
    codes = np.zeros((rows, q.shape[1]), dtype=np.uint8)
    codes[: q.shape[0]] = np.asarray(q, dtype=ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    half = rows // 2
    return (codes[:half] | (codes[half:] << 4)).astype(np.uint8)


def _node(graph: ir.Graph, before: ir.Node, op: str, inputs: list, name: str, **attrs) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs, name=name)
    node.outputs[0].name = name
    graph.insert_before(before, node)
    return node.outputs[0]


def _const(graph: ir.Graph, name: str, array) -> ir.Value:
    return add_initializer(graph, name, np.asarray(array))


def emulated_weight(graph: ir.Graph, before: ir.Node, base: str, w: np.ndarray, spec: QuantSpec) -> ir.Value:
    """Nodes (inserted before `before`) that compute dequantize(quantize(w)) for a logical [K, N] weight."""
    k, n = w.shape
    by_block = spec.granularity == "block" and spec.axis % 2 == 0 and spec.block_size % 2 == 0
    by_column = spec.granularity == "channel" and spec.axis % 2 == 1
    if spec.format != FORMAT or not (by_block or by_column or spec.granularity == "tensor"):
        raise QGraphError(f"{base}: the fp4-emulated lowering takes E2M1 weights per tensor, per output channel or "
                          f"in even-sized input blocks, not {spec.describe()}",
                          "use weights format fp4_e2m1 with granularity channel, or group with an even group_size")
    q, scale, _ = quantize_tensor(w, spec)
    # Scales as [blocks, 1, N] (or [1, 1, 1] per tensor) against the codes viewed as [blocks, block, N].
    block = spec.block_size if by_block else k + k % 2
    nblocks = -(-k // block)
    scales = np.asarray(scale, dtype=np.float32).reshape(nblocks if by_block else 1, 1, -1)
    rows = nblocks * block
    packed = _const(graph, f"{base}.fp4_codes", pack_codes(q, rows))
    lo = _node(graph, before, "BitwiseAnd", [packed, _const(graph, f"{base}.nibble_mask", np.uint8(15))], f"{base}.lo")
    hi = _node(graph, before, "BitShift", [packed, _const(graph, f"{base}.nibble_shift", np.uint8(4))], f"{base}.hi",
               direction="RIGHT")
    codes = _node(graph, before, "Concat", [lo, hi], f"{base}.codes", axis=0)
    idx = _node(graph, before, "Cast", [codes], f"{base}.codes_i32", to=ir.DataType.INT32)
    table = _const(graph, f"{base}.e2m1_table", E2M1_VALUES)
    vals = _node(graph, before, "Gather", [table, idx], f"{base}.values", axis=0)
    blocks = _node(graph, before, "Reshape", [vals, _const(graph, f"{base}.blocked", np.array([nblocks, block, n]))],
                   f"{base}.blocks")
    scaled = _node(graph, before, "Mul", [blocks, _const(graph, f"{base}.scale", scales)],
                   f"{base}.scaled")
    out = _node(graph, before, "Reshape", [scaled, _const(graph, f"{base}.flat", np.array([rows, n]))],
                f"{base}.padded" if rows != k else f"{base}.dq")
    if rows != k:
        out = _node(graph, before, "Slice", [out, _const(graph, f"{base}.start", np.array([0])),
                                             _const(graph, f"{base}.stop", np.array([k])),
                                             _const(graph, f"{base}.axes", np.array([0]))], f"{base}.dq")
    out.shape, out.type = ir.Shape([k, n]), ir.TensorType(ir.DataType.FLOAT)
    return out


def emulated_activation(graph: ir.Graph, before: ir.Node, x: ir.Value, scale: float) -> ir.Value:
    """Nodes that compute dequantize(quantize(x)) to E2M1 with a per-tensor scale (Div first, as the reference)."""
    b = x.name
    s = _const(graph, f"{b}.fp4_scale", np.float32(scale))
    y = _node(graph, before, "Div", [x, s], f"{b}.fp4_y")
    y = _node(graph, before, "Clip", [y, _const(graph, f"{b}.fp4_min", np.float32(-6)),
                                      _const(graph, f"{b}.fp4_max", np.float32(6))], f"{b}.fp4_clipped")
    a = _node(graph, before, "Abs", [y], f"{b}.fp4_abs")
    below2 = _node(graph, before, "Less", [a, _const(graph, f"{b}.fp4_two", np.float32(2))], f"{b}.fp4_below2")
    below4 = _node(graph, before, "Less", [a, _const(graph, f"{b}.fp4_four", np.float32(4))], f"{b}.fp4_below4")
    upper = _node(graph, before, "Where", [below4, _const(graph, f"{b}.fp4_step1", np.float32(1)),
                                           _const(graph, f"{b}.fp4_step2", np.float32(2))], f"{b}.fp4_upper_step")
    step = _node(graph, before, "Where", [below2, _const(graph, f"{b}.fp4_step05", np.float32(0.5)), upper],
                 f"{b}.fp4_step")
    r = _node(graph, before, "Round", [_node(graph, before, "Div", [y, step], f"{b}.fp4_units")], f"{b}.fp4_rounded")
    q = _node(graph, before, "Mul", [r, step], f"{b}.fp4_q")
    out = _node(graph, before, "Mul", [q, s], f"{b}.fp4_dq")
    out.shape, out.type = x.shape, ir.TensorType(ir.DataType.FLOAT)
    return out


def lower_fp4_emulated(graph: ir.Graph, layer, note: LayerAnnotation, shared: dict[str, ir.Value]) -> str:
    """Lower one annotated linear to the emulated form; returns what runs (for report.json)."""
    a = note.activation
    if a is not None and (a.format != FORMAT or a.granularity != "tensor" or not a.static):
        raise QGraphError(f"layer {layer.name}: the fp4-emulated lowering takes static per-tensor E2M1 activations, "
                          f"not {a.describe()}", "use activations {format: fp4_e2m1, granularity: tensor, static: true}")
    w_dq = emulated_weight(graph, layer.node, f"{layer.name}.weight", weight_array(layer), note.weight)
    if layer.node.op_type == "Gemm" and layer.transposed:
        layer.node.attributes["transB"] = ir.AttrInt64("transB", 0)
    layer.node.replace_input_with(1, w_dq)
    if a is not None:
        x = layer.node.inputs[0]
        rng = range_of(x)
        if rng is None:
            raise QGraphError(f"layer {layer.name}: activation {x.name!r} has no calibrated range",
                              "run calibration before lowering (qgraph.compile does this for static recipes)")
        if x.name not in shared:  # one rounding chain per activation tensor, shared by its readers
            scale, _ = qparams_from_range(np.asarray(rng[0]), np.asarray(rng[1]), a)
            shared[x.name] = emulated_activation(graph, layer.node, x, float(scale))
        layer.node.replace_input_with(0, shared[x.name])
    return KERNEL
