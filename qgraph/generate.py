"""Text generation from an artifact: a KV-cache graph steps one token at a time, a logits graph recomputes.

A KV-cache artifact (`qgraph compile --kv-cache`) runs the prompt once (prefill) and then one token
per step with the cache it returned; a logits-only artifact runs the whole sequence again for every
new token (the same tokens, far slower: `qgraph generate` says so). Greedy by default; with a
temperature, sampling from the top-k softmax with a seeded generator, so a seed gives the same text.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.errors import QGraphError
from qgraph.ir.feeds import CACHE_INPUT, CACHE_OUTPUT, empty_past, has_cache, token_feeds


@dataclasses.dataclass
class Generation:
    """What `generate` returns: the prompt's and the new token ids, the text, and the timings."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str | None
    cached: bool
    prefill_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time they took (the first comes from the prefill)."""
        steps = len(self.new_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "new_tokens": len(self.new_ids), "new_ids": self.new_ids,
                "text": self.text, "kv_cache": self.cached, "prefill_ms": round(self.prefill_s * 1e3, 3),
                "decode_tokens_per_s": round(self.tokens_per_s, 3)}


class SharedCache:
    """A KV cache written in place: per past input one [batch, kv_heads, capacity, head_dim] buffer.

    GroupQueryAttention appends a step's keys and values into the buffer it reads the past from when
    past and present are the same memory (onnxruntime-genai's past_present_share_buffer), so a step
    copies nothing of the cache; without it every step copies the whole cache into a new present.
    The numpy buffers are the OrtValues' memory (ortvalue_from_numpy wraps, it does not copy).
    """

    def __init__(self, empty: dict[str, np.ndarray], capacity: int):
        self.arrays, self.capacity, self.length = empty, 0, 0  # zero-length tensors: the shapes and dtypes
        self.reserve(capacity)

    def reserve(self, total: int) -> None:
        """Room for `total` tokens: a new buffer of twice the size with the valid tokens copied, when it is short."""
        import onnxruntime as ort

        if total <= self.capacity:
            return
        capacity = max(total, 2 * self.capacity)
        grown = {}
        for n, a in self.arrays.items():
            b = np.zeros((*a.shape[:2], capacity, a.shape[3]), dtype=a.dtype)
            b[:, :, : self.length] = a[:, :, : self.length]
            grown[n] = b
        self.arrays, self.capacity = grown, capacity
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.arrays.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        """The valid part of one cache tensor, [batch, kv_heads, length, head_dim] (a view)."""
        return self.arrays[name][:, :, : self.length]

    def keys(self):
        return self.arrays.keys()


class Decoder:
    """One ONNX Runtime session of a causal LM graph, with or without a KV cache.

    share_buffer (default: what the graph's metadata says, set on qgraph's fused-attention graphs)
    keeps the cache in SharedCache buffers bound to the session, instead of numpy arrays fed in and
    returned every step.
    """

    def __init__(self, session, share_buffer: bool | None = None, kivi_residual: int | None = None):
        from qgraph.backends.kivi_cache import layouts_of
        from qgraph.backends.ort_attention import MAX_POSITIONS_KEY, SHARE_BUFFER_KEY

        self.session = session
        self.inputs = session.get_inputs()
        outputs = [o.name for o in session.get_outputs()]
        self.logits = outputs[0]
        self.cached = has_cache(self.inputs)
        self.past_names = [v.name for v in self.inputs if CACHE_INPUT.match(v.name)]
        self.present_names = [n for n in outputs if CACHE_OUTPUT.match(n)]
        # present.N.* of a step is the next step's past_key_values.N.*
        self.past_of = {n: CACHE_OUTPUT.sub(r"past_key_values.\1.\2", n) for n in self.present_names}
        if self.cached and len(self.present_names) != len(self.past_names):
            raise QGraphError(f"the graph has {len(self.past_names)} past_key_values inputs but "
                              f"{len(self.present_names)} present outputs", "recompile the artifact with --kv-cache")
        meta = session.get_modelmeta().custom_metadata_map
        if share_buffer is None:
            share_buffer = meta.get(SHARE_BUFFER_KEY) == "1"
        self.max_positions = int(meta[MAX_POSITIONS_KEY]) if MAX_POSITIONS_KEY in meta else None
        # KIVI's stored cache (qgraph.backends.kivi_cache): codes fed beside the float residual window
        self.kivi = layouts_of(meta)
        if self.kivi is not None and kivi_residual is not None:
            self.kivi = (self.kivi[0], kivi_residual)
        self.shared = bool(share_buffer and self.cached and self.kivi is None)
        self._binding = session.io_binding() if self.shared else None

    def start(self, batch: int = 1, capacity: int = 256) -> dict[str, np.ndarray] | SharedCache:
        """An empty cache for `batch` sequences (with a shared buffer: room for `capacity` tokens, grown on demand)."""
        empty = {v.name: empty_past(v, batch) for v in self.inputs if CACHE_INPUT.match(v.name)}
        if self.kivi is not None:
            from qgraph.backends.kivi_cache import KiviCache

            return KiviCache(empty, *self.kivi)
        return SharedCache(empty, capacity) if self.shared else empty

    def bytes_per_token(self) -> float:
        """Bytes the cache grows by per token and sequence: every past tensor's kv_heads x head_dim x element size
        (a KIVI cache: its stored codes, steps and minima; the float residual window is a fixed size)."""
        pasts = {v.name: empty_past(v, 1) for v in self.inputs if CACHE_INPUT.match(v.name)}
        if self.kivi is not None:
            return sum(self.kivi[0][name].bytes_per_token(a.shape[1]) for name, a in pasts.items())
        return sum(a.shape[1] * a.shape[3] * a.itemsize for a in pasts.values())

    def step(self, ids: np.ndarray, cache, past: int) -> tuple[np.ndarray, Any]:
        """Logits for `ids` [batch, seq] after `past` cached tokens, and the cache that includes them."""
        if self.max_positions is not None and past + ids.shape[1] > self.max_positions:
            raise QGraphError(f"{past + ids.shape[1]} tokens are more than the {self.max_positions} positions this "
                              "graph's rotary caches hold", "shorten the prompt or --max-new-tokens")
        if self.shared:
            return self._shared_step(ids, cache, past)
        if self.kivi is not None:
            return self._kivi_step(ids, cache, past)
        feeds = token_feeds(self.inputs, ids, past=past, cache=cache if self.cached else None)
        outs = self.session.run([self.logits, *self.present_names], feeds)
        present = {self.past_of[n]: a for n, a in zip(self.present_names, outs[1:], strict=True)}
        return outs[0], present

    def _kivi_step(self, ids: np.ndarray, cache, past: int):
        if past != cache.length:
            raise ValueError(f"the KIVI cache holds {cache.length} tokens, the step says {past}")
        feeds = token_feeds(self.inputs, ids, past=past, cache=cache.residual)
        feeds.update(cache.feeds())
        outs = self.session.run([self.logits, *self.present_names], feeds)
        cache.absorb({self.past_of[n]: a for n, a in zip(self.present_names, outs[1:], strict=True)}, past + ids.shape[1])
        return outs[0], cache

    def _shared_step(self, ids: np.ndarray, cache: SharedCache, past: int) -> tuple[np.ndarray, SharedCache]:
        if past != cache.length:
            raise ValueError(f"the shared cache holds {cache.length} tokens, the step says {past}")
        cache.reserve(past + ids.shape[1])
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        for name, value in token_feeds(self.inputs, ids, past=past, cache=cache.values).items():
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                io.bind_ortvalue_input(name, value)
        io.bind_output(self.logits)
        for name in self.present_names:  # the present is the past's own buffer
            io.bind_ortvalue_output(name, cache.values[self.past_of[name]])
        self.session.run_with_iobinding(io)
        cache.length = past + ids.shape[1]
        return io.get_outputs()[0].numpy(), cache


def cached_forward(decoder: Decoder, prompt: int):
    """A perplexity Forward through the cache: ids[:, :prompt] in one pass, then one token per step.

    Its logits [1, T, V] are what generation sees at every position, so perplexity over them is the
    cached decode path's (a quantized cache's rounding as it happens step by step)."""
    if not decoder.cached:
        raise QGraphError("the cached decode path needs a KV-cache artifact", "compile it with --kv-cache")

    def forward(ids: np.ndarray) -> np.ndarray:
        first = max(1, min(prompt, ids.shape[1]))
        logits, cache = decoder.step(ids[:, :first], decoder.start(ids.shape[0], capacity=ids.shape[1]), 0)
        rows = [logits]
        for t in range(first, ids.shape[1]):
            logits, cache = decoder.step(ids[:, t:t + 1], cache, t)
            rows.append(logits)
        return np.concatenate(rows, axis=1)

    return forward


def next_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy (temperature 0) or a sample from softmax(logits / T) over the top_k largest (0: all)."""
    logits = logits.astype(np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


def run_generation(decoder: Decoder, prompt_ids: Sequence[int], *, max_new_tokens: int = 32, temperature: float = 0.0,
                   top_k: int = 0, seed: int = 0, eos_token_id: int | Sequence[int] | None = None,
                   on_token: Callable[[int], None] | None = None) -> tuple[list[int], float, float]:
    """New token ids (stopping after an end-of-sequence id), prefill seconds, decode seconds."""
    rng = np.random.default_rng(seed)
    stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    new: list[int] = []
    cache = decoder.start(capacity=ids.shape[1] + max_new_tokens) if decoder.cached else {}
    t0 = time.perf_counter()
    logits, cache = decoder.step(ids, cache, 0)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    while len(new) < max_new_tokens:
        token = next_token(logits[0, -1], temperature, top_k, rng)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop or len(new) == max_new_tokens:
            break
        if decoder.cached:
            logits, cache = decoder.step(np.asarray([[token]], dtype=np.int64), cache, ids.shape[1] + len(new) - 1)
        else:  # no cache: the whole sequence again
            seq = np.concatenate([ids, np.asarray([new], dtype=np.int64)], axis=1)
            logits, _ = decoder.step(seq, {}, 0)
    return new, prefill, time.perf_counter() - t1


def open_decoder(target: Any, threads: int = 2) -> tuple[Decoder, Any]:
    """A decoder and the tokenizer (or None) for an artifact directory, an .onnx file or a CompiledModel."""
    from qgraph.artifact import read_manifest
    from qgraph.compiled import CompiledModel
    from qgraph.ir.capture import MANIFEST
    from qgraph.runner import open_runner

    if isinstance(target, CompiledModel):
        runner = target.runner(threads)
        return Decoder(runner.session), runner.tokenizer
    if not isinstance(target, (str, Path)):
        raise QGraphError(f"cannot generate from {type(target).__name__}", "pass an artifact directory or an .onnx file")
    path = Path(target)
    if path.is_dir() and (path / MANIFEST).exists():
        manifest = read_manifest(path)
        if manifest.get("task", "causal-lm") != "causal-lm":
            raise QGraphError(f"artifact {str(path)!r} is an {manifest.get('task')} model: it does not generate text",
                              "pass a causal LM artifact")
        if manifest.get("backend", "onnxruntime") != "onnxruntime":
            raise QGraphError(f"artifact {str(path)!r} is built for {manifest.get('backend')}: generate runs "
                              "ONNX Runtime artifacts", "compile it with --backend onnxruntime --kv-cache")
    elif not (path.is_file() and path.suffix == ".onnx"):
        raise QGraphError(f"{str(target)!r} is not a qgraph artifact directory or an .onnx file",
                          "compile one first: qgraph compile --kv-cache -o DIR")
    runner = open_runner(path, threads=threads)  # the checked session and the tokenizer, as eval opens them
    return Decoder(runner.session), runner.tokenizer


def generate(target: Any, prompt: str | Sequence[int], *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, eos_token_id: int | Sequence[int] | None | str = "auto", threads: int = 2,
             on_token: Callable[[int], None] | None = None, on_text: Callable[[str], None] | None = None) -> Generation:
    """Generate up to max_new_tokens after `prompt` (text, with the artifact's tokenizer, or token ids).

    eos_token_id "auto" stops at the tokenizer's end-of-sequence token (none without a tokenizer).
    on_token gets every new id as it comes; on_text every new piece of decoded text (a tokenizer needed).
    """
    if max_new_tokens < 1:
        raise QGraphError(f"max_new_tokens is {max_new_tokens}", "ask for at least one new token")
    if temperature < 0 or top_k < 0:
        raise QGraphError(f"temperature {temperature} / top_k {top_k} is negative", "use temperature >= 0 and top_k >= 0")
    decoder, tokenizer = open_decoder(target, threads)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise QGraphError("this artifact has no tokenizer, so a text prompt cannot be encoded", "pass token ids")
        prompt_ids = list(tokenizer(prompt)["input_ids"])
    else:
        prompt_ids = [int(t) for t in prompt]
    if not prompt_ids:
        raise QGraphError("the prompt is empty", "give at least one token of prompt")
    if eos_token_id == "auto":
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if on_text is not None and tokenizer is not None:
        on_token = _text_stream(tokenizer, on_text, on_token)
    new, prefill, decode = run_generation(decoder, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k, seed=seed, eos_token_id=eos_token_id, on_token=on_token)
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return Generation(prompt_ids, new, text, decoder.cached, prefill, decode)


def _text_stream(tokenizer, on_text: Callable[[str], None], on_token: Callable[[int], None] | None) -> Callable[[int], None]:
    """A token callback that decodes everything so far and hands on_text what is new.

    Decoding the whole list (not token by token) keeps the tokenizer's spacing and merges; a piece
    ending in U+FFFD is a multi-byte character still incomplete, held back until its last token.
    """
    ids: list[int] = []
    shown = [""]

    def take(token: int) -> None:
        if on_token is not None:
            on_token(token)
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown[0]):
            on_text(text[len(shown[0]):])
            shown[0] = text

    return take
