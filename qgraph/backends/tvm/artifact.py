"""TVM artifacts: build a lowered qgraph graph into one Relax VM library (model.so + params.npz) and run it.

The Relax module holds one function per input length (`seq1`, `seq512`, ...): TVM's ONNX frontend
imports static shapes well (see lower.py), and a causal LM's logits for a prompt padded on the right
are the same as unpadded, so a runner pads each call to the next length and slices the logits.
Weights are parameters, stored once in params.npz (by name) and shared by every length.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.backends.tvm import host_target, require_tvm
from qgraph.backends.tvm import lower as L
from qgraph.errors import QGraphError

LENGTHS = (1, 512)
LIBRARY = "model.so"
PARAMS = "params.npz"


def _clone(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def lower_to_relax(model: ir.Model, lengths=LENGTHS, target=None, progress: bool = False):
    """onnx_ir graph (qgraph's ONNX lowering) -> (Relax IRModule with seq<L> functions, params, names per function)."""
    tvm = require_tvm()
    from tvm import relax

    from qgraph.progress import status

    target = target or host_target()
    ir.external_data.load_to_model(model)  # same values, now in memory: clones no longer need the .data file
    base = _clone(model)
    counts = L.rewrite_linears(base)
    keep = L.weight_names(base)
    functions, params, names, kernels = {}, {}, {}, {}
    for length in lengths:
        with status(f"TVM: importing length {length}", enabled=progress):
            m = _clone(base)
            L.fix_length(m, length)
            L.inline_constants(m, keep)
            mod = L.import_onnx(ir.to_proto(m), target)
        mod, detached = relax.frontend.detach_params(mod)
        main = mod["main"]
        fname = f"seq{length}"
        names[fname] = [str(v.name) for v in main.params[1:]]
        for name, array in zip(names[fname], detached["main"], strict=True):
            params.setdefault(name, array)
        functions[fname] = main.with_attr("global_symbol", fname)
        for gv, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc):
                kernels[gv.name_hint] = (gv, func)
    merged = tvm.IRModule({tvm.ir.GlobalVar(f): func for f, func in functions.items()})
    for gv, func in kernels.values():
        merged[gv] = func
    return merged, params, names, counts


def build(mod, target=None):
    """Compile the Relax module (llvm: the scheduled kernels plus TVM's default CPU lowering for the rest)."""
    tvm = require_tvm()
    from qgraph.backends.tvm.pipeline import cpu_pipeline

    target = target or host_target()
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))


def check_target(target: str, archs=None) -> tuple[str, ...] | None:
    """Refuse an unknown target (or cuda without nvcc) before any long work; the CUDA archs, None for llvm."""
    if target not in ("llvm", "cuda"):
        raise QGraphError(f"TVM target {target!r} is not supported", "use --target llvm or --target cuda")
    if target == "llvm":
        return None
    from qgraph.backends.tvm import cuda as C

    C.require_nvcc()
    return tuple(archs or C.DEFAULT_ARCHS)


def save_artifact(compiled, out_dir: str | Path, *, target: str = "llvm", archs=None, lengths=LENGTHS,
                  progress: bool = True) -> Path:
    """Write a TVM artifact directory for a qgraph CompiledModel: model.so, params.npz, tokenizer, manifest, report.

    target "cuda" adds kernels.cu and one kernels.<arch>.cubin per architecture (archs, default
    sm_80 and sm_90); model.so then holds the host code with a fatbin of those cubins embedded.
    """
    from qgraph.artifact import MANIFEST, REPORT, dir_size, write_atomically, write_json
    from qgraph.backends.tvm import cuda as C
    from qgraph.ir.feeds import has_cache
    from qgraph.progress import status

    if has_cache(compiled.model.graph.inputs):
        raise QGraphError("the TVM backend builds the fixed-length logits graph only; this one has a KV cache",
                          "capture without kv_cache, or save this one for ONNX Runtime (compiled.save)")
    archs = check_target(target, archs)  # before the long lowering
    t0 = time.perf_counter()
    tgt = host_target() if target == "llvm" else C.base_target(archs)
    mod, params, names, counts = lower_to_relax(compiled.model, lengths, tgt, progress)
    lower_s = time.perf_counter() - t0
    with status(f"TVM: building for {target}", enabled=progress):
        cuda_build = C.build(mod, archs) if target == "cuda" else None
        ex = cuda_build.executable if cuda_build else build(mod, tgt)
    build_s = time.perf_counter() - t0 - lower_s

    def fill(tmp: Path) -> None:
        info = {"target": str(tgt), "device": "cpu" if target == "llvm" else "cuda", "params_file": PARAMS,
                "lengths": list(lengths), "functions": names, "linears": counts, "tvm_version": _tvm_version()}
        files = [LIBRARY, PARAMS]
        if cuda_build is None:
            ex.export_library(str(tmp / LIBRARY))
        else:
            C.export_library(cuda_build, tmp / LIBRARY)
            (tmp / C.SOURCE).write_text(cuda_build.source)
            cubins = {arch: f"kernels.{arch}.cubin" for arch in cuda_build.cubins}
            for arch, name in cubins.items():
                (tmp / name).write_bytes(cuda_build.cubins[arch])
            files += [C.SOURCE, *cubins.values()]
            info.update(archs=list(archs), kernels=len(cuda_build.kernels), cuda_source=C.SOURCE, cubins=cubins,
                        embedded="fatbin")
        np.savez(tmp / PARAMS, **{name: array.numpy() for name, array in params.items()})
        if compiled.tokenizer is not None:
            compiled.tokenizer.save_pretrained(str(tmp))
        manifest = compiled.manifest()
        manifest.update({"backend": "tvm", "model_file": LIBRARY, "tvm": info})
        write_json(tmp / MANIFEST, manifest)
        report = dict(compiled.report)
        report["timings_s"] = dict(report.get("timings_s", {}), tvm_lower=round(lower_s, 3), tvm_build=round(build_s, 3))
        report["sizes_bytes"] = {"model_files": sum((tmp / f).stat().st_size for f in files),
                                 "artifact_dir": dir_size(tmp)}
        if cuda_build is not None:
            report["tvm_cuda"] = {"kernels": len(cuda_build.kernels), "fatbin_bytes": len(cuda_build.fatbin),
                                  "cubin_bytes": {a: len(b) for a, b in cuda_build.cubins.items()},
                                  "source_bytes": len(cuda_build.source.encode()),
                                  "library_bytes": (tmp / LIBRARY).stat().st_size}
        write_json(tmp / REPORT, report)

    return write_atomically(out_dir, fill)


