"""Layer-streamed compile: one block's weights and calibration activations in memory at a time.

The model is exported once without constant folding and, for a Hugging Face folder with safetensors,
with weightless (meta) parameters: each initializer reads its tensor from the checkpoint only when a
part needs it. The graph is cut into parts (qgraph.ir.partition: prologue, each block, epilogue);
each part is folded, compiled with the recipe exactly as a whole model would be (`qgraph.api._compile`
on the part, calibrated on the activations that reach it), and its lowered weights are parked in a
work file as it finishes, so they leave memory. The inputs of part i+1 are part i's outputs on the
calibration windows. By default each pass of a block is calibrated on what the earlier passes made of the blocks
before it, as a whole-model compile does, so the artifact is the one `qgraph compile` writes without
streaming, up to float rounding. The parts are joined into one graph whose initializers point into the work file; saving the
artifact streams them into model.onnx.data.

Passes that rewrite the residual stream of the whole model (rotate) or need the KV-cache graph
(kv_quant) cannot run part by part and are refused.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qgraph.errors import QGraphError

# Passes that span parts: each names why it cannot run on one block at a time.
WHOLE_MODEL_PASSES = {
    "rotate": "rotates the residual stream, which the embedding, every block and the head share",
    "kv_quant": "quantizes the KV cache of the decoder-step graph; streaming compiles the logits graph",
}
# What a block is calibrated on: "as-whole" (default), the blocks before it as each pass left them, which
# is what a whole-model compile does; "float", the float model's activations for every pass; "quantized",
# the lowered blocks' outputs (what the block reads at run time; GPTQ's reference code feeds blocks so).
SEQUENTIAL = ("as-whole", "float", "quantized")
_PARK_MIN_BYTES = 1024  # smaller initializers (shape constants) stay in the graph: ORT's shape inference reads them
_ALIGN = 64


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SafetensorsWeights:
    """Tensors of a Hugging Face checkpoint folder (one file or an index of shards), read one at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: self.directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (self.directory / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(self.directory / "model.safetensors", "pt") as f:
                self.files = {k: self.directory / "model.safetensors" for k in f.keys()}  # noqa: SIM118 - not a dict
        else:
            self.files = {}

    def __bool__(self) -> bool:
        return bool(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, key: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(self.files[key], "pt") as f:
            return f.get_tensor(key).to(torch.float32).numpy()


def load_streaming(source: Any = None, *, progress: bool = True):
    """Capture a causal LM / encoder for streaming: unfolded graph, weights read lazily where possible.

    A Hugging Face folder with safetensors is built on the meta device (no weight in memory) and its
    initializers read the checkpoint on demand; a GGUF or other source is loaded by transformers first.
    """
    from qgraph.ir.capture import CapturedModel, export_token_module, load

    directory = Path(source) if source is not None else None
    weights = SafetensorsWeights(directory) if directory is not None and directory.is_dir() else None
    if weights:
        captured = _meta_capture(directory, weights, progress=progress)
    else:
        captured = load(source, progress=progress, export=False)
        if captured.torch_module is None:
            raise QGraphError(f"streaming compiles torch, Hugging Face and GGUF models; {source!r} is an ONNX graph",
                              "compile it without --stream, or pass the model it was exported from")
        captured = CapturedModel(export_token_module(captured.torch_module, progress=progress, optimize=False),
                                 captured.tokenizer, captured.source, captured.torch_module)
    return captured


def _meta_capture(directory: Path, weights: SafetensorsWeights, *, progress: bool):
    import torch
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from qgraph.ir.capture import CapturedModel, CausalLMLogits, EncoderHidden, causal_lm, export_token_module, load_tokenizer

    transformers.logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(str(directory))
    archs = list(getattr(config, "architectures", None) or [])
    is_causal = causal_lm(archs, config.model_type)
    auto = transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed on CPU
        module = auto.from_config(config, dtype=torch.float32)
    module.tie_weights()  # a tied lm_head is the embedding's parameter: one initializer, as from_pretrained gives
    module.eval()
    if hasattr(module.config, "use_cache"):
        module.config.use_cache = False
    wrapper = CausalLMLogits(module) if is_causal else EncoderHidden(module)
    model = export_token_module(wrapper, progress=progress, optimize=False)
    tied = getattr(module, "_tied_weights_keys", None) if getattr(config, "tie_word_embeddings", False) else None
    tied = tied if isinstance(tied, dict) else {}  # {tied parameter: the parameter the checkpoint stores}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or not _on_meta(tensor):
            continue
        key = name.split(".", 1)[1] if name.startswith("net.") else name
        key = key if key in weights else tied.get(key, key)
        if key not in weights:
            raise QGraphError(f"parameter {key!r} is not in the checkpoint {str(directory)!r}",
                              "pass the folder transformers saved (config.json and its safetensors)")
        value.const_value = ir.LazyTensor(lambda key=key: ir.Tensor(weights.read(key)), dtype=tensor.dtype,
                                          shape=tensor.shape, name=name)
    source = {"kind": "huggingface", "path": str(directory), "default": False, "model_type": config.model_type,
              "architecture": archs[0] if archs else type(module).__name__, "loaded_class": type(module).__name__,
              "task": "causal-lm" if is_causal else "encoder"}
    return CapturedModel(model, load_tokenizer(directory), source, None)


def _on_meta(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return getattr(raw, "is_meta", False)


class _WorkFile:
    """Append-only file that holds finished parts' weights until the artifact is saved."""

    def __init__(self, directory: Path | None):
        self.directory = Path(tempfile.mkdtemp(prefix="qgraph-stream.", dir=directory))
        atexit.register(shutil.rmtree, self.directory, True)
        self.name = "weights.bin"
        self.file = open(self.directory / self.name, "wb")  # noqa: SIM115 - closed in close()
        self.offset = 0
        self.bytes = 0

    def park(self, graph: ir.Graph) -> None:
        """Write the graph's weights to the file and point the initializers at them (memory freed)."""
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < _PARK_MIN_BYTES:
                continue
            data = tensor.tobytes()
            pad = -self.offset % _ALIGN
            self.file.write(b"\0" * pad + data)
            self.offset += pad
            value.const_value = ir.ExternalTensor(self.name, self.offset, len(data), tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=str(self.directory))
            self.offset += len(data)
            self.bytes += len(data)
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def check_streamable(recipe) -> None:
    for name, _ in recipe.passes:
        if name in WHOLE_MODEL_PASSES:
            raise QGraphError(f"recipe {recipe.name}: pass {name} {WHOLE_MODEL_PASSES[name]}, so it cannot run one block "
                              "at a time", "compile this recipe without --stream")


class _Boundary:
    """Values that cross parts: per calibration stage, one array per window; dropped after their last reader.

    Stage s holds what the blocks compute after the recipe's first s passes (a whole-model compile
    calibrates pass s on exactly that). A stage after function-preserving passes only is the same list
    object as the stage before it, so it costs no memory and no run.
    """

    def __init__(self, graph_input: str, ids: np.ndarray, stages: int, last_reader: dict[str, int]):
        windows = [ids[i:i + 1] for i in range(ids.shape[0])]
        self.values: dict[str, dict[int, list[np.ndarray]]] = {graph_input: dict.fromkeys(range(stages), windows)}
        self.last_reader = last_reader

    def feeds(self, names: list[str], stage: int) -> list[dict[str, np.ndarray]]:
        lists = [self.values[n][self.latest(n, stage)] for n in names]
        return [{n: lst[w] for n, lst in zip(names, lists, strict=True)} for w in range(len(lists[0]))]

    def latest(self, name: str, stage: int) -> int:
        return max(s for s in self.values[name] if s <= stage)

    def same_inputs(self, names: list[str], stage: int) -> bool:
        """Whether every input's stage `stage` is the very list of stage - 1."""
        return stage > 0 and all(self.values[n].get(stage) is self.values[n].get(stage - 1) for n in names)

    def release(self, part: int) -> None:
        for name in [n for n, last in self.last_reader.items() if last <= part and n in self.values]:
            del self.values[name]


def _stages_needed(recipe) -> set[int]:
    """The stages some pass calibrates on: before each pass that reads data, and the range calibration."""
    from qgraph.passes.registry import lookup

    needed = {i for i, (name, _) in enumerate(recipe.passes) if not lookup(name, recipe.name).data_free}
    rules = [r for r in (recipe.blocks, recipe.lm_head) if r is not None]
    if any(r.activations is not None and r.activations.static for r in rules) or not needed:
        needed.add(len(recipe.passes))
    return needed | {0}


def stream(captured, recipe, windows, compile_part, *, progress: bool = True, verify: bool = False,
           sequential: str = "as-whole", workdir: str | Path | None = None):
    """Compile a load_streaming() capture part by part (see the module doc) on token windows.

    compile_part is qgraph.api's per-graph compile (passed in: this module sits below the API).
    Returns a CompiledModel whose weights wait in a work file until it is saved or discarded.
    """
    from qgraph.backends.onnx_qdq import int8_kernel_record
    from qgraph.calib.tensors import TensorFeeds
    from qgraph.compiled import CompiledModel
    from qgraph.ir.capture import CapturedModel
    from qgraph.ir.partition import append_part, extract, partition
    from qgraph.progress import track

    model = captured.model
    parts = partition(model)
    part_recipe = dataclasses.replace(recipe, embedding=None)  # the table is quantized once, on the joined graph
    stages = len(recipe.passes) + 1
    needed = _stages_needed(recipe) if sequential == "as-whole" else {0}
    boundary = _Boundary(model.graph.inputs[0].name, windows.ids, stages,
                         {name: k for k, p in enumerate(parts) for name in p.inputs})
    whole = ir.Model(ir.Graph([ir.Value(name=v.name, type=v.type, shape=v.shape) for v in model.graph.inputs], [],
                              nodes=[], name=model.graph.name), ir_version=model.ir_version)
    check_streamable(recipe)
    if sequential not in SEQUENTIAL:
        raise QGraphError(f"unknown sequential mode {sequential!r}", f"use one of {', '.join(SEQUENTIAL)}")
    work = _WorkFile(workdir)
    layers: list[dict] = []
    part_reports: list[dict] = []
    simplified: list[dict] = []
    totals: dict[str, dict] = {}
    sqnr: dict[str, float] = {}
    listed: dict[str, list] = {"skipped_layers": [], "float_layers": [], "not_quantized": []}
    verified: list[dict] = []
    try:
        for k, part in enumerate(track(parts, "compiling block by block", enabled=progress)):
            t = time.perf_counter()
            sub = extract(model, part)
            _fold(sub)
            names = [v.name for v in sub.graph.inputs]
            later = [name for name in part.outputs if boundary.last_reader.get(name, -1) > k]
            produced: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in later}
            runs = {"forward": 0}

            def feeds_at(stage: int, names=names, part=part) -> TensorFeeds:
                # rows: the windows' tokens, so samplers (AWQ, clip search) pick the rows a whole-model compile picks
                return TensorFeeds(boundary.feeds(names, stage), f"the inputs of {part.name}", rows=int(windows.ids.size))

            def stage_calib(i: int, graph: ir.Model, changed: bool, names=names, later=later, produced=produced,
                            runs=runs, feeds_at=feeds_at):
                stage = i if sequential == "as-whole" else 0
                feeds = feeds_at(stage)
                if later and stage in needed and stage not in next(iter(produced.values())):
                    if stage > 0 and not changed and boundary.same_inputs(names, stage) and stage - 1 in produced[later[0]]:
                        for name in later:  # nothing moved since the previous stage: the same outputs
                            produced[name][stage] = produced[name][stage - 1]
                    elif sequential != "quantized":
                        outs = _run(graph, later, feeds)
                        runs["forward"] += 1
                        for name in later:
                            produced[name][stage] = outs[name]
                return feeds

            result = compile_part(CapturedModel(sub, captured.tokenizer, captured.source), part_recipe, feeds_at(0),
                                  progress=False, verify=verify, stage_calib=stage_calib)
            if later and sequential == "quantized":  # what the next block reads at run time
                outs = _run(result.model, later, feeds_at(0))
                runs["forward"] += 1
                for name in later:
                    produced[name][0] = outs[name]
            boundary.release(k)
            for name in later:
                boundary.values[name] = produced[name]
            del sub
            _reuse_shared(whole, result.model, model, part.shared)
            work.park(result.model.graph)
            for op, version in result.model.opset_imports.items():
                whole.opset_imports[op] = max(version, whole.opset_imports.get(op, version))
            whole.ir_version = max(whole.ir_version or 0, result.model.ir_version or 0)
            append_part(whole, result.model, part.name.replace(".", "_"))
            layers += result.layers
            sqnr.update(result.report.get("layer_sqnr_db") or {})
            for key, items in listed.items():
                items += result.report.get(key) or []
            simplified += [dict(e, part=part.name) for e in result.report.get("simplified", [])]
            verified += [dict(v, part=part.name) for v in result.report.get("verified") or []]
            for entry in result.report.get("passes", []):
                total = totals.setdefault(entry["pass"], {"pass": entry["pass"], "modified": False, "seconds": 0.0})
                total["modified"] |= bool(entry["modified"])
                total["seconds"] = round(total["seconds"] + entry["seconds"], 3)
            part_reports.append({"part": part.name, "seconds": round(time.perf_counter() - t, 3),
                                 "peak_rss_bytes": peak_rss_bytes(), "quantized_layers": result.report["quantized_layers"],
                                 "forward_runs": runs["forward"], "passes": result.report.get("passes", [])})
            del result, stage_calib, feeds_at
            _release_memory()
        work.close()
        produced = {o.name: o for n in whole.graph for o in n.outputs}
        whole.graph.outputs.extend(produced[v.name] for v in model.graph.outputs)
        _join_cleanup(whole)
        embedding = None
        if recipe.embedding is not None:
            from qgraph.backends.embedding_table import QuantizeEmbeddingPass, table_spec

            t = time.perf_counter()
            pass_ = QuantizeEmbeddingPass(table_spec(recipe.embedding.format, recipe.embedding.group_size),
                                          tie_lm_head=recipe.lm_head_tied)
            result = pass_(whole)
            embedding = {"pass": "quantize_embedding", "modified": result.modified,
                         "seconds": round(time.perf_counter() - t, 3), **pass_.summary()}
    except BaseException:
        work.remove()
        raise
    blocks = [p for p in part_reports if p["part"] not in ("prologue", "epilogue")]
    report = {
        "recipe": recipe.name,
        "simplified": simplified,
        "passes": list(totals.values()) + ([embedding] if embedding else []),
        "quantized_layers": len(layers),
        **listed,
        "verified": verified if verify else None,
        "layer_sqnr_db": sqnr,
        "timings_s": {**{p["pass"]: p["seconds"] for p in totals.values()},
                      "parts": round(sum(p["seconds"] for p in part_reports), 3)},
        "int8_gemm": int8_kernel_record(whole),
        "streaming": {
            "parts": part_reports,
            "blocks": len(blocks),
            "seconds_per_block": round(sum(p["seconds"] for p in blocks) / max(1, len(blocks)), 3),
            "sequential": sequential,
            "parked_bytes": work.bytes,
            "peak_rss_bytes": peak_rss_bytes(),
        },
    }
    return CompiledModel(whole, captured.tokenizer, dict(captured.source, streamed=True), recipe, layers, report,
                         workdir=work.directory)


def _reuse_shared(whole: ir.Model, part: ir.Model, captured: ir.Model, shared: list[str]) -> None:
    """A weight an earlier part already wrote (the tied table), unchanged here, is read from there: one copy."""
    for name in shared:
        mine, earlier = part.graph.initializers.get(name), whole.graph.initializers.get(name)
        if mine is None or earlier is None or mine.const_value is not captured.graph.initializers[name].const_value:
            continue
        mine.replace_all_uses_with(earlier)
        del part.graph.initializers[name]


def _release_memory() -> None:
    """Free a finished part now: graphs are reference cycles (nodes <-> values), which Python's collector
    reaches only after enough new objects, not bytes; glibc then keeps freed arenas unless trimmed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator returns memory its own way
        pass


def _fold(sub: ir.Model) -> None:
    """What the exporter's optimizer does to a whole graph, for one part: constant folding, weight transposes."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(sub)
    graph = sub.graph
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        del graph.initializers[name]  # the unfolded weights (their transposes replaced them)


def _run(model: ir.Model, names: list[str], feeds) -> dict[str, list[np.ndarray]]:
    from qgraph.backends.onnx_qdq import session_from_model

    session = session_from_model(model, optimize=False)  # unfused, as the calibration runs (collect_stats) are
    outputs = [o.name for o in session.get_outputs()]
    index = [outputs.index(n) for n in names]
    runs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds.batches:
        values = session.run(None, feed)
        for n, i in zip(names, index, strict=True):
            runs[n].append(values[i])
    return runs


def _join_cleanup(model: ir.Model) -> None:
    """Merge what each part recomputed (positions, masks, rotary tables) and drop what nothing reads."""
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, DeduplicateInitializersPass, RemoveUnusedNodesPass

    DeduplicateInitializersPass(size_limit=_PARK_MIN_BYTES)(model)
    CommonSubexpressionEliminationPass()(model)
    RemoveUnusedNodesPass()(model)
