"""The public Python API: load, compile, save, evaluate, bench — the CLI is a thin layer on it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qgraph.calib.data import (
    DEFAULT_CALIB_WINDOWS,
    DEFAULT_CTX,
    DEFAULT_EVAL_WINDOWS,
    TokenWindows,
    calibration_windows,
    evaluation_windows,
)
from qgraph.calib.tensors import TensorFeeds, as_tensor_feeds
from qgraph.compiled import CompiledModel
from qgraph.errors import QGraphError
from qgraph.ir.capture import CapturedModel
from qgraph.ir.feeds import reads_tokens
from qgraph.recipes import Recipe, load_recipe
from qgraph.runner import Runner, open_runner

__all__ = ["CalibConfig", "CompiledModel", "Runner", "bench", "compile", "compile_streaming", "evaluate", "load",
           "open_runner"]


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


def compile_streaming(
    source: Any = None, recipe: str | Path | Recipe = "w8a8", calib: CalibConfig | TokenWindows | None = None, *,
    progress: bool = True, verify: bool = False, sequential: str = "as-whole", workdir: str | Path | None = None,
) -> CompiledModel:
    """Compile a language model block by block (`qgraph compile --stream`): see qgraph.streaming.

    source: a Hugging Face folder (its safetensors are read one block at a time; the model is never
    in memory whole), a .gguf or None (the default model). The result's weights wait in a work file
    under `workdir` (default: the system's temporary directory): save() writes them into the artifact,
    discard() removes the file (also done when the process exits).
    """
    from qgraph.calib.blas import blas_threads
    from qgraph.calib.stats import CALIB_THREADS
    from qgraph.streaming import check_streamable, load_streaming, stream

    recipe = load_recipe(recipe)
    check_streamable(recipe)
    t0 = time.perf_counter()
    captured = load_streaming(source, progress=progress)
    capture_s = time.perf_counter() - t0
    windows = calib if isinstance(calib, TokenWindows) else calibration_windows_for(captured, calib or CalibConfig())
    with blas_threads(CALIB_THREADS):
        compiled = stream(captured, recipe, windows, _compile, progress=progress, verify=verify, sequential=sequential,
                          workdir=workdir)
    compiled.report["timings_s"]["capture"] = round(capture_s, 3)
    return compiled


def _compile(model: CapturedModel, recipe, calib, *, progress: bool, verify: bool, stage_calib=None) -> CompiledModel:
    """compile() without the thread pinning. stage_calib(i, graph, changed), when given (the streaming compile),
    returns the calibration data for recipe pass i (i = len(passes): range calibration and SQNR), given the
    graph as it stands before that pass and whether its function moved since the previous stage: a block is
    then calibrated on what the passes so far made of the blocks before it, as in a whole-model compile."""
    import onnx_ir as ir

    from qgraph.backends.onnx_qdq import LowerToOnnxPass, int8_kernel_record
    from qgraph.ir.checks import check_compilable, extra_inputs, left_in_float
    from qgraph.ir.feeds import has_cache
    from qgraph.passes.annotate import AnnotateLinearsPass
    from qgraph.passes.calibrate_ranges import CalibrateRangesPass
    from qgraph.passes.drop_nan_guard import DropNanGuardPass
    from qgraph.passes.fold_batchnorm import FoldBatchNormPass
    from qgraph.passes.split_fused_linears import SplitFusedLinearsPass, has_fused_linears

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

            if not tokens or isinstance(calib, TensorFeeds):  # tensor inputs (a streamed block reads hidden states too)
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
    if recipe.passes and has_fused_linears(graph_model):  # the region passes need q, k, v (gate, up) apart
        run(SplitFusedLinearsPass(), "split_fused_linears", simplified, simplify_verdicts)
    for entry, verdict in zip(simplified, simplify_verdicts, strict=False):
        entry["verified"] = verdict
    changed = True  # since the last stage: the graph's function moved (a weight-rounding pass ran)
    for i, (name, options) in enumerate(recipe.passes):
        stage = calib if stage_calib is None else stage_calib(i, graph_model, changed)
        p = _recipe_pass(name, options, recipe, stage, progress)
        run(p, name)
        changed = not getattr(p, "function_preserving", False)
    if stage_calib is not None:
        calib = stage_calib(len(recipe.passes), graph_model, changed)
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
