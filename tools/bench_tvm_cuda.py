"""Benchmark a qgraph TVM CUDA artifact on a GPU machine: single-token decode and 512-token prefill latency.

Build the artifact anywhere nvcc is installed (no GPU needed), copy the directory, then on the GPU machine:

    qgraph compile --recipe w4a16 --backend tvm --target cuda -o out/cuda/w4a16      # default --arch sm_80,sm_90
    python tools/bench_tvm_cuda.py out/cuda/w4a16 --runs 50 [--ppl] [--json]

The GPU machine needs an NVIDIA GPU of one of the artifact's architectures (manifest tvm.archs;
sm_80: A100 / A30, and the sm_86 / sm_89 cards run sm_80 code; sm_90: H100), a driver, qgraph, and
Apache TVM 0.27 built with USE_CUDA=ON (the PyPI wheel has no CUDA runtime). No compiler is needed:
model.so holds a fatbin of the cubins. Each timed call is one VM function call on device-resident
inputs followed by a device sync (logits stay on the GPU); min and median of --runs after --warmup.
--ppl adds qgraph's perplexity (16 x 512-token windows), which copies logits back per window.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def time_calls(call, sync, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        call()
    sync()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"min_ms": round(min(samples), 3), "median_ms": round(statistics.median(samples), 3), "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="qgraph TVM artifact built with --target cuda")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ppl", action="store_true", help="also evaluate perplexity on the GPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from qgraph.artifact import read_manifest
    from qgraph.backends.tvm import require_tvm
    from qgraph.backends.tvm.artifact import load_functions
    from qgraph.errors import QGraphError

    try:
        manifest = read_manifest(args.artifact)
        if (manifest.get("tvm") or {}).get("device") != "cuda":
            raise QGraphError(f"{str(args.artifact)!r} is not a TVM CUDA artifact",
                              "build one with qgraph compile --backend tvm --target cuda")
        tvm = require_tvm()
        dev, functions = load_functions(args.artifact, manifest)  # raises the no-GPU error here
    except QGraphError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"artifact": str(args.artifact), "recipe": manifest.get("recipe"), "gpu": dev.device_name,
              "compute_version": dev.compute_version}
    for length, key in ((1, "decode"), (512, "prefill512")):
        if length not in functions:
            continue
        func, params = functions[length]
        ids = tvm.runtime.tensor(np.random.default_rng(0).integers(0, 1000, (1, length)).astype(np.int64), dev)
        result[key] = time_calls(lambda f=func, i=ids, p=params: f(i, *p), dev.sync, args.runs, args.warmup)
    if args.ppl:
        import qgraph

        result["ppl"] = qgraph.evaluate(str(args.artifact), progress=not args.json)["ppl"]
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
