"""Write an artifact's weights back as a Hugging Face checkpoint (`qgraph export-weights`).

For the transforms that keep the model's architecture: norm folding, SmoothQuant / AWQ / QSM scales
(folded into norm weights and linears), GPTQ / RTN rounding. Each quantized weight is dequantized from
its stored form (MatMulNBits blocks, DequantizeLinear codes) to float on the recipe's grid, so
transformers computes what the artifact computes with float arithmetic (MatMulNBits' accuracy level 1).
The layout follows the source checkpoint: its config, tokenizer and parameter names, each tensor's
orientation from its module (nn.Linear stores [out, in], GPT-2's Conv1D [in, out]).

Refused, with the reason: transforms a checkpoint of the same architecture cannot hold, such as an
online Hadamard (a rotation applied at run time) or split channels (a layer wider than the source).
The recipe's quantization is described in compressed-tensors' config format in
`quantization_config.json` beside the weights; it is not put into config.json, since transformers
would then need the compressed-tensors package to load the float weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qgraph.artifact import EXPORT_MANIFEST, check_output_dir, read_manifest, write_atomically
from qgraph.backends.onnx_qdq import unpack_nibbles
from qgraph.errors import QGraphError
from qgraph.ir.hadamard import ONLINE_PREFIX
from qgraph.ir.validate import constant_array

QUANT_CONFIG = "quantization_config.json"


def _matmulnbits_weight(node: ir.Node, graph_consts: dict[str, np.ndarray]) -> np.ndarray:
    """MatMulNBits B / scales / zero points -> float W [N, K] (the zero-point shift term added, if any)."""
    a = {k: v.value for k, v in node.attributes.items()}
    k, n, bits, block = a["K"], a["N"], a.get("bits", 4), a["block_size"]
    blocks = -(-k // block)
    packed = constant_array(node.inputs[1]).reshape(n, -1)
    if bits == 4:
        codes = unpack_nibbles(packed).astype(np.float32)
    elif bits == 8:
        codes = packed.astype(np.float32)
    else:
        raise QGraphError(f"{node.name}: MatMulNBits with {bits} bits", "export 4- or 8-bit weights")
    scales = constant_array(node.inputs[2]).astype(np.float32).reshape(n, blocks)
    zp_value = node.inputs[3] if len(node.inputs) > 3 else None
    if zp_value is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float32)
    elif zp_value.dtype == ir.DataType.UINT8 and bits == 4:
        zero = unpack_nibbles(constant_array(zp_value).reshape(n, -1))[:, :blocks].astype(np.float32)
    else:
        zero = constant_array(zp_value).astype(np.float32).reshape(n, blocks)
    w = (codes.reshape(n, blocks, -1)[:, :, :block] - zero[:, :, None]) * scales[:, :, None]
    w = w.reshape(n, blocks * block)[:, :k]
    shift = graph_consts.get(f"{node.name}.zero_point_shift")  # s (8 - z) per block: float zero points
    if shift is not None:
        w = w + np.repeat(shift.T, block, axis=1)[:, :k]
    return w


def _dequantize_linear(node: ir.Node) -> np.ndarray:
    """DequantizeLinear of constants -> float array (per tensor, per axis or blocked)."""
    q = constant_array(node.inputs[0]).astype(np.float32)
    scale = constant_array(node.inputs[1]).astype(np.float32)
    zero = constant_array(node.inputs[2]).astype(np.float32) if len(node.inputs) > 2 and node.inputs[2] is not None \
        else np.zeros_like(scale)
    axis = node.attributes.get_int("axis", 1) % q.ndim
    block = node.attributes.get_int("block_size", 0)
    if scale.ndim == q.ndim and block:  # blocked: repeat each scale over its block
        scale, zero = (np.repeat(v, block, axis=axis).take(range(q.shape[axis]), axis=axis) for v in (scale, zero))
    elif scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _linear_weights(graph: ir.Graph) -> dict[str, np.ndarray]:
    """Layer name -> float weight [K, N] as the artifact computes it (float, QDQ or MatMulNBits)."""
    consts = {node.name: constant_array(node.inputs[1]) for node in graph  # float zero points' shift terms
              if node.op_type == "MatMul" and node.name.endswith(".zero_point_shift") and node.inputs[1].const_value is not None}
    weights: dict[str, np.ndarray] = {}
    for node in graph:
        if node.op_type == "MatMulNBits":
            weights[node.name] = _matmulnbits_weight(node, consts).T
        elif node.op_type in ("MatMul", "Gemm") and not node.name.endswith(".zero_point_shift"):
            w = node.inputs[1]
            producer = w.producer() if w is not None else None
            if w is not None and w.const_value is not None:
                array = constant_array(w).astype(np.float32)
            elif producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs[0].const_value is not None:
                array = _dequantize_linear(producer)
            else:
                continue
            if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
                array = array.T
            weights[node.name] = array
    return weights


def _rejoin_parts(weights: dict[str, np.ndarray], artifact: Path) -> dict[str, np.ndarray]:
    """Fused projections cut for the region passes (split_fused_linears: qkv_proj.part0 [0:64], ...) joined back
    into the source's one weight, their columns where the report says."""
    report = artifact / "report.json"
    simplified = json.loads(report.read_text()).get("simplified", []) if report.is_file() else []
    split = next((p.get("parts", {}) for p in simplified if p.get("pass") == "split_fused_linears"), {})
    for fused, parts in split.items():
        columns = []
        for part in parts:  # '<fused>.part<i> [lo:hi]'
            name, bounds = part.rsplit(" ", 1)
            lo, hi = (int(b) for b in bounds.strip("[]").split(":"))
            if name in weights:
                columns.append((lo, hi, weights.pop(name)))
        if columns:
            k, n = columns[0][2].shape[0], max(hi for _, hi, _ in columns)
            joined = np.zeros((k, n), np.float32)
            for lo, hi, w in columns:
                joined[:, lo:hi] = w
            weights[fused] = joined
    return weights


