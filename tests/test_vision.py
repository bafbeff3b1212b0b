"""Models that read tensors: CNNs (Conv, depthwise, grouped) and a ViT, calibrated and evaluated from arrays.

Random-weight models from transformers configs (ResNet-18's layout, MobileNetV2, ViT), written here;
images are random arrays or PNGs written with Pillow.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qgraph
from qgraph.backends.onnx_qdq import session_from_model
from qgraph.calib.tensors import TensorFeeds, load_tensor_data
from qgraph.errors import QGraphError
from qgraph.eval.tensor_eval import evaluate_tensors
from tests.test_cli import assert_user_error
from tests.test_cli import qgraph as run_cli


class Logits(torch.nn.Module):
    """transformers image classifiers return an output object: the graph returns its logits."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixel_values):
        return self.net(pixel_values=pixel_values).logits


def _resnet18():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                          num_labels=10)
    return Logits(ResNetForImageClassification(config).eval())


def _mobilenet():
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    net = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=10, depth_multiplier=0.35, image_size=32))
    for m in net.modules():  # its default init shrinks activations to ~1e-26 by the logits: He init keeps them O(1)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return Logits(net.eval())


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                       patch_size=8, num_labels=10)
    return Logits(ViTForImageClassification(config).eval())


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth random images, normalized: per-channel offsets so channels differ, as photos' do."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
    x = base.repeat(4, axis=2).repeat(4, axis=3) + 0.3 * rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
    return x + np.asarray([0.5, -0.2, 0.1], np.float32)[None, :, None, None]


def _feeds(n: int, seed: int, batch: int = 4) -> list[dict]:
    x = _images(n, seed)
    return [{"pixel_values": x[i:i + batch]} for i in range(0, n, batch)]


def _capture(module):
    return qgraph.load(module, example_inputs=(torch.from_numpy(_images(2, 9)),), progress=False)


