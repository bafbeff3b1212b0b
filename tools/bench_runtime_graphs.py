#!/usr/bin/env python
"""KV-cache artifacts, each run through its runtime graph (model.ort.onnx) and through model.onnx, in one run.

For every artifact directory given: decode tokens/s with the cache after a prompt of --context tokens
(round-robin over all rows, --rounds rounds, median and max), cache bytes per token, the int8 kernel
that ran, and with --windows N the perplexity of the cached decode path (`--decode-from 256`) over N
windows. Shows what the fused-attention graph buys (w8a8-qsm, w4a16-awq) and what KIVI's stored cache
costs in speed and saves in memory (kv4), on this machine:

    python tools/bench_runtime_graphs.py out/fp32-kv out/qsm-kv out/kv4-kv [--windows 16] [--context 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qgraph  # noqa: E402
from qgraph.artifact import read_manifest  # noqa: E402
from qgraph.calib.data import evaluation_windows  # noqa: E402
from qgraph.eval.bench import decode_rate  # noqa: E402
from qgraph.eval.host import describe_host  # noqa: E402
from qgraph.eval.perplexity import perplexity  # noqa: E402
from qgraph.generate import Decoder, cached_forward  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", help="KV-cache artifact directories (qgraph compile --kv-cache)")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before the timed steps")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--windows", type=int, default=0, help="also the cached-decode perplexity over N windows of 512")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    rows: dict[str, tuple[Decoder, object]] = {}
    for path in args.artifacts:
        manifest = read_manifest(Path(path))
        graphs = [("model.onnx", False)]
        if manifest.get("runtime_file"):
            graphs.insert(0, (f"{manifest['runtime_file']} ({manifest.get('runtime_kind', 'fused-attention')})", True))
        for label, runtime in graphs:
            runner = qgraph.open_runner(path, threads=args.threads, runtime=runtime)
            rows[f"{Path(path).name}: {label}"] = (Decoder(runner.session), runner)
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(args.rounds):
        print(f"[bench] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, (decoder, runner) in rows.items():
            rates[name].append(decode_rate(decoder, args.context, args.steps, vocab=runner.vocab)[1])
    lines = [f"Decode with the KV cache after {args.context} tokens, {args.steps} steps x {args.rounds} round-robin "
             f"rounds, {args.threads} threads.", "", f"Host: {describe_host()}.", "",
             "| artifact: graph | decode tok/s (med / max) | cache bytes per token | int8 GEMMs | ppl (decode from 256) |",
             "| --- | ---: | ---: | --- | ---: |"]
    for name, (decoder, runner) in rows.items():
        ppl = "-"
        if args.windows:
            spans = evaluation_windows(runner.tokenizer, None, windows=args.windows, ctx=512)
            ppl = f"{perplexity(cached_forward(decoder, 256), spans, progress=False)['ppl']:.2f}"
        lines.append(f"| {name} | {statistics.median(rates[name]):.1f} / {max(rates[name]):.1f} | "
                     f"{decoder.bytes_per_token():,.0f} | {runner.int8_kernel} | {ppl} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