def _constant(value: ir.Value) -> np.ndarray:
    """A constant, or a Reshape of one (a tied table reads the head's blocks through a Reshape)."""
    producer = value.producer()
    if value.const_value is None and producer is not None and producer.op_type == "Reshape":
        return constant_array(producer.inputs[0]).reshape(constant_array(producer.inputs[1]))
    return constant_array(value)


def _module_name(net, module) -> str | None:
    return next((n for n, m in net.named_modules() if m is module), None)


def _table(graph: ir.Graph) -> np.ndarray | None:
    """The token table as the lookup reads it: a float Gather table, or GatherBlockQuantized's blocks dequantized."""
    for node in graph:
        if node.op_type == "Gather" and node.inputs[1] is not None and node.inputs[1].is_graph_input() \
                and node.inputs[0].const_value is not None and len(node.inputs[0].shape or ()) == 2:
            return constant_array(node.inputs[0]).astype(np.float32)
        if node.op_type == "GatherBlockQuantized":
            a = {k: v.value for k, v in node.attributes.items()}
            packed = _constant(node.inputs[0])
            scales = _constant(node.inputs[2]).astype(np.float32)
            rows, block = scales.shape[0], a["block_size"]
            if a.get("bits", 4) == 4:
                codes, zero = unpack_nibbles(packed).astype(np.float32), 8.0
            else:
                codes, zero = packed.astype(np.float32), 128.0
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                raise QGraphError(f"{node.name}: a token table with zero points", "export a symmetric table")
            return (codes.reshape(rows, scales.shape[1], block) - zero) * scales[:, :, None]
    return None


