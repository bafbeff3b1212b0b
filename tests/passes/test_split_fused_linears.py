"""split_fused_linears: fused projections cut by Split / Slice become one linear per part, exactly."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.calib.data import TokenWindows
from qgraph.ir.regions import find_linears
from qgraph.passes.split_fused_linears import SplitFusedLinearsPass, regions_as_compiled
from qgraph.recipes import RECIPE_DIR
from tests.test_families import _families


def _fused(sizes: list[int], *, gemm: bool, bias: bool, heads: int | None, cut: str, step: int = 1,
           seed: int = 0) -> ir.Model:
    """x [batch, seq, K] -> X @ W (+ b) [-> Reshape to (.., heads, N / heads)] -> Split / Slices -> Mul(2) each.

    gemm: as GPT-2's Conv1D, the tokens flattened for a Gemm and one Reshape back (to heads, if any).

    `sizes` are the parts in units of the cut axis (channels, or heads after the Reshape)."""
    rng = np.random.default_rng(seed)
    k, unit = 12, 4 if heads else 1
    n = sum(sizes) * unit
    inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = []
    if gemm:  # Conv1D's form: flatten the tokens, Gemm with its bias, restore [batch, seq, N]
        inits.append(numpy_helper.from_array(np.array([-1, k], np.int64), "flat"))
        nodes += [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                  helper.make_node("Gemm", ["x2", "W", *(["b"] if bias else [])], ["y2"], name="proj"),
                  helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Slice", ["xs", "zero", "two_i"], ["lead"]),
                  helper.make_node("Concat", ["lead", "n"], ["back"], axis=0),
                  helper.make_node("Reshape", ["y2", "back"], ["y"])]
        # restored straight to heads when there are heads: [batch, seq, heads, unit]
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([2], np.int64), "two_i"),
                  numpy_helper.from_array(np.array([sum(sizes), unit] if heads else [n], np.int64), "n")]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y0" if bias else "y"], name="proj"))
        if bias:
            nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]))
    carrier, axis = "y", 2
    if heads and not gemm:
        inits.append(numpy_helper.from_array(np.array([0, 0, sum(sizes), unit], np.int64), "heads"))
        nodes.append(helper.make_node("Reshape", ["y", "heads"], ["yh"]))
        carrier = "yh"
    parts = [f"p{i}" for i in range(len(sizes))]
    if cut == "split":
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        nodes.append(helper.make_node("Split", [carrier, "sizes"], parts, axis=axis))
    else:
        bounds = np.cumsum([0, *sizes])
        for i, p in enumerate(parts):
            end = bounds[i + 1] if i + 1 < len(sizes) else np.iinfo(np.int64).max  # the exporter's open end
            inits += [numpy_helper.from_array(np.array([bounds[i]], np.int64), f"s{i}"),
                      numpy_helper.from_array(np.array([end], np.int64), f"e{i}"),
                      numpy_helper.from_array(np.array([axis], np.int64), f"a{i}"),
                      numpy_helper.from_array(np.array([step], np.int64), f"t{i}")]
            nodes.append(helper.make_node("Slice", [carrier, f"s{i}", f"e{i}", f"a{i}", f"t{i}"], [p]))
    nodes += [helper.make_node("Mul", [p, "two"], [f"out{i}"]) for i, p in enumerate(parts)]
    outputs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, None) for i in range(len(parts))]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
                              outputs, inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    from onnx_ir.passes.common import ShapeInferencePass

    return ShapeInferencePass()(model).model


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    return session_from_model(model, threads=1, optimize=False).run(None, {"x": x})


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=2, max_size=4), gemm=st.booleans(), bias=st.booleans(),
       heads=st.booleans(), cut=st.sampled_from(["split", "slice"]))
def test_split_keeps_every_output_and_leaves_one_linear_per_part(sizes, gemm, bias, heads, cut):
    model = _fused(sizes, gemm=gemm, bias=bias, heads=4 if heads else None, cut=cut)
    x = np.random.default_rng(len(sizes)).standard_normal((2, 3, 12)).astype(np.float32)
    want = _run(model, x)
    split = SplitFusedLinearsPass()
    assert split(model).modified, split.kept
    assert [l.name for l in find_linears(model)] == [f"proj.part{i}" for i in range(len(sizes))]
    assert not {"Split"} & {n.op_type for n in model.graph} and "W" not in model.graph.initializers
    for got, ref in zip(_run(model, x), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_cut_that_is_not_whole_channel_units_stays_fused_with_its_reason():
    model = _fused([2, 2], gemm=False, bias=False, heads=None, cut="slice", step=2)  # every other channel
    split = SplitFusedLinearsPass()
    assert not split(model).modified
    assert "is not a unit-step slice of the channel axis" in split.kept["proj"]


@pytest.mark.parametrize(("family", "regions"), [
    ("phi3", {"model.layers.0.self_attn.qkv_proj.part2 -> o_proj": "v->o",
              "model.layers.0.mlp.gate_up_proj.part1 -> down_proj": "up->down"}),
    ("gpt2", {"transformer.h.0.attn.c_attn.part2 -> c_proj": "v->o"}),
    ("falcon", {"transformer.h.0.self_attention.query_key_value.part2 -> dense": "v->o"}),
])
def test_fused_families_get_the_value_and_gated_regions_a_llama_has(tmp_path, family, regions):
    torch.manual_seed(0)
    _families()[family]().eval().save_pretrained(tmp_path)
    captured = qgraph.load(tmp_path, progress=False)
    found, rejected, split = regions_as_compiled(captured.model)
    assert len(split.split) == {"phi3": 4, "gpt2": 2, "falcon": 2}[family] and not split.kept
    kinds = {r.name: r.kind for r in found}
    assert {name: kinds.get(name) for name in regions} == regions
    # What still refuses says which op and why, not "unknown op".
    assert not [r for r in rejected if "unknown/non-commuting" in r.reason], rejected


def test_skipping_a_fused_projection_by_name_skips_its_parts(tmp_path):
    torch.manual_seed(0)
    _families()["phi3"]().eval().save_pretrained(tmp_path / "phi3")
    captured = qgraph.load(tmp_path / "phi3", progress=False)
    recipe = tmp_path / "skip.yaml"
    recipe.write_text((RECIPE_DIR / "w8a8-qsm.yaml").read_text().replace(
        "skip: []", "skip: [model.layers.0.self_attn.qkv_proj]"))
    calib = TokenWindows(np.random.default_rng(1).integers(0, 256, size=(2, 32), dtype=np.int64), 0, "random")
    compiled = qgraph.compile(captured, recipe=str(recipe), calib=calib, progress=False, verify=True)
    assert compiled.report["skipped_layers"] == [f"model.layers.0.self_attn.qkv_proj.part{i}" for i in range(3)]
    simplified = {p["pass"]: p for p in compiled.report["simplified"]}
    assert simplified["split_fused_linears"]["linears_split"] == 4 and simplified["split_fused_linears"]["verified"]["ok"]
