"""Calibration: token windows from text or tensor feeds, and streamed activation statistics from ONNX Runtime."""

from qgraph.calib.data import TokenWindows, calibration_windows, default_text_path, evaluation_windows, tokenize_text
from qgraph.calib.stats import ChannelStats, collect_stats
from qgraph.calib.tensors import TensorFeeds, load_tensor_data

__all__ = [
    "ChannelStats",
    "TensorFeeds",
    "TokenWindows",
    "calibration_windows",
    "collect_stats",
    "default_text_path",
    "evaluation_windows",
    "load_tensor_data",
    "tokenize_text",
]