def _norm_weights(graph: ir.Graph, net, written: dict) -> None:
    """Norm scales (and LayerNorm biases) from the artifact, paired with the source's norm modules in order.

    Names cannot pair them: passes rewrite a norm scale shared by several norms (an exporter deduplicates
    equal ones) into copies of their own. A module's stored weight may differ from the scale it applies
    (Gemma's 1 + w): that offset is measured on the source module and kept.
    """
    import torch

    from qgraph.ir.regions import find_norms

    norms = find_norms(ir.Model(graph, ir_version=10))
    modules = [(n, m) for n, m in net.named_modules()
               if "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.nn.Parameter)
               and m.weight.ndim == 1]
    if len(norms) != len(modules):
        raise QGraphError(f"the artifact has {len(norms)} norms and the source {len(modules)}",
                          "export an artifact compiled from this source with a graph-preserving recipe")
    for norm, (name, module) in zip(norms, modules, strict=True):
        gamma = constant_array(norm.gamma).astype(np.float32).reshape(-1)
        if gamma.shape != tuple(module.weight.shape):
            raise QGraphError(f"norm {name} is {list(gamma.shape)} wide in the artifact, {list(module.weight.shape)} in "
                              "the source", "export a recipe without channel splitting")
        written[f"{name}.weight"] = torch.from_numpy(gamma - _scale_offset(module))
        if norm.beta is not None and getattr(module, "bias", None) is not None:
            written[f"{name}.bias"] = torch.from_numpy(constant_array(norm.beta).astype(np.float32).reshape(-1))


def _scale_offset(module) -> np.ndarray:
    """What the module adds to its weight to get the scale it applies (0 for most norms, 1 for Gemma's): norm(x)
    over the plain normalization of x, minus the weight, on a probe with zero bias."""
    import torch

    c = module.weight.shape[0]
    x = torch.linspace(-2.0, 3.0, 4 * c, dtype=torch.float32).reshape(4, c)
    with torch.no_grad():
        saved = module.bias.detach().clone() if getattr(module, "bias", None) is not None else None
        if saved is not None:
            module.bias.zero_()
        y = module(x)
        if saved is not None:
            module.bias.copy_(saved)
    layer = isinstance(module, torch.nn.LayerNorm) or "layernorm" in type(module).__name__.lower() and saved is not None
    centered = x - x.mean(-1, keepdim=True) if layer else x
    plain = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + getattr(module, "eps", getattr(
        module, "variance_epsilon", 1e-6)))
    applied = (y / plain).median(dim=0).values
    return np.round((applied - module.weight.detach()).numpy().astype(np.float32), 4)


