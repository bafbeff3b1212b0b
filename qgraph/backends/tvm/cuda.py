"""Whole-graph CUDA builds: the Relax module for cuda, device code compiled by nvcc, one library with it embedded.

TVM's PyPI wheel has the CUDA code generator but no CUDA runtime: `tvm.compile` for cuda returns the
host library with a placeholder device module that holds the generated CUDA C source (kind "cuda",
serialized as [fmt][function table][code], the format a CUDA-enabled TVM runtime loads). Here the
source goes through nvcc once per architecture (a cubin each), the cubins are joined into one
fatbin, and the library is exported with that fatbin in the placeholder's place (fmt "fatbin"):
a CUDA-enabled TVM loads it with cuModuleLoadData, no compiler needed on the GPU machine.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qgraph.backends.tvm import cuda_target, require_tvm
from qgraph.errors import QGraphError

DEFAULT_ARCHS = ("sm_80", "sm_90")
SOURCE = "kernels.cu"
_KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


def parse_archs(text: str | None) -> tuple[str, ...]:
    """'sm_80,sm_90' -> ('sm_80', 'sm_90'); None -> the defaults."""
    if not text:
        return DEFAULT_ARCHS
    archs = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in archs if not re.fullmatch(r"sm_\d{2,3}[a-z]?", a)]
    if bad or not archs:
        raise QGraphError(f"CUDA architecture {', '.join(bad) or repr(text)} is not of the form sm_XY",
                          "pass --arch sm_80,sm_90 (compute capability 8.0 and 9.0)")
    return tuple(dict.fromkeys(archs))


def require_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise QGraphError("building the cuda target needs nvcc, which is not on PATH",
                          "install the CUDA toolkit (nvcc) or use --target llvm")
    return nvcc


def kernel_names(source: str) -> list[str]:
    """Names of the __global__ functions in CUDA source (each is declared, then defined: counted once)."""
    return list(dict.fromkeys(m.group(1) for m in _KERNEL.finditer(source)))


@dataclass
class CudaBuild:
    """A compiled Relax VM executable for cuda plus its device code in every form shipped."""

    executable: object
    source: str
    cubins: dict[str, bytes]
    fatbin: bytes
    kernels: list[str] = field(default_factory=list)


def base_target(archs) -> object:
    """The cuda target code is generated for: the oldest architecture, whose CUDA C every newer one compiles."""
    return cuda_target(min(archs, key=lambda a: int(re.sub(r"\D", "", a))))


def build(mod, archs=DEFAULT_ARCHS) -> CudaBuild:
    """Compile the Relax module for cuda (dlight GPU schedules for the float ops) and the device code with nvcc."""
    tvm = require_tvm()
    from tvm.support import nvcc

    from qgraph.backends.tvm.pipeline import cuda_pipeline

    require_nvcc()
    # The compile hook a CUDA-enabled TVM calls uses NVRTC (needs cuda-bindings) unless told otherwise.
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    target = base_target(archs)
    # A CUDA-enabled TVM would compile for one arch inside tvm.compile; the source placeholder is what
    # embed_fatbin replaces, so ask for it on every TVM build.
    forced = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        executable = tvm.compile(mod, target=target, relax_pipeline=cuda_pipeline(target))
    finally:
        if forced is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK")
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = forced
    device = _device_module(executable)
    source = device.inspect_source("")
    cubins = {}
    for arch in archs:
        with cuda_target(arch):
            cubins[arch] = bytes(nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc"))
    return CudaBuild(executable, source, cubins, fatbin(cubins), kernel_names(source))


def _device_module(executable):
    found = [m for m in executable.mod._collect_from_import_tree(lambda m: m.kind == "cuda")]
    if len(found) != 1:
        raise QGraphError(f"the cuda build holds {len(found)} device modules (expected 1)",
                          "report this with the TVM version; the artifact layout assumes one")
    return found[0]


def fatbin(cubins: dict[str, bytes]) -> bytes:
    """Join per-architecture cubins into one fatbin (the driver picks the image matching the GPU)."""
    tool = shutil.which("fatbinary") or str(Path(require_nvcc()).with_name("fatbinary"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [tool, "--64", f"--create={tmp}/all.fatbin"]
        for arch, data in cubins.items():
            path = Path(tmp) / f"{arch}.cubin"
            path.write_bytes(data)
            sm = re.sub(r"\D", "", arch)
            args.append(f"--image3=kind=elf,sm={sm},file={path}")
        result = subprocess.run(args, capture_output=True, text=True)
        if result.returncode != 0:
            raise QGraphError(f"fatbinary failed: {result.stderr.strip()[:300]}", "check the CUDA toolkit install")
        return (Path(tmp) / "all.fatbin").read_bytes()


# ---------------------------------------------------------------- library export with the fatbin embedded


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def modules_in_blob(blob: bytes) -> list[tuple[str, tuple[int, int] | None]]:
    """The module entries of a packed import blob: (kind, (payload start, payload end) or None for '_lib').

    Layout (TVM's PackImportsToBytes): u64 size, the import tree as two u64 arrays, then per module
    a length-prefixed kind and, except for the host library itself ('_lib'), a length-prefixed payload.
    """
    off = 8
    for _ in range(2):
        (count,) = struct.unpack_from("<Q", blob, off)
        off += 8 + 8 * count
    entries = []
    while off < len(blob):
        (n,) = struct.unpack_from("<Q", blob, off)
        kind = blob[off + 8:off + 8 + n].decode()
        off += 8 + n
        if kind == "_lib":
            entries.append((kind, None))
            continue
        (n,) = struct.unpack_from("<Q", blob, off)
        entries.append((kind, (off + 8, off + 8 + n)))
        off += 8 + n
    return entries


def embed_fatbin(blob: bytes, source: str, image: bytes) -> bytes:
    """Replace the cuda module's payload [fmt "cuda"][function table][source] by [fmt "fatbin"][table][image]."""
    code = source.encode()
    cuda = [span for kind, span in modules_in_blob(blob) if kind == "cuda"]
    if len(cuda) != 1:
        raise QGraphError(f"the packed library holds {len(cuda)} cuda modules (expected 1)",
                          "report this with the TVM version")
    start, end = cuda[0]
    payload = blob[start:end]
    head, tail = _string(b"cuda"), _string(code)
    if not (payload.startswith(head) and payload.endswith(tail)):
        raise QGraphError("the cuda module is not TVM's source placeholder [fmt][table][source]",
                          "this TVM serializes device code differently; ship kernels.cu and the cubins instead")
    table = payload[len(head):len(payload) - len(tail)]
    new = _string(b"fatbin") + table + _string(image)
    out = blob[:start - 8] + _string(new) + blob[end:]
    return struct.pack("<Q", len(out) - 8) + out[8:]


def export_library(result: CudaBuild, path: str | Path) -> None:
    """Write the host library with the fatbin embedded as its cuda module."""
    tvm = require_tvm()

    host = next(m for m in result.executable.mod.imports if m.kind == "llvm")
    llvm_target = host.get_function("_get_target_string")()

    def pack(mod, is_system_lib, prefix, workspace):
        blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        blob = embed_fatbin(blob, result.source, result.fatbin)
        packed = tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, llvm_target, prefix)
        out = os.path.join(workspace, f"{prefix}devc.o")
        packed.write_to_file(out)
        return out

    result.executable.export_library(str(path), fpack_imports=pack)


def cuda_available() -> bool:
    """A CUDA runtime in this TVM and a GPU behind it."""
    tvm = require_tvm()
    return bool(tvm.runtime.enabled("cuda")) and bool(tvm.cuda(0).exist)
