"""ONNX Runtime backend: lower annotations to QuantizeLinear/DequantizeLinear and MatMulNBits.

Standard QDQ is emitted so ONNX Runtime's graph optimizer fuses it into its int8 kernels:
the weight is an int8 initializer read through DequantizeLinear (per output channel), the
activation goes QuantizeLinear -> DequantizeLinear (per tensor, static scale), and the
MatMul output stays float. int4 weight-only layers become com.microsoft MatMulNBits.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from qgraph.backends.int8_kernels import DEFAULT as DEFAULT_INT8_KERNEL
from qgraph.backends.int8_kernels import KERNELS, takes_int8_gemm
from qgraph.backends.int8_kernels import int8_kernel as get_int8_kernel
from qgraph.errors import QGraphError
from qgraph.ir.convs import conv_weight, find_convs
from qgraph.ir.qspec import LayerAnnotation, QuantSpec, annotation_of, range_of
from qgraph.ir.regions import find_linears, weight_array
from qgraph.ir.rewrite import add_initializer, shared_initializer, values_by_name
from qgraph.quantize import qparams_from_range, quantize_tensor

MS_DOMAIN = "com.microsoft"
# Above this many bytes of weights the artifact keeps them in model.onnx.data beside model.onnx.
EXTERNAL_DATA_THRESHOLD = 64 * 1024 * 1024
# Convolution weights stored as uint8 (int8 codes + 128, zero point 128): ORT fuses the QDQ Conv into
# QLinearConv with u8 x u8 products, which MLAS widens to int16 exactly on every x86 CPU (u8 x s8 would
# saturate its pair sums on AVX2 without VNNI, as for the int8 GEMMs; see int8_kernels). Where the
# host's u8 x s8 kernel is exact, host_int8 re-stores them as int8 when the artifact is opened
# (ResNet-18 at batch 4: 1.14x fp32's latency as stored, 0.53x on u8 x s8).
CONV_WEIGHT_STORAGE = "uint8"


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> 4-bit codes [..., 2m] (uint8), low nibble first: how MatMulNBits and
    GatherBlockQuantized store B, zero points and tables (the inverse of pack_matmulnbits' packing)."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_matmulnbits(w: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pack a float [K, N] weight for MatMulNBits: (B [N, blocks, block/2] uint8, scales, zero points).

    Codes are unsigned 4-bit: a signed symmetric value q is stored as q + 8 (MatMulNBits' implied
    zero point when none is given). K is padded to whole blocks with the zero code. Written by hand:
    ONNX Runtime's own packer picks its own scales, and qgraph's scales must follow the QuantSpec.
    """
    k, n = w.shape
    block = spec.block_size
    nblocks = -(-k // block)
    q, scale, zp = quantize_tensor(w, spec)  # q [K, N]; scale, zp [nblocks, N]
    shift = 8 if spec.format == "int4" else 0  # signed codes are stored as q + 8
    codes = q.astype(np.int16) + shift
    if spec.float_zero_point:  # float zero points in code units, one per block (MatMulNBits' T1 form)
        zero_code = shift
        zero_points = (np.ascontiguousarray(zp.T).astype(np.float32) + shift).reshape(-1)
    elif spec.format == "int4":
        zero_code = 8
        zero_points = None if spec.symmetric else (zp.astype(np.int16) + 8).astype(np.uint8)
    else:
        zero_code = int(zp.reshape(-1)[0]) if spec.symmetric else 0
        zero_points = None if spec.symmetric and zero_code == 8 else zp.astype(np.uint8)
    padded = np.full((nblocks * block, n), zero_code, dtype=np.uint8)
    padded[:k] = codes.astype(np.uint8)
    per_block = padded.T.reshape(n, nblocks, block)
    packed = (per_block[..., 0::2] | (per_block[..., 1::2] << 4)).astype(np.uint8)
    scales = np.ascontiguousarray(scale.T).astype(np.float32).reshape(-1)
    if zero_points is not None and not spec.float_zero_point:  # uint4 zero points, two per byte
        zt = np.full((n, nblocks + (nblocks % 2)), 8, dtype=np.uint8)
        zt[:, :nblocks] = zero_points.T
        zero_points = (zt[:, 0::2] | (zt[:, 1::2] << 4)).reshape(-1).astype(np.uint8)
    return packed, scales, zero_points


STORED_QUANTIZER_OPS = ("MatMulNBits", "DequantizeLinear", "GatherBlockQuantized")


def stored_quantizer_tensors(model: ir.Model) -> dict[str, np.ndarray]:
    """Every constant input of the lowered quantizer nodes (codes, scales, zero points), keyed "node:slot":
    what two artifacts must share to hold the same quantized weights."""
    return {f"{node.name}:{i}": v.const_value.numpy() for node in model.graph if node.op_type in STORED_QUANTIZER_OPS
            for i, v in enumerate(node.inputs) if v is not None and v.const_value is not None}


def fused_int8(note: LayerAnnotation) -> bool:
    """Whether ORT fuses this QDQ layer into MatMulIntegerToFloat (int8_kernels.takes_int8_gemm)."""
    return takes_int8_gemm(note.weight.format, note.activation)


def kernel_for(note: LayerAnnotation, int8_kernel: str = DEFAULT_INT8_KERNEL, op_type: str = "MatMul") -> str:
    """What ONNX Runtime's CPU provider runs for a QDQ-lowered layer (checked on its optimized graph)."""
    w, a = note.weight, note.activation
    if op_type == "Gemm" and fused_int8(note):
        # ORT 1.32 fuses no QDQ Gemm whose output is float, and folds MatMul + bias Add on 2-D inputs back
        # into Gemm before its int8 fusions run: the layer computes in float on dequantized operands.
        return "QDQ Gemm: DequantizeLinear + float Gemm (ORT has no int8 Gemm with a float output)"
    if "fp4_e2m1" in (w.format, a and a.format):
        return "standard opset-23 float4e2m1 Q/DQ (no ORT 1.32 CPU kernel: lowering fp4-emulated runs in ORT)"
    if a is not None and not a.static:
        return f"{a.format} activations rounded per {'token' if a.granularity == 'token' else 'group'} at run time " \
               "in float ops (no ORT kernel takes them) + DQ weights + float MatMul"
    if fused_int8(note):
        storage = "u8 x u8" if KERNELS[int8_kernel].weight_storage == "uint8" else "u8 x s8"
        return f"QDQ -> MatMulIntegerToFloat (fused int8, {storage}, {w.format} weights)"
    return "explicit Q -> DQ + float MatMul (ORT CPU has no fused kernel for this format)"


def int8_gemm_weights(model: ir.Model):
    """Each fused int8 GEMM of a QDQ graph as (MatMul/Gemm/Conv node, its weight's DequantizeLinear node).

    The pattern ORT fuses into MatMulIntegerToFloat (QLinearConv for a Conv, on the same MLAS int8
    GEMM): DequantizeLinear(constant codes) as the weight and DequantizeLinear(QuantizeLinear(x)) as
    the activation.
    """
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose") or len(node.inputs) < 2:
            continue
        a, w = (v.producer() if v is not None else None for v in node.inputs[:2])
        if a is None or w is None or a.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear":
            continue
        codes = w.inputs[0].const_value if w.inputs[0] is not None else None
        q = a.inputs[0].producer() if a.inputs[0] is not None else None
        if codes is not None and q is not None and q.op_type == "QuantizeLinear":
            yield node, w


def int8_gemms(model: ir.Model) -> dict[str, int]:
    """Count the fused int8 GEMMs of a QDQ graph by the kernel ORT will run: {'u8u8' | 's7' | 'u8s8': layers}.

    Read from the graph itself (weight storage and code range of every int8_gemm_weights pair), so it
    describes any QDQ model, ORT's own quantize_static output included.
    """
    counts: collections.Counter = collections.Counter()
    for _, w in int8_gemm_weights(model):
        codes = w.inputs[0].const_value
        if codes.dtype == ir.DataType.UINT8:
            counts["u8u8"] += 1
        elif codes.dtype == ir.DataType.INT8:
            counts["s7" if np.abs(codes.numpy().astype(np.int16)).max(initial=0) <= 64 else "u8s8"] += 1
    return dict(counts)


def int8_kernel_record(model: ir.Model) -> dict | None:
    """What report.json and `qgraph inspect` say of the int8 GEMMs: kernels, where exact, this host's verdict."""
    from qgraph.backends.int8_kernels import host_verdict
    from qgraph.eval.host import cpu_info

    counts = int8_gemms(model)
    if not counts:
        return None
    from qgraph.backends.host_int8 import u8s8_exact_here

    host = cpu_info()
    switch = u8s8_exact_here()
    return {
        "layers": counts,
        "kernels": {k: {"ort_kernel": KERNELS[k].ort_kernel, "exact_on": KERNELS[k].exact_on,
                        "on_this_host": host_verdict(KERNELS[k], host["int8_dot"]),
                        # what qgraph eval / bench / generate run here (qgraph.backends.host_int8)
                        "at_run_time_here": "u8s8 (re-stored at load: its probe is exact here)"
                        if k == "u8u8" and switch else k} for k in counts},
        "host": host,
    }


class LowerToOnnxPass(ir.passes.InPlacePass):
    """Replace annotations with QuantizeLinear/DequantizeLinear pairs or MatMulNBits nodes."""

    def __init__(self, accuracy_level: int = 4, int8_kernel: str = DEFAULT_INT8_KERNEL):
        super().__init__()
        # MatMulNBits accuracy_level 4: int8 activations inside the kernel (ORT's fastest CPU path).
        self.accuracy_level = accuracy_level
        self.int8_kernel = get_int8_kernel(int8_kernel)
        self.lowered: dict[str, str] = {}
        self.fallbacks: list[str] = []
        # Block sums of an input, made once for every float-zero-point layer that reads it (q, k, v share one).
        self._block_sums: dict[tuple[str, int, int], ir.Value] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        activation_dq: dict[str, ir.Value] = {}
        self._block_sums = {}
        for layer in find_linears(model):
            note = annotation_of(layer.node)
            if note is None:
                continue
            if note.activation is not None and not note.activation.static:
                self._round_dynamic_activation(graph, layer, note.activation, activation_dq)
            if note.lowering == "matmulnbits":
                self._lower_matmulnbits(model, layer, note)
                a = note.activation
                self.lowered[layer.name] = "MatMulNBits" + (
                    f" after run-time {a.format} rounding of its input per "
                    f"{'token' if a.granularity == 'token' else 'group'}" if a is not None else "")
                continue
            if note.lowering == "fp4-emulated":
                from qgraph.backends.fp4_emulated import lower_fp4_emulated

                self.lowered[layer.name] = lower_fp4_emulated(graph, layer, note, activation_dq)
                continue
            if "fp4_e2m1" in (note.weight.format, note.activation and note.activation.format):
                model.opset_imports[""] = max(23, model.opset_imports.get("", 23))  # float4e2m1 Q/DQ is opset 23
            fused = fused_int8(note)
            self._lower_weight_qdq(graph, layer, note.weight, self.int8_kernel.weight_storage if fused else "int8")
            if note.activation is not None and note.activation.static:
                self._lower_activation_qdq(graph, layer, note, activation_dq)
            self.lowered[layer.name] = kernel_for(note, self.int8_kernel.name, layer.node.op_type)
        convs = [(conv, annotation_of(conv.node)) for conv in find_convs(model)]
        outputs = values_by_name(graph) if any(note is not None and note.output for _, note in convs) else {}
        for conv, note in convs:
            if note is None:
                continue
            self._lower_weight_qdq(graph, conv, note.weight, CONV_WEIGHT_STORAGE, conv_weight(conv))
            if note.activation is not None:
                x = conv.node.inputs[0]
                self._lower_activation_qdq(graph, conv, note, activation_dq)
                _read_dequantized(x, conv.node.inputs[0])
                if note.output:
                    self._quantize_output(graph, conv, note, outputs.get(note.output), activation_dq)
            self.lowered[conv.name] = f"QDQ -> QLinearConv ({conv.kind}, u8 x u8)" \
                if note.activation is not None else f"DQ weights + float {conv.kind}"
        ir.passes.common.RemoveUnusedNodesPass()(model)
        if self._block_sums:
            graph.sort()  # a shared block sum sits before the first layer lowered, not the first in the graph
        return ir.passes.PassResult(model, modified=bool(self.lowered))

    def summary(self) -> dict:
        return {"lowered": len(self.lowered), "ops": dict(collections.Counter(self.lowered.values())),
                "int8_kernel": self.int8_kernel.name}

    def _lower_weight_qdq(self, graph: ir.Graph, layer, spec: QuantSpec, storage: str = "int8",
                          w: np.ndarray | None = None) -> None:
        if spec.float_zero_point:
            raise QGraphError(f"layer {layer.name!r}: float_zero_point weights have no DequantizeLinear form "
                              "(its zero point is an integer)", "use lowering: matmulnbits with 4-bit weights")
        w = weight_array(layer) if w is None else w
        q, scale, zp = quantize_tensor(w, spec)
        if storage == "uint8" and spec.storage_dtype is np.int8:
            # The same grid shifted by 128, so ORT runs its u8 x u8 kernel (exact on every CPU; see int8_kernels).
            q, zp = (q.astype(np.int16) + 128).astype(np.uint8), (zp.astype(np.int16) + 128).astype(np.uint8)
        q_v = add_initializer(graph, f"{layer.name}.weight_q", q)
        base = q_v.name
        s_v = add_initializer(graph, f"{base}.scale", scale)
        inputs = [q_v, s_v]
        if not spec.is_float:
            inputs.append(add_initializer(graph, f"{base}.zero_point", zp))
        attrs = {}
        if spec.granularity in ("channel", "block"):
            attrs["axis"] = spec.axis
        if spec.granularity == "block":
            attrs["block_size"] = spec.block_size
        dq = ir.node("DequantizeLinear", inputs, attributes=attrs, name=f"{layer.name}/weight_dq")
        out = dq.outputs[0]
        out.name = f"{base}.dq"
        out.shape = ir.Shape(w.shape)
        out.type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(layer.node, dq)
        if layer.node.op_type == "Gemm" and layer.transposed:
            layer.node.attributes["transB"] = ir.AttrInt64("transB", 0)
        layer.node.replace_input_with(1, out)

    def _round_dynamic_activation(self, graph: ir.Graph, layer, spec: QuantSpec, shared: dict) -> None:
        """Run-time rounding of the layer's input (per token or per group of its channels), shared by its readers.

        No ORT CPU kernel takes 4-bit activations or per-group run-time steps, so the rounding is float
        ops (backends.dynamic_rounding) in front of the layer's usual weight kernel.
        """
        from qgraph.backends.dynamic_rounding import insert_rounding

        x = layer.node.inputs[0]
        if spec.is_float or spec.symmetric == spec.format.startswith("uint"):
            raise QGraphError(f"layer {layer.name}: dynamic activations are rounded to symmetric signed or asymmetric "
                              f"unsigned integers, not {spec.describe()}",
                              "use format int4/int8 with symmetric: true, or uint4/uint8 with symmetric: false")
        if x.shape is None:
            raise QGraphError(f"layer {layer.name}: activation {x.name!r} has no known rank for run-time rounding",
                              "capture the model with shapes (qgraph.load runs ONNX shape inference)")
        key = f"{x.name}/dynamic"
        if key not in shared:
            group = spec.block_size if spec.granularity == "block" else layer.in_features
            shared[key] = insert_rounding(graph, x, axis=-1, rank=len(x.shape), group_size=min(group, layer.in_features),
                                          bits=spec.bits, symmetric=spec.symmetric, clip=spec.clip, readers=[],
                                          base=f"{x.name}.dynamic_{spec.format}")
        layer.node.replace_input_with(0, shared[key])

    def _lower_activation_qdq(self, graph: ir.Graph, layer, note: LayerAnnotation, shared: dict) -> None:
        spec = note.activation
        x = layer.node.inputs[0]
        if any(x is v for v in shared.values()):
            return  # already the dequantized output of an earlier layer (a convolution's output Q -> DQ)
        if not spec.static:
            raise QGraphError(
                f"layer {layer.name}: dynamic activation quantization has no QDQ lowering yet",
                "use static: true in the recipe",
            )
        rng = range_of(x)
        if rng is None:
            raise QGraphError(
                f"layer {layer.name}: activation {x.name!r} has no calibrated range",
                "run calibration before lowering (qgraph.compile does this for static recipes)",
            )
        # One QuantizeLinear -> DequantizeLinear pair per activation tensor, shared by its readers
        # (q/k/v, gate/up). int8 is stored as uint8 with its zero point + 128 -- the same grid
        # (symmetric: scale max|x|/127, zero point 128) in the form ORT's x86 int8 kernels take.
        # Signed int8 activations fuse only as 1:1 Q->DQ pairs and then run ~4x slower (measured).
        if x.name not in shared:
            qn, dq = _activation_qdq_pair(graph, x, spec, rng)
            graph.insert_before(layer.node, [qn, dq])
            shared[x.name] = dq.outputs[0]
        layer.node.replace_input_with(0, shared[x.name])

    def _quantize_output(self, graph: ir.Graph, conv, note: LayerAnnotation, value: ir.Value | None,
                         shared: dict) -> None:
        """Q -> DQ on a convolution's output (or its Relu / Clip's), so ORT fuses the Conv into QLinearConv."""
        if value is None or value.name in shared:
            return
        rng = range_of(value)
        if rng is None:
            raise QGraphError(f"layer {conv.name}: output {value.name!r} has no calibrated range",
                              "run calibration before lowering (qgraph.compile does this for static recipes)")
        readers = list(value.uses())
        qn, dq = _activation_qdq_pair(graph, value, note.activation, rng)
        graph.insert_after(value.producer(), [qn, dq])
        for user, index in readers:
            user.replace_input_with(index, dq.outputs[0])
        shared[value.name] = dq.outputs[0]

    def _lower_matmulnbits(self, model: ir.Model, layer, note: LayerAnnotation) -> None:
        graph = model.graph
        spec = note.weight
        bias = None
        if layer.node.op_type == "Gemm":  # GPT-2's Conv1D layers export as Gemm(x, W, b): MatMulNBits + Add
            attrs = layer.node.attributes
            if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
                raise QGraphError(f"layer {layer.name}: Gemm with transA, alpha or beta has no MatMulNBits form",
                                  "use lowering: qdq for this layer (or re-export it as MatMul)")
            bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        elif layer.node.op_type != "MatMul":
            raise QGraphError(f"layer {layer.name}: MatMulNBits lowering needs a MatMul or Gemm, found "
                              f"{layer.node.op_type}", "use lowering: qdq for this layer")
        w = weight_array(layer)
        packed, scales, zps = pack_matmulnbits(w, spec)
        k, n = w.shape
        block = spec.block_size
        x = layer.node.inputs[0]
        correction = None
        if spec.float_zero_point and k % block == 0:
            # Float zero points send ORT 1.32's CPU MatMulNBits to a slow path (SmolLM2: 15 tokens/s
            # against 100). s (q - z) = s (q - 8) + s (8 - z): the fast kernel with its implied zero
            # point 8, plus each block's constant s (8 - z) times the block's sum of x: the block sums
            # (made once per input, _block_sum_nodes) then @ C [blocks, N]. Exact up to float rounding.
            blocks = k // block
            shift = scales.reshape(n, blocks) * (8.0 - zps.reshape(n, blocks))
            sums = []
            if (x.name, k, block) not in self._block_sums:
                sums = _block_sum_nodes(graph, x, k, block, layer.name)
                self._block_sums[x.name, k, block] = sums[-1].outputs[0]
            correction = ir.node("MatMul", [self._block_sums[x.name, k, block], add_initializer(
                graph, f"{layer.weight.name}_q4.zero_point_shift", np.ascontiguousarray(shift.T))],
                name=f"{layer.name}.zero_point_shift")
            zps = None
        # Named after the float weight it replaces (short); the layer name stays on the node.
        b_v = add_initializer(graph, f"{layer.weight.name}_q4", packed)
        base = b_v.name
        inputs = [x, b_v, add_initializer(graph, f"{base}.scales", scales)]
        if zps is not None:
            inputs.append(add_initializer(graph, f"{base}.zero_points", zps))
        new = ir.node(
            "MatMulNBits", inputs, domain=MS_DOMAIN, name=layer.name,
            attributes={"K": k, "N": n, "bits": 4, "block_size": block, "accuracy_level": self.accuracy_level},
        )
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        old_out = layer.node.outputs[0]
        # Type and shape are left to ORT's inference: no value_info entry, a smaller artifact.
        graph.insert_before(layer.node, new)
        out = new
        if correction is not None:
            out = ir.node("Add", [new.outputs[0], correction.outputs[0]], name=f"{layer.name}.with_zero_points")
            graph.insert_after(new, [*sums, correction, out])
        if bias is not None:
            with_bias = ir.node("Add", [out.outputs[0], bias], name=f"{layer.name}.with_bias")
            graph.insert_after(out, [with_bias])
            out = with_bias
        old_name = old_out.name
        old_out.replace_all_uses_with(out.outputs[0], replace_graph_outputs=True)
        graph.remove(layer.node, safe=True)
        out.outputs[0].name = old_name


def _read_dequantized(x: ir.Value, dq: ir.Value) -> None:
    """Every reader of a convolution's input reads its Q -> DQ copy, as ORT's quantize_static quantizes tensors.

    A residual Add then sees two DequantizeLinear inputs and, with the next layer's QuantizeLinear after
    it, runs as QLinearAdd; MaxPool runs on the codes. (Linear layers of LLMs keep the float residual
    stream: only their own input edge is rounded.)
    """
    if x is dq or x.is_graph_output():
        return
    q = dq.producer().inputs[0].producer() if dq.producer() is not None else None
    for user, index in list(x.uses()):
        if user is not q and user.op_type not in ("QuantizeLinear", "Shape"):
            user.replace_input_with(index, dq)


def _activation_qdq_pair(graph: ir.Graph, x: ir.Value, spec: QuantSpec, rng: tuple[float, float]):
    """QuantizeLinear -> DequantizeLinear on x with the static range rng (int8 stored as uint8, zero point + 128)."""
    storage = QuantSpec("uint8", "tensor") if spec.format == "int8" else spec
    scale, zp = qparams_from_range(np.asarray(rng[0]), np.asarray(rng[1]), spec)
    if spec.format == "int8":
        zp = (zp.astype(np.int16) + 128).astype(np.uint8)
    s_v = add_initializer(graph, f"{x.name}.act_scale", scale.reshape(()))
    z_v = add_initializer(graph, f"{s_v.name}.zero_point", zp.reshape(()))
    qn = ir.node("QuantizeLinear", [x, s_v, z_v], name=f"{x.name}/act_q")
    dq = ir.node("DequantizeLinear", [qn.outputs[0], s_v, z_v], name=f"{x.name}/act_dq")
    qn.outputs[0].name, dq.outputs[0].name = f"{x.name}.q", f"{x.name}.dq"
    qn.outputs[0].type = ir.TensorType(storage.onnx_dtype)
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    qn.outputs[0].shape = dq.outputs[0].shape = x.shape
    return qn, dq


def _block_sum_nodes(graph: ir.Graph, x: ir.Value, k: int, block: int, name: str) -> list[ir.Node]:
    """Nodes summing x's last axis over blocks of `block`: [..., K] -> [..., K / block].

    Reshape + ReduceSum where x's rank is known: at decode these run on one thread, where a MatMul by a
    block indicator went through MLAS's thread pool (about 10 us more per layer on 2 threads).
    """
    rank = len(x.shape) if x.shape is not None else None
    if rank:
        shape = shared_initializer(graph, f"qgraph.block_shape_{rank}d_{block}",
                                 np.array([0] * (rank - 1) + [-1, block], np.int64))
        axis = shared_initializer(graph, "qgraph.last_axis", np.array([-1], np.int64))
        grouped = ir.node("Reshape", [x, shape], name=f"{name}.blocks")
        sums = ir.node("ReduceSum", [grouped.outputs[0], axis], attributes={"keepdims": 0}, name=f"{name}.block_sums")
        # Shapes kept, so later rewrites (the runtime graph's skip norms) see the block-sum term's shape.
        grouped.outputs[0].shape = ir.Shape([*x.shape[:-1], k // block, block])
        sums.outputs[0].shape = ir.Shape([*x.shape[:-1], k // block])
        grouped.outputs[0].type = sums.outputs[0].type = x.type
        return [grouped, sums]
    indicator = shared_initializer(graph, f"qgraph.block_sum_{k}x{block}",
                                 np.repeat(np.eye(k // block, dtype=np.float32), block, axis=0))
    return [ir.node("MatMul", [x, indicator], name=f"{name}.block_sums")]


def save_model(model: ir.Model, path: Path) -> list[Path]:
    """Save model.onnx, with weights in model.onnx.data when large; returns the written files."""
    path = Path(path)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if size > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        ir.save(model, path, external_data=data)
        return [path, path.parent / data]
    # Weights a streamed compile parked in its work file go into the proto (a small model's only file).
    ir.save(ir.external_data.load_to_model(model), path)
    return [path]


def session_options(threads: int = 2, optimize: bool = True, optimized_path: str | None = None):
    """ORT session options with a fixed thread count (reproducible timings and statistics)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return opts


# Weights handed to ORT as arrays (add_external_initializers) rather than serialized into the proto:
# SmolLM2's session builds in 0.7 s instead of 2.7 s (a 540 MB SerializeToString and parse saved).
_IN_MEMORY = "qgraph-in-memory"
_IN_MEMORY_MIN_BYTES = 1024  # shape constants stay inline: ORT's shape inference reads them from the proto
_ARRAY_DTYPES = {np.dtype(t) for t in ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                       "uint32", "int64", "uint64", "bool")}


def session_from_model(model: ir.Model, threads: int = 2, optimize: bool = True):
    """An ORT CPU session on an in-memory graph; large weights are passed as arrays, not serialized."""
    import onnxruntime as ort

    graph = model.graph
    arrays: dict[str, np.ndarray] = {}
    originals: dict[str, ir.TensorProtocol] = {}
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.nbytes < _IN_MEMORY_MIN_BYTES:
            if isinstance(tensor, ir.ExternalTensor):  # a loaded artifact's small tensor: inline it, the bytes have no directory
                originals[name], value.const_value = tensor, ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
            continue
        array = tensor.numpy()
        if array.dtype not in _ARRAY_DTYPES:
            continue  # int4 / float8 / float4 codes: ORT's numpy bridge has no such dtypes, serialize them
        arrays[name], originals[name] = np.ascontiguousarray(array), tensor
        value.const_value = ir.ExternalTensor(_IN_MEMORY, offset=0, length=array.nbytes, dtype=tensor.dtype,
                                              shape=tensor.shape, name=name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, tensor in originals.items():
            graph.initializers[name].const_value = tensor
    opts = session_options(threads, optimize)
    if arrays:
        opts.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def session_with_outputs(model: ir.Model, value_names: list[str], threads: int = 1, optimize: bool = False):
    """A session whose outputs are the named intermediate values (the graph is left as it was)."""
    graph = model.graph
    by_name = {v.name: v for node in graph for v in node.outputs}
    by_name.update({v.name: v for v in graph.inputs})
    missing = [n for n in value_names if n not in by_name]
    if missing:
        raise QGraphError(f"values not in the graph: {missing[:5]}", "check the value names (qgraph inspect lists layers)")
    added = [by_name[n] for n in dict.fromkeys(value_names) if by_name[n] not in graph.outputs]
    graph.outputs.extend(added)
    try:
        return session_from_model(model, threads=threads, optimize=optimize)
    finally:
        for v in added:
            graph.outputs.remove(v)


def session_from_file(path: str | Path, threads: int = 2, optimize: bool = True, optimized_path: str | None = None):
    """An ORT CPU session on a saved model file (external data beside it)."""
    import onnxruntime as ort

    return ort.InferenceSession(
        str(path), session_options(threads, optimize, optimized_path), providers=["CPUExecutionProvider"]
    )


