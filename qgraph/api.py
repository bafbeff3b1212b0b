"""The public Python API: load, compile, save, evaluate, bench — the CLI is a thin layer on it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.artifact import FORMAT_VERSION, MANIFEST, REPORT, dir_size, read_manifest, write_atomically, write_json
from qgraph.calib.data import (
    DEFAULT_CALIB_WINDOWS,
    DEFAULT_CTX,
    DEFAULT_EVAL_WINDOWS,
    TokenWindows,
    calibration_windows,
    evaluation_windows,
)
from qgraph.calib.tensors import TensorFeeds, as_tensor_feeds
from qgraph.errors import QGraphError
from qgraph.ir.capture import CapturedModel
from qgraph.ir.feeds import reads_tokens
from qgraph.recipes import Recipe, load_recipe

__all__ = ["CalibConfig", "CompiledModel", "Runner", "bench", "compile", "evaluate", "load", "open_runner"]


def load(
    source: Any = None, example_inputs: tuple | None = None, *, progress: bool = True, export: bool = True,
    kv_cache: bool = False,
) -> CapturedModel:
    """Capture a model into an onnx_ir graph (nn.Module, HF dir, .gguf, .onnx; None = SmolLM2).

    export=False loads a torch/HF/GGUF model without exporting it yet (`.exported()` does it).
    kv_cache=True captures a causal LM as a decoder step with past/present key-values (what
    `qgraph generate` and onnxruntime-genai run) instead of the logits-only graph.
    """
    from qgraph.ir.capture import load as _load

    return _load(source, example_inputs, progress=progress, export=export, kv_cache=kv_cache)


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Where calibration tokens come from (defaults: 8 x 512 tokens from token 8,192 of britannica)."""

    text: str | None = None
    windows: int = DEFAULT_CALIB_WINDOWS
    ctx: int = DEFAULT_CTX
    start: int | None = None


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


def compile(  # noqa: A001 - mirrors `qgraph compile`
    model: CapturedModel,
    recipe: str | Path | Recipe = "w8a8",
    calib: CalibConfig | TokenWindows | TensorFeeds | Iterable[dict] | str | Path | None = None,
    *,
    progress: bool = True,
    verify: bool = False,
) -> CompiledModel:
    """Annotate the recipe's layers, calibrate static activations, lower to ONNX Runtime ops.

    calib: text (CalibConfig, TokenWindows) for language models; for models that read tensors
    (images, features) an iterable of {input name: array} feeds, an .npz / .npy / folder path, or
    TensorFeeds. verify=True runs the float graph before and after every function-preserving pass
    (random and calibration inputs) and raises if its outputs move beyond float rounding.
    """
    from qgraph.calib.blas import blas_threads
    from qgraph.calib.stats import CALIB_THREADS

    with blas_threads(CALIB_THREADS):  # numpy's float sums too, not only ORT's: the same artifact on any machine
        return _compile(model, recipe, calib, progress=progress, verify=verify)


