"""A compiled model in memory: the lowered graph, its recipe, per-layer formats and report; saves an artifact."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from qgraph.artifact import FORMAT_VERSION, MANIFEST, REPORT, dir_size, write_atomically, write_json
from qgraph.errors import QGraphError
from qgraph.recipes import Recipe
from qgraph.runner import Runner


@dataclasses.dataclass
class CompiledModel:
    """A lowered graph with its recipe, per-layer formats and the compile report."""

    model: Any  # onnx_ir.Model
    tokenizer: Any
    source: dict
    recipe: Recipe
    layers: list[dict]
    report: dict
    # A KV-cache graph's runtime copy, same weights, written as model.ort.onnx: attention fused into
    # GroupQueryAttention (qgraph.backends.ort_attention; what qgraph's runners and onnxruntime-genai load), or
    # with kv_quant the cache stored as KIVI codes (qgraph.backends.kivi_cache; qgraph's decoder only).
    runtime: Any = None
    # A streamed compile's work folder: its weights file backs the graph's initializers until save().
    workdir: Path | None = None

    def discard(self) -> None:
        """Remove a streamed compile's work folder (after save(); the graph can no longer be read)."""
        import shutil

        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    @property
    def runtime_kind(self) -> str | None:
        from qgraph.backends.kivi_cache import layouts_of

        if self.runtime is None:
            return None
        return "kivi-cache" if layouts_of(self.runtime) is not None else "fused-attention"

    def manifest(self) -> dict:
        g = self.model.graph
        return {
            "format_version": FORMAT_VERSION,
            "backend": "onnxruntime",
            "model_file": "model.onnx",
            **({"runtime_file": _runtime_file(), "runtime_kind": self.runtime_kind} if self.runtime is not None else {}),
            "recipe": self.recipe.name,
            "recipe_spec": self.recipe.to_dict(),
            "source": self.source,
            "task": self.source.get("task", "causal-lm"),
            "ir_version": self.model.ir_version,
            "opset": dict(self.model.opset_imports),
            "inputs": [_describe_value(v) for v in g.inputs],
            "outputs": [_describe_value(v) for v in g.outputs],
            "tokenizer": {"add_special_tokens": False, "present": self.tokenizer is not None},
            "quantized_layers": self.layers,
            "created_by": f"qgraph {_version()}",
        }

    def save(self, out_dir: str | Path, *, progress: bool = True, report_files: bool = False, genai: bool = False) -> Path:
        """Write the artifact directory atomically: model.onnx (+ .data), tokenizer, manifest, report.

        report_files=True also writes report.md and sqnr.png (per-layer SQNR plot). genai=True (a
        KV-cache graph) also writes genai_config.json: the directory is an onnxruntime-genai model folder.
        """
        from qgraph.backends.genai import check_genai_source, write_genai_config
        from qgraph.backends.onnx_qdq import save_model
        from qgraph.backends.ort_attention import RUNTIME_FILE, save_runtime_graph
        from qgraph.ir.feeds import has_cache
        from qgraph.progress import status

        decoder = check_genai_source(self.source, has_cache(self.model.graph.inputs)) if genai else None
        if genai and self.tokenizer is None:
            raise QGraphError("--format genai needs the model's tokenizer (onnxruntime-genai reads tokenizer.json)",
                              "compile from a Hugging Face directory or .gguf that has one")

        def fill(tmp: Path) -> None:
            t = time.perf_counter()
            with status("saving artifact", enabled=progress):
                files = save_model(self.model, tmp / "model.onnx")
                if self.runtime is not None:
                    files += save_runtime_graph(self.runtime, tmp / RUNTIME_FILE, tmp / "model.onnx")
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(str(tmp))
            if decoder is not None:  # onnxruntime-genai feeds a float cache: a KIVI runtime graph is qgraph's own
                fused = self.runtime_kind == "fused-attention"
                write_genai_config(tmp, decoder, RUNTIME_FILE if fused else "model.onnx", share_buffer=fused)
            write_json(tmp / MANIFEST, self.manifest())
            report = dict(self.report)
            report["timings_s"] = dict(report.get("timings_s", {}), save=round(time.perf_counter() - t, 3))
            report["sizes_bytes"] = {
                "model_files": sum(f.stat().st_size for f in files),
                "artifact_dir": dir_size(tmp),
            }
            write_json(tmp / REPORT, report)
            if report_files:
                from qgraph.eval.sqnr import plot_sqnr, write_report_md

                sqnr = report.get("layer_sqnr_db") or {}
                plot = None
                if sqnr:
                    plot = "sqnr.png"
                    plot_sqnr(tmp / plot, sqnr, f"{self.recipe.name}: per-layer SQNR")
                write_report_md(tmp / "report.md", report, sqnr, plot)

        return write_atomically(out_dir, fill)

    def runner(self, threads: int = 2, runtime: bool | str = True) -> Runner:
        """A runner on the runtime graph (runtime=True), model.onnx (False), or the runtime graph only when it
        is the fused-attention one ("fused": a one-pass perplexity must not read KIVI's unrounded prompt pass)."""
        from qgraph.backends.onnx_qdq import session_from_model

        use_runtime = runtime is True or (runtime == "fused" and self.runtime_kind == "fused-attention")
        graph = self.runtime if self.runtime is not None and use_runtime else self.model
        return Runner.from_session(session_from_model(graph, threads=threads), self.tokenizer, self.recipe.name)


def _runtime_file() -> str:
    from qgraph.backends.ort_attention import RUNTIME_FILE

    return RUNTIME_FILE


def _describe_value(v) -> dict:
    dims = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": dims}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qgraph")
    except PackageNotFoundError:
        return "dev"
