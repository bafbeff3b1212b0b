"""Calibration: token windows from text, and streamed activation statistics from ONNX Runtime."""

from qgraph.calib.data import TokenWindows, calibration_windows, default_text_path, evaluation_windows, tokenize_text
from qgraph.calib.stats import ChannelStats, collect_stats

__all__ = [
    "ChannelStats",
    "TokenWindows",
    "calibration_windows",
    "collect_stats",
    "default_text_path",
    "evaluation_windows",
    "tokenize_text",
]