def _compile(model: CapturedModel, recipe, calib, *, progress: bool, verify: bool) -> CompiledModel:
    import onnx_ir as ir

    from qgraph.backends.onnx_qdq import LowerToOnnxPass, int8_kernel_record
    from qgraph.ir.checks import check_compilable, extra_inputs, left_in_float
    from qgraph.ir.feeds import has_cache
    from qgraph.passes.annotate import AnnotateLinearsPass
    from qgraph.passes.calibrate_ranges import CalibrateRangesPass
    from qgraph.passes.drop_nan_guard import DropNanGuardPass
    from qgraph.passes.fold_batchnorm import FoldBatchNormPass

    recipe = load_recipe(recipe)
    if model.model is None:
        raise QGraphError("this CapturedModel was loaded without export", "use qgraph.load(...) to capture it")
    check_compilable(model.model, runs_graph=recipe.needs_calibration or verify)
    tokens = reads_tokens(model.model.graph.inputs)
    if calib is not None and not isinstance(calib, (CalibConfig, TokenWindows)):
        calib = as_tensor_feeds(calib, list(model.model.graph.inputs))
    elif recipe.needs_calibration and not tokens and not isinstance(calib, TokenWindows):
        raise QGraphError(f"recipe {recipe.name} calibrates activations, and this model reads tensors "
                          f"({model.model.graph.inputs[0].name!r}: {model.model.graph.inputs[0].dtype}), not text",
                          "pass calibration data: --calib-data DIR_OR_NPZ, or calib=[{input name: array}, ...] in the API")
    not_quantized = left_in_float(model.model)
    graph_model = model.model.clone()  # passes work in place; the captured graph stays float
    passes: list[dict] = []
    verified: list[dict] = []

    def run(p, name: str, log: list[dict] = passes, verdicts: list[dict] = verified) -> None:
        t = time.perf_counter()
        if verify and getattr(p, "function_preserving", False):
            from qgraph.eval.verify import check_pass, tensor_verification_inputs, token_range, verification_inputs

            if not tokens:
                inputs = tensor_verification_inputs(list(graph_model.graph.inputs),
                                                    calib if isinstance(calib, TensorFeeds) else None)
            else:
                vocab = token_range(graph_model)
                in_shape = graph_model.graph.inputs[0].shape
                length = in_shape[1] if in_shape is not None and isinstance(in_shape[1], int) else 128  # static exports
                if isinstance(calib, TokenWindows) and length == 128:
                    length = min(length, calib.ctx)  # sentence-length encoder windows are real inputs too
                real = calib.ids[:1, :length] if isinstance(calib, TokenWindows) and calib.ctx >= length else None
                inputs = verification_inputs(vocab, real, length=length)
            result, verdict = check_pass(p, graph_model, inputs, name=name)
            verdicts.append(verdict.to_dict())
        else:
            result = p(graph_model)
        log.append({"pass": name, "modified": result.modified, "seconds": round(time.perf_counter() - t, 3),
                    **p.summary()})

    if recipe.needs_calibration and not isinstance(calib, (TokenWindows, TensorFeeds)):
        calib = calibration_windows_for(model, calib or CalibConfig())
    # Graph cleanup on every recipe, fp32 included, so quantized and float artifacts compare like for like.
    simplified: list[dict] = []
    simplify_verdicts: list[dict] = []
    run(DropNanGuardPass(), "drop_nan_guard", simplified, simplify_verdicts)
    if any(n.op_type == "BatchNormalization" for n in graph_model.graph):
        run(FoldBatchNormPass(), "fold_batchnorm", simplified, simplify_verdicts)
    for entry, verdict in zip(simplified, simplify_verdicts, strict=False):
        entry["verified"] = verdict
    for name, options in recipe.passes:
        run(_recipe_pass(name, options, recipe, calib, progress), name)
    # The float reference for per-layer SQNR is the graph after the function-preserving rewrites:
    # they rescale (and may widen) layers inside a region, so only this graph matches layer for layer.
    float_reference = graph_model.clone() if recipe.passes else model.model  # the cleanup changes no layer
    annotate = AnnotateLinearsPass(recipe)
    run(annotate, "annotate_linears")
    if recipe.needs_calibration and annotate.annotated and any(n.activation for n in annotate.annotated.values()):
        run(CalibrateRangesPass(calib, progress=progress), "calibrate_ranges")
    run(LowerToOnnxPass(int8_kernel=recipe.int8_kernel), "lower_onnx")
    if recipe.embedding is not None:
        from qgraph.backends.embedding_table import QuantizeEmbeddingPass, table_spec

        run(QuantizeEmbeddingPass(table_spec(recipe.embedding.format, recipe.embedding.group_size),
                                  tie_lm_head=recipe.lm_head_tied), "quantize_embedding")
    t = time.perf_counter()
    # ORT 1.32 has no float4e2m1 Q/DQ kernel: the standard opset-23 FP4 form is written but not measured here.
    runs_in_ort = all(v.dtype != ir.DataType.FLOAT4E2M1 for v in graph_model.graph.initializers.values())
    # A graph with inputs besides the token ids (a weight fed at run time) cannot be run for SQNR.
    sqnr = (_layer_sqnr(model, float_reference, graph_model, list(annotate.annotated), calib, progress)
            if annotate.annotated and runs_in_ort and (not extra_inputs(graph_model) or isinstance(calib, TensorFeeds)) else {})
    sqnr_seconds = round(time.perf_counter() - t, 3)
    layers = [{"name": name, **note.describe(), **({"sqnr_db": round(sqnr[name], 2)} if name in sqnr else {})}
              for name, note in annotate.annotated.items()]
    report = {
        "recipe": recipe.name,
        "simplified": simplified,
        "passes": passes,
        "quantized_layers": len(layers),
        "skipped_layers": annotate.skipped,
        "float_layers": annotate.left_float,
        "not_quantized": not_quantized,
        "timings_s": {**{p["pass"]: p["seconds"] for p in passes}, "layer_sqnr": sqnr_seconds},
        "verified": verified if verify else None,
        "layer_sqnr_db": {n: round(v, 3) for n, v in sqnr.items()},
        # Which int8 GEMM ORT runs and the CPU the SQNR above was measured on (MLAS picks kernels by CPUID).
        "int8_gemm": int8_kernel_record(graph_model),
    }
    runtime = None
    kv = next((p for p in passes if p["pass"] == "kv_quant" and p.get("blocks")), None)
    if has_cache(graph_model.graph.inputs) and runs_in_ort and kv is not None:
        from qgraph.backends.kivi_cache import stored_cache_graph
        from qgraph.progress import status

        t = time.perf_counter()
        with status("storing the KV cache as KIVI codes (runtime graph) and checking it", enabled=progress):
            runtime, report["kivi_cache"] = stored_cache_graph(graph_model, kv)
        report["timings_s"]["kivi_cache"] = round(time.perf_counter() - t, 3)
    elif has_cache(graph_model.graph.inputs) and runs_in_ort:
        from qgraph.backends.ort_attention import runtime_graph
        from qgraph.progress import status

        t = time.perf_counter()
        with status("fusing attention for ONNX Runtime (GroupQueryAttention) and checking it", enabled=progress):
            runtime, report["ort_fusion"] = runtime_graph(graph_model, model.source.get("decoder"))
        report["timings_s"]["ort_fusion"] = round(time.perf_counter() - t, 3)
    return CompiledModel(graph_model, model.tokenizer, model.source, recipe, layers, report, runtime)


