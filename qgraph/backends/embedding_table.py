"""Quantize the token embedding table, and the lm_head that is tied to it, in one stored copy.

The table is quantized symmetric (int8 or int4) per block of `block_size` along the hidden axis
and stored once, in MatMulNBits' layout [vocab, blocks, block * bits / 8] (uint8 codes, implied
zero point 128 or 8, 4-bit codes two per byte):
- every Gather on the table becomes com.microsoft GatherBlockQuantized (bits 8 or 4), reading the
  codes through a Reshape (and a Slice when the hidden size is not a whole number of blocks);
- a tied lm_head, MatMul(x, Transpose(table)), becomes MatMulNBits (same bits) on the same codes;
  under a tied recipe an untied lm_head gets the same format in its own copy.
ONNX Runtime constant-folds the Reshape, so the artifact holds the table once.

On SmolLM2 the GGUF stores the table as Q8_0 (int8, blocks of 32, one scale each): int8 blocks
of 32 with scale max|x| / 127 give back exactly the stored values.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError
from qgraph.ir.qspec import QuantSpec
from qgraph.ir.regions import find_embeddings, find_linears
from qgraph.ir.rewrite import add_initializer
from qgraph.quantize import quantize_tensor

MS_DOMAIN = "com.microsoft"


def quantize_table(table: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """table [V, D] -> (codes [V, blocks, block * bits / 8] uint8, scales [V * blocks] float32).

    Codes carry the kernels' implied zero point: 128 for 8 bits, 8 for 4 bits (two codes per byte,
    the even element in the low nibble, as MatMulNBits and GatherBlockQuantized read them).
    """
    v, d = table.shape
    q, scale, _ = quantize_tensor(table, spec)  # q [V, D] signed; scale [V, blocks]
    blocks = scale.shape[1]
    zero = 1 << (spec.bits - 1)
    codes = np.full((v, blocks * spec.block_size), zero, dtype=np.uint8)  # tail padded with the zero code
    codes[:, :d] = (q.astype(np.int16) + zero).astype(np.uint8)
    if spec.bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.reshape(v, blocks, -1), np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)


def table_spec(fmt: str, block_size: int) -> QuantSpec:
    """The QuantSpec of an embedding table [V, D] quantized in blocks along D (symmetric int8 or int4)."""
    if fmt not in ("int8", "int4"):
        raise QGraphError(f"embedding format {fmt!r} is not supported",
                          "use embedding format: int8 (group 32 is lossless for Q8_0 GGUFs) or int4")
    if block_size < 16 or block_size & (block_size - 1):
        raise QGraphError(f"embedding block size {block_size} is not a power of two >= 16 (GatherBlockQuantized needs one)",
                          "use group_size: 32")
    return QuantSpec(fmt, "block", axis=1, block_size=block_size)


def _tied_heads(model: ir.Model, table: ir.Value) -> list:
    return [layer for layer in find_linears(model)
            if layer.role == "lm_head" and layer.transposed and layer.weight is table and layer.node.op_type == "MatMul"]


class QuantizeEmbeddingPass(ir.passes.InPlacePass):
    """Replace float embedding Gathers (and the tied lm_head) with 8- or 4-bit block-quantized kernels."""

    def __init__(self, spec: QuantSpec, *, tie_lm_head: bool = False, accuracy_level: int = 4):
        super().__init__()
        self.spec = spec
        self.tie_lm_head = tie_lm_head
        # accuracy_level 4 (int8 activations inside, like the block layers): ORT 1.32's 8-bit kernel at
        # level 0 takes ~200 ms per token for SmolLM2's 576 x 49152 lm_head, at level 4 ~6 ms, for
        # 16-window perplexity 32.64 -> 32.66 (w4a16-awq).
        self.accuracy_level = accuracy_level
        self.tables: dict[str, dict] = {}
        self.untied_heads: dict[str, dict] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        by_table: dict[int, list[ir.Node]] = {}
        for _, node in find_embeddings(model):
            by_table.setdefault(id(node.inputs[0]), []).append(node)
        if self.tie_lm_head and not by_table:
            raise QGraphError("recipe says lm_head: tied, but this model has no embedding table (Gather on a constant)",
                              "set lm_head: float or give lm_head its own weights rule")
        for gathers in by_table.values():
            self._lower_table(model, gathers)
        if self.tie_lm_head and not any(t["lm_head"] for t in self.tables.values()):
            # An untied model (Mistral, Qwen3, Phi-3 ...) under a tied recipe: its own lm_head weight gets
            # the table's block format, so one recipe serves tied and untied checkpoints alike.
            heads = [layer for layer in find_linears(model) if layer.role == "lm_head" and layer.node.op_type == "MatMul"
                     and layer.weight.const_value is not None]
            if not heads:
                raise QGraphError("recipe says lm_head: tied, but this model has no lm_head MatMul on a constant weight",
                                  "set lm_head: float, or give lm_head a weights rule of its own")
            for layer in heads:
                self._lower_untied_head(model, layer)
        return ir.passes.PassResult(model, modified=bool(by_table))

    def _lower_untied_head(self, model: ir.Model, layer) -> None:
        from qgraph.ir.regions import weight_array

        table = weight_array(layer).T  # [V, D], the layout a tied head reads
        codes, scales = quantize_table(np.ascontiguousarray(table), self.spec)
        codes_v = add_initializer(model.graph, f"{layer.name}.weight_q{self.spec.bits}", codes)
        scales_v = add_initializer(model.graph, f"{codes_v.name}.scales", scales)
        _head_to_matmulnbits(model.graph, layer, codes_v, scales_v, table.shape, self.spec, self.accuracy_level)
        self.untied_heads[layer.name] = {"format": f"{self.spec.format} symmetric, blocks of {self.spec.block_size} "
                                                  "(its own copy: the model's lm_head is not tied to the table)",
                                         "kernel": f"MatMulNBits (bits {self.spec.bits})", "float_bytes": int(table.nbytes),
                                         "stored_bytes": int(codes.nbytes + scales.nbytes)}

    def _lower_table(self, model: ir.Model, gathers: list[ir.Node]) -> None:
        graph = model.graph
        table = gathers[0].inputs[0]
        array = table.const_value.numpy().astype(np.float32)
        v, d = array.shape
        codes, scales = quantize_table(array, self.spec)
        blocks = codes.shape[1]
        codes_v = add_initializer(graph, f"{table.name}_q{self.spec.bits}", codes)
        scales_v = add_initializer(graph, f"{codes_v.name}.scales", scales)
        model.opset_imports.setdefault(MS_DOMAIN, 1)

        def const(name: str, values: list[int]) -> ir.Value:
            return add_initializer(graph, f"{codes_v.name}.{name}", np.asarray(values, dtype=np.int64))

        bits = self.spec.bits
        if bits == 4 and d % 2:
            raise QGraphError(f"embedding {table.name}: hidden size {d} is odd, and 4-bit rows are read two codes a byte",
                              "use embedding format: int8")
        # GatherBlockQuantized reads [V, D * bits / 8] bytes: 4-bit rows are half as wide.
        flat = ir.node("Reshape", [codes_v, const("rows_shape", [v, blocks * self.spec.block_size * bits // 8])],
                       name=f"{codes_v.name}/rows")
        nodes = [flat, ir.node("Reshape", [scales_v, const("scales_shape", [v, blocks])], name=f"{codes_v.name}/scales")]
        data = flat.outputs[0]
        if blocks * self.spec.block_size != d:  # the last block is padded in storage; Gather sees [V, D]
            cut = ir.node("Slice", [data, const("starts", [0]), const("ends", [d * bits // 8]), const("axes", [1])],
                          name=f"{codes_v.name}/unpad")
            nodes.append(cut)
            data = cut.outputs[0]
        graph.insert_before(gathers[0], nodes)
        for gather in gathers:
            if gather.attributes.get_int("axis", 0) != 0:
                raise QGraphError(f"embedding {gather.name}: Gather on axis {gather.attributes.get_int('axis', 0)}",
                                  "only row lookups (axis 0) can be block-quantized; set embedding: float")
            new = ir.node("GatherBlockQuantized", [data, gather.inputs[1], nodes[1].outputs[0]], domain=MS_DOMAIN,
                          name=gather.name, attributes={"gather_axis": 0, "quantize_axis": 1,
                                                        "block_size": self.spec.block_size, "bits": bits})
            graph.insert_before(gather, new)
            old_name = gather.outputs[0].name
            gather.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
            graph.remove(gather, safe=True)
            new.outputs[0].name = old_name
        heads = _tied_heads(model, table) if self.tie_lm_head else []
        for layer in heads:
            _head_to_matmulnbits(graph, layer, codes_v, scales_v, (v, d), self.spec, self.accuracy_level)
        if not table.uses() and table.name in graph.initializers and table not in graph.outputs:
            graph.initializers.pop(table.name)  # the float table is not stored any more
        self.tables[table.name] = {
            "format": f"{self.spec.format} symmetric, blocks of {self.spec.block_size} along the hidden axis",
            "gathers": [g.name for g in gathers],
            "lm_head": [layer.name for layer in heads],
            "kernel": "GatherBlockQuantized" + (f" + MatMulNBits (bits {bits}, one stored copy)" if heads else ""),
            "float_bytes": int(array.nbytes),
            "stored_bytes": int(codes.nbytes + scales.nbytes),
        }

    def summary(self) -> dict:
        return {"tables": self.tables, "untied_lm_head": self.untied_heads}


def _head_to_matmulnbits(graph: ir.Graph, layer, codes: ir.Value, scales: ir.Value, shape: tuple[int, int],
                         spec: QuantSpec, accuracy_level: int) -> None:
    """Replace the lm_head MatMul (and a Transpose only it read) by MatMulNBits (bits 8 or 4) on the table's codes."""
    v, d = shape
    weight_producer = layer.node.inputs[1].producer()
    new = ir.node("MatMulNBits", [layer.node.inputs[0], codes, scales], domain=MS_DOMAIN, name=layer.name,
                  attributes={"K": d, "N": v, "bits": spec.bits, "block_size": spec.block_size,
                              "accuracy_level": accuracy_level})
    graph.insert_before(layer.node, new)
    old_name = layer.node.outputs[0].name
    layer.node.outputs[0].replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    old_weight = layer.node.inputs[1]
    graph.remove(layer.node, safe=True)
    new.outputs[0].name = old_name
    if weight_producer is not None and weight_producer.op_type == "Transpose" and not weight_producer.outputs[0].uses():
        old_weight = weight_producer.inputs[0]
        graph.remove(weight_producer, safe=True)
    if not old_weight.uses() and old_weight.name in graph.initializers and old_weight not in graph.outputs:
        graph.initializers.pop(old_weight.name)  # an untied head's float weight is not stored any more
