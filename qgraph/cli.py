"""`qgraph compile | eval | generate | bench | inspect | recipes` — a thin layer over qgraph.api."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import typer

from qgraph.errors import QGraphError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="qgraph: capture a model into one ONNX graph, quantize it with graph passes, lower it to ONNX Runtime.",
)

MODEL_HELP = "Hugging Face directory, .gguf file, .onnx file or qgraph artifact; omitted: the embedded SmolLM2-135M."


def _out():
    from rich.console import Console

    return Console()


RUN_INT8_HELP = ("Run-time int8 GEMM: host (default: int8 weights stored for the portable u8 x u8 kernel run on "
                 "ORT's faster u8 x s8 kernel where a probe finds it exact on this CPU) or stored (as compiled).")


@app.command("compile")
def compile_cmd(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    recipe: str = typer.Option("w8a8", "--recipe", "-r", help="Recipe name (fp32, w8a8, w4a16, ...) or YAML path."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write (replaced atomically)."),
    calib_text: str | None = typer.Option(None, "--calib-text", help="Calibration text file (default britannica)."),
    calib_windows: int = typer.Option(8, "--calib-windows", help="Number of calibration windows."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per calibration window."),
    calib_data: Path | None = typer.Option(
        None, "--calib-data",
        help="Models that read tensors (images, features): an .npz keyed by input name (samples on axis 0), an "
             ".npy, or a folder of .npy files or images (resized, center-cropped, ImageNet-normalized)."),
    verify: bool = typer.Option(False, "--verify", help="Prove every function-preserving pass keeps the float outputs."),
    report: bool = typer.Option(False, "--report", help="Also write report.md and sqnr.png (per-layer SQNR)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or table."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, or tvm (needs pip install 'qgraph[tvm]')."),
    target: str = typer.Option("llvm", "--target", help="TVM target: llvm (this CPU) or cuda (built here, runs on a GPU)."),
    arch: str | None = typer.Option(None, "--arch", help="CUDA architectures for --target cuda (default sm_80,sm_90)."),
    int8_kernel: str | None = typer.Option(
        None, "--int8-kernel",
        help="ORT int8 GEMM for w8a8 layers: u8u8 (default; exact on every CPU), s7 (7-bit weights, exact, "
             "u8 x s8 speed), u8s8 (fastest; saturates on CPUs without VNNI). Overrides the recipe's int8_kernel."),
    kv_cache: bool = typer.Option(
        False, "--kv-cache",
        help="Causal LMs: capture the decoder step with past/present key-values (what `qgraph generate` and "
             "onnxruntime-genai run) instead of the logits-only graph; needs a Hugging Face / GGUF / default model."),
    out_format: str = typer.Option(
        "onnx", "--format",
        help="onnx: a qgraph artifact; genai: also an onnxruntime-genai model folder (genai_config.json; "
             "implies --kv-cache)."),
    stream: bool = typer.Option(
        False, "--stream",
        help="Compile block by block: one block's weights and calibration activations in memory at a time, weights "
             "read from the checkpoint's safetensors as needed (models larger than memory). Same artifact."),
    sequential: str = typer.Option(
        "as-whole", "--sequential",
        help="--stream: what a block is calibrated on: as-whole (the earlier blocks as each pass left them, what a "
             "whole-model compile does), float, or quantized (the lowered earlier blocks)."),
) -> None:
    """Capture MODEL, apply RECIPE and write an ONNX Runtime (or TVM) artifact directory."""
    import qgraph
    from qgraph.ir.feeds import reads_tokens

    progress = not quiet
    from qgraph.artifact import check_output_dir

    recipe_obj = qgraph.load_recipe(recipe)  # fail fast on a bad recipe or output, before a long export
    if int8_kernel is not None:
        recipe_obj = recipe_obj.with_int8_kernel(int8_kernel)
    check_output_dir(out)
    if backend not in ("onnxruntime", "tvm"):
        raise QGraphError(f"unknown backend {backend!r}", "use --backend onnxruntime or --backend tvm")
    if backend == "tvm" and kv_cache:
        raise QGraphError("--kv-cache with --backend tvm: the TVM backend builds the fixed-length logits graph only",
                          "drop --kv-cache, or use --backend onnxruntime for a KV-cache artifact")
    if backend == "tvm":
        from qgraph.backends.tvm import require_tvm
        from qgraph.backends.tvm.artifact import check_target
        from qgraph.backends.tvm.cuda import parse_archs

        require_tvm()
        archs = check_target(target, parse_archs(arch) if target == "cuda" else None)
    if arch is not None and (backend != "tvm" or target != "cuda"):
        raise QGraphError("--arch applies to --backend tvm --target cuda only", "drop --arch or add --target cuda")
    if out_format not in ("onnx", "genai"):
        raise QGraphError(f"unknown --format {out_format!r}", "use --format onnx or --format genai")
    if out_format == "genai":
        if backend != "onnxruntime":
            raise QGraphError("--format genai writes an ONNX Runtime folder", "drop --backend tvm")
        kv_cache = True
    if stream:
        from qgraph.streaming import SEQUENTIAL, check_streamable

        for flag, given in (("--backend tvm", backend == "tvm"), ("--kv-cache", kv_cache), ("--calib-data", calib_data)):
            if given:
                raise QGraphError(f"--stream compiles the logits graph of a language model for ONNX Runtime; {flag} "
                                  "is not supported with it", f"drop {flag} or --stream")
        if sequential not in SEQUENTIAL:
            raise QGraphError(f"unknown --sequential {sequential!r}", f"use one of {', '.join(SEQUENTIAL)}")
        check_streamable(recipe_obj)
    t0 = time.perf_counter()
    if stream:
        calib_config = qgraph.CalibConfig(text=calib_text, windows=calib_windows, ctx=ctx)
        compiled = qgraph.compile_streaming(model, recipe_obj, calib_config, progress=progress, verify=verify,
                                            sequential=sequential,  # the work file on the output's filesystem
                                            workdir=next(p for p in out.resolve().parents if p.is_dir()))
        try:
            path = compiled.save(out, progress=progress, report_files=report)
        finally:
            compiled.discard()
        _print_compile_summary(path, recipe_obj, t0, quiet)
        return
    captured = qgraph.load(model, progress=progress, export=False, kv_cache=kv_cache)
    if kv_cache and captured.model is not None:
        from qgraph.ir.feeds import has_cache

        if not has_cache(captured.model.graph.inputs):
            raise QGraphError(f"--kv-cache: the ONNX graph {model!r} has no past_key_values inputs, and an exported graph "
                              "cannot gain a cache", "pass the Hugging Face directory or .gguf it came from, "
                              "or omit MODEL for the default")
        if out_format == "genai":  # before the long compile, not at save
            from qgraph.backends.genai import check_genai_source

            check_genai_source(captured.source, True)
    calib = qgraph.CalibConfig(text=calib_text, windows=calib_windows, ctx=ctx)
    if calib_data is not None:
        if calib_text is not None:
            raise QGraphError("--calib-data and --calib-text both given", "calibrate from one: tensors or text")
        calib = calib_data  # read and checked against the graph's inputs by compile, before any pass runs
    elif recipe_obj.needs_calibration and (captured.model is None or reads_tokens(captured.model.graph.inputs)):
        # a bad --calib-text fails now, not after a long export; a tensor model without data is refused by compile
        calib = qgraph.api.calibration_windows_for(captured, calib)
    captured = captured.exported(progress=progress)
    capture_s = time.perf_counter() - t0
    compiled = qgraph.compile(captured, recipe=recipe_obj, calib=calib, progress=progress, verify=verify)
    compiled.report["timings_s"]["capture"] = round(capture_s, 3)
    if backend == "tvm":
        from qgraph.backends.tvm.artifact import save_artifact

        path = save_artifact(compiled, out, target=target, archs=archs, progress=progress)
    else:
        path = compiled.save(out, progress=progress, report_files=report, genai=out_format == "genai")
    _print_compile_summary(path, recipe_obj, t0, quiet)


def _print_compile_summary(path: Path, recipe_obj, t0: float, quiet: bool) -> None:
    """Add the total time to report.json and print the one-table summary."""
    report = json.loads((path / "report.json").read_text())
    report["timings_s"]["total"] = round(time.perf_counter() - t0, 3)
    (path / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if quiet:
        return
    from rich.table import Table

    table = Table(title=f"qgraph compile -> {path}", show_header=True)
    sqnr = report.get("layer_sqnr_db") or {}
    for col in ("recipe", "quantized layers", "float layers", "model size", "wall time"):
        table.add_column(col)
    table.add_row(
        recipe_obj.name,
        str(report["quantized_layers"]),
        str(len(report["float_layers"]) + len(report["skipped_layers"])),
        f"{report['sizes_bytes']['model_files'] / 1e6:.1f} MB",
        f"{report['timings_s']['total']:.1f} s",
    )
    _out().print(table)
    if sqnr:
        worst = min(sqnr, key=sqnr.get)
        _out().print(f"per-layer SQNR: median {sorted(sqnr.values())[len(sqnr) // 2]:.1f} dB, "
                     f"worst {sqnr[worst]:.1f} dB at {worst} (all layers in report.json; --report for a plot)")


@app.command("eval")
def eval_cmd(
    target: str | None = typer.Argument(None, help="Artifact directory or " + MODEL_HELP),
    text: str | None = typer.Option(None, "--text", help="Evaluation text file (default britannica)."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per window."),
    windows: int = typer.Option(16, "--windows", help="Number of non-overlapping windows from token 0."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    sentences: int = typer.Option(256, "--sentences", help="Encoders: sentences compared with the float model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: ppl, tokens, windows."),
    decode_from: int | None = typer.Option(
        None, "--decode-from",
        help="KV-cache artifacts: each window's first N tokens in one pass, the rest one token per step with the cache."),
    int8_kernel: str | None = typer.Option(None, "--int8-kernel", help=RUN_INT8_HELP),
    data: Path | None = typer.Option(
        None, "--data", help="Models that read tensors: an .npz / .npy / folder of images (a folder per class gives "
                             "labels) to evaluate on, instead of text."),
    reference: str | None = typer.Option(
        None, "--reference", help="With --data: the float artifact or .onnx to compare with (top-1 agreement, "
                                  "logit cosine)."),
) -> None:
    """Perplexity of an artifact or model over non-overlapping token windows (encoders: embedding cosine;
    tensor models with --data: top-1 agreement and logit cosine against --reference, top-1 with labels)."""
    import qgraph

    if decode_from is not None and decode_from < 1:
        raise QGraphError(f"--decode-from {decode_from}", "give at least 1 prompt token")
    if reference is not None and data is None:
        raise QGraphError("--reference compares outputs on --data", "add --data DIR_OR_NPZ")
    if data is not None:
        from qgraph.eval.tensor_eval import evaluate_tensors

        result = evaluate_tensors(target, data, reference=reference, threads=threads, int8_kernel=int8_kernel)
        if as_json:
            print(json.dumps(result))
            return
        parts = [f"{k} [bold]{result[k]:.4f}[/]" for k in ("top1_agreement", "logit_cosine", "top1") if k in result]
        _out().print(", ".join(parts) + f" over {result['samples']} samples ({result['model']}"
                     + (f" vs {result['reference']}" if "reference" in result else "") + ")")
        return
    result = qgraph.evaluate(target, text=text, ctx=ctx, windows=windows, threads=threads, progress=not as_json,
                             sentences=sentences, decode_from=decode_from, int8_kernel=int8_kernel)
    if as_json:
        print(json.dumps(result))
    elif "cosine_mean" in result:
        _out().print(
            f"sentence-embedding cosine vs float: mean [bold]{result['cosine_mean']:.5f}[/], min {result['cosine_min']:.5f} "
            f"over {result['sentences']} sentences (mean-pooled; {result['runtime']}: {result['model']})"
        )
    else:
        _out().print(
            f"perplexity [bold]{result['ppl']:.4f}[/] over {result['tokens']} scored predictions "
            f"({result['windows']} windows x {result['ctx']} tokens, {result['runtime']}: {result['model']}"
            + (f"; int8 GEMMs: {result['int8_kernel']}" if result.get("int8_kernel", "as stored") != "as stored" else "")
            + ")"
        )


@app.command("generate")
def generate_cmd(
    target: str = typer.Argument(..., help="Artifact directory (compiled with --kv-cache for speed) or .onnx file."),
    prompt: str = typer.Argument(..., help="Prompt text, encoded with the artifact's tokenizer."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above 0: sample softmax(logits / T)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler (the same seed, the same text)."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming the text."),
) -> None:
    """Generate text after PROMPT, streaming it as it comes; timings on stderr."""
    from qgraph.generate import generate

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(target, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                      threads=threads, on_text=None if as_json else stream)
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(file=sys.stdout)
    how = "KV cache" if result.cached else "no KV cache: the whole sequence recomputed per token (compile with --kv-cache)"
    print(f"{len(result.new_ids)} tokens after a {len(result.prompt_ids)}-token prompt: prefill {result.prefill_s * 1e3:.1f} ms, "
          f"decode {result.tokens_per_s:.1f} tokens/s ({how})", file=sys.stderr)


@app.command("export-weights")
def export_weights_cmd(
    artifact: str = typer.Argument(..., help="ONNX Runtime artifact directory, compiled from a Hugging Face dir or .gguf."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write (replaced atomically)."),
    fmt: str = typer.Option("safetensors", "--format", help="safetensors (a transformers checkpoint folder)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Write the artifact's weights (folded scales, rounded values) as a Hugging Face checkpoint transformers loads."""
    from qgraph.backends.hf_checkpoint import export_weights

    info = export_weights(artifact, out, fmt=fmt, progress=not (quiet or as_json))
    if as_json:
        print(json.dumps(info))
    elif not quiet:
        _out().print(f"wrote {info['out']}: {info['tensors']} tensors ({info['linears']} linears dequantized to "
                     f"float on the recipe's grid; logits within {info['relative_error']:.1e} of the artifact's)"
                     f"{'; lm_head untied from the table' if info['untied_head'] else ''}"
                     f"{'; quantization_config.json describes the grid' if info['quantization_config'] else ''}")