def _layer_sqnr(model: CapturedModel, reference, lowered, layers: list[str], calib, progress: bool) -> dict[str, float]:
    """Per-layer SQNR on one calibration window (511 positions); empty when the model has no tokenizer/text."""
    from qgraph.eval.sqnr import layer_sqnr
    from qgraph.progress import status

    try:
        windows = calib if isinstance(calib, (TokenWindows, TensorFeeds)) else calibration_windows_for(
            model, calib or CalibConfig())
    except QGraphError:
        return {}
    with status("measuring per-layer SQNR", enabled=progress):
        return layer_sqnr(reference, lowered, layers, windows, max_windows=1)


def _recipe_pass(name: str, options: dict, recipe: Recipe, windows: TokenWindows, progress: bool):
    """Build a recipe's graph pass from its registration (each pass declares its options in its own file)."""
    from qgraph.passes.registry import build_pass

    return build_pass(name, options, recipe, windows, progress)


def calibration_windows_for(model: CapturedModel, calib: CalibConfig) -> TokenWindows:
    """The calibration token windows a CalibConfig describes, tokenized with the model's tokenizer."""
    return calibration_windows(model.tokenizer, calib.text, windows=calib.windows, ctx=calib.ctx, start=calib.start,
                               encoder=model.source.get("task") == "encoder")


@dataclasses.dataclass
class Runner:
    """Something that maps token ids [1, T] to logits [1, T, V]: an ORT session or a torch module."""

    forward: Any
    tokenizer: Any
    name: str
    kind: str
    vocab: int = 1000
    session: Any = None  # the ONNX Runtime session behind forward, when there is one (generate steps it)
    int8_kernel: str = "as stored"  # what its fused int8 GEMMs run (qgraph.backends.host_int8)

    @classmethod
    def from_session(cls, session, tokenizer, name: str, int8_kernel: str = "as stored") -> Runner:
        from qgraph.ir.feeds import token_feeds

        inputs, logits = session.get_inputs(), session.get_outputs()[0].name
        vocab = session.get_outputs()[0].shape[-1]

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
    if isinstance(target, CompiledModel):
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


