"""Feeds for one run of a graph from token ids alone.

A logits graph takes the ids only. A KV-cache graph (onnxruntime-genai's names: input_ids,
attention_mask, position_ids, past_key_values.N.key / .value) also gets an all-ones mask, positions
0..seq-1 and an empty past: a prompt run with no cache, the same function as the logits graph. Every
calibration, verification and evaluation run goes through `token_feeds`, so each pass compiles
either graph without knowing which it got.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import numpy as np

CACHE_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
CACHE_OUTPUT = re.compile(r"^present\.(\d+)\.(key|value)$")
# A KIVI runtime graph's stored tokens beside each past (qgraph.backends.kivi_cache): empty in a prompt run.
STORED_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)\.(codes|step|min)$")
FED_INPUTS = ("input_ids", "attention_mask", "position_ids")


def is_cache_input(name: str) -> bool:
    return CACHE_INPUT.match(name) is not None


def fed_from_ids(name: str) -> bool:
    """True for the inputs `token_feeds` fills: the ids, the mask, the positions and the past."""
    return name in FED_INPUTS or is_cache_input(name) or STORED_INPUT.match(name) is not None


def has_cache(inputs: Iterable[Any]) -> bool:
    """True when a graph's inputs (onnx_ir values or ORT NodeArgs) carry a KV cache."""
    return any(is_cache_input(v.name) for v in inputs)


def input_dims(v) -> list[int | None]:
    """An input's axes (onnx_ir value or ORT NodeArg): its size where fixed, None where dynamic (a symbol, or
    the -1 some exporters, e.g. Paddle's, write for an open axis)."""
    return [d if isinstance(d, int) and d >= 0 else None for d in (v.shape or [])]


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}


def input_dtype(v) -> np.dtype:
    """An input's element type (onnx_ir value or ORT NodeArg, whose type reads 'tensor(float16)'); float32 if unknown."""
    t = getattr(v, "type", None)
    if isinstance(t, str):
        return np.dtype(_ORT_TYPES.get(t, np.float32))
    dtype = getattr(v, "dtype", None)  # onnx_ir value
    return np.dtype(dtype.numpy()) if dtype is not None else np.dtype(np.float32)


def reads_tokens(inputs: Iterable[Any]) -> bool:
    """True when a graph's (or session's) first input takes token ids (int64 / int32): a language model.

    False for models that read tensors (images, features), which are fed by name (qgraph.calib.tensors).
    """
    first = next(iter(inputs), None)
    return first is not None and input_dtype(first) in (np.dtype(np.int64), np.dtype(np.int32))


def empty_past(v, batch: int) -> np.ndarray:
    """A zero-length cache tensor [batch, kv_heads, 0, head_dim] for the input `v`."""
    dims = input_dims(v)
    if len(dims) != 4 or dims[1] is None or dims[3] is None:
        raise ValueError(f"cache input {v.name!r} has shape {list(v.shape or [])}: expected [batch, kv_heads, past, head_dim]")
    return np.zeros((batch, dims[1], 0, dims[3]), dtype=input_dtype(v))


def token_feeds(inputs: Iterable[Any], ids: np.ndarray | dict[str, np.ndarray], *, past: int = 0,
                cache: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Feeds for token ids [batch, seq] (the first input takes the ids, whatever its name and rank).

    A dict is already one feed per input name and is returned as it is.

    With `cache` (the past_key_values of `past` earlier tokens) the mask covers past + seq tokens and
    the positions start at `past`; without it the past is empty.
    """
    if isinstance(ids, dict):
        return ids  # already a feed per input (tensor data: qgraph.calib.tensors)
    inputs = list(inputs)
    feeds = {inputs[0].name: ids}
    if not any(fed_from_ids(v.name) for v in inputs[1:]):
        return feeds  # a one-input graph (or a toy whose first input is a float tensor)
    batch, seq = ids.shape
    for v in inputs[1:]:
        if v.name == "attention_mask":
            feeds[v.name] = np.ones((batch, past + seq), dtype=np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy()
        elif is_cache_input(v.name):
            feeds[v.name] = cache[v.name] if cache is not None else empty_past(v, batch)
        elif STORED_INPUT.match(v.name):
            feeds[v.name] = empty_past(v, batch)  # a decoder with stored tokens feeds its own
    return feeds
