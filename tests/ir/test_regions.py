"""Channel regions: counts, GQA sink_index, rejection reasons, and that every region preserves the function.

The numeric check applies a random positive diagonal scale through a region (sources' output
channels *= s, sinks' input rows /= s[sink_index]) on a clone and runs both graphs in ONNX Runtime.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.ir.regions import Region, find_regions, unshare
from tests.conftest import tiny_bert_affine


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    sess = session_from_model(model, threads=1, optimize=False)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _array(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy().astype(np.float32)


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


def _scale_through(model: ir.Model, region: Region, s: np.ndarray, *, sinks: bool = True, index=None) -> Region:
    """Sources' output channels *= s, sinks' input rows *= 1 / s[sink_index] (in place on `model`)."""
    region = unshare(model.graph, region)
    for src in region.sources:
        if src.kind in ("rmsnorm", "layernorm", "mul"):
            _set(src.gamma, _array(src.gamma) * s)
            if src.beta is not None:
                _set(src.beta, _array(src.beta) * s)
        else:  # a linear's output columns (rows when stored [out, in]) and its bias
            _set(src.weight, _array(src.weight) * (s[:, None] if src.linear.transposed else s))
            if src.bias is not None:
                _set(src.bias, _array(src.bias) * s)
    if sinks:
        inv = 1.0 / s[region.sink_index if index is None else index]
        for sink in region.sinks:
            _set(sink.weight, _array(sink.weight) * (inv if sink.transposed else inv[:, None]))
    return region


def _weights(region: Region) -> list[np.ndarray]:
    src = region.sources[0]
    values = [src.gamma, src.beta, src.weight, src.bias] + [s.weight for s in region.sinks]
    return [_array(v) for v in values if v is not None]


def _check_preserved(model: ir.Model, name: str, x: np.ndarray, seed: int = 0) -> Region:
    """Scale through region `name` on a clone: output unchanged, weights changed; without the sink fix it breaks."""
    ref = _run(model, x)
    rng = np.random.default_rng(seed)
    clone = model.clone()
    region = next(r for r in find_regions(clone)[0] if r.name == name)
    before = _weights(region)
    s = rng.uniform(0.25, 4.0, region.channels).astype(np.float32)
    region = _scale_through(clone, region, s)
    np.testing.assert_allclose(_run(clone, x), ref, rtol=1e-4, atol=1e-5)
    after = _weights(region)
    assert len(before) == len(after)
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True) if np.any(a != 0)), "weights did not change"
    broken = model.clone()  # the check has teeth: scaling the sources alone changes the output
    _scale_through(broken, next(r for r in find_regions(broken)[0] if r.name == name), s, sinks=False)
    assert not np.allclose(_run(broken, x), ref, rtol=1e-3, atol=1e-4)
    return region


# ---- tiny Llama (pre-norm, GQA 4 heads / 2 KV heads, head_dim 16, tied lm_head) ----------------


@pytest.fixture(scope="module")
def llama(llama_captured):
    return llama_captured.model


@pytest.fixture(scope="module")
def llama_regions(llama):
    return find_regions(llama)


IDS = np.arange(3, 15, dtype=np.int64).reshape(1, 12) * 7 % 256


def test_llama_region_counts_and_kinds(llama_regions):
    regions, rejected = llama_regions
    assert len(regions) == 8
    assert Counter(r.kind for r in regions) == {"norm->linears": 4, "v->o": 2, "up->down": 2}
    names = [r.name for r in regions]
    assert "model.layers.0.self_attn.v_proj -> o_proj" in names
    assert "model.layers.1.mlp.up_proj -> down_proj" in names
    qkv = [r for r in regions if r.kind == "norm->linears" and len(r.sinks) == 3]
    assert [s.name.rsplit(".", 1)[1] for s in qkv[0].sinks] == ["q_proj", "k_proj", "v_proj"]
    gate_up = [r for r in regions if r.kind == "norm->linears" and len(r.sinks) == 2]
    assert len(qkv) == len(gate_up) == 2 and all(r.channels == 64 for r in qkv + gate_up)
    up = next(r for r in regions if r.kind == "up->down")
    src = up.sources[0]
    assert src.kind == "gated_product" and src.linear.name.endswith("up_proj") and src.gate.name.endswith("gate_proj")
    assert [n.op_type for n in up.path] == ["Mul"] and up.channels == 160
    assert up.diagonal_only and not any(r.diagonal_only for r in regions if r.kind != "up->down")
    assert len({r.candidate for r in rejected}) == len(rejected)  # one rejection per candidate
    assert not {r.candidate for r in rejected} & {s.name for r in regions for s in r.sources}


def test_llama_gqa_sink_index(llama_regions):
    regions, _ = llama_regions
    vo = [r for r in regions if r.kind == "v->o"]
    heads, kv_heads, head_dim = 4, 2, 16
    expected = np.array([(h // (heads // kv_heads)) * head_dim + d for h in range(heads) for d in range(head_dim)])
    for r in vo:
        assert r.channels == kv_heads * head_dim and r.sharing == heads // kv_heads
        np.testing.assert_array_equal(r.sink_index, expected)
        ops = [n.op_type for n in r.path]
        assert "MatMul" in ops and "Expand" in ops  # through Softmax(..) x V and the GQA repeat


def test_llama_rejections(llama_regions):
    _, rejected = llama_regions
    reasons = {r.candidate: r.reason for r in rejected}
    tied = [r for r in rejected if "tied to the embedding table" in r.reason]
    assert len(tied) == 1 and "sink lm_head" in tied[0].reason and "Gather" in tied[0].reason
    assert "clone it first" in tied[0].reason
    assert "rotary" in reasons["model.layers.0.self_attn.q_proj"]
    assert "rotary" in reasons["model.layers.0.self_attn.k_proj"]
    assert "residual" in reasons["model.layers.0.self_attn.o_proj"]
    assert "residual" in reasons["model.layers.1.mlp.down_proj"]
    assert "Sigmoid" in reasons["model.layers.0.mlp.gate_proj"]
    assert "graph output" in reasons["lm_head"]


def test_llama_shared_gamma_is_listed_and_unshared(llama):
    """The exporter deduplicates the tiny model's all-ones gammas into one initializer: regions must say so."""
    clone = llama.clone()
    region = next(r for r in find_regions(clone)[0] if r.kind == "norm->linears")
    gamma = region.sources[0].gamma
    assert region.shared == [gamma]
    readers = len(gamma.uses())
    private = unshare(clone.graph, region)
    assert private.shared == [] and private.sources[0].gamma is not gamma
    assert len(gamma.uses()) == readers - 1 and len(private.sources[0].gamma.uses()) == 1


