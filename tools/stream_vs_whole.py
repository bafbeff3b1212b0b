#!/usr/bin/env python
"""The streamed compile against the whole-model compile on the embedded SmolLM2-135M, per recipe.

Both compiles use the default calibration. Prints one JSON line per recipe:
- `tensors_equal` / `tensors_compared`: the block and head quantizers' stored codes, scales and zero points
  that are bitwise equal;
- `logits_max_rel`: the largest logit difference over the largest logit, on two fixed 64-token rows;
- `ppl_whole` / `ppl_stream`: perplexity over `--windows` 512-token windows of the embedded text;
- `whole_s` / `stream_s`: the compile times.

    python tools/stream_vs_whole.py [--recipes w8a8-qsm,w4a16-awq --windows 16 --keep out/smol]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qgraph  # noqa: E402
from qgraph.backends.onnx_qdq import session_from_model, stored_quantizer_tensors  # noqa: E402
from qgraph.eval.host import describe_host  # noqa: E402


def stored_quantizers(model) -> dict[str, np.ndarray]:
    """The block, head and table quantizers' stored tensors (exporter-named helper nodes left out)."""
    return {k: v for k, v in stored_quantizer_tensors(model).items() if k.startswith(("model.", "lm_head", "node_embedding"))}


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compare(recipe: str, windows: int, keep: Path) -> dict:
    t = time.perf_counter()
    whole = qgraph.compile(qgraph.load(progress=False), recipe, progress=False)
    whole_s = time.perf_counter() - t
    t = time.perf_counter()
    streamed = qgraph.compile_streaming(None, recipe, progress=False)
    stream_s = time.perf_counter() - t
    a, b = stored_quantizers(whole.model), stored_quantizers(streamed.model)
    common = sorted(set(a) & set(b))
    tokens = np.arange(5, 5 + 2 * 64).reshape(2, 64) * 37 % 49152
    x = session_from_model(whole.model).run(None, {"input_ids": tokens})[0]
    y = session_from_model(streamed.model).run(None, {"input_ids": tokens})[0]
    whole_dir = whole.save(keep / f"whole-{recipe}", progress=False)
    stream_dir = streamed.save(keep / f"stream-{recipe}", progress=False)
    streamed.discard()
    return {"whole_s": round(whole_s, 1), "stream_s": round(stream_s, 1),
            "tensors_compared": len(common), "tensors_only_in_one": len(set(a) ^ set(b)),
            "tensors_equal": sum(bitwise_equal(a[k], b[k]) for k in common),
            "logits_max_rel": float(np.abs(x - y).max() / np.abs(x).max()),
            "ppl_whole": qgraph.evaluate(whole_dir, windows=windows, progress=False)["ppl"],
            "ppl_stream": qgraph.evaluate(stream_dir, windows=windows, progress=False)["ppl"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="w8a8-qsm,w4a16-awq")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--keep", type=Path, help="folder to keep both artifacts in (default: a temporary one)")
    args = ap.parse_args()
    print(describe_host(), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        for recipe in args.recipes.split(","):
            print(json.dumps({recipe: compare(recipe, args.windows, keep)}), flush=True)


if __name__ == "__main__":
    main()
