"""Lower a qgraph ONNX graph to a Relax module: TVM's ONNX frontend for the float ops, qgraph's kernels for linears.

1. Every linear with a constant weight becomes one node of the `qgraph.tvm` domain, its weight kept
   in the kernel's own layout as initializers (packed int4 words, int8 codes, fp32):
   MatMulNBits -> Q4Linear, QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(int8 or
   int4 w)) -> Int8Linear (the QuantizeLinear stays; int4 packed 8 per word, attribute w_bits=4),
   MatMul(x, W or W^T) -> F32Linear.
2. The input length is fixed (one Relax module per length) and onnxscript's optimizer folds the
   shape arithmetic: TVM's ONNX frontend cannot import the exporter's dynamic mask subgraph (a
   Reshape of a symbolic scalar) and its static import is what it handles well.
3. An importer subclass of TVM's ONNX frontend turns the qgraph nodes into `call_tir` of the
   scheduled kernels in kernels.py; everything else goes through the frontend's own converters.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.backends.tvm import kernels as K
from qgraph.backends.tvm import require_tvm
from qgraph.errors import QGraphError

DOMAIN = "qgraph.tvm"
LINEARS = ("Q4Linear", "Int8Linear", "F32Linear")
# Rows at or below this run the decode (GEMV) schedule, above it the prefill (panel) schedule.
DECODE_ROWS = 4


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _add(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, old: ir.Node, op: str, inputs: list[ir.Value], attrs: dict) -> None:
    new = ir.node(op, inputs, attributes=attrs, domain=DOMAIN, name=old.name)
    out = old.outputs[0]
    new.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    x = inputs[0]
    n = attrs.get("N_out", attrs["N"])
    new.outputs[0].shape = ir.Shape([*x.shape[:-1], n]) if x.shape is not None else out.shape
    graph.insert_before(old, new)
    name = out.name
    out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    graph.remove(old, safe=True)
    new.outputs[0].name = name


def _scalar(value: ir.Value, what: str, node: ir.Node) -> np.ndarray:
    array = _const(value)
    if array is None or array.size != 1:
        raise QGraphError(f"{node.name}: {what} is not a constant scalar", "TVM lowers per-tensor static activations only")
    return array.reshape(1)


def rewrite_linears(model: ir.Model) -> dict[str, int]:
    """Replace every constant-weight linear by a qgraph.tvm node (in place); returns counts per kind."""
    graph = model.graph
    counts = {op: 0 for op in LINEARS}
    for node in list(graph):
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            _rewrite_q4(graph, node)
            counts["Q4Linear"] += 1
        elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            kind = _rewrite_matmul(graph, node)
            if kind:
                counts[kind] += 1
    model.opset_imports[DOMAIN] = 1
    _remove_unused(graph)
    return counts


def _remove_unused(graph: ir.Graph) -> None:
    import onnx_ir.passes.common

    onnx_ir.passes.common.RemoveUnusedNodesPass()(ir.Model(graph, ir_version=10))


def _rewrite_q4(graph: ir.Graph, node: ir.Node) -> None:
    a = {k: v.value for k, v in node.attributes.items()}
    if a.get("bits", 4) != 4:
        raise QGraphError(f"{node.name}: MatMulNBits with {a['bits']} bits", "TVM lowers 4-bit MatMulNBits only")
    k, n, block = int(a["K"]), int(a["N"]), int(a["block_size"])
    b, scales = _const(node.inputs[1]), _const(node.inputs[2])
    zps = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    if b is None or scales is None or (len(node.inputs) > 3 and node.inputs[3] is not None and zps is None):
        raise QGraphError(f"{node.name}: MatMulNBits weights are not constants", "lower a graph with constant weights")
    if zps is not None and zps.dtype != np.uint8:
        raise QGraphError(f"{node.name}: MatMulNBits float zero points", "use packed uint8 zero points (qgraph's lowering)")
    w, s, z = K.matmulnbits_to_q4(b, scales, zps, k, n, block)
    base = node.inputs[1].name
    inputs = [node.inputs[0], _add(graph, f"{base}.q4w", w), _add(graph, f"{base}.q4s", s)]
    if z is not None:
        inputs.append(_add(graph, f"{base}.q4z", z))
    _replace(graph, node, "Q4Linear", inputs, {"K": k, "N": n, "group": block})


def _rewrite_matmul(graph: ir.Graph, node: ir.Node) -> str | None:
    x, w = node.inputs
    weight = _const(w)
    producer = w.producer()
    if weight is None and producer is not None and producer.op_type == "Transpose":
        src = _const(producer.inputs[0])
        perm = producer.attributes.get("perm")
        if src is not None and src.ndim == 2 and (perm is None or list(perm.value) == [1, 0]):
            weight = np.ascontiguousarray(src.T)  # a tied lm_head: the kernel wants [K, N]
    if weight is not None:
        if weight.ndim != 2 or weight.dtype != np.float32:
            return None
        kn = _add(graph, f"{w.name}.kn", weight)
        _replace(graph, node, "F32Linear", [x, kn], {"K": weight.shape[0], "N": weight.shape[1]})
        if _const(w) is None:  # the tied lm_head: its table's lookups move onto this copy
            _gather_from_transposed(graph, producer.inputs[0], kn)
        return "F32Linear"
    if producer is None or producer.op_type != "DequantizeLinear" or _const(producer.inputs[0]) is None:
        return None  # activation x activation (attention): the frontend's matmul
    return _rewrite_int8(graph, node, producer)


def _gather_from_transposed(graph: ir.Graph, table: ir.Value, table_kn: ir.Value) -> None:
    """Embedding lookups on a tied table [V, D] read the lm_head kernel's [D, V] copy instead.

    Gather(table, ids) == Transpose(Gather(table_kn, ids, axis=1)): the table is then stored once
    (SmolLM2: 113 MB less). The lookup reads D strided values per token, nothing next to the lm_head.
    """
    for user, index in list(table.uses()):
        axis = user.attributes.get("axis")
        ids = user.inputs[1] if len(user.inputs) > 1 else None
        if user.op_type != "Gather" or index != 0 or (axis is not None and axis.value != 0) or ids is None \
                or ids.shape is None:
            continue
        rank = len(ids.shape)
        gather = ir.node("Gather", [table_kn, ids], attributes={"axis": 1}, name=f"{user.name}.kn")
        turn = ir.node("Transpose", gather.outputs, attributes={"perm": [*range(1, rank + 1), 0]},
                       name=f"{user.name}.rows")
        out = user.outputs[0]
        for value, shape in ((gather.outputs[0], [table_kn.shape[0], *ids.shape]), (turn.outputs[0], out.shape)):
            value.type = ir.TensorType(ir.DataType.FLOAT)
            value.shape = ir.Shape(shape) if shape is not None else None
        graph.insert_before(user, [gather, turn])
        name = out.name
        out.replace_all_uses_with(turn.outputs[0], replace_graph_outputs=True)
        graph.remove(user, safe=True)
        turn.outputs[0].name = name
    if not table.uses() and table.name in graph.initializers:
        graph.initializers.pop(table.name)


def _rewrite_int8(graph: ir.Graph, node: ir.Node, wdq: ir.Node) -> str:
    q = _const(wdq.inputs[0])
    w_scale = _const(wdq.inputs[1])
    w_zero = _const(wdq.inputs[2]) if len(wdq.inputs) > 2 and wdq.inputs[2] is not None else None
    adq = node.inputs[0].producer()
    aq = adq.inputs[0].producer() if adq is not None and adq.op_type == "DequantizeLinear" else None
    fix = ("TVM lowers int8/int4 per-channel weights with int8/uint8 per-tensor static activations "
           "(recipes w8a8*, w4a8*) only")
    # onnx_ir hands int4 out as an ml_dtypes.int4 array: the ONNX type says which width it is
    w_dtype = wdq.inputs[0].const_value.dtype
    w_bits = {ir.DataType.INT8: 8, ir.DataType.UINT8: 8, ir.DataType.INT4: 4}.get(w_dtype)
    shifted = w_dtype == ir.DataType.UINT8 and w_zero is not None and np.all(w_zero.astype(np.int32) == 128)
    if shifted:  # int8 codes stored as uint8 + 128 for ORT's exact u8 x u8 kernel (int8_kernels): the same grid
        q, w_zero = (q.astype(np.int16) - 128).astype(np.int8), None
    if w_bits is None or q.ndim != 2 or (w_zero is not None and np.any(w_zero.astype(np.int32) != 0)):
        raise QGraphError(f"{node.name}: weight {wdq.inputs[0].name} is {q.dtype} {q.shape} "
                          "(not symmetric int8 or int4 [K, N])", fix)
    if aq is None or aq.op_type != "QuantizeLinear":
        raise QGraphError(f"{node.name}: a dequantized weight without a QuantizeLinear -> DequantizeLinear activation "
                          f"(weight-only int{w_bits})", fix)
    axis = wdq.attributes.get("axis")
    if w_scale.size not in (1, q.shape[1]) or (w_scale.size > 1 and axis is not None and axis.value not in (1, -1)):
        raise QGraphError(f"{node.name}: weight scale {w_scale.shape} is not per output channel", fix)
    a_scale = _scalar(adq.inputs[1], "activation scale", node)
    a_zero = _scalar(adq.inputs[2], "activation zero point", node) if len(adq.inputs) > 2 else np.zeros(1, np.uint8)
    a_dtype = np.dtype(a_zero.dtype)
    if a_dtype not in (np.uint8, np.int8):
        raise QGraphError(f"{node.name}: activations quantized to {a_dtype}", fix)
    base = wdq.inputs[0].name
    n = q.shape[1]
    # QSM's split channels give N like 1537, and a kernel whose N is not a multiple of the vector width runs
    # scalar (a 15x slower decode): pad N with zero channels (scale 0) and slice the output back
    n_pad = -(-n // K.VEC) * K.VEC
    q = np.pad(q.astype(np.int8), ((0, 0), (0, n_pad - n)))
    scale = np.zeros(n_pad, np.float32)
    scale[:n] = np.broadcast_to(w_scale.astype(np.float32).reshape(-1), (n,))
    if w_bits == 4:  # 8 codes per uint32 word (kernels.pack_int4_signed) replace the int4 initializer
        weight = _add(graph, f"{base}.w4", K.pack_int4_signed(q))
    else:
        weight = wdq.inputs[0] if n_pad == n and not shifted else _add(graph, f"{base}.s8", q)
    inputs = [
        aq.outputs[0], weight,
        _add(graph, f"{base}.colsum", q.astype(np.int32).sum(0).astype(np.int32)),
        _add(graph, f"{base}.a_scale", a_scale.astype(np.float32)),
        _add(graph, f"{base}.a_zero", a_zero.astype(np.int32)),
        _add(graph, f"{base}.w_scale", scale),
    ]
    _replace(graph, node, "Int8Linear", inputs,
             {"K": q.shape[0], "N": n_pad, "N_out": n, "a_dtype": str(a_dtype), "w_bits": w_bits})
    return "Int8Linear"


def fix_length(model: ir.Model, seq: int) -> None:
    """Fix the token input to [1, seq] and fold the shape arithmetic that depended on it (in place)."""
    import onnxscript.optimizer

    ids = model.graph.inputs[0]
    if ids.shape is None or len(ids.shape) != 2:
        raise QGraphError(f"input {ids.name!r} has shape {ids.shape}", "TVM lowers causal LMs with input_ids [1, seq]")
    fixed = {str(d): n for d, n in zip(ids.shape, (1, seq), strict=True) if not isinstance(d, int)}
    ids.shape = ir.Shape([1, seq])
    # The exporter's symbolic batch and length also annotate inner values (and the outputs of qgraph.tvm
    # nodes, which shape inference cannot see through): make them numbers everywhere.
    for node in model.graph:
        for value in node.outputs:
            if value.shape is not None:
                value.shape = ir.Shape([fixed.get(str(d), d) if not isinstance(d, int) else d for d in value.shape])
    # Limits: the folded causal mask ([1, 1, seq, seq] bool) must fold; weights are already kernel inputs.
    onnxscript.optimizer.optimize(model, input_size_limit=1 << 22, output_size_limit=1 << 22)


def inline_constants(model: ir.Model, keep: set[str]) -> list[str]:
    """Make every initializer not in `keep` a Constant node; returns the kept (parameter) names in order.

    TVM's frontend turns all initializers into function parameters (keep_params_in_input) and then
    cannot see shape constants, so a Reshape or Expand target becomes a runtime shape and every
    kernel after it symbolic. Only weights stay parameters; the rest is compiled in.
    """
    graph = model.graph
    first = next(iter(graph))
    for name in [n for n in graph.initializers if n not in keep]:
        value = graph.initializers.pop(name)
        const = ir.node("Constant", [], attributes={"value": ir.AttrTensor("value", value.const_value)}, name=f"{name}.const")
        graph.insert_before(first, const)
        value.replace_all_uses_with(const.outputs[0], replace_graph_outputs=True)
        const.outputs[0].name = name
        const.outputs[0].type, const.outputs[0].shape = value.type, value.shape
    return list(graph.initializers)


def weight_names(model: ir.Model, min_size: int = 1 << 12) -> set[str]:
    """Initializers that stay parameters: kernel inputs and large tensors of the source graph."""
    graph = model.graph
    names = {v.name for node in graph if node.domain == DOMAIN for v in node.inputs[1:] if v is not None}
    names |= {name for name, v in graph.initializers.items()
              if v.const_value is not None and v.const_value.size >= min_size}
    return names


# ---------------------------------------------------------------- import


def _importer_class():
    require_tvm()
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    class Importer(frontend.ONNXGraphImporter):
        """TVM's ONNX importer plus qgraph's linears (call_tir of scheduled kernels, shared by shape)."""

        def __init__(self, *args, target=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.target = target
            self.kernels: dict[str, relax.GlobalVar] = {}

        def _check_for_unsupported_ops(self, graph):
            supported = frontend._get_convert_map()
            missing = sorted({n.op_type for n in graph.node
                              if n.op_type not in supported and n.op_type not in LINEARS + ("If", "Constant")})
            if missing:
                raise QGraphError(f"TVM's ONNX frontend has no converter for {', '.join(missing)}",
                                  "use the onnxruntime backend for this model")

        def _convert_operator(self, op_name, inputs, attrs, opset):
            if op_name not in LINEARS:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            x = inputs[0]
            shape = [int(d) for d in x.ty.shape]
            k, n = int(attrs["K"]), int(attrs["N"])
            rows = int(np.prod(shape[:-1]))
            x2 = self.bb.emit(relax.op.reshape(x, (rows, k)))
            gv = self._kernel(op_name, attrs, rows)
            y = self.bb.emit(relax.call_tir(gv, [x2, *[i for i in inputs[1:] if i is not None]],
                                            relax.TensorType((rows, n), "float32")))
            n_out = int(attrs.get("N_out", n))
            if n_out != n:  # channels padded to the vector width (_rewrite_int8)
                y = self.bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n_out]))
            return self.bb.normalize(relax.op.reshape(y, (*shape[:-1], n_out)))

        def _kernel(self, op_name, attrs, rows):
            k, n = int(attrs["K"]), int(attrs["N"])
            decode = rows <= DECODE_ROWS
            if op_name == "Q4Linear":
                zp = int(attrs.get("num_inputs", 3)) > 3
                func, name = K.q4_linear(k, n, int(attrs["group"]), m=rows, zero_points=zp), f"q4_k{k}_n{n}_g{attrs['group']}"
                name += "_zp" if zp else ""
            elif op_name == "Int8Linear":
                a_dtype = attrs["a_dtype"].decode() if isinstance(attrs["a_dtype"], bytes) else attrs["a_dtype"]
                w_bits = int(attrs.get("w_bits", 8))
                func = K.int8_linear(k, n, m=rows, a_dtype=a_dtype, w_bits=w_bits)
                name = f"i8_k{k}_n{n}_{a_dtype}" + ("_w4" if w_bits == 4 else "")
            else:
                func, name = K.f32_linear(k, n, m=rows), f"f32_k{k}_n{n}"
            name += f"_m{rows}"
            if name not in self.kernels:
                if self.target is not None and self.target.kind.name == "cuda":
                    with self.target:  # dlight's prefill rule reads the current target
                        scheduled = K.schedule_cuda(func, decode=decode)
                else:
                    scheduled = K.schedule_cpu(func, decode=decode)
                self.kernels[name] = self.bb.add_func(scheduled.with_attr("global_symbol", name), name)
            return self.kernels[name]

    return Importer


def import_onnx(proto, target=None):
    """ONNX ModelProto (after rewrite_linears and fix_length) -> Relax IRModule with weights as parameters."""
    require_tvm()
    importer_cls = _importer_class()
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 21)
    importer = importer_cls(None, "int64", keep_params_in_input=True, sanitize=True, target=target)
    for node in proto.graph.node:
        if node.domain == DOMAIN:
            # the converters see attributes only: record the input count (optional zero points)
            node.attribute.append(_int_attr("num_inputs", len([i for i in node.input if i])))
    return importer.from_onnx(proto.graph, opset)


def _int_attr(name: str, value: int):
    import onnx

    return onnx.helper.make_attribute(name, value)