def export_weights(artifact: str | Path, out_dir: str | Path, *, fmt: str = "safetensors",
                   progress: bool = True) -> dict:
    """Write the artifact's weights as a Hugging Face checkpoint folder; returns what was written."""
    import torch

    from qgraph.ir.capture import load as capture_load

    artifact = Path(artifact)
    check_output_dir(out_dir)  # before the work: a folder of the user's is never replaced
    if fmt != "safetensors":
        raise QGraphError(f"export format {fmt!r} is not supported", "use --format safetensors")
    manifest = read_manifest(artifact)
    if manifest.get("backend", "onnxruntime") != "onnxruntime":
        raise QGraphError(f"{str(artifact)!r} is a {manifest.get('backend')} artifact",
                          "export weights from an ONNX Runtime artifact of the same recipe")
    source = manifest.get("source", {})
    if not source.get("path") or not Path(source["path"]).exists():
        raise QGraphError(f"the source model of {str(artifact)!r} ({source.get('path')!r}) is not on this machine",
                          "export on the machine that compiled it: the checkpoint takes its config and names")
    model = ir.load(artifact / manifest.get("model_file", "model.onnx"))
    model = ir.external_data.load_to_model(model)
    graph = model.graph
    online = sorted(n for n in graph.initializers if n.startswith(ONLINE_PREFIX))
    if online:
        raise QGraphError(f"{str(artifact)!r} applies an online Hadamard at run time ({online[0]}, ...): a checkpoint "
                          "of the source architecture has no op for it", "export a recipe without online rotations")
    captured = capture_load(source["path"], progress=progress, export=False)
    net = getattr(captured.torch_module, "net", captured.torch_module)
    state = net.state_dict()
    linears = _rejoin_parts(_linear_weights(graph), artifact)
    written: dict[str, torch.Tensor] = {}
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if name not in linears or not isinstance(weight, torch.nn.Parameter) or weight.ndim != 2:
            continue
        w = linears[name]  # [in, out]
        w = w.T if isinstance(module, torch.nn.Linear) else w  # transformers' Conv1D stores [in, out]
        if tuple(w.shape) != tuple(weight.shape):
            raise QGraphError(f"layer {name} is {list(w.shape)} in the artifact and {list(weight.shape)} in the source: "
                              "its channels were split (QSM / QLLM channel splitting)",
                              "export a recipe without channel splitting")
        written[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    missing_linears = sorted(n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.weight" not in written)
    _norm_weights(graph, net, written)
    for key, tensor in state.items():  # biases, float tables: initializers named net.<key>
        if key in written:
            continue
        value = graph.initializers.get(f"net.{key}")
        if value is not None and value.const_value is not None and tuple(value.shape) == tuple(tensor.shape):
            written[key] = torch.from_numpy(np.array(constant_array(value), dtype=np.float32))  # a writable copy
    embed = net.get_input_embeddings()
    table_key = next(k for k, v in state.items() if v.data_ptr() == embed.weight.data_ptr())
    table = _table(graph)  # what the lookup reads (the head may hold a rescaled, untied copy under a tied name)
    if table is None:
        raise QGraphError("the token table is not in the artifact", "recompile the artifact")
    written[table_key] = torch.from_numpy(table.reshape(tuple(state[table_key].shape)).astype(np.float32))
    head = net.get_output_embeddings()
    for key, tensor in state.items():  # other tied parameters are stored once, under one of their names
        alias = next((k for k, v in state.items() if k in written and v.data_ptr() == tensor.data_ptr()), None)
        if key not in written and alias is not None and key != f"{_module_name(net, head)}.weight":
            written[key] = written[alias]
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    head_key = f"{_module_name(net, head)}.weight" if head is not None else None
    untie = False
    if tied and head_key in written and not torch.equal(written[head_key], written[table_key]):
        untie = True  # the head was quantized apart from the table: both are written, the config unties them
    elif tied:
        written[head_key] = written[table_key]
    missing = sorted(set(state) - set(written))
    unexplained = [k for k in missing if k.rsplit(".", 1)[0] in missing_linears or k.endswith("weight")]
    if unexplained:
        raise QGraphError(f"the artifact has no weight for {unexplained[0]} ({len(unexplained)} in all)",
                          "export an artifact compiled from this source with a graph-preserving recipe")
    for key in missing:  # buffers the graph folded away (rotary frequencies): the source's own
        written[key] = state[key]

    if untie:
        net.config.tie_word_embeddings = False
        net.lm_head.weight = torch.nn.Parameter(written[head_key].clone())
    net.load_state_dict(written, strict=False)
    gap = _check_against_artifact(net, model, int(state[table_key].shape[0]))

    def fill(tmp: Path) -> None:
        # A GGUF source loads dequantized but marked as GGUF-quantized, which save_pretrained refuses; the
        # weights written here are plain float.
        net.hf_quantizer = None
        for holder in (net, net.config):
            if "quantization_config" in vars(holder):
                delattr(holder, "quantization_config")
        net.save_pretrained(str(tmp), safe_serialization=True)
        if captured.tokenizer is not None:
            captured.tokenizer.save_pretrained(str(tmp))
        spec = _quantization_config(manifest)
        if spec is not None:
            (tmp / QUANT_CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
        shutil.copy(artifact / "manifest.json", tmp / EXPORT_MANIFEST)

    out = write_atomically(out_dir, fill)
    return {"out": str(out), "relative_error": gap, "tensors": len(written),
            "linears": len([k for k in written if k.removesuffix(".weight") in linears]),
            "untied_head": untie, "quantization_config": (out / QUANT_CONFIG).is_file()}


EXPORT_TOLERANCE = 1e-3  # relative logits gap between the checkpoint and the artifact computed in float


def _float_reference(model: ir.Model) -> ir.Model:
    """The artifact as float arithmetic on its stored weights: activation Q -> DQ pairs bypassed, MatMulNBits
    at accuracy level 1 (float activations). What a float checkpoint of the same weights computes."""
    model = ir.from_proto(ir.to_proto(model))  # a copy
    for node in list(model.graph):
        if node.op_type == "MatMulNBits":
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 1)
        elif node.op_type == "DequantizeLinear" and node.inputs[0].producer() is not None \
                and node.inputs[0].producer().op_type == "QuantizeLinear":
            source = node.inputs[0].producer().inputs[0]
            if not node.outputs[0].is_graph_output():
                ir.convenience.replace_all_uses_with(node.outputs[0], source)
    return model


def _check_against_artifact(net, model: ir.Model, vocab: int) -> float:
    """The checkpoint's logits against the artifact's float computation on 24 tokens; refuses a gap above
    EXPORT_TOLERANCE (a transform the weights cannot carry: an op a pass inserted, a shift)."""
    import torch

    from qgraph.backends.onnx_qdq import session_from_model

    ids = ((np.arange(24, dtype=np.int64) * 7919 + 11) % vocab).reshape(1, 24)
    # Unoptimized: ORT's optimizer would fuse a weight-only DequantizeLinear -> MatMul into an int8 kernel
    # that rounds the activations (5e-3 on a tiny w8a8 Llama); the float reference must stay float.
    session = session_from_model(_float_reference(model), threads=2, optimize=False)
    want = session.run(None, {session.get_inputs()[0].name: ids})[0]
    with torch.no_grad():
        got = net(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    gap = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    if not gap <= EXPORT_TOLERANCE:
        raise QGraphError(f"the checkpoint's logits differ from the artifact's by {gap:.2e} (relative; limit "
                          f"{EXPORT_TOLERANCE:g}): the recipe changed the graph beyond its weights",
                          "export a recipe whose passes fold into weights (norm fold, smooth, AWQ, GPTQ / RTN)")
    return gap


def _quantization_config(manifest: dict) -> dict | None:
    """The recipe's block weights in compressed-tensors' config format, where it has the terms (int weights,
    per channel or group); None for float recipes."""
    spec = manifest.get("recipe_spec", {}).get("blocks") or {}
    weights = spec.get("weights") or {}
    fmt = weights.get("format", "")
    if not fmt.startswith(("int", "uint")):
        return None
    bits = int("".join(c for c in fmt if c.isdigit()) or 8)
    strategy = {"channel": "channel", "group": "group", "tensor": "tensor"}.get(weights.get("granularity"), "channel")
    acts = spec.get("activations") or None
    scheme = {
        "targets": ["Linear"],
        "weights": {"num_bits": bits, "type": "int", "symmetric": bool(weights.get("symmetric", True)),
                    "strategy": strategy, **({"group_size": weights.get("group_size")} if strategy == "group" else {}),
                    "dynamic": False, "observer": "minmax"},
        "input_activations": None if acts is None else {
            "num_bits": int("".join(c for c in acts.get("format", "int8") if c.isdigit()) or 8), "type": "int",
            "symmetric": bool(acts.get("symmetric", True)), "strategy": acts.get("granularity", "tensor"),
            "dynamic": not acts.get("static", True)},
    }
    return {"quant_method": "compressed-tensors", "format": "int-quantized" if acts else "pack-quantized",
            "quantization_status": "frozen", "config_groups": {"group_0": scheme},
            "ignore": ["lm_head"], "note": "qgraph writes the weights dequantized to float on this grid; "
            "this describes the grid (recipe " + str(manifest.get("recipe")) + ")"}
