"""Calibration and evaluation data as tensors: feeds keyed by input name, for models that do not read text.

Sources: an .npz (arrays keyed by input name, samples along axis 0), an .npy (a one-input model), a
folder of .npy files (one sample each) or a folder of images (read with Pillow, resized and
center-cropped to the model's input size and normalized; a sub-folder per class gives labels), or any
iterable of {input name: array} dicts in the API. Every feed is checked against the graph's inputs
before anything runs, so a wrong name, dtype or shape is a one-line error, not an ORT traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.errors import QGraphError
from qgraph.ir.feeds import input_dims, input_dtype

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# torchvision's ImageNet preprocessing (resize to 256/224 of the crop, center crop, mean/std per channel),
# what most pretrained classifiers on PyPI expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224
DEFAULT_BATCH = 8  # samples per run where the graph's batch axis is dynamic

LABELS = "labels"  # the .npz key of one class index per sample (when no model input has that name)


@dataclasses.dataclass
class TensorFeeds:
    """Runs of a graph: each a {input name: array} dict with the batch axis first; labels when known."""

    batches: list[dict[str, np.ndarray]]
    source: str = "arrays"
    labels: np.ndarray | None = None  # one class index per sample, in order, when the source had classes
    classes: list[str] | None = None
    rows: int | None = None  # activation rows the runs produce, when not one per sample (a block's token windows)

    @property
    def count(self) -> int:
        return len(self.batches)

    @property
    def samples(self) -> int:
        return sum(next(iter(b.values())).shape[0] for b in self.batches) if self.batches else 0

    @property
    def ctx(self) -> None:  # no token length: the reports print None
        return None

    @property
    def size(self) -> int:
        """Rows of activations the runs produce, for samplers that spread picks over them."""
        return self.rows if self.rows is not None else self.samples

    def feeds(self, inputs: Iterable[Any]) -> Iterator[dict[str, np.ndarray]]:
        """The runs, after checking them against a graph's (or session's) inputs."""
        check_feeds(self.batches, list(inputs), self.source)
        return iter(self.batches)


def check_feeds(batches: list[dict[str, np.ndarray]], inputs: list, source: str) -> None:
    """One-line errors for data that does not fit the graph: names, dtypes, ranks and fixed dims."""
    if not batches:
        raise QGraphError(f"calibration data {source}: no samples", "give at least one sample")
    wanted = {v.name: v for v in inputs}
    for i, feed in enumerate(batches):
        unknown = sorted(set(feed) - set(wanted))
        if unknown:
            raise QGraphError(f"data {source}: {unknown[0]!r} is not an input of this model (inputs: {sorted(wanted)})",
                              "key the arrays by the model's input names (`qgraph inspect MODEL` lists them)")
        missing = sorted(set(wanted) - set(feed))
        if missing:
            raise QGraphError(f"data {source}: no data for input {missing[0]!r} (the model takes {sorted(wanted)})",
                              f"add an array named {missing[0]!r}")
        for name, array in feed.items():
            v, dtype = wanted[name], input_dtype(wanted[name])
            if array.dtype != dtype:
                raise QGraphError(f"data {source}: input {name!r} is {array.dtype} in sample {i}, the model takes {dtype}",
                                  f"convert it (array.astype(np.{dtype.name}))")
            dims = input_dims(v)
            if dims and (len(dims) != array.ndim or
                         any(d is not None and d != s for d, s in zip(dims, array.shape, strict=True))):
                shown = ["?" if d is None else d for d in dims]
                raise QGraphError(f"data {source}: input {name!r} has shape {list(array.shape)} in sample {i}, "
                                  f"the model takes {shown}", "reshape or resize the data to the model's input")


def random_feeds(inputs: list, dynamic: Callable[[Any, int], int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One feed of each input's dtype and shape: standard normal floats, zero integers; `dynamic(input, axis)`
    sizes each axis the graph leaves open."""
    feeds = {}
    for v in inputs:
        shape = [d if d is not None else dynamic(v, i) for i, d in enumerate(input_dims(v))]
        dtype = input_dtype(v)
        feeds[v.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                         else np.zeros(shape, dtype=dtype))
    return feeds


def batch_size_of(inputs: list) -> int | None:
    """The graph's fixed batch size (axis 0 of its first input), or None when the axis is dynamic."""
    dims = input_dims(inputs[0]) if inputs else []
    return dims[0] if dims else None


