"""Runners: what feeds a graph. An ORT session, a TVM artifact or a torch module behind one interface.

Below qgraph.api (which re-exports it): evaluation, generation and the backends open runners from here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.artifact import MANIFEST, read_manifest
from qgraph.errors import QGraphError
from qgraph.ir.capture import CapturedModel


@dataclasses.dataclass
class Runner:
    """What feeds a graph: `forward` maps token ids [1, T] to logits [1, T, V] (a causal LM or encoder);
    `run` takes named inputs of any dtype (image tensors, several inputs) where an ORT session is behind it."""

    forward: Any
    tokenizer: Any
    name: str
    kind: str
    vocab: int = 1000
    session: Any = None  # the ONNX Runtime session behind forward, when there is one (generate steps it)
    int8_kernel: str = "as stored"  # what its fused int8 GEMMs run (qgraph.backends.host_int8)

    @property
    def inputs(self) -> list:
        """The session's inputs (name, type, shape), or [] for a runner without one (torch, TVM)."""
        return list(self.session.get_inputs()) if self.session is not None else []

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        """The graph's outputs for named inputs of any dtype (a missing or unknown name is one clear error)."""
        if self.session is None:
            raise QGraphError(f"runner {self.name!r} ({self.kind}) takes token ids only",
                              "open an ONNX Runtime artifact or .onnx file to feed named tensors")
        names = [i.name for i in self.inputs]
        unknown, missing = sorted(set(feeds) - set(names)), [n for n in names if n not in feeds]
        if unknown or missing:
            raise QGraphError(f"feeds for {self.name!r} do not match its inputs {names}: "
                              f"unknown {unknown}, missing {missing}", "name every graph input once")
        return self.session.run(outputs, feeds)

    @classmethod
    def from_session(cls, session, tokenizer, name: str, int8_kernel: str = "as stored") -> Runner:
        from qgraph.ir.feeds import token_feeds

        inputs, logits = session.get_inputs(), session.get_outputs()[0].name
        vocab = (session.get_outputs()[0].shape or [None])[-1]  # a scalar or unshaped output has no vocab axis

        def forward(ids: np.ndarray) -> np.ndarray:
            return session.run([logits], token_feeds(inputs, ids))[0]

        return cls(forward, tokenizer, name, "onnxruntime", vocab if isinstance(vocab, int) else 1000, session, int8_kernel)

    @classmethod
    def from_torch(cls, module, tokenizer, name: str) -> Runner:
        import torch

        def forward(ids: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(ids)).float().numpy()

        vocab = getattr(getattr(getattr(module, "net", module), "config", None), "vocab_size", 1000)
        return cls(forward, tokenizer, name, "torch", vocab)


def open_runner(target: Any = None, *, threads: int = 2, progress: bool = True, runtime: bool | str = True,
                int8_kernel: str | None = None) -> Runner:
    """A runner for an artifact dir, an .onnx file, a HF dir / .gguf (torch), or a compiled model.

    runtime=False opens an artifact's model.onnx even where it has a model.ort.onnx beside it; runtime="fused"
    opens model.ort.onnx only when it is the fused-attention graph (not KIVI's stored cache, whose prompt pass
    leaves the cache unrounded).
    int8_kernel: "host" (default, or $QGRAPH_INT8_KERNEL) runs u8u8-stored int8 weights on ORT's u8 x s8
    kernel where a probe finds it exact on this CPU; "stored" runs them as compiled (qgraph.backends.host_int8).
    """
    from qgraph.backends import host_int8

    host_int8.choice(int8_kernel)  # a mistyped choice is reported before any loading
    if callable(getattr(target, "runner", None)):  # a CompiledModel (qgraph.compiled) opens its own graph
        return target.runner(threads, runtime)
    if isinstance(target, CapturedModel):
        if target.torch_module is not None:
            return Runner.from_torch(target.torch_module, target.tokenizer, "torch")
        from qgraph.backends.onnx_qdq import session_from_model

        return Runner.from_session(session_from_model(target.model, threads), target.tokenizer, "onnx")
    if target is not None:
        path = Path(target)
        if path.is_dir() and (path / MANIFEST).exists():
            manifest = read_manifest(path)
            if manifest.get("backend") == "tvm":
                from qgraph.backends.tvm.artifact import open_runner as open_tvm_runner

                return open_tvm_runner(path, manifest, threads)
            if manifest.get("backend") != "onnxruntime":
                raise QGraphError(f"artifact backend {manifest.get('backend')!r} is not supported by this qgraph",
                                  "use a qgraph with that backend")
            from qgraph.ir.capture import load_tokenizer

            model_file = path / manifest.get("model_file", "model.onnx")
            if runtime and (path / manifest.get("runtime_file", "-")).is_file():
                model_file = path / manifest["runtime_file"]  # the fused-attention copy: same function, faster
                if runtime == "fused" and manifest.get("runtime_kind") == "kivi-cache":
                    model_file = path / manifest.get("model_file", "model.onnx")  # one pass rounds every position
            session, kernel = _ort_session_checked(host_int8.open_session, model_file, threads, int8_kernel)
            return Runner.from_session(session, load_tokenizer(path), manifest.get("recipe", path.name), kernel)
        if path.is_file() and path.suffix == ".onnx":
            from qgraph.ir.capture import load_tokenizer

            session, kernel = _ort_session_checked(host_int8.open_session, path, threads, int8_kernel)
            return Runner.from_session(session, load_tokenizer(path.parent), path.stem, kernel)
    from qgraph.ir.capture import load as _load

    captured = _load(target, progress=progress, export=False)
    if captured.torch_module is None:
        return open_runner(captured, threads=threads)
    return Runner.from_torch(captured.torch_module, captured.tokenizer, "torch")


def _ort_session_checked(make, path: Path, threads: int, int8_kernel: str | None = None):
    try:
        return make(path, threads=threads, int8_kernel=int8_kernel)
    except QGraphError:
        raise
    except Exception as exc:
        from qgraph.ir.checks import external_data_problem

        problem = external_data_problem(path)
        if problem:
            raise QGraphError(f"cannot read ONNX file {str(path)!r}: {problem}",
                              "put the complete .data file beside the .onnx file, or recompile the artifact") from None
        raise QGraphError(
            f"ONNX Runtime cannot load {str(path)!r}: {str(exc).splitlines()[0][:200]}",
            "re-export or recompile the model; check its .data file is complete",
        ) from None