def evaluate(
    target: Any = None, *, text: str | None = None, ctx: int = DEFAULT_CTX, windows: int = DEFAULT_EVAL_WINDOWS,
    threads: int = 2, progress: bool = True, sentences: int | None = None, decode_from: int | None = None,
    int8_kernel: str | None = None,
) -> dict:
    """Perplexity over non-overlapping windows from token 0: {'ppl', 'tokens', 'windows', 'ctx'}.

    An encoder (manifest task "encoder") gets the sentence-embedding cosine against its float source
    instead: {'cosine_mean', 'cosine_min', 'sentences', ...} (qgraph.eval.embedding).
    decode_from=N (a KV-cache artifact): each window's first N tokens in one pass, the rest one token
    per step with the cache, as generation runs ('decode_from' in the result).
    int8_kernel: "host" or "stored", as open_runner; the result's 'int8_kernel' says what ran.
    """
    from qgraph.eval.embedding import DEFAULT_SENTENCES, encoder_source, evaluate_encoder
    from qgraph.eval.perplexity import perplexity

    if decode_from is not None:
        from qgraph.generate import cached_forward, open_decoder

        decoder, tokenizer = open_decoder(target, threads=threads)
        spans = evaluation_windows(tokenizer, text, windows=windows, ctx=ctx)
        result = perplexity(cached_forward(decoder, decode_from), spans, progress=progress)
        return {**result, "model": str(target), "runtime": "onnxruntime (KV cache)", "decode_from": decode_from}

    source = encoder_source(target)
    if source is not None:
        return evaluate_encoder(target, source, text=text, count=sentences or DEFAULT_SENTENCES, threads=threads,
                                progress=progress)

    # runtime="fused": a one-pass perplexity of a KIVI artifact runs model.onnx, which rounds the whole cache;
    # the stored-cache graph's prompt pass attends in float (its steps read the codes: --decode-from)
    runner = target if isinstance(target, Runner) else open_runner(target, threads=threads, progress=progress,
                                                                   int8_kernel=int8_kernel, runtime="fused")
    spans = evaluation_windows(runner.tokenizer, text, windows=windows, ctx=ctx)
    result = perplexity(runner.forward, spans, progress=progress)
    return {**result, "model": runner.name, "runtime": runner.kind, "int8_kernel": runner.int8_kernel}


def bench(target: Any, *, threads: int = 2, runs: int = 10, prefill_tokens: int = 512,
          contexts: tuple[int, ...] = (128, 512, 1024), steps: int = 32, int8_kernel: str | None = None,
          batch: int = 1) -> dict:
    """Latency of an artifact. A KV-cache artifact: prefill ms at 128 / 512 tokens, decode tokens/s at
    each context with the cache, cache bytes per token and peak memory (`kv_cache` true). A logits-only
    one: prefill and a single-token forward (median of `runs`), a proxy for decode. A model reading
    tensors (images): one forward on random inputs at `batch` (`latency_ms`, `samples_per_s`).
    int8_kernel as open_runner."""
    from qgraph.eval.bench import bench as _bench
    from qgraph.eval.bench import bench_generation, bench_tensors
    from qgraph.generate import Decoder
    from qgraph.ir.feeds import has_cache

    runner = target if isinstance(target, Runner) else open_runner(target, threads=threads, int8_kernel=int8_kernel)
    if runner.session is not None and not reads_tokens(runner.session.get_inputs()):
        return {**bench_tensors(runner.session, batch=batch, runs=runs), "threads": threads,
                "int8_kernel": runner.int8_kernel, "model": runner.name}
    if runner.session is not None and has_cache(runner.session.get_inputs()):
        result = bench_generation(Decoder(runner.session), prompts=(128, prefill_tokens) if prefill_tokens != 128 else (128,),
                                  contexts=contexts, steps=steps, runs=max(1, min(runs, 5)), vocab=runner.vocab)
        return {**result, "kv_cache": True, "threads": threads, "int8_kernel": runner.int8_kernel,
                "model": runner.name if target is runner else str(target)}
    return {**_bench(runner.forward, prefill_tokens=prefill_tokens, runs=runs, vocab=runner.vocab),
            "kv_cache": False, "threads": threads, "int8_kernel": runner.int8_kernel, "model": runner.name}