def _batched(arrays: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = {a.shape[0] for a in arrays.values()}
    if len(n) != 1:
        raise QGraphError(f"data arrays have different sample counts {sorted(n)}", "give every input the same number of samples")
    total = n.pop()
    return [{k: np.ascontiguousarray(a[i:i + batch]) for k, a in arrays.items()} for i in range(0, total, batch)]


def _image_size(inputs: list) -> tuple[int, int, int]:
    """(channels, height, width) of a one-input NCHW image model."""
    if len(inputs) != 1:
        raise QGraphError(f"an image folder feeds one input, this model takes {[v.name for v in inputs]}",
                          "give an .npz keyed by input name instead")
    dims = input_dims(inputs[0])
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise QGraphError(f"input {inputs[0].name!r} has shape {inputs[0].shape}: an image folder needs a fixed "
                          "[batch, channels, height, width] input", "give an .npz of preprocessed arrays instead")
    return dims[1], dims[2], dims[3]


def read_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """One image as float32 [C, H, W]: resized (shorter side to 256/224 of the crop), center-cropped, normalized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            scale = RESIZE_RATIO * max(height / img.height, width / img.width)
            w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
            img = img.resize((w, h), Image.BILINEAR)
            left, top = (w - width) // 2, (h - height) // 2
            array = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise QGraphError(f"image {str(path)!r} does not decode: {exc}", "remove it or convert it to PNG/JPEG") from None
    array = array.reshape(height, width, channels).transpose(2, 0, 1)
    if channels == 3:
        mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
        array = (array - mean) / std
    return np.ascontiguousarray(array, dtype=np.float32)


def _image_folder(path: Path, inputs: list, batch: int, limit: int | None) -> TensorFeeds:
    c, h, w = _image_size(inputs)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if classes:  # a folder per class: labels are the class folders' sorted positions
        files = [(f, i) for i, cls in enumerate(classes) for f in sorted((path / cls).iterdir())
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if limit:
        files = files[:limit]
    if not files:
        raise QGraphError(f"folder {str(path)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .npy files",
                          "point --calib-data at images, .npy files or an .npz")
    images = np.stack([read_image(f, c, h, w) for f, _ in files])
    labels = np.asarray([i for _, i in files]) if classes else None
    return TensorFeeds(_batched({inputs[0].name: images}, batch), str(path), labels, classes or None)


def load_tensor_data(path: str | Path, inputs: list, *, limit: int | None = None) -> TensorFeeds:
    """Feeds from an .npz / .npy / folder of .npy or images, batched to fit the graph's inputs."""
    path = Path(path)
    if not path.exists():
        raise QGraphError(f"data path {str(path)!r} does not exist", "pass an .npz, an .npy, or a folder of images or .npy")
    batch = batch_size_of(inputs) or DEFAULT_BATCH
    if path.is_dir():
        npys = sorted(path.glob("*.npy"))
        if not npys:
            return _image_folder(path, inputs, batch, limit)
        if len(inputs) != 1:
            raise QGraphError(f"a folder of .npy files feeds one input, this model takes {[v.name for v in inputs]}",
                              "give an .npz keyed by input name")
        arrays = {inputs[0].name: np.stack([_load_npy(f) for f in npys[:limit]])}
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k][:limit] for k in z.files}
        except (ValueError, OSError) as exc:
            raise QGraphError(f"{str(path)!r} is not a readable .npz: {exc}", "write it with numpy.savez") from None
    elif path.suffix == ".npy":
        if len(inputs) != 1:
            raise QGraphError(f"an .npy feeds one input, this model takes {[v.name for v in inputs]}",
                              "give an .npz keyed by input name")
        arrays = {inputs[0].name: _load_npy(path)[:limit]}
    else:
        raise QGraphError(f"data {str(path)!r} is not an .npz, an .npy or a folder", "pass one of those")
    names = {v.name for v in inputs}
    for name, array in arrays.items():
        if name in names and array.ndim == 0:
            raise QGraphError(f"data {str(path)!r}: array {name!r} is a scalar", "stack the samples along axis 0")
    labels = None
    if LABELS in arrays and LABELS not in names:  # an .npz may carry one class index per sample
        labels = arrays.pop(LABELS)
        samples = {len(a) for a in arrays.values()}
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or samples != {len(labels)}:
            raise QGraphError(f"data {str(path)!r}: {LABELS!r} must be one integer class per sample "
                              f"({sorted(samples)} samples, labels {labels.dtype} {list(labels.shape)})",
                              "save labels=np.array([...], dtype=np.int64) beside the inputs")
    feeds = TensorFeeds(_batched(arrays, batch), str(path), labels)
    check_feeds(feeds.batches, inputs, feeds.source)
    return feeds


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise QGraphError(f"{str(path)!r} is not a readable .npy: {exc}", "write it with numpy.save") from None


def as_tensor_feeds(data: Any, inputs: list) -> TensorFeeds:
    """The API's calib/data argument as TensorFeeds: TensorFeeds, a path, or an iterable of feed dicts."""
    if isinstance(data, TensorFeeds):
        check_feeds(data.batches, inputs, data.source)
        return data
    if isinstance(data, (str, Path)):
        return load_tensor_data(data, inputs)
    if isinstance(data, dict):
        data = [data]
    try:
        batches = [{k: np.asarray(v) for k, v in feed.items()} for feed in data]
    except (TypeError, AttributeError):
        raise QGraphError(f"calibration data of type {type(data).__name__} is not understood",
                          "pass an iterable of {input name: array} dicts, a path, or qgraph.CalibConfig") from None
    feeds = TensorFeeds(batches, "the given feeds")
    check_feeds(feeds.batches, inputs, feeds.source)
    return feeds
