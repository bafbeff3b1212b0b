"""A real pretrained CNN (PP-OCR's text-direction classifier, an opset-11 Paddle export) on real photos.

What a user bringing this ONNX file gets from w8a8-cnn: the opset converted, the 35 BatchNormalizations
folded, all 53 convolutions and the classifier quantized, and the measured agreement with fp32 on
labelled crops of a photographed page (tools/bench_vision.py --models ppocr-cls puts ORT's quantize_static
and the latencies beside it).
"""

from __future__ import annotations

import numpy as np
import pytest

import qgraph
from qgraph.eval.pretrained_cnn import INPUT, calibration_crops, evaluation_crops, model_path
from qgraph.eval.tensor_eval import evaluate_tensors


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppocr")
    captured = qgraph.load(model_path(), progress=False)
    assert captured.source["opset_converted_from"] == 11
    qgraph.compile(captured, "fp32", progress=False).save(out / "fp32", progress=False)
    calib = calibration_crops()
    quantized = qgraph.compile(captured, "w8a8-cnn", calib=[{INPUT: calib[i:i + 16]} for i in range(0, len(calib), 16)],
                               progress=False, verify=True)
    quantized.save(out / "w8a8", progress=False)
    x, labels = evaluation_crops()
    np.savez(out / "page.npz", **{INPUT: x, "labels": labels})
    return out, quantized.report


def test_every_convolution_of_the_pretrained_cnn_is_quantized(artifacts):
    _, report = artifacts
    fold = next(p for p in report["simplified"] if p["pass"] == "fold_batchnorm")
    assert fold["folded"] == 35 and fold["verified"]["ok"]
    assert report["quantized_layers"] == 54 and not report["float_layers"]  # 53 Conv + the classifier MatMul


def test_quantized_pretrained_cnn_agrees_with_fp32_on_photos(artifacts):
    out, _ = artifacts
    result = evaluate_tensors(out / "w8a8", out / "page.npz", reference=out / "fp32")
    assert result["samples"] == 690
    assert result["reference_top1"] == pytest.approx(0.9377, abs=1e-3)  # fp32 on the labelled page crops
    # Measured 0.955 agreement / 0.910 top-1 (ORT quantize_static: 0.961 / 0.916); weight-only int8 already
    # flips 2 % of these near-even crops. A regression in calibration or lowering drops these at once.
    assert result["top1_agreement"] >= 0.95 and result["logit_cosine"] >= 0.99 and result["top1"] >= 0.90, result
