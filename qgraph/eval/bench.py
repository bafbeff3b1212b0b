"""Latency of an artifact: prefill of a long prompt and a single-token forward."""

from __future__ import annotations

import statistics
import time

import numpy as np

from qgraph.eval.perplexity import Forward

DECODE_NOTE = (
    "decode = one forward of a single token without KV cache (a GEMV-bound proxy until the "
    "KV-cache graph exists)"
)


def time_forward(forward: Forward, ids: np.ndarray, runs: int, warmup: int = 2) -> list[float]:
    """Wall-clock milliseconds of `runs` forwards after `warmup` untimed ones."""
    for _ in range(warmup):
        forward(ids)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        forward(ids)
        times.append((time.perf_counter() - t) * 1e3)
    return times


def bench(forward: Forward, *, prefill_tokens: int = 512, runs: int = 10, vocab: int = 1000, seed: int = 0) -> dict:
    """Median and min latency of prefill (prefill_tokens) and single-token forwards."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, size=(1, prefill_tokens), dtype=np.int64)
    one = prompt[:, :1]
    pre = time_forward(forward, prompt, runs)
    dec = time_forward(forward, one, max(runs, 20))
    return {
        "prefill_ms": statistics.median(pre),
        "prefill_min_ms": min(pre),
        "decode_ms": statistics.median(dec),
        "decode_min_ms": min(dec),
        "prefill_tokens": prefill_tokens,
        "runs": runs,
        "note": DECODE_NOTE,
    }
