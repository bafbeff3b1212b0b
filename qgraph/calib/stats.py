"""Stream per-channel activation statistics by running the float graph in ONNX Runtime.

Requested values are exposed as extra graph outputs; each calibration window is run once
and folded into running min / max / sum|x| / count per channel (last axis), so memory holds
one window's activations at a time, never the whole calibration set.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.calib.tensors import TensorFeeds
from qgraph.progress import track

CALIB_THREADS = 2
# The first positions of every window are always among the kept samples: causal LMs park huge
# activations there (attention sinks, |x| ~ 20x the rest on SmolLM2's MLP inputs), and a weight
# search that never sees them clips exactly the rows those tokens need. Measured on SmolLM2 (AWQ +
# int4 g128 clip search, 4 eval windows): 32.66 perplexity without these rows, 28.43 with them.
SINK_POSITIONS = 4


@dataclasses.dataclass
class ChannelStats:
    """Running statistics of one activation, per channel of its last axis."""

    min: np.ndarray
    max: np.ndarray
    abs_sum: np.ndarray
    count: int = 0
    samples: list[np.ndarray] = dataclasses.field(default_factory=list)  # token rows kept for searches
    gram: np.ndarray | None = None  # sum of x^T x over every token, [C, C] float64, when asked for

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(np.full(channels, np.inf), np.full(channels, -np.inf), np.zeros(channels), 0)

    def update(self, x: np.ndarray, sample_stride: int = 0, sink_positions: int = 0, gram: bool = False) -> None:
        """Fold one window's activations [..., T, C] in; keep every sample_stride-th row and the first sink_positions.

        gram=True also accumulates x^T x (one window's product in float32, the running sum in float64).
        """
        x = np.asarray(x, dtype=np.float32)
        x2 = x.reshape(-1, x.shape[-1])
        if gram:
            g = (x2.T @ x2).astype(np.float64)
            self.gram = g if self.gram is None else self.gram + g
        if sample_stride:
            rows = np.arange(sample_stride // 2, x2.shape[0], sample_stride)
            if sink_positions and x.ndim >= 2:
                seq = x.shape[-2]
                starts = np.arange(0, x2.shape[0], seq)[:, None] + np.arange(min(sink_positions, seq))[None, :]
                rows = np.union1d(starts.reshape(-1), rows)
            self.samples.append(x2[rows].copy())
        self.min = np.minimum(self.min, x2.min(axis=0))
        self.max = np.maximum(self.max, x2.max(axis=0))
        self.abs_sum += np.abs(x2).sum(axis=0, dtype=np.float64)
        self.count += x2.shape[0]

    @property
    def abs_mean(self) -> np.ndarray:
        return self.abs_sum / max(self.count, 1)

    @property
    def abs_max(self) -> np.ndarray:
        return np.maximum(-self.min, self.max)

    @property
    def sample_rows(self) -> np.ndarray:
        """The kept token rows, [n, channels] (empty when sampling was off)."""
        if not self.samples:
            return np.zeros((0, self.min.shape[0]), dtype=np.float32)
        return np.concatenate(self.samples)

    @property
    def tensor_min(self) -> float:
        return float(self.min.min())

    @property
    def tensor_max(self) -> float:
        return float(self.max.max())


def collect_stats(
    model: ir.Model,
    value_names: list[str],
    windows: TokenWindows | TensorFeeds,
    *,
    threads: int = CALIB_THREADS,
    progress: bool = True,
    sample_tokens: int = 0,
    gram: bool = False,
) -> dict[str, ChannelStats]:
    """Per-channel statistics of the named values over the calibration windows.

    sample_tokens > 0 also keeps about that many evenly spaced token rows of each value, plus the
    first SINK_POSITIONS positions of every window, for searches (smoothing strength, clipping)
    that need real activations, not just ranges. gram=True accumulates each value's x^T x over
    every calibration token (error-feedback rounding needs the full second moment).
    """
    from qgraph.backends.onnx_qdq import session_with_outputs

    wanted = list(dict.fromkeys(value_names))
    # A fixed thread count: ORT's CPU kernels split work the same way each run, so the same inputs
    # give bit-identical statistics, hence the same artifact.
    session = session_with_outputs(model, wanted, threads=threads, optimize=False)
    inputs = session.get_inputs()
    axes = channel_axes(model, wanted)
    stats: dict[str, ChannelStats] = {}
    stride = max(1, windows.size // sample_tokens) if sample_tokens else 0
    for feeds in track(windows.feeds(inputs), "calibrating", total=windows.count, enabled=progress):
        outs = session.run(wanted, feeds)
        for name, arr in zip(wanted, outs, strict=True):
            if axes[name] != -1 and arr.ndim > 1:
                arr = np.moveaxis(arr, axes[name], -1)  # channels last: a conv input's NCHW -> N H W C
            if name not in stats:
                stats[name] = ChannelStats.empty(arr.shape[-1])
            stats[name].update(arr, stride, SINK_POSITIONS if stride else 0, gram=gram)
    return stats


def channel_axes(model: ir.Model, names: list[str]) -> dict[str, int]:
    """Each named value's channel axis, read off the graph: 1 where a convolution reads it (NCHW), else the last."""
    from qgraph.ir.convs import channel_axis
    from qgraph.ir.rewrite import values_by_name

    values = values_by_name(model.graph)
    return {n: channel_axis(values[n]) if n in values else -1 for n in names}


def region_stats(model: ir.Model, windows: TokenWindows | TensorFeeds, *, progress: bool = True, sample_tokens: int = 0):
    """The model's channel regions, its refused candidates (as dicts) and statistics of each region's input."""
    from qgraph.ir.regions import find_regions

    regions, rejections = find_regions(model)
    refused = [dataclasses.asdict(r) for r in rejections]
    if not regions:
        return regions, refused, {}
    names = list(dict.fromkeys(r.input.name for r in regions))
    return regions, refused, collect_stats(model, names, windows, progress=progress, sample_tokens=sample_tokens)
