"""QuantSpec: the quantization intent annotated on one graph value."""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError

Granularity = Literal["tensor", "channel", "block", "token"]  # token: one run-time step per row (dynamic only)

# name -> (storage numpy dtype, ONNX data type, qmin, qmax); float formats use the
# format's largest finite value as qmax and quantize by rounding to the format's grid.
FORMATS: dict[str, tuple[type, ir.DataType, float, float]] = {
    "int8": (np.int8, ir.DataType.INT8, -128, 127),
    # 7-bit codes stored as int8: no two u8 x s7 products can overflow the int16 pair sums of
    # ONNX Runtime's AVX2 / AVX-512BW u8 x s8 kernel (255 * 64 * 2 < 2^15), so that fast kernel is exact.
    "int7": (np.int8, ir.DataType.INT8, -64, 63),
    "uint8": (np.uint8, ir.DataType.UINT8, 0, 255),
    "int4": (ml_dtypes.int4, ir.DataType.INT4, -8, 7),
    "uint4": (ml_dtypes.uint4, ir.DataType.UINT4, 0, 15),
    # KV-cache codes only (kv_quant's asymmetric 2-bit keys and values): no weight lowering takes it.
    "uint2": (ml_dtypes.uint2, ir.DataType.UINT2, 0, 3),
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN, -448.0, 448.0),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, ir.DataType.FLOAT8E5M2, -57344.0, 57344.0),
    # E2M1 grid: 0, 0.5, 1, 1.5, 2, 3, 4, 6 (and negatives); ONNX opset 23 Q/DQ, no ORT 1.32 CPU kernel.
    "fp4_e2m1": (ml_dtypes.float4_e2m1fn, ir.DataType.FLOAT4E2M1, -6.0, 6.0),
}

KV_ONLY_FORMATS = ("uint2",)

# The meta keys under which annotations live: quantization intent on a node's input edges,
# and a calibrated [min, max] range on a value.
ANNOTATION_KEY = "qgraph.quant_spec"
RANGE_KEY = "qgraph.range"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, granularity, axis, block, symmetry, static or dynamic."""

    format: str = "int8"
    granularity: Granularity = "tensor"
    axis: int | None = None
    block_size: int | None = None
    symmetric: bool = True
    static: bool = True
    # Symmetric signed integers only: use the whole range [-2^(b-1), 2^(b-1) - 1]. The value of
    # largest magnitude maps exactly to -2^(b-1), so the scale carries its sign (it may be
    # negative) and the step is max|x| / 2^(b-1) instead of max|x| / (2^(b-1) - 1): llama.cpp's
    # Q4_0 and ONNX Runtime's blockwise 4-bit quantizer do this; at 4 bits it is 8/7 finer.
    full_range: bool = False
    # Dynamic activations: the step covers clip x max|x| of each token or group (values beyond clip).
    clip: float = 1.0
    # Asymmetric weights only: a float zero point, so each group's codes span exactly [min, max]
    # (step (max - min) / (2^b - 1), zero point -min / step unrounded) and zero need not be on the
    # grid. This is llama.cpp's Q4_1 (x = d q + m): a Q4_1 GGUF's dequantized weights come back to
    # the same codes, losslessly. Lowered to MatMulNBits, whose CPU kernel takes float zero points.
    float_zero_point: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise QGraphError(
                f"unknown quantization format {self.format!r}",
                f"use one of {', '.join(FORMATS)}",
            )
        if self.granularity not in ("tensor", "channel", "block", "token"):
            raise QGraphError(
                f"unknown granularity {self.granularity!r}", "use tensor, channel, block or token"
            )
        if self.granularity == "token" and self.static:
            raise QGraphError("granularity 'token' is a run-time step per token", "set static=False")
        if self.granularity in ("channel", "block") and self.axis is None:
            raise QGraphError(f"granularity {self.granularity!r} needs an axis", "set axis")
        if self.granularity == "block" and not self.block_size:
            raise QGraphError("granularity 'block' needs block_size", "set block_size, e.g. 128")
        if self.float_zero_point and (self.is_float or self.symmetric or self.granularity not in ("block", "channel")):
            raise QGraphError(
                f"float_zero_point applies to asymmetric integer weights per group or channel, not {self.format} "
                f"{'symmetric' if self.symmetric else 'asymmetric'} per {self.granularity}",
                "set symmetric: false and granularity: group, or drop float_zero_point")
        if self.full_range and (self.is_float or not self.symmetric or self.format.startswith("uint")):
            raise QGraphError(
                f"full_range applies to symmetric signed integers, not {self.format} "
                f"{'symmetric' if self.symmetric else 'asymmetric'}", "drop full_range",
            )
        if self.is_float and not self.symmetric:
            raise QGraphError(
                f"format {self.format} is symmetric only", "set symmetric: true"
            )

    @property
    def is_float(self) -> bool:
        return self.format.startswith("fp")

    @property
    def bits(self) -> int:
        return {"int4": 4, "uint4": 4, "fp4_e2m1": 4, "int7": 7, "uint2": 2}.get(self.format, 8)

    @property
    def storage_dtype(self) -> type:
        return FORMATS[self.format][0]

    @property
    def onnx_dtype(self) -> ir.DataType:
        return FORMATS[self.format][1]

    @property
    def qmin(self) -> float:
        lo = FORMATS[self.format][2]
        # Symmetric signed integers use the restricted range [-qmax, qmax] so zero is centred.
        restricted = self.symmetric and not self.is_float and lo < 0 and not self.full_range
        return -FORMATS[self.format][3] if restricted else lo

    @property
    def qmax(self) -> float:
        return FORMATS[self.format][3]

    def describe(self) -> str:
        """Short human-readable form, e.g. 'int8 channel(axis=1) sym static'."""
        g = self.granularity
        if g == "channel":
            g = f"channel(axis={self.axis})"
        elif g == "block":
            g = f"block(axis={self.axis},size={self.block_size})"
        sym = ("sym-full" if self.full_range else "sym") if self.symmetric else "asym"
        clip = f" clip {self.clip:g}" if self.clip != 1.0 else ""
        return f"{self.format} {g} {sym} {'static' if self.static else 'dynamic'}{clip}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerAnnotation:
    """Quantization intent for one linear node: its weight edge, its activation edge, the lowering."""

    layer: str
    weight: QuantSpec
    activation: QuantSpec | None
    lowering: Literal["qdq", "matmulnbits", "fp4-emulated"] = "qdq"
    # A convolution's output (or its Relu / Clip's) quantized with the activation spec: ORT fuses a QDQ
    # Conv into QLinearConv only between a DequantizeLinear input and a QuantizeLinear output.
    output: str | None = None

    def describe(self) -> dict:
        return {
            "weight": self.weight.describe(),
            "activation": self.activation.describe() if self.activation else "float",
            "lowering": self.lowering,
            **({"output": self.output} if self.output else {}),
        }


def annotate(node: ir.Node, annotation: LayerAnnotation) -> None:
    """Attach quantization intent to a linear node (its input edges), replacing any earlier one."""
    node.meta[ANNOTATION_KEY] = annotation


def annotation_of(node: ir.Node) -> LayerAnnotation | None:
    """The annotation on a node, or None."""
    return node.meta.get(ANNOTATION_KEY)


def set_range(value: ir.Value, lo: float, hi: float) -> None:
    """Record a calibrated [lo, hi] range on an activation value."""
    value.meta[RANGE_KEY] = (float(lo), float(hi))


def range_of(value: ir.Value) -> tuple[float, float] | None:
    """The calibrated range of a value, or None."""
    return value.meta.get(RANGE_KEY)
