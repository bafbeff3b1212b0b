"""Which ONNX Runtime int8 GEMM a w8a8 layer runs, chosen at lowering time (recipe key or --int8-kernel).

ORT fuses QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(W)) into MatMulIntegerToFloat,
and MLAS picks the integer kernel by the weight's storage type and the CPU (CPUID at start-up):

- u8 x s8 (int8 weights): on AVX2 and AVX-512BW hosts without VNNI, MLAS multiplies with
  vpmaddubsw, which adds each pair of adjacent u8 x s8 products in int16 with saturation
  (255 * 127 * 2 = 64770 > 32767): a layer whose activation codes reach the grid's ends is off by
  tens of percent. With AVX-512 VNNI / AVX-VNNI (vpdpbusd) and on ARM64 (sdot/udot) it is exact.
- u8 x u8 (int8 codes stored as uint8 with zero point 128, the same grid): MLAS widens to int16 and
  multiplies with vpmaddwd into int32 on every x86 ISA (udot on ARM64): exact everywhere.
- s7 (weights on a 7-bit grid, codes -63..63, stored int8): the u8 x s8 kernel, and no pair of
  products can leave int16 (255 * 64 * 2 = 32640), so it is exact everywhere, at u8 x s8 speed,
  with half the weight resolution.

The default is the portable exact kernel with the full 8-bit weight grid.
"""

from __future__ import annotations

import dataclasses

from qgraph.errors import QGraphError

DEFAULT = "u8u8"


@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    name: str
    weight_storage: str  # ONNX storage of the int8 weight codes: "uint8" (code + 128) or "int8"
    weight_format: str  # the weight grid passes and the lowering round to
    ort_kernel: str
    exact_on: str
    help: str


KERNELS: dict[str, Int8Kernel] = {
    "u8u8": Int8Kernel("u8u8", "uint8", "int8", "MatMulIntegerToFloat, MLAS u8 x u8 (int16 widen + vpmaddwd / udot)",
                       "every CPU (x86-64 with or without VNNI, ARM64)",
                       "8-bit weights stored as uint8 (zero point 128): exact on every CPU; the default"),
    "s7": Int8Kernel("s7", "int8", "int7", "MatMulIntegerToFloat, MLAS u8 x s8 (vpmaddubsw / vpdpbusd / sdot)",
                     "every CPU (7-bit weights cannot saturate int16 pair sums)",
                     "7-bit weights (codes -63..63) through the u8 x s8 kernel: exact on every CPU, "
                     "u8 x s8 speed, half the weight resolution"),
    "u8s8": Int8Kernel("u8s8", "int8", "int8", "MatMulIntegerToFloat, MLAS u8 x s8 (vpmaddubsw / vpdpbusd / sdot)",
                       "VNNI (AVX-512 VNNI, AVX-VNNI) and ARM64 only; saturates on AVX2 / AVX-512 without VNNI",
                       "8-bit int8 weights through the u8 x s8 kernel: fastest, but its int16 pair sums "
                       "saturate on CPUs without VNNI"),
}


def int8_kernel(name: str, where: str = "--int8-kernel") -> Int8Kernel:
    """The named kernel choice, or a one-line error listing the choices."""
    try:
        return KERNELS[name]
    except (KeyError, TypeError):
        raise QGraphError(f"{where}: unknown int8 kernel {name!r}",
                          f"use one of {', '.join(KERNELS)} ({DEFAULT} is exact on every CPU)") from None


def takes_int8_gemm(weight_format: str, activation) -> bool:
    """Whether ORT fuses a layer into MatMulIntegerToFloat: 8-bit integer weights x 8-bit per-tensor activations.

    `activation` is anything with `format` and `granularity` (a recipe's TensorRule or a QuantSpec), or None.
    """
    return (weight_format in ("int8", "int7") and activation is not None and activation.format in ("int8", "uint8")
            and activation.granularity == "tensor" and getattr(activation, "static", True))


def host_verdict(kernel: Int8Kernel, int8_dot: str) -> str:
    """Whether this kernel computes exact integer sums on a host with the given int8 dot-product unit."""
    if kernel.name != "u8s8" or int8_dot in ("vnni", "arm64"):
        return "exact"
    return "saturates (no VNNI: int16 pair sums)"
