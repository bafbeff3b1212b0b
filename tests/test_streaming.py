"""Streaming compile (qgraph.streaming): the artifact a whole-model compile writes, one block at a time."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import qgraph
from qgraph.backends.onnx_qdq import session_from_model, stored_quantizer_tensors
from qgraph.errors import QGraphError
from qgraph.streaming import load_streaming
from tests.test_cli import assert_user_error
from tests.test_cli import qgraph as qgraph_cli

IDS = np.arange(1, 49).reshape(2, 24) % 250


def _calib(text_file):
    return qgraph.CalibConfig(text=str(text_file), windows=4, ctx=64, start=0)


def _logits(model: ir.Model) -> np.ndarray:
    return session_from_model(model).run(None, {"input_ids": IDS})[0]


@pytest.mark.parametrize("recipe", ["w8a8-qsm", "w4a16-awq"])
def test_streamed_artifact_is_the_whole_model_one(llama_dir, text_file, recipe):
    whole = qgraph.compile(qgraph.load(llama_dir, progress=False), recipe, _calib(text_file), progress=False)
    streamed = qgraph.compile_streaming(llama_dir, recipe, _calib(text_file), progress=False)
    try:
        expected, got = _logits(whole.model), _logits(streamed.model)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
        a, b = stored_quantizer_tensors(whole.model), stored_quantizer_tensors(streamed.model)
        layers = {k for k in a if k.startswith("model.layers.")}
        assert len(layers) >= 14 and layers <= set(b)
        for key in layers:  # the same codes and scales, not merely close logits
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)
        assert streamed.report["quantized_layers"] == whole.report["quantized_layers"]
        assert sorted(streamed.report["layer_sqnr_db"]) == sorted(whole.report["layer_sqnr_db"])
        parts = streamed.report["streaming"]["parts"]
        assert [p["part"] for p in parts] == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
    finally:
        streamed.discard()


def test_weights_stay_on_disk_until_a_part_reads_them(llama_dir):
    captured = load_streaming(llama_dir, progress=False)
    lazy = [v for v in captured.model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    # every parameter of the tiny Llama (tied: the head reads the table), none loaded
    assert len(lazy) == 2 * 9 + 2
    assert captured.torch_module is None


def test_whole_model_passes_are_refused(llama_dir):
    with pytest.raises(QGraphError, match="rotate rotates the residual stream"):
        qgraph.compile_streaming(llama_dir, "w4a8-rot", progress=False)


def test_sequential_modes(llama_dir, text_file):
    runs = {}
    for mode in ("float", "quantized"):
        compiled = qgraph.compile_streaming(llama_dir, "w4a16-awq", _calib(text_file), progress=False, sequential=mode)
        runs[mode] = _logits(compiled.model)
        assert compiled.report["streaming"]["sequential"] == mode
        compiled.discard()
    assert not np.array_equal(runs["float"], runs["quantized"])
    with pytest.raises(QGraphError, match="unknown sequential mode"):
        qgraph.compile_streaming(llama_dir, "w4a16-awq", _calib(text_file), progress=False, sequential="bf16")


def test_cli_stream_writes_the_artifact_and_no_work_files(llama_dir, text_file, tmp_path):
    from typer.testing import CliRunner

    from qgraph.cli import app

    out = tmp_path / "new" / "art"  # a parent that does not exist yet
    args = ["compile", str(llama_dir), "-r", "w8a8-qsm", "-o", str(out), "--stream", "--calib-text", str(text_file),
            "--calib-windows", "4", "--ctx", "64", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["new"]  # the work folder is gone
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["art"]
    report = json.loads((out / "report.json").read_text())
    assert report["streaming"]["blocks"] == 2 and report["quantized_layers"] == 14
    loaded = qgraph.load(out / "model.onnx", progress=False)
    whole = qgraph.compile(qgraph.load(llama_dir, progress=False), "w8a8-qsm", _calib(text_file), progress=False)
    expected = _logits(whole.model)
    assert np.abs(_logits(loaded.model) - expected).max() <= 1e-5 * np.abs(expected).max()
    assert_user_error(qgraph_cli("compile", llama_dir, "-o", tmp_path / "x", "--stream", "--kv-cache"),
                      "--kv-cache is not supported with it")


def test_verify_checks_every_part(llama_dir, text_file):
    compiled = qgraph.compile_streaming(llama_dir, "w8a8-qsm", _calib(text_file), progress=False, verify=True)
    compiled.discard()
    verdicts = compiled.report["verified"]
    assert [v["part"] for v in verdicts] == ["prologue", "model.layers.0", "model.layers.1", "epilogue"]
    assert all(v["ok"] and v["relative_error"] < 1e-5 for v in verdicts)
