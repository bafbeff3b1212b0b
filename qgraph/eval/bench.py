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


def round_robin(forwards: dict[str, Forward], *, runs: int = 10, vocab: int = 49152, prefill_tokens: int = 512,
                label: str = "bench") -> dict[str, dict]:
    """Prefill and single-token latency of several models timed in turns, so a busy machine slows all alike.

    Each round times every model once on the prompt and 5 times on one token; returns per model
    {'prefill_min', 'prefill_med', 'decode_min', 'decode_med'} in milliseconds.
    """
    import sys

    prompt = np.random.default_rng(0).integers(0, vocab, size=(1, prefill_tokens), dtype=np.int64)
    one = prompt[:, :1]
    pre: dict[str, list[float]] = {n: [] for n in forwards}
    dec: dict[str, list[float]] = {n: [] for n in forwards}
    for fwd in forwards.values():
        time_forward(fwd, prompt, runs=1, warmup=1)
        time_forward(fwd, one, runs=1, warmup=2)
    for r in range(runs):
        print(f"[{label}] latency round {r + 1}/{runs}", file=sys.stderr, flush=True)
        for name, fwd in forwards.items():
            pre[name] += time_forward(fwd, prompt, runs=1, warmup=0)
            dec[name] += time_forward(fwd, one, runs=5, warmup=0)
    return {n: {"prefill_min": min(pre[n]), "prefill_med": statistics.median(pre[n]),
                "decode_min": min(dec[n]), "decode_med": statistics.median(dec[n])} for n in forwards}
