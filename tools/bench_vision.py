#!/usr/bin/env python
"""CNNs in one run: qgraph w8a8-cnn against fp32 and ONNX Runtime's quantize_static on the same graph and data.

Random-weight ResNet-18 and MobileNetV2 (transformers configs), 224 x 224 inputs, calibrated on --calib
images of smooth random noise and evaluated on --eval others; and `ppocr-cls`, a real pretrained CNN:
PP-OCR's text-direction classifier from the rapidocr-onnxruntime wheel (opset 11, 53 Conv, 35
BatchNormalization), 48 x 192 inputs, calibrated on 256 windows of scikit-image's text.png photo and
evaluated on 690 labelled crops of its page.png photo (qgraph.eval.pretrained_cnn; top-1 against the
labels too). Rows: fp32, qgraph w8a8-cnn (per-channel int8 weights, uint8 activations, every Conv a
QLinearConv; opened as `qgraph eval` / `bench` open it, and as stored), ORT quantize_static (QDQ,
per-channel int8 weights, uint8 activations, MinMax) on the same fp32 ONNX file and the same
calibration arrays. Latency: one forward at --batch, round-robin over
the rows for --rounds rounds (min and median); top-1 agreement and logit cosine against fp32.

    python tools/bench_vision.py [--batch 4 --rounds 10 --models resnet18,mobilenetv2,ppocr-cls]
    python tools/compare_peers.py --vision [same options]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qgraph  # noqa: E402
from qgraph.eval.host import describe_host  # noqa: E402


def _model(name: str):
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    if name == "resnet18":
        net = ResNetForImageClassification(ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
                                                        hidden_sizes=[64, 128, 256, 512], num_labels=1000))
    elif name == "mobilenetv2":
        net = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000))
        for m in net.modules():  # He init: the default one shrinks activations toward zero by the logits
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
    else:
        raise SystemExit(f"unknown model {name!r}: resnet18 or mobilenetv2")

    class Logits(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.net = n

        def forward(self, pixel_values):
            return self.net(pixel_values=pixel_values).logits

    return Logits(net.eval())


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth noise images, normalized like ImageNet inputs (low-frequency structure, per-channel offsets)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 3, 14, 14)).astype(np.float32)
    x = base.repeat(16, axis=2).repeat(16, axis=3) + 0.25 * rng.standard_normal((n, 3, 224, 224)).astype(np.float32)
    return x + np.asarray([0.4, -0.1, 0.2], np.float32)[None, :, None, None]


def _ort_static(fp32: Path, out: Path, calib: np.ndarray, input_name: str = "pixel_values") -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter([{input_name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.rows, None)

    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _workload(name: str, calib_count: int, eval_count: int):
    """(captured model, input name, calibration array, evaluation array, labels or None)."""
    import torch

    if name == "ppocr-cls":
        from qgraph.eval import pretrained_cnn

        x, labels = pretrained_cnn.evaluation_crops()
        return (qgraph.load(pretrained_cnn.model_path(), progress=False), pretrained_cnn.INPUT,
                pretrained_cnn.calibration_crops(), x, labels)
    captured = qgraph.load(_model(name), example_inputs=(torch.from_numpy(_images(2, 0)),), progress=False)
    return captured, "pixel_values", _images(calib_count, 1), _images(eval_count, 2), None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenetv2,ppocr-cls")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from qgraph.backends.onnx_qdq import session_options

    lines = [f"CNNs at batch {args.batch}, {args.threads} threads, {args.rounds} round-robin rounds; random-weight "
             f"models: 224 x 224, {args.calib} calibration / {args.eval} evaluation images (smooth random noise); "
             "ppocr-cls: pretrained, 48 x 192, photos (qgraph.eval.pretrained_cnn).", "",
             f"Host: {describe_host()}.", "",
             "| model: row | top-1 agreement with fp32 | top-1 (labels) | logit cosine (min) | ms min / med | x fp32 (med) "
             "| QLinearConv |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in args.models.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"qgraph-{name}-"))
        captured, feed, calib, evaluation, labels = _workload(name, args.calib, args.eval)
        fp32 = qgraph.compile(captured, "fp32", progress=False).save(work / "fp32", progress=False)
        t = time.perf_counter()
        feeds = [{feed: calib[i:i + 8]} for i in range(0, len(calib), 8)]
        q8 = qgraph.compile(captured, "w8a8-cnn", calib=feeds, progress=False).save(work / "w8a8-cnn", progress=False)
        qgraph_s = time.perf_counter() - t
        t = time.perf_counter()
        ort_q = _ort_static(fp32 / "model.onnx", work / "ort-static.onnx", calib, feed)
        ort_s = time.perf_counter() - t
        # As users open it (qgraph eval / bench / open_runner): u8 x u8 weights re-stored as int8 where the
        # host's u8 x s8 kernel is exact (qgraph.backends.host_int8); the stored form is its own row.
        from qgraph.backends import host_int8
        from qgraph.backends.onnx_qdq import save_model

        opened = ir.load(str(q8 / "model.onnx"))
        kernel = "as stored"
        if host_int8.u8s8_exact_here() and host_int8.restore_as_u8s8(opened):
            kernel = "u8s8 at load"
        save_model(opened, work / "w8a8-cnn-opened.onnx")
        rows = {"fp32": fp32 / "model.onnx", f"qgraph w8a8-cnn ({kernel}; {qgraph_s:.0f} s)": work / "w8a8-cnn-opened.onnx",
                "qgraph w8a8-cnn (as stored: u8u8)": q8 / "model.onnx", f"ORT quantize_static ({ort_s:.0f} s)": ort_q}
        sessions, fused = {}, {}
        for row, path in rows.items():
            opts = session_options(args.threads)
            opts.optimized_model_filepath = str(work / f"{len(sessions)}.optimized.onnx")
            sessions[row] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            import onnx

            fused[row] = sum(n.op_type == "QLinearConv" for n in onnx.load(opts.optimized_model_filepath).graph.node)
        outs = {row: np.concatenate([s.run(None, {feed: evaluation[i:i + 8]})[0]
                                     for i in range(0, len(evaluation), 8)]) for row, s in sessions.items()}
        x = evaluation[:args.batch]
        times: dict[str, list[float]] = {row: [] for row in sessions}
        for s in sessions.values():
            s.run(None, {feed: x})
        for _ in range(args.rounds):
            for row, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {feed: x})
                times[row].append((time.perf_counter() - t) * 1e3)
        base = statistics.median(times["fp32"])
        ref = outs["fp32"]
        for row in sessions:
            got = outs[row]
            cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
            med = statistics.median(times[row])
            top1 = f"{np.mean(got.argmax(1) == labels):.3f}" if labels is not None else "-"
            agree = np.mean(ref.argmax(1) == got.argmax(1))
            lines.append(f"| {name}: {row} | {agree:.3f} | {top1} | {cos.mean():.4f} ({cos.min():.4f}) "
                         f"| {min(times[row]):.1f} / {med:.1f} | {med / base:.2f} | {fused[row]} |")
        print(f"[bench_vision] {name} done", file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
