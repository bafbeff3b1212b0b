"""Sentence-embedding fidelity of an encoder: mean-pooled embeddings against the float model's, by cosine.

Perplexity means nothing for an encoder; what a user of a sentence-embedding model (MiniLM) needs
is that every sentence still maps where the float model puts it. Sentences come from the default
text (britannica-11th.txt), split deterministically, starting right after the default calibration
span (token 12,288 of the model's own tokenizer) so no evaluated sentence was calibrated on; each is
tokenized with the model's special tokens ([CLS] ... [SEP]) and truncated to the model's max length,
exactly as sentence-transformers feeds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qgraph.calib.data import DEFAULT_CALIB_START, DEFAULT_CALIB_WINDOWS, DEFAULT_CTX, default_text_path
from qgraph.errors import QGraphError
from qgraph.progress import track

DEFAULT_SENTENCES = 256
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json)

Forward = Callable[[np.ndarray], np.ndarray]  # int64 ids [1, T] -> hidden states [1, T, H]

_MARKUP = re.compile(r"^(#|p\.\d+)")  # the text's page headers and scan-source lines
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _read(text_path: str | Path | None) -> str:
    path = Path(text_path) if text_path else default_text_path()
    if not path.is_file():
        raise QGraphError(f"text file {str(path)!r} does not exist", "pass an existing UTF-8 text file")
    return path.read_text(encoding="utf-8", errors="replace")


def after_calibration(tokenizer, text_path: str | Path | None = None) -> int:
    """The character where the default calibration span (tokens 8,192..12,288) ends; 0 for another text."""
    if text_path is not None:
        return 0
    text = _read(None)
    end = DEFAULT_CALIB_START + DEFAULT_CALIB_WINDOWS * DEFAULT_CTX
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return int(offsets[min(end, len(offsets) - 1)][1])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # no offsets: proportional estimate, rounded up
    return min(len(text), int(np.ceil(len(text) * end / max(len(ids), 1) * 1.1)))


def sentences(text_path: str | Path | None = None, *, count: int = DEFAULT_SENTENCES, start: int = 0,
              min_words: int = 6, max_words: int = 60) -> list[str]:
    """The first `count` sentences of the text from character `start` with min_words..max_words words (deterministic)."""
    path = Path(text_path) if text_path else default_text_path()
    lines = [ln.strip() for ln in _read(text_path)[start:].splitlines()]
    prose = " ".join(ln for ln in lines if ln and not _MARKUP.match(ln))
    pieces = _SENTENCE_END.split(prose)[1 if start else 0:]  # a sentence cut by `start` is dropped
    picked = [s for s in pieces if min_words <= len(s.split()) <= max_words][:count]
    if len(picked) < count:
        raise QGraphError(f"text {path.name!r} has only {len(picked)} sentences of {min_words}-{max_words} words",
                          f"use a longer text or ask for at most {len(picked)} sentences")
    return picked


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors the attention mask keeps: [B, T, H], [B, T] -> [B, H] (sentence-transformers)."""
    m = np.asarray(mask, dtype=np.float64)[..., None]
    return (np.asarray(hidden, dtype=np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, H] arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def encode(tokenizer, texts: list[str], max_tokens: int = MAX_TOKENS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [1, T], attention mask [1, T]) per sentence, with the model's special tokens."""
    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_tokens)
        out.append((np.asarray([enc["input_ids"]], dtype=np.int64), np.asarray([enc["attention_mask"]], dtype=np.int64)))
    return out


def embed(forward: Forward, batches: list[tuple[np.ndarray, np.ndarray]], *, progress: bool = False,
          label: str = "embedding") -> np.ndarray:
    """Mean-pooled sentence embeddings [N, H]; one unpadded sentence per run, so the graph needs no mask input."""
    rows = [mean_pool(forward(ids), mask)[0] for ids, mask in track(batches, label, total=len(batches), enabled=progress)]
    return np.stack(rows)


def embedding_cosine(forward: Forward, reference: Forward, tokenizer, texts: list[str], *, progress: bool = False) -> dict:
    """Cosine of each sentence's embedding against the reference model's: mean, min and count."""
    batches = encode(tokenizer, texts)
    ref = embed(reference, batches, progress=progress, label="embedding (reference)")
    got = embed(forward, batches, progress=progress)
    cos = cosine(got, ref)
    return {"metric": "embedding_cosine", "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "sentences": len(texts), "tokens": int(sum(ids.shape[1] for ids, _ in batches))}


def encoder_source(target: Any) -> dict | None:
    """The source description when `target` is an encoder (artifact, .onnx in one, compiled/captured model,
    Hugging Face dir or alias), else None."""
    from qgraph.compiled import CompiledModel
    from qgraph.ir.capture import MANIFEST, CapturedModel, alias_location, causal_lm
    from qgraph.runner import Runner

    if isinstance(target, CompiledModel | CapturedModel):
        source = target.source
    elif target is None or isinstance(target, Runner):
        return None
    else:
        path = Path(target)
        if not path.exists():
            path = alias_location(str(target)) or path
        manifest = path / MANIFEST if path.is_dir() else path.parent / MANIFEST
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            source = dict(data.get("source", {}), task=data.get("task", "causal-lm"))
        elif path.is_dir() and (path / "config.json").is_file():  # the float model itself: compared with itself
            config = json.loads((path / "config.json").read_text())
            encoder = not causal_lm(config.get("architectures") or [], config.get("model_type"))
            source = {"path": str(path), "task": "encoder" if encoder else "causal-lm"}
        else:
            return None
    return source if source.get("task") == "encoder" else None


def evaluate_encoder(target: Any, source: dict, *, text: str | None = None, count: int = DEFAULT_SENTENCES,
                     reference: Any = None, threads: int = 2, progress: bool = True) -> dict:
    """Embedding cosine of an encoder against its float source model (the Hugging Face dir in its manifest)."""
    from qgraph.runner import open_runner

    reference = reference if reference is not None else source.get("path")
    if reference is None or (isinstance(reference, str) and not Path(reference).exists()):
        raise QGraphError(f"the float reference {reference!r} of this encoder is not available",
                          "evaluate on the machine that compiled it, or pass reference= (a model dir or artifact)")
    runner = open_runner(target, threads=threads, progress=progress)
    ref = open_runner(reference, threads=threads, progress=progress)
    tokenizer = runner.tokenizer or ref.tokenizer
    if tokenizer is None:
        raise QGraphError("this encoder has no tokenizer, so sentences cannot be turned into tokens",
                          "compile from a Hugging Face directory with tokenizer files")
    texts = sentences(text, count=count, start=after_calibration(tokenizer, text))
    result = embedding_cosine(runner.forward, ref.forward, tokenizer, texts, progress=progress)
    return {**result, "model": runner.name, "runtime": runner.kind, "reference": str(reference)}
