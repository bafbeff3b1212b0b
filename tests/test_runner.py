"""qgraph.runner: named inputs of any dtype, and the layering that keeps it below qgraph.api."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qgraph
from qgraph.errors import QGraphError
from qgraph.runner import open_runner

PACKAGE = Path(qgraph.__file__).parent
TOP = {"api.py", "cli.py", "__init__.py"}  # the public layer: everything else sits below it


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included: a lazy circle is one too
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_module_below_the_api_imports_it():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if m in ("qgraph.api", "qgraph.cli"))
        for p in PACKAGE.rglob("*.py")
        if p.relative_to(PACKAGE).as_posix() not in TOP
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def _two_input_model(path: Path) -> Path:
    """y = image * 2 + bias[index]: a float image and an int64 index input."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "two"], ["scaled"]),
            helper.make_node("Gather", ["bias", "index"], ["picked"]),
            helper.make_node("Add", ["scaled", "picked"], ["y"]),
        ],
        "two_inputs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
         helper.make_tensor("bias", TensorProto.FLOAT, [2, 3], [0, 0, 0, 10, 20, 30])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_runner_feeds_named_inputs_of_any_dtype(tmp_path):
    runner = open_runner(_two_input_model(tmp_path / "m.onnx"), progress=False)
    assert [i.name for i in runner.inputs] == ["image", "index"]
    image = np.arange(6, dtype=np.float32).reshape(2, 3)
    (y,) = runner.run({"image": image, "index": np.array([0, 1], dtype=np.int64)})
    np.testing.assert_array_equal(y, [[0, 2, 4], [16, 28, 40]])


def test_runner_names_missing_and_unknown_inputs(tmp_path):
    runner = open_runner(_two_input_model(tmp_path / "m.onnx"), progress=False)
    with pytest.raises(QGraphError, match=r"unknown \['pixels'\], missing \['image'\]"):
        runner.run({"pixels": np.zeros((1, 3), np.float32), "index": np.zeros(1, np.int64)})