def _tvm_version() -> str:
    return str(require_tvm().__version__)


def load_functions(path: Path, manifest: dict):
    """(device, {length: (VM function, its parameter tensors)}) of a TVM artifact, on its device (cpu or cuda)."""
    tvm = require_tvm()
    from tvm import relax

    info = manifest.get("tvm") or {}
    device = info.get("device", "cpu")
    if device == "cuda":
        from qgraph.backends.tvm.cuda import cuda_available

        if not cuda_available():
            raise QGraphError(f"{str(path)!r} is a CUDA artifact ({', '.join(info.get('archs', []))}) and needs a CUDA GPU "
                              "with a CUDA-enabled TVM; this machine has none",
                              "run it on a GPU machine (tools/bench_tvm_cuda.py) or compile with --target llvm")
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu()
    library = path / manifest.get("model_file", LIBRARY)
    try:
        ex = tvm.runtime.load_module(str(library))
    except Exception as exc:
        raise QGraphError(f"TVM cannot load {str(library)!r}: {str(exc).splitlines()[0][:200]}",
                          "recompile the artifact on this machine (the library is built for its CPU)") from None
    vm = relax.VirtualMachine(ex, dev)
    with np.load(path / info.get("params_file", PARAMS)) as stored:
        params = {name: tvm.runtime.tensor(stored[name], dev) for name in stored.files}
    return dev, {int(f.removeprefix("seq")): (vm[f], [params[n] for n in args]) for f, args in info["functions"].items()}


def open_runner(path: Path, manifest: dict, threads: int = 2):
    """A qgraph Runner over a TVM artifact: pads each call to the next compiled length."""
    # The TVM thread pool reads this once, at its first parallel call.
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    tvm = require_tvm()

    from qgraph.ir.capture import load_tokenizer
    from qgraph.runner import Runner

    dev, functions = load_functions(path, manifest)
    lengths = sorted(functions)

    def forward(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise QGraphError(f"TVM artifact input shape {ids.shape}", "pass token ids shaped [1, T]")
        length = next((n for n in lengths if n >= ids.shape[1]), None)
        if length is None:
            raise QGraphError(f"{ids.shape[1]} tokens exceed the longest compiled length {lengths[-1]}",
                              "recompile with longer lengths or pass a shorter window")
        padded = np.zeros((1, length), dtype=np.int64)
        padded[:, : ids.shape[1]] = ids
        func, args = functions[length]
        return func(tvm.runtime.tensor(padded, dev), *args).numpy()[:, : ids.shape[1]]

    vocab = next((o["shape"][-1] for o in manifest.get("outputs", []) if isinstance(o.get("shape", [None])[-1], int)), 1000)
    return Runner(forward, load_tokenizer(path), manifest.get("recipe", path.name),
                  "tvm-cuda" if (manifest.get("tvm") or {}).get("device") == "cuda" else "tvm-llvm", vocab)


def lower_onnx_artifact(src_dir: str | Path, out_dir: str | Path, *, target: str = "llvm", archs=None, lengths=LENGTHS,
                        progress: bool = True) -> Path:
    """Build the TVM artifact (llvm or cuda) of an existing ONNX artifact directory (same graph, recipe, tokenizer)."""
    from qgraph.artifact import read_manifest
    from qgraph.ir.capture import load_tokenizer

    src = Path(src_dir)
    manifest = read_manifest(src)
    if manifest.get("backend") != "onnxruntime":
        raise QGraphError(f"{str(src)!r} is a {manifest.get('backend')} artifact", "pass an ONNX Runtime artifact directory")
    report = json.loads((src / "report.json").read_text()) if (src / "report.json").exists() else {}
    compiled = _ArtifactModel(ir.load(src / manifest.get("model_file", "model.onnx")), load_tokenizer(src), manifest, report)
    return save_artifact(compiled, out_dir, target=target, archs=archs, lengths=lengths, progress=progress)


class _ArtifactModel:
    """The parts of a CompiledModel save_artifact needs, read back from an ONNX artifact."""

    def __init__(self, model, tokenizer, manifest, report):
        self.model, self.tokenizer, self._manifest = model, tokenizer, manifest
        self.report = {k: v for k, v in report.items() if k not in ("sizes_bytes",)}
        self.report.setdefault("timings_s", {})

    def manifest(self) -> dict:
        return dict(self._manifest)
