"""Per-layer SQNR: every quantized layer gets a number; worse formats score lower; report files render."""

from __future__ import annotations

import numpy as np

import qgraph
from qgraph.calib.data import TokenWindows
from qgraph.eval.sqnr import layer_sqnr


def _windows() -> TokenWindows:
    return TokenWindows(np.random.default_rng(9).integers(0, 256, size=(3, 32), dtype=np.int64), 0, "random")


def test_sqnr_per_quantized_layer_and_format_ordering(llama_captured):
    w8 = qgraph.compile(llama_captured, "w8a8", calib=_windows(), progress=False)
    sqnr8 = w8.report["layer_sqnr_db"]
    assert len(sqnr8) == 14 and all(np.isfinite(v) and v > 10 for v in sqnr8.values()), sqnr8
    assert all("sqnr_db" in layer for layer in w8.layers)
    w4 = qgraph.compile(llama_captured, "w4a16", calib=_windows(), progress=False)
    sqnr4 = layer_sqnr(llama_captured.model, w4.model, list(sqnr8), _windows())
    # int4 weights lose more than int8 weights + int8 activations on every layer of this model.
    assert np.mean(list(sqnr4.values())) < np.mean(list(sqnr8.values())) - 3
    # Identical graphs have no noise at all.
    same = layer_sqnr(llama_captured.model, llama_captured.model, list(sqnr8)[:2], _windows())
    assert all(v == float("inf") for v in same.values())


def test_report_files(tmp_path, llama_captured):
    out = qgraph.compile(llama_captured, "w8a8", calib=_windows(), progress=False).save(
        tmp_path / "a", progress=False, report_files=True)
    md = (out / "report.md").read_text()
    assert "Per-layer SQNR" in md and "![SQNR per layer](sqnr.png)" in md and "model.layers." in md
    png = (out / "sqnr.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