def _optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    """The op types ORT runs after its graph optimizations (its own dump of the optimized graph)."""
    import onnx
    import onnxruntime as ort

    ir.save(model, tmp_path / "q.onnx")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def _agreement(float_model: ir.Model, quant_model: ir.Model, feeds: list[dict]) -> tuple[float, float]:
    f, q = session_from_model(float_model), session_from_model(quant_model)
    want = np.concatenate([f.run(None, x)[0] for x in feeds])
    got = np.concatenate([q.run(None, x)[0] for x in feeds])
    cos = np.sum(want * got, 1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    return float(np.mean(want.argmax(1) == got.argmax(1))), float(cos.min())


@pytest.fixture(scope="module")
def resnet18():
    return _capture(_resnet18())


def test_resnet18_every_conv_runs_as_one_qlinearconv(resnet18, tmp_path):
    captured = resnet18
    assert captured.model.graph.inputs[0].shape[0] == ir.SymbolicDim("batch")  # dynamic batch from the export
    compiled = qgraph.compile(captured, "w8a8-cnn", calib=_feeds(16, 1), progress=False, verify=True)
    lowered = next(p for p in compiled.report["passes"] if p["pass"] == "lower_onnx")["ops"]
    assert lowered["QDQ -> QLinearConv (Conv, u8 x u8)"] == 20 and compiled.report["quantized_layers"] == 21
    assert compiled.report["float_layers"] == []
    ops = _optimized_ops(compiled.model, tmp_path)
    assert ops["QLinearConv"] == 20 and "Conv" not in ops and "FusedConv" not in ops
    assert "Relu" not in {n.op_type for n in compiled.model.graph if n.name.endswith("act_q")}
    top1, cos = _agreement(captured.model, compiled.model, _feeds(32, 2))
    assert top1 >= 0.9 and cos > 0.99, (top1, cos)
    assert min(compiled.report["layer_sqnr_db"].values()) > 20  # per-layer error from the tensor calibration data


def test_symmetric_int8_recipe_fuses_convolutions_too(resnet18, tmp_path):
    """w8a8's symmetric activations quantize each Conv's own output (before its Relu): still one QLinearConv each."""
    compiled = qgraph.compile(resnet18, "w8a8", calib=_feeds(8, 1), progress=False)
    assert _optimized_ops(compiled.model, tmp_path)["QLinearConv"] == 20


def test_depthwise_and_pointwise_convolutions_quantize(tmp_path):
    captured = _capture(_mobilenet())
    compiled = qgraph.compile(captured, "w8a8-cnn", calib=_feeds(8, 1), progress=False, verify=True)
    lowered = next(p for p in compiled.report["passes"] if p["pass"] == "lower_onnx")["ops"]
    convs = sum(1 for n in captured.model.graph if n.op_type == "Conv")
    assert lowered["QDQ -> QLinearConv (depthwise Conv, u8 x u8)"] >= 10
    assert sum(v for k, v in lowered.items() if "QLinearConv" in k) == convs
    assert _optimized_ops(compiled.model, tmp_path)["QLinearConv"] == convs
    top1, cos = _agreement(captured.model, compiled.model, _feeds(16, 2))
    assert cos > 0.95, cos


def test_weight_only_recipe_leaves_convolutions_float_with_the_reason(resnet18):
    compiled = qgraph.compile(resnet18, "w4a16", progress=False)
    annotate = next(p for p in compiled.report["passes"] if p["pass"] == "annotate_linears")
    assert len(annotate["convs_left_float"]) == 20
    assert "no convolution form" in next(iter(annotate["convs_left_float"].values()))


def test_vit_compiles_verifies_and_evaluates_from_tensor_data(tmp_path):
    captured = _capture(_vit())
    compiled = qgraph.compile(captured, "w8a8", calib=_feeds(16, 1), progress=False, verify=True)
    assert compiled.report["quantized_layers"] >= 12  # q, k, v, o, fc1, fc2 per layer (+ patch Conv, classifier)
    out = compiled.save(tmp_path / "vit-w8a8", progress=False)
    reference = qgraph.compile(captured, "fp32", progress=False).save(tmp_path / "vit-fp32", progress=False)
    np.savez(tmp_path / "eval.npz", pixel_values=_images(24, 3))
    result = evaluate_tensors(out, tmp_path / "eval.npz", reference=reference)
    assert result["samples"] == 24 and result["top1_agreement"] >= 0.9 and result["logit_cosine"] > 0.99, result


def test_dynamic_batch_runs_batch_1_and_4_alike(resnet18):
    compiled = qgraph.compile(resnet18, "w8a8-cnn", calib=_feeds(8, 1), progress=False)
    session = session_from_model(compiled.model)
    x = _images(4, 5)
    four = session.run(None, {"pixel_values": x})[0]
    ones = np.concatenate([session.run(None, {"pixel_values": x[i:i + 1]})[0] for i in range(4)])
    assert four.shape == (4, 10)
    np.testing.assert_allclose(ones, four, rtol=1e-4, atol=1e-4)


def test_statistics_are_taken_on_the_graph_s_channel_axis():
    """A conv's input is NCHW: per-channel statistics run over axis 1, which a last-axis reading would get wrong."""
    from qgraph.calib.stats import collect_stats

    captured = _capture(_resnet18())
    x = _images(4, 7) * np.asarray([1.0, 4.0, 16.0], np.float32)[None, :, None, None]  # channels of different range
    stats = collect_stats(captured.model, ["pixel_values"], TensorFeeds([{"pixel_values": x}]), progress=False)
    np.testing.assert_allclose(stats["pixel_values"].max, x.max(axis=(0, 2, 3)), rtol=1e-6)
    assert stats["pixel_values"].max.shape == (3,)


def test_image_folder_with_classes_gives_labels_and_top1(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "photos" / cls / f"{i}.png")
    inputs = [ir.Value(name="pixel_values", shape=ir.Shape(["batch", 3, 32, 32]), type=ir.TensorType(ir.DataType.FLOAT))]
    feeds = load_tensor_data(tmp_path / "photos", inputs)
    assert feeds.samples == 6 and feeds.classes == ["cat", "dog"] and list(feeds.labels) == [0, 0, 0, 1, 1, 1]
    x = feeds.batches[0]["pixel_values"]
    assert x.shape == (6, 3, 32, 32) and x.dtype == np.float32 and -3 < x.mean() < 3
    (tmp_path / "photos" / "dog" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(QGraphError, match="does not decode"):
        load_tensor_data(tmp_path / "photos", inputs)


@pytest.fixture(scope="module")
def small_cnn_onnx(tmp_path_factory):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10)
    d = tmp_path_factory.mktemp("cnn")
    ir.save(_capture(Logits(ResNetForImageClassification(config).eval())).model, d / "cnn.onnx")
    np.savez(d / "calib.npz", pixel_values=_images(12, 1))
    np.savez(d / "eval.npz", pixel_values=_images(12, 2))
    return d


def test_cli_compiles_and_evaluates_from_tensor_data(small_cnn_onnx, tmp_path):
    d = small_cnn_onnx
    r = run_cli("compile", d / "cnn.onnx", "-r", "w8a8-cnn", "--calib-data", d / "calib.npz", "--verify", "-o",
                tmp_path / "q8", "-q")
    assert r.returncode == 0, r.stderr
    assert run_cli("compile", d / "cnn.onnx", "-r", "fp32", "-o", tmp_path / "fp32", "-q").returncode == 0
    r = run_cli("eval", tmp_path / "q8", "--data", d / "eval.npz", "--reference", tmp_path / "fp32", "--json")
    result = json.loads(r.stdout)
    assert result["samples"] == 12 and result["top1_agreement"] >= 0.9 and result["logit_cosine"] > 0.99, result
    r = run_cli("bench", tmp_path / "q8", "--batch", "4", "--runs", "2", "--json")
    assert json.loads(r.stdout)["batch"] == 4, r.stderr
    info = json.loads(run_cli("inspect", d / "cnn.onnx", "--json").stdout)
    assert len(info["convs"]) == 6 and info["inputs"][0]["shape"] == ["batch", 3, 32, 32]


def test_cli_tensor_input_errors_are_one_line(small_cnn_onnx, tmp_path):
    d = small_cnn_onnx
    compile_ = ("compile", d / "cnn.onnx", "-r", "w8a8-cnn", "-o", tmp_path / "out", "-q")
    assert_user_error(run_cli(*compile_), "reads tensors", "--calib-data")
    np.savez(tmp_path / "names.npz", pixels=_images(2, 0))
    assert_user_error(run_cli(*compile_, "--calib-data", tmp_path / "names.npz"), "'pixels' is not an input")
    assert_user_error(run_cli("eval", d / "cnn.onnx", "--reference", d / "cnn.onnx"), "--data")
    assert not (tmp_path / "out").exists()


def test_tensor_data_errors_name_the_input_and_the_fix(tmp_path):
    """The messages the CLI prints in one line (checked in-process: each CLI start costs seconds)."""
    inputs = [ir.Value(name="pixel_values", shape=ir.Shape(["batch", 3, 32, 32]), type=ir.TensorType(ir.DataType.FLOAT))]
    np.savez(tmp_path / "dtype.npz", pixel_values=_images(2, 0).astype(np.float64))
    with pytest.raises(QGraphError, match=r"is float64 in sample 0, the model takes float32.*astype"):
        load_tensor_data(tmp_path / "dtype.npz", inputs)
    np.savez(tmp_path / "shape.npz", pixel_values=_images(2, 0)[:, :, :16])
    with pytest.raises(QGraphError, match=r"shape \[2, 3, 16, 32\] in sample 0, the model takes \['\?', 3, 32, 32\]"):
        load_tensor_data(tmp_path / "shape.npz", inputs)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(QGraphError, match="does not decode"):
        load_tensor_data(tmp_path / "imgs", inputs)
    with pytest.raises(QGraphError, match="does not exist"):
        load_tensor_data(tmp_path / "missing.npz", inputs)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(QGraphError, match="not a readable .npz"):
        load_tensor_data(tmp_path / "bad.npz", inputs)
    np.savez(tmp_path / "labels.npz", pixel_values=_images(3, 0), labels=np.array([0, 1]))
    with pytest.raises(QGraphError, match=r"'labels' must be one integer class per sample \(\[3\] samples"):
        load_tensor_data(tmp_path / "labels.npz", inputs)
    np.savez(tmp_path / "labelled.npz", pixel_values=_images(3, 0), labels=np.array([0, 1, 1]))
    assert load_tensor_data(tmp_path / "labelled.npz", inputs).labels.tolist() == [0, 1, 1]


def test_api_calibration_feeds_are_checked_against_every_input():
    class TwoInputs(torch.nn.Module):
        def forward(self, a, b):
            return torch.nn.functional.conv2d(a, torch.ones(4, 3, 3, 3)) + b.mean()

    captured = qgraph.load(TwoInputs(), example_inputs=(torch.randn(1, 3, 8, 8), torch.randn(1, 5)), progress=False)
    with pytest.raises(QGraphError, match="no data for input 'b'"):
        qgraph.compile(captured, "w8a8-cnn", calib=[{"a": np.zeros((1, 3, 8, 8), np.float32)}], progress=False)
    rng = np.random.default_rng(0)
    both = [{"a": rng.standard_normal((2, 3, 8, 8)).astype(np.float32), "b": rng.standard_normal((2, 5)).astype(np.float32)}]
    compiled = qgraph.compile(captured, "w8a8-cnn", calib=both, progress=False, verify=True)
    assert compiled.report["quantized_layers"] == 1 and len(compiled.report["layer_sqnr_db"]) == 1  # every input fed


def test_conv_weights_switch_to_u8s8_at_load_with_the_same_integers(resnet18):
    """The artifact stores u8 x u8 (exact on every CPU); opened where u8 x s8 is exact, every Conv's codes are
    re-stored as int8 (code - 128, zero point 0): the same dequantized weights, ORT's fast kernel."""
    from qgraph.backends.host_int8 import restore_as_u8s8
    from qgraph.backends.onnx_qdq import int8_gemms

    compiled = qgraph.compile(resnet18, "w8a8-cnn", calib=_feeds(8, 1), progress=False)
    assert int8_gemms(compiled.model) == {"u8u8": 21}  # 20 Conv + the classifier, as stored
    opened = compiled.model.clone()
    assert restore_as_u8s8(opened) == 21 and int8_gemms(opened) == {"u8s8": 21}

    def integers(model) -> dict:
        """Each weight DequantizeLinear's code - zero point, broadcast along its axis: what the kernel multiplies."""
        out = {}
        for n in model.graph:
            if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None:
                codes, zero = n.inputs[0].const_value.numpy(), n.inputs[2].const_value.numpy()
                shape = [1] * codes.ndim
                shape[n.attributes.get_int("axis", 1)] = -1
                out[n.name] = codes.astype(np.int16) - zero.astype(np.int16).reshape(shape)
        return out

    before, after = integers(compiled.model), integers(opened)
    assert len(before) == 21 and before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