@pytest.mark.parametrize("which", range(8))
def test_llama_region_preserves_function(llama, llama_regions, which):
    name = llama_regions[0][which].name
    _check_preserved(llama, name, IDS, seed=which)


def test_llama_vo_needs_the_gqa_index(llama, llama_regions):
    """Undoing the scale with the wrong head mapping (h % kv instead of h // n_rep) changes the output."""
    region = next(r for r in llama_regions[0] if r.kind == "v->o")
    clone = llama.clone()
    s = np.random.default_rng(5).uniform(0.25, 4.0, region.channels).astype(np.float32)
    wrong = np.tile(np.arange(region.channels), region.sharing)
    _scale_through(clone, next(r for r in find_regions(clone)[0] if r.name == region.name), s, index=wrong)
    assert not np.allclose(_run(clone, IDS), _run(llama, IDS), rtol=1e-3, atol=1e-4)


# ---- tiny BERT (post-norm, LayerNorm + Linear with bias) ------------------------------------------


@pytest.fixture(scope="module")
def bert():
    """tiny_bert() with random biases and LayerNorm affines, so bias scaling is tested (and not deduplicated)."""
    return tiny_bert_affine()


def test_bert_regions_and_rejections(bert):
    regions, rejected = find_regions(bert)
    assert [r.kind for r in regions] == ["v->o", "v->o"]
    assert regions[0].name == "encoder.layer.0.attention.self.value -> output.dense"
    assert regions[0].sources[0].bias is not None and regions[0].sharing == 1
    np.testing.assert_array_equal(regions[0].sink_index, np.arange(64))
    reasons = {r.candidate: r.reason for r in rejected}
    assert len(reasons) == len(rejected) == 15  # 5 LayerNorms + 5 x 2 other linears
    post_norms = ("embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm")
    for norm in post_norms:
        assert "(Add) is not a sink" in reasons[norm] and "residual stream (post-norm)" in reasons[norm]
    assert "graph output" in reasons["encoder.layer.1.output.LayerNorm"]
    gelu = reasons["encoder.layer.0.intermediate.dense"]
    assert "enters the nonlinear Gelu" in gelu and "does not commute with a channel scale" in gelu
    assert "attention scores" in reasons["encoder.layer.0.attention.self.key"]
    assert "non-constant weight" in reasons["encoder.layer.0.attention.self.query"]
    assert "residual" in reasons["encoder.layer.0.attention.output.dense"]


