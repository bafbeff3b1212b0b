"""The command line end to end on the tiny Llama, and bad input: exit 2, one line, no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_text


def qgraph(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "qgraph.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def w8a8_artifact(tmp_path_factory, llama_dir, text_file):
    out = tmp_path_factory.mktemp("cli") / "w8a8"
    r = qgraph("compile", llama_dir, "--recipe", "w8a8", "-o", out, "--calib-text", text_file,
               "--calib-windows", "4", "--ctx", "64", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_compile_writes_self_describing_artifact(w8a8_artifact):
    names = {p.name for p in w8a8_artifact.iterdir()}
    assert {"model.onnx", "manifest.json", "report.json", "tokenizer.json"} <= names
    manifest = json.loads((w8a8_artifact / "manifest.json").read_text())
    assert manifest["recipe"] == "w8a8" and manifest["source"]["kind"] == "huggingface"
    assert len(manifest["quantized_layers"]) == 14
    assert manifest["quantized_layers"][0]["activation"] == "int8 tensor sym static"
    report = json.loads((w8a8_artifact / "report.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["annotate_linears", "calibrate_ranges", "lower_onnx"]
    assert report["passes"][1]["windows"] == 4 and report["sizes_bytes"]["model_files"] > 0


def test_eval_and_bench_json(w8a8_artifact, text_file):
    r = qgraph("eval", w8a8_artifact, "--text", text_file, "--ctx", "64", "--windows", "3", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["tokens"] == 3 * 63 and res["windows"] == 3 and 1 < res["ppl"] < 1000
    r = qgraph("bench", w8a8_artifact, "--json", "--runs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["prefill_ms"] > 0 and res["decode_ms"] > 0 and "without KV cache" in res["note"]


def test_compile_from_artifact_onnx_reuses_tokenizer(tmp_path, w8a8_artifact, llama_dir, text_file):
    fp32 = tmp_path / "fp32"
    assert qgraph("compile", llama_dir, "--recipe", "fp32", "-o", fp32, "-q").returncode == 0
    r = qgraph("compile", fp32 / "model.onnx", "--recipe", "w4a16", "-o", tmp_path / "w4", "-q")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "w4" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "huggingface" and (tmp_path / "w4" / "tokenizer.json").exists()


def test_inspect_lists_layers(llama_dir):
    r = qgraph("inspect", llama_dir, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert sum(l["role"] == "block" for l in info["linears"]) == 14 and len(info["norms"]) == 5


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_user_error(qgraph("compile", tmp_path / "nope", "--recipe", "fp32", "-o", out), "does not exist")
    assert not out.exists()


def test_corrupt_and_truncated_onnx(tmp_path, w8a8_artifact):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model at all" * 50)
    assert_user_error(qgraph("compile", bad, "--recipe", "fp32", "-o", tmp_path / "o1"), "cannot read ONNX file")
    data = (w8a8_artifact / "model.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_user_error(qgraph("compile", cut, "--recipe", "fp32", "-o", tmp_path / "o2"), "cannot read ONNX file")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_unknown_recipe_and_key_typo(tmp_path, llama_dir):
    assert_user_error(qgraph("compile", llama_dir, "--recipe", "w3a3", "-o", tmp_path / "o"), "unknown recipe 'w3a3'")
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: typo\nweights:\n  format: int8\nactivatons:\n  format: int8\n")
    assert_user_error(qgraph("compile", llama_dir, "--recipe", typo, "-o", tmp_path / "o"),
                      "'activatons'", "did you mean 'activations'")
    assert not (tmp_path / "o").exists()


def test_text_too_short(tmp_path, llama_dir, w8a8_artifact):
    short = write_text(tmp_path / "short.txt", 300)
    assert_user_error(qgraph("eval", w8a8_artifact, "--text", short, "--ctx", "64", "--windows", "16"),
                      "too short", "lower --windows to 4")
    r = qgraph("compile", llama_dir, "--recipe", "w8a8", "-o", tmp_path / "o", "--calib-text", short, "--ctx", "64")
    assert_user_error(r, "too short", "lower --calib-windows to 4")
    r = qgraph("compile", llama_dir, "--recipe", "w8a8", "-o", tmp_path / "o", "--calib-text", short)
    assert_user_error(r, "too short", "smaller --ctx")
    assert not (tmp_path / "o").exists()


def test_unsupported_model_type(tmp_path):
    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    assert_user_error(qgraph("compile", d, "--recipe", "fp32", "-o", tmp_path / "o"), "cannot read a Hugging Face config")
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    assert_user_error(qgraph("inspect", notes), "unsupported model")


def test_output_dir_that_is_not_an_artifact_is_kept(tmp_path, llama_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_user_error(qgraph("compile", llama_dir, "--recipe", "fp32", "-o", out), "is not a qgraph artifact")
    assert (out / "precious.txt").read_text() == "keep me"


def test_recipes_lists_the_shipped_ones():
    from typer.testing import CliRunner

    from qgraph.cli import app
    from qgraph.recipes import available

    r = CliRunner().invoke(app, ["recipes", "--json"])
    assert r.exit_code == 0, r.output
    listed = json.loads(r.output)
    assert [x["name"] for x in listed] == available()
    assert next(x for x in listed if x["name"] == "w4a16-awq")["passes"] == ["awq", "clip_search", "gptq"]
    r = CliRunner().invoke(app, ["recipes"])
    assert r.exit_code == 0 and "shipped recipes (22" in r.output and "w8a8-smooth" in r.output


def test_recipes_name_shows_passes_options_and_formats(tmp_path):
    from typer.testing import CliRunner

    from qgraph.cli import app

    r = CliRunner().invoke(app, ["recipes", "w4a16-awq", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert [p["pass"] for p in info["passes"]] == ["awq", "clip_search", "gptq"]
    alpha, grid, tokens = info["passes"][0]["options"]
    assert alpha == {"name": "alpha", "value": "search", "type": "float | search", "default": "search", "required": False,
                     "help": alpha["help"], "set": True} and "[0, 1]" in alpha["help"]
    assert grid["type"] == "list[float]" and grid["value"] == grid["default"] and not grid["set"]
    damp = info["passes"][2]["options"][0]
    assert (damp["name"], damp["value"], damp["default"], damp["set"]) == ("damp", 0.01, 0.01, True)
    weights = {row["name"]: row["value"] for row in info["blocks"]["weights"]}
    assert weights == {"format": "int4", "granularity": "group", "group_size": 128, "symmetric": False, "full_range": False,
                       "float_zero_point": False}
    assert info["blocks"]["activations"] is None and info["blocks"]["lowering"] == "matmulnbits"
    assert info["lm_head"] == "tied" and {row["name"]: row["value"] for row in info["embedding"]}["group_size"] == 32
    mine = tmp_path / "mine.yaml"
    mine.write_text("weights: {format: int8}\npasses:\n  - qsm: {clip: search}\n")
    r = CliRunner().invoke(app, ["recipes", str(mine)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for fragment in ("mine (mine.yaml)", "pass 1: qsm", "split_threshold", "float | null", "(required)", "lm_head: float",
                     "blocks lowering: qdq"):
        assert fragment in r.output, fragment


def test_recipes_unknown_name_and_bad_file(tmp_path):
    assert_user_error(qgraph("recipes", "w3a3"), "qgraph: error: unknown recipe 'w3a3'", "-- use one of fp32")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: {format: int8}\npasses:\n  - smooth: {alpha: abc}\n")
    assert_user_error(qgraph("recipes", bad), "recipe bad.yaml: passes.smooth.alpha: 'abc' is not a number in [0, 1]",
                      "-- write e.g. `alpha: search`")
