"""Latency of an artifact: prefill of a long prompt, and decode with the KV cache (or a single-token proxy without one)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from qgraph.eval.perplexity import Forward

DECODE_NOTE = (
    "decode = one forward of a single token without KV cache: a GEMV-bound proxy, not generation "
    "(compile with --kv-cache for decode tokens/s with the cache)"
)
CACHED_NOTE = "decode = tokens/s of single-token steps with the KV cache after a prompt of the given context"


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


def decode_rate(decoder, context: int, steps: int, *, vocab: int, seed: int = 0) -> tuple[float, float]:
    """(prefill ms of `context` random tokens, decode tokens/s of `steps` cached single-token steps after it)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, size=(1, context), dtype=np.int64)
    t = time.perf_counter()
    logits, cache = decoder.step(prompt, decoder.start(capacity=context + steps + 1), 0)
    prefill = (time.perf_counter() - t) * 1e3
    token = np.asarray([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
    t = time.perf_counter()
    for i in range(steps):
        logits, cache = decoder.step(token, cache, context + i)
        token[0, 0] = int(np.argmax(logits[0, -1]))
    return prefill, steps / (time.perf_counter() - t)


def cache_bytes_per_token(decoder) -> int:
    """Bytes the cache grows by per token: every past tensor's kv_heads x head_dim x element size."""
    return decoder.bytes_per_token()


def bench_generation(decoder, *, prompts: tuple[int, ...] = (128, 512), contexts: tuple[int, ...] = (128, 512, 1024),
                     steps: int = 32, runs: int = 3, vocab: int = 1000) -> dict:
    """Prefill ms per prompt length and decode tokens/s per context (median of runs), cache size, peak memory."""
    import resource

    decode_rate(decoder, 16, 4, vocab=vocab)  # warm-up: session arenas, kernel selection
    prefill = {n: statistics.median(decode_rate(decoder, n, 0, vocab=vocab, seed=r)[0] for r in range(runs)) for n in prompts}
    decode = {c: statistics.median(decode_rate(decoder, c, steps, vocab=vocab, seed=r)[1] for r in range(runs))
              for c in contexts}
    return {
        "prefill_ms": {str(n): round(v, 3) for n, v in prefill.items()},
        "decode_tokens_per_s": {str(c): round(v, 3) for c, v in decode.items()},
        "decode_steps": steps,
        "runs": runs,
        "cache_bytes_per_token": cache_bytes_per_token(decoder),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": CACHED_NOTE,
    }


def tensor_feeds_for_bench(inputs: list, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds of each input's dtype and shape, the batch axis (a dynamic axis 0) set to `batch`."""
    from qgraph.calib.tensors import random_feeds
    from qgraph.errors import QGraphError
    from qgraph.ir.feeds import input_dims

    for v in inputs:
        if any(d is None for d in input_dims(v)[1:]):
            raise QGraphError(f"input {v.name!r} has dynamic axes beyond the batch ({v.shape}): no shape to time",
                              "export the model with fixed sizes except the batch")
    return random_feeds(inputs, lambda v, axis: batch, np.random.default_rng(seed))


def bench_tensors(session, *, batch: int = 1, runs: int = 10) -> dict:
    """Latency of one forward on random inputs at a batch size: median and min ms, samples per second."""
    feeds = tensor_feeds_for_bench(session.get_inputs(), batch)
    batch = next(iter(feeds.values())).shape[0] if feeds else batch  # a fixed batch axis wins
    times = time_forward(lambda f: session.run(None, f), feeds, runs)
    med = statistics.median(times)
    return {"latency_ms": med, "latency_min_ms": min(times), "batch": batch, "runs": runs,
            "samples_per_s": batch / (med / 1e3)}