@app.command("bench")
def bench_cmd(
    target: str = typer.Argument(..., help="Artifact directory or .onnx file."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    runs: int = typer.Option(10, "--runs", help="Timed runs per measurement (median reported; KV-cache artifacts: at most 5)."),
    steps: int = typer.Option(32, "--steps", help="KV-cache artifacts: decode steps timed per context."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (keys in the README's bench section)."),
    int8_kernel: str | None = typer.Option(None, "--int8-kernel", help=RUN_INT8_HELP),
    batch: int = typer.Option(1, "--batch", help="Models that read tensors: samples per forward (a dynamic batch axis)."),
) -> None:
    """KV-cache artifacts: prefill ms (128 / 512 tokens), decode tokens/s at context 128 / 512 / 1024, peak memory.
    Logits-only artifacts: prefill and a single-token forward (a proxy for decode). Tensor models (images):
    one forward at --batch."""
    import qgraph

    if batch < 1:
        raise QGraphError(f"--batch {batch}", "give at least 1 sample per forward")
    result = qgraph.bench(target, threads=threads, runs=runs, steps=steps, int8_kernel=int8_kernel, batch=batch)
    if as_json:
        print(json.dumps(result))
    elif "latency_ms" in result:
        _out().print(f"forward at batch {result['batch']}: {result['latency_ms']:.2f} ms (min {result['latency_min_ms']:.2f}), "
                     f"{result['samples_per_s']:.1f} samples/s\n[dim]{threads} threads, median of {runs} runs; "
                     f"int8 GEMMs: {result['int8_kernel']}[/]")
    elif result["kv_cache"]:
        pre = ", ".join(f"{n} tokens {ms:.1f} ms" for n, ms in result["prefill_ms"].items())
        dec = ", ".join(f"context {c}: {r:.1f}" for c, r in result["decode_tokens_per_s"].items())
        _out().print(f"prefill: {pre}\ndecode tokens/s with the KV cache: {dec}\n"
                     f"cache {result['cache_bytes_per_token']} bytes per token; peak RSS {result['peak_rss_mb']:.0f} MB\n"
                     f"[dim]{threads} threads, median of {result['runs']} runs, {result['decode_steps']} steps each; "
                     f"int8 GEMMs: {result['int8_kernel']}[/]")
    else:
        _out().print(
            f"prefill {result['prefill_tokens']} tokens: {result['prefill_ms']:.1f} ms (min {result['prefill_min_ms']:.1f})\n"
            f"decode 1 token: {result['decode_ms']:.2f} ms (min {result['decode_min_ms']:.2f})\n"
            f"[dim]{result['note']}; {threads} threads, median of {runs} runs; int8 GEMMs: {result['int8_kernel']}[/]"
        )


@app.command("inspect")
def inspect_cmd(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List the graph's inputs, linear layers (with roles), convolutions, norms, embeddings, channel regions and
    rejected candidates."""
    import qgraph
    from qgraph.backends.onnx_qdq import int8_kernel_record
    from qgraph.ir.convs import find_convs
    from qgraph.ir.regions import find_embeddings, find_linears, find_norms
    from qgraph.passes.split_fused_linears import regions_as_compiled

    captured = qgraph.load(model, progress=not as_json)
    linears = find_linears(captured.model)
    norms = find_norms(captured.model)
    embeds = find_embeddings(captured.model)
    regions, rejected, split = regions_as_compiled(captured.model)  # fused q/k/v cut as recipes with passes do
    convs = find_convs(captured.model)
    info = {
        "inputs": [{"name": v.name, "dtype": str(v.dtype),
                    "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])]}
                   for v in captured.model.graph.inputs],
        "convs": [{"name": c.name, "kind": c.kind, "out_channels": c.out_channels, "kernel": list(c.weight.shape)[2:]}
                  for c in convs],
        "linears": [{"name": l.name, "role": l.role, "in": l.in_features, "out": l.out_features,
                     "op": l.node.op_type, "tied": l.transposed and l.node.op_type == "MatMul"} for l in linears],
        "norms": [{"name": n.name, "kind": n.kind} for n in norms],
        "embeddings": [name for name, _ in embeds],
        "regions": [{"name": r.name, "kind": r.kind, "channels": r.channels, "sources": [s.name for s in r.sources],
                     "sinks": [s.name for s in r.sinks], "sharing": r.sharing} for r in regions],
        "rejected": [{"candidate": r.candidate, "reason": r.reason} for r in rejected],
        "fused_split": split.split,
        "fused_kept": split.kept,
        "nodes": sum(1 for _ in captured.model.graph),
        "int8_gemm": int8_kernel_record(captured.model),
    }
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"linear layers ({sum(l['role'] == 'block' for l in info['linears'])} block, "
                    f"{sum(l['role'] == 'lm_head' for l in info['linears'])} head)")
    for col in ("name", "role", "in", "out", "op"):
        t.add_column(col)
    for l in info["linears"]:
        t.add_row(l["name"], l["role"] + (" (tied)" if l["tied"] else ""), str(l["in"]), str(l["out"]), l["op"])
    _out().print(t)
    if convs:
        c = Table(title=f"convolutions ({len(convs)})")
        for col in ("name", "kind", "out channels", "kernel"):
            c.add_column(col)
        for x in info["convs"]:
            c.add_row(x["name"], x["kind"], str(x["out_channels"]), "x".join(map(str, x["kernel"])))
        _out().print(c)
    n = Table(title=f"norms ({len(norms)})")
    n.add_column("name")
    n.add_column("kind")
    for x in info["norms"]:
        n.add_row(x["name"], x["kind"])
    _out().print(n)
    r = Table(title=f"channel regions ({len(regions)})")
    for col in ("name", "kind", "channels", "sinks"):
        r.add_column(col)
    for x in info["regions"]:
        r.add_row(x["name"], x["kind"], str(x["channels"]), str(len(x["sinks"])))
    _out().print(r)
    for fused, parts in info["fused_split"].items():
        _out().print(f"fused {fused}: split into {', '.join(p.rsplit('.', 1)[-1] for p in parts)} for the region passes")
    for fused, why in info["fused_kept"].items():
        _out().print(f"fused {fused}: kept whole, {why}")
    j = Table(title=f"rejected region candidates ({len(rejected)})")
    j.add_column("candidate", overflow="fold")
    j.add_column("reason")
    for x in info["rejected"]:
        j.add_row(x["candidate"], x["reason"])
    _out().print(j)
    _out().print(f"embeddings: {', '.join(info['embeddings']) or 'none'}; {info['nodes']} nodes")
    if info["int8_gemm"]:
        from qgraph.eval.host import describe_host

        gemm = info["int8_gemm"]
        for kernel, n in gemm["layers"].items():
            k = gemm["kernels"][kernel]
            _out().print(f"int8 GEMMs: {n} x {kernel} ({k['ort_kernel']}); exact on {k['exact_on']}; "
                         f"on this host: {k['on_this_host']}; qgraph runs it here as {k['at_run_time_here']}")
        _out().print(f"host: {describe_host()}")


@app.command("recipes")
def recipes_cmd(
    name: str | None = typer.Argument(None, help="Recipe name or YAML path; omitted: list the shipped recipes."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """List the shipped recipes, or show one: its passes in order with every option, and its formats."""
    from rich.table import Table

    from qgraph.recipes import load_recipe
    from qgraph.recipes.describe import describe, shipped

    info = shipped() if name is None else describe(load_recipe(name))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if name is None:
        t = Table(title=f"shipped recipes ({len(info)}; `qgraph recipes NAME` shows one)")
        for col in ("name", "passes", "description"):
            t.add_column(col, overflow="fold")
        for r in info:
            t.add_row(r["name"], ", ".join(r["passes"]) or "-", r["description"])
        _out().print(t)
        return
    _out().print(f"[bold]{info['name']}[/] ({info['source']}): {info['description']}")
    for i, p in enumerate(info["passes"], 1):
        _out().print(_option_table(f"pass {i}: {p['pass']} - {p['help']}", p["options"]))
    parts = {"blocks": info["blocks"], "lm_head": info["lm_head"]}
    for part, rule in parts.items():
        if not isinstance(rule, dict):
            _out().print(f"{part}: {rule or 'float'}")
            continue
        for kind in ("weights", "activations"):
            if rule[kind] is None:
                _out().print(f"{part} {kind}: float")
            else:
                _out().print(_option_table(f"{part} {kind}", rule[kind]))
        _out().print(f"{part} lowering: {rule['lowering']} ({rule['lowering_help']})")
    if info["embedding"] is None:
        _out().print("embedding: float")
    else:
        _out().print(_option_table("embedding table", info["embedding"]))
    skip = info["layers"]["skip"]
    _out().print(f"layers: {info['layers']['select']}" + (f", float: {', '.join(skip)}" if skip else ""))
    _out().print(f"int8_kernel: {info['int8_kernel']['name']} ({info['int8_kernel']['help']})")


def _option_table(title: str, rows: list[dict]):
    """A table of option rows (value, type, default, help); values the recipe sets are bold."""
    from rich.markup import escape
    from rich.table import Table

    from qgraph.options import show

    table = Table(title=title, title_justify="left")
    for col in ("option", "value", "type", "default", "help"):
        table.add_column(col, overflow="fold")
    for row in rows:
        value = escape(show(row["value"]))
        table.add_row(row["name"], f"[bold]{value}[/]" if row.get("set") else value, escape(row["type"]),
                      "(required)" if row["required"] else escape(show(row["default"])), escape(row["help"]))
    return table


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an internal error (or set QGRAPH_DEBUG=1)."),
) -> None:
    if debug:
        os.environ["QGRAPH_DEBUG"] = "1"


def _hoist_debug(args: list[str]) -> list[str]:
    """Accept --debug anywhere before `--`: a user reruns the failing command with --debug appended."""
    cut = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:cut]:
        return args
    return ["--debug", *[a for a in args[:cut] if a != "--debug"], *args[cut:]]


def _usage_line(exc, args: list[str]) -> str:
    """A click usage error as one line: what is wrong, for which command, where its help is."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "qgraph"
    if ctx is None:  # click's parser raises some errors (an option without its value) with no context
        named = [a for a in args if a in typer.main.get_command(app).commands]
        command = f"qgraph {named[0]}" if named else command
    if getattr(exc, "option_name", None) and hasattr(exc, "possibilities"):  # NoSuchOption
        what = f"no such option {exc.option_name}"
        if exc.possibilities:
            what += f" (did you mean {' or '.join(sorted(exc.possibilities))}?)"
    else:
        what = " ".join(exc.format_message().split()).rstrip(".")
        what = re.sub(r"\. Did you mean (.*)\?$", r" (did you mean \1?)", what)
        what = what[:1].lower() + what[1:]
    return f"qgraph: error: {what} for {command!r} -- see {command} --help"


def _click_exceptions() -> tuple[type, type]:
    """(ClickException, UsageError) of the click that typer runs: typer >= 0.20 vendors its own copy."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer runs on click itself
        from click import exceptions
    return exceptions.ClickException, exceptions.UsageError


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line per error; user errors and usage errors exit 2, internal errors 1, Ctrl-C 130."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _hoist_debug(sys.argv[1:] if argv is None else list(argv))
    with _sigint_recorded() as interrupted:
        try:
            # standalone_mode=False: errors come back here instead of click printing usage blocks and
            # tracebacks; click turns Ctrl-C into the return value 130.
            code = app(args=args, prog_name="qgraph", standalone_mode=False)
        except Exception as exc:
            # Ctrl-C inside an extension (during ONNX Runtime's import) can surface as another error.
            code = 130 if interrupted else _report(exc, args)
    if code == 130:
        print("qgraph: interrupted", file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


@contextlib.contextmanager
def _sigint_recorded() -> Iterator[list[int]]:
    """Note every Ctrl-C (and raise KeyboardInterrupt, as Python does); the list stays empty until one comes."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _report(exc: Exception, args: list[str]) -> int:
    """Print one line for exc; the exit code: 2 for user and usage errors, 1 for anything qgraph did not expect."""
    click_error, usage_error = _click_exceptions()
    if os.environ.get("QGRAPH_DEBUG") == "1" and not isinstance(exc, click_error):
        traceback.print_exception(exc)
    if isinstance(exc, QGraphError):
        print(f"qgraph: error: {exc.what}" + (f" -- {exc.fix}" if exc.fix else ""), file=sys.stderr)
        return 2
    if isinstance(exc, click_error):
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `qgraph`: the help text is the answer
            exc.show()
        elif isinstance(exc, usage_error):
            print(_usage_line(exc, args), file=sys.stderr)
        else:
            print(f"qgraph: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return exc.exit_code
    if isinstance(exc, (typer.Abort, EOFError)):
        print("qgraph: aborted", file=sys.stderr)
        return 1
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    print(f"qgraph: internal error: {type(exc).__name__}: {first} -- rerun with --debug for the traceback",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    main()
