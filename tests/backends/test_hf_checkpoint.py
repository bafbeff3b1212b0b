"""export-weights: an artifact's folded and rounded weights as a Hugging Face checkpoint transformers loads."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qgraph
from qgraph.backends.hf_checkpoint import QUANT_CONFIG, _float_reference, export_weights
from qgraph.backends.onnx_qdq import session_from_model


def _float_compute(path) -> ir.Model:
    """The artifact with MatMulNBits computing in float (accuracy level 1): its weights, no activation rounding."""
    return _float_reference(ir.external_data.load_to_model(ir.load(path)))


def _gap_to_artifact(hf_dir, artifact, length: int):
    """(transformers model, ||logits - artifact's float-compute logits|| / ||artifact's||) on one prompt."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = (np.arange(length, dtype=np.int64).reshape(1, length) * 7) % 256
    with torch.no_grad():
        got = hf(torch.from_numpy(ids)).logits.numpy()
    want = session_from_model(_float_compute(artifact / "model.onnx")).run(None, {"input_ids": ids})[0]
    return hf, float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def awq(llama_captured, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    calib = qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32)
    qgraph.compile(llama_captured, "w4a16-awq", calib=calib, progress=False).save(out / "awq", progress=False)
    return out


def test_awq_write_back_loads_in_transformers_and_matches_the_artifact(awq):
    import transformers

    info = export_weights(awq / "awq", awq / "hf", progress=False)
    assert info["linears"] == 15 and not info["untied_head"]  # 14 block linears + the tied 8-bit head
    assert info["relative_error"] < 1e-4  # export-weights' own check against the artifact
    hf, gap = _gap_to_artifact(awq / "hf", awq / "awq", 24)
    assert gap < 1e-4
    # AWQ's scales live in the norm weights now: the checkpoint is not the source's
    source = transformers.AutoModelForCausalLM.from_pretrained(json.loads((awq / "awq" / "manifest.json").read_text())
                                                               ["source"]["path"], dtype=torch.float32)
    assert not torch.equal(hf.model.layers[0].input_layernorm.weight, source.model.layers[0].input_layernorm.weight)
    config = json.loads((awq / "hf" / QUANT_CONFIG).read_text())
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["quant_method"], weights["num_bits"], weights["strategy"], weights["group_size"]) == (
        "compressed-tensors", 4, "group", 128)


def test_a_graph_change_the_weights_cannot_carry_is_refused(awq, tmp_path):
    """export-weights checks the checkpoint's logits against the artifact's: an op a pass left in the graph
    (here a Mul after o_proj) is caught, not written."""
    import shutil

    shutil.copytree(awq / "awq", tmp_path / "changed")
    model = ir.load(tmp_path / "changed" / "model.onnx")
    o_proj = next(n for n in model.graph if n.name == "model.layers.0.self_attn.o_proj")
    scale = ir.Value(name="extra_scale", const_value=ir.tensor(np.float32(1.5)))
    model.graph.register_initializer(scale)
    mul = ir.node("Mul", [o_proj.outputs[0], scale], name="extra_mul")
    ir.convenience.replace_all_uses_with(o_proj.outputs[0], mul.outputs[0])
    mul.replace_input_with(0, o_proj.outputs[0])
    model.graph.insert_after(o_proj, mul)
    ir.save(model, tmp_path / "changed" / "model.onnx")
    with pytest.raises(qgraph.QGraphError, match=r"differ from the artifact's by .* beyond its weights"):
        export_weights(tmp_path / "changed", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_an_online_rotation_is_refused_with_the_reason(llama_captured, text_file, tmp_path):
    calib = qgraph.CalibConfig(text=str(text_file), windows=2, ctx=32)
    qgraph.compile(llama_captured, "w4a8-rot", calib=calib, progress=False).save(tmp_path / "rot", progress=False)
    with pytest.raises(qgraph.QGraphError, match="online Hadamard at run time"):
        export_weights(tmp_path / "rot", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_a_folder_of_the_user_s_is_refused_before_any_work(awq, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(qgraph.QGraphError, match="exists and is not a qgraph artifact"):
        export_weights(awq / "awq", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_export_weights_errors_are_one_line(tmp_path):
    from qgraph.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["export-weights", str(tmp_path / "missing"), "-o", str(tmp_path / "hf")])
    assert exc.value.code == 2


def test_a_fused_projection_split_for_the_passes_is_written_whole(tmp_path):
    """Phi-3's qkv_proj / gate_up_proj are cut into parts by split_fused_linears; the checkpoint has them joined."""
    from qgraph.calib.data import TokenWindows
    from tests.test_families import _families

    torch.manual_seed(0)
    _families()["phi3"]().eval().save_pretrained(tmp_path / "phi3")
    calib = TokenWindows(np.random.default_rng(1).integers(0, 256, size=(2, 32), dtype=np.int64), 0, "random")
    compiled = qgraph.compile(qgraph.load(tmp_path / "phi3", progress=False), "w4a16-awq", calib=calib, progress=False)
    compiled.save(tmp_path / "awq", progress=False)
    export_weights(tmp_path / "awq", tmp_path / "hf", progress=False)
    assert _gap_to_artifact(tmp_path / "hf", tmp_path / "awq", 16)[1] < 1e-4
