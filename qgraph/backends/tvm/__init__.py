"""TVM backend: qgraph's quantized linears as TIR kernels inside a Relax module (llvm runs here, cuda is built here).

A package rather than the single `backends/tvm.py` of the design notes: kernels, schedules, graph
lowering and artifacts are separate modules. Importing it does not import TVM (an optional extra).
"""

from __future__ import annotations

from qgraph.errors import QGraphError


def require_tvm():
    """Import TVM or say how to install it."""
    try:
        import tvm
    except ImportError as err:
        raise QGraphError(f"the TVM backend needs Apache TVM, which is not importable ({err})",
                          "pip install 'qgraph[tvm]'") from err
    return tvm


def host_target(threads: int = 2):
    """llvm target for this machine's CPU, detected (a hard-coded mcpu makes artifacts crash elsewhere)."""
    tvm = require_tvm()
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": int(threads)})


def cuda_target(arch: str = "sm_80"):
    """CUDA target with a host llvm part for the packed-function glue."""
    tvm = require_tvm()
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
