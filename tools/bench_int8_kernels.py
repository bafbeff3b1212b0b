#!/usr/bin/env python
"""The int8 kernel choices on this CPU: exactness of a saturating layer, SmolLM2 perplexity and latency.

For each --int8-kernel (u8u8, s7, u8s8) it compiles w8a8-qsm (or --recipe) from the fp32 artifact, checks
one lone QDQ linear whose activation codes sit at the grid's ends against the exact int32 product, and
times every artifact round-robin with the fp32 one in one process (2 threads, min and median of --runs).

    python tools/bench_int8_kernels.py [--out out/int8-kernels] [--fp32 out/compare/fp32] [--runs 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgraph.backends.int8_kernels import KERNELS, host_verdict  # noqa: E402
from qgraph.backends.onnx_qdq import session_from_file  # noqa: E402
from qgraph.eval.bench import round_robin  # noqa: E402
from qgraph.eval.host import cpu_info, describe_host  # noqa: E402


def lone_layer_error(kernel: str) -> float:
    """Max relative error of ORT's fused int8 layer vs the exact int32 product (codes at the grid ends)."""
    from qgraph.eval.int8_exactness import max_rel_error
    from qgraph.ir.qspec import QuantSpec

    with tempfile.TemporaryDirectory() as d:
        return max_rel_error(kernel, QuantSpec("uint8", "tensor", symmetric=False), Path(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/int8-kernels")
    ap.add_argument("--fp32", default="out/compare/fp32", help="fp32 artifact to compile from (built if missing)")
    ap.add_argument("--recipe", default="w8a8-qsm")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows (0: skip perplexity)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "qgraph")
    fp32, out = Path(args.fp32), Path(args.out)
    if not (fp32 / "manifest.json").exists():
        subprocess.run([exe, "compile", "--recipe", "fp32", "-o", str(fp32), "-q"], check=True)
    rows = {"fp32": {"dir": fp32}}
    for kernel in KERNELS:
        d = out / f"{args.recipe}-{kernel}"
        if not (d / "manifest.json").exists():
            print(f"[int8-kernels] compiling {args.recipe} --int8-kernel {kernel}", file=sys.stderr, flush=True)
            subprocess.run([exe, "compile", str(fp32 / "model.onnx"), "--recipe", args.recipe, "--int8-kernel", kernel,
                            "-o", str(d), "-q"], check=True)
        rows[kernel] = {"dir": d, "lone_layer_rel_err": lone_layer_error(kernel),
                        "verdict": host_verdict(KERNELS[kernel], cpu_info()["int8_dot"])}
    if args.windows:
        for name, row in rows.items():
            print(f"[int8-kernels] perplexity {name}", file=sys.stderr, flush=True)
            r = subprocess.run([exe, "eval", str(row["dir"]), "--windows", str(args.windows), "--json"], check=True,
                               capture_output=True, text=True)
            row["ppl"] = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    sessions = {}
    for name, row in rows.items():
        sess = session_from_file(row["dir"] / "model.onnx", threads=args.threads)
        sessions[name] = lambda ids, s=sess: s.run(None, {"input_ids": ids})[0]
    for name, timing in round_robin(sessions, runs=args.runs, label="int8-kernels").items():
        rows[name].update(timing)
    base = rows["fp32"]
    if args.json:
        print(json.dumps({"host": cpu_info(), "recipe": args.recipe,
                          "rows": {n: {k: (str(v) if k == "dir" else v) for k, v in r.items()} for n, r in rows.items()}}))
        return
    lines = [f"int8 kernels, {args.recipe} on SmolLM2-135M; host: {describe_host()}; {args.threads} threads, "
             f"{args.runs} round-robin rounds", "",
             "| kernel | lone-layer max rel err | on this host | ppl | prefill ms min / med | prefill x fp32 "
             "| decode ms min / med | decode x fp32 |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        err = f"{r['lone_layer_rel_err']:.1e}" if "lone_layer_rel_err" in r else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        lines.append(f"| {name} | {err} | {r.get('verdict', 'float')} | {ppl} | {r['prefill_min']:.0f} / "
                     f"{r['prefill_med']:.0f} | {base['prefill_min'] / r['prefill_min']:.2f} | {r['decode_min']:.1f} / "
                     f"{r['decode_med']:.1f} | {base['decode_min'] / r['decode_min']:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
