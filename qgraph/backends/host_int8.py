"""Run an artifact's 8-bit weights on the fastest int8 GEMM that is exact on the host it is opened on.

Artifacts store int8 weight codes as uint8 with zero point 128 (the `u8u8` lowering, see int8_kernels):
ONNX Runtime then runs its u8 x u8 kernel, which is exact on every CPU, so one artifact serves any host.
That kernel widens to int16 and multiplies with vpmaddwd: on AVX-512 hosts it is no faster than the
float GEMM (SmolLM2 w8a8-qsm prefill on a Xeon with AVX-512 VNNI: 1.08x fp32, against 1.82x for u8 x s8).
Where ORT's u8 x s8 kernel accumulates in int32 (AVX-512 VNNI, AVX-VNNI, ARM64 dot products) it is exact
as well, so opening a session there re-stores the same codes as int8 (code - 128, zero point 0): the same
integers, the same exact product, ORT's fast kernel. The files on disk are not touched.

The switch is not taken on CPUID alone: the saturating lone linear of qgraph.eval.int8_exactness runs
through the u8 x s8 kernel once per process, and only an exact answer (both activation grids) switches.
`QGRAPH_INT8_KERNEL=stored` (or `int8_kernel="stored"`, `--int8-kernel stored` on eval / bench /
generate) keeps the stored kernel.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError

CHOICES = ("host", "stored")
ENV = "QGRAPH_INT8_KERNEL"
EXACT = 1e-5  # max relative error of the probe that still counts as the exact int32 product


def choice(requested: str | None = None) -> str:
    """The run-time int8 kernel choice: the argument, else $QGRAPH_INT8_KERNEL, else 'host'."""
    value = requested or os.environ.get(ENV) or "host"
    if value not in CHOICES:
        where = "--int8-kernel" if requested else ENV
        raise QGraphError(f"{where}: {value!r} is not a run-time int8 kernel choice",
                          "use host (the fastest kernel exact on this CPU, the default) or stored (as compiled)")
    return value


@functools.lru_cache(maxsize=1)
def u8s8_exact_here() -> bool:
    """Whether ORT's u8 x s8 GEMM gives the exact int32 product on this host (probed, both activation grids)."""
    from qgraph.eval.int8_exactness import probe_rel_error
    from qgraph.ir.qspec import QuantSpec

    activations = (QuantSpec("int8", "tensor"), QuantSpec("uint8", "tensor", symmetric=False))
    return all(probe_rel_error("u8s8", a) < EXACT for a in activations)


def restore_as_u8s8(model: ir.Model) -> int:
    """Re-store every u8u8 weight (uint8 codes, zero point 128) of a fused int8 GEMM as int8; returns how many.

    code - 128 in int8 is the same integer the uint8 code with zero point 128 stands for, so the
    dequantized weights and the integer product are unchanged; only ORT's kernel choice moves.
    """
    from qgraph.backends.onnx_qdq import int8_gemm_weights

    done: set[int] = set()
    for _, dq in int8_gemm_weights(model):
        if id(dq) in done or len(dq.inputs) < 3 or dq.inputs[2] is None or dq.inputs[2].const_value is None:
            continue
        codes, zero = dq.inputs[0], dq.inputs[2]
        if codes.const_value.dtype != ir.DataType.UINT8 or np.any(zero.const_value.numpy() != 128):
            continue
        shifted = (codes.const_value.numpy() ^ np.uint8(0x80)).view(np.int8)
        dq.replace_input_with(0, _constant_like(model.graph, codes, shifted, dq))
        dq.replace_input_with(2, _constant_like(model.graph, zero, np.zeros_like(zero.const_value.numpy(), dtype=np.int8), dq))
        done.add(id(dq))
    return len(done)


def _constant_like(graph: ir.Graph, old: ir.Value, array: np.ndarray, reader: ir.Node) -> ir.Value:
    """`array` in place of `old` for `reader`: rewritten in place when reader is its only user, else a new initializer."""
    from qgraph.ir.rewrite import add_initializer

    if all(user is reader for user, _ in old.uses()) and old.name in graph.initializers:
        old.const_value = ir.tensor(array, name=old.name)
        old.type = ir.TensorType(old.const_value.dtype)
        return old
    return add_initializer(graph, f"{old.name}.s8", array)


def open_session(path: str | Path, threads: int = 2, int8_kernel: str | None = None):
    """(ORT session on the .onnx file, what its int8 GEMMs run): u8 x s8 where that is exact here, else as stored."""
    from qgraph.backends.onnx_qdq import session_from_file, session_from_model

    if choice(int8_kernel) == "host" and u8s8_exact_here():
        model = ir.load(str(path))  # external data stays on disk until ORT is handed the arrays
        switched = restore_as_u8s8(model)
        if switched:
            return session_from_model(model, threads), f"u8s8 ({switched} layers; stored u8u8, exact on this host)"
    return session_from_file(path, threads), "as stored"