def test_bert_vo_with_biases_preserves_function(bert):
    ids = (np.arange(12, dtype=np.int64).reshape(1, 12) * 13) % 200
    for name in [r.name for r in find_regions(bert)[0]]:
        region = _check_preserved(bert, name, ids)
        assert region.sources[0].bias is not None


# ---- a toy module: constant Mul source, Gemm linear -> ReLU -> Gemm, a weight used twice -----------


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)
        self.shared = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.shared(self.shared(self.fc2(torch.relu(self.fc1(x * self.scale)))))


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return qgraph.load(Toy(), example_inputs=(torch.randn(5, 16),), progress=False).model


def test_toy_mul_and_linear_regions(toy):
    regions, rejected = find_regions(toy)
    assert [(r.name, r.kind) for r in regions] == [("node_mul -> fc1", "mul->linears"), ("fc1 -> fc2", "linear->linear")]
    fc1 = regions[1].sources[0]
    assert fc1.node.op_type == "Gemm" and fc1.linear.transposed and fc1.bias_node is fc1.node
    assert [n.op_type for n in regions[1].path] == ["Relu"] and regions[1].diagonal_only
    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    for r in regions:
        _check_preserved(toy, r.name, x)
    reasons = {r.candidate: r.reason for r in rejected}
    assert "shared with node" in reasons["fc2"] and "(tied)" in reasons["fc2"]


def test_inspect_prints_regions(tmp_path, llama):
    from typer.testing import CliRunner

    from qgraph.cli import app

    path = tmp_path / "m.onnx"
    ir.save(llama, path)
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert len(info["regions"]) == 8 and {"name", "kind", "channels", "sources", "sinks"} <= set(info["regions"][0])
    assert any("tied to the embedding table" in r["reason"] for r in info["rejected"])
    table = CliRunner().invoke(app, ["inspect", str(path)])
    assert table.exit_code == 0 and "channel regions (8)" in table.output and "rejected region candidates" in table.output


def test_shape_readers_are_not_consumers():
    """A dynamic Reshape's Shape(y) reads only y's dims: the linear -> linear region through it is found."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", shape=ir.Shape([1, "T", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    weights = {n: ir.Value(name=n, shape=ir.Shape([8, 8]), type=ir.TensorType(ir.DataType.FLOAT),
                           const_value=ir.tensor(rng.standard_normal((8, 8)).astype(np.float32), name=n))
               for n in ("w1", "w2")}
    for w in weights.values():
        graph.register_initializer(w)
    first = ir.node("MatMul", [x, weights["w1"]], name="first")
    shape = ir.node("Shape", [first.outputs[0]], name="dims")
    second = ir.node("MatMul", [first.outputs[0], weights["w2"]], name="second")
    reshape = ir.node("Reshape", [second.outputs[0], shape.outputs[0]], name="back")
    for node in (first, shape, second, reshape):
        graph.append(node)
    y = reshape.outputs[0]
    y.name, y.shape, y.type = "y", ir.Shape([1, "T", 8]), ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(y)
    first.outputs[0].shape = second.outputs[0].shape = ir.Shape([1, "T", 8])
    regions, rejected = find_regions(ir.Model(graph, ir_version=10))
    assert [(r.kind, [s.name for s in r.sources], [s.name for s in r.sinks]) for r in regions] == [
        ("linear->linear", ["first"], ["second"])], rejected
