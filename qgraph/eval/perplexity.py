"""Perplexity over non-overlapping token windows: the accuracy number every recipe is judged by."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from qgraph.calib.data import TokenWindows
from qgraph.progress import track

Forward = Callable[[np.ndarray], np.ndarray]  # int64 ids [1, T] -> float logits [1, T, V]


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ids[1:] given logits[:-1], in float64."""
    z = np.asarray(logits[0, :-1], dtype=np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    target = z[np.arange(z.shape[0]), ids[1:]]
    return float((logz - target).sum())


def perplexity(forward: Forward, windows: TokenWindows, *, progress: bool = True) -> dict:
    """exp(mean NLL) over every window; each window of ctx tokens scores ctx - 1 predictions."""
    nll = 0.0
    for row in track(windows.ids, "evaluating", total=windows.count, enabled=progress):
        nll += window_nll(forward(row[None, :]), row)
    tokens = windows.scored_predictions
    return {"ppl": math.exp(nll / tokens), "tokens": tokens, "windows": windows.count, "ctx": windows.ctx}
