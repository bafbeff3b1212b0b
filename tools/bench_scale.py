#!/usr/bin/env python
"""Streaming compile at scale: a 1.5 B-parameter Llama (random weights, models/scale_llama.py) and its depth
family (0.25x, 0.5x, 1x layers), compiled block by block with each recipe.

Each compile runs as its own `qgraph compile MODEL --stream` process, so its peak resident memory
(the kernel's ru_maxrss for that child, from os.wait4) and wall time are its own. Time against layer
count is fitted with a line: `seconds_per_layer` is the slope, `r2` how straight the line is. The
models are built (seeded, safetensors shards, once) when missing. Prints the CPU it ran on to stderr,
then one JSON line. Each run also fits its own blocks' finishing times against block index
(`within_run_r2`): the depth curve of one compile, fixed costs (capture, head, save) left out;
`pass_seconds` splits the time by pass.



    python tools/bench_scale.py --json [--recipes w4a16-awq,w8a8-qsm --depths 0.25x,0.5x,1x --calib-windows 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from qgraph.eval.host import describe_host  # noqa: E402


def compile_once(model: Path, recipe: str, out: Path, calib_windows: int, ctx: int) -> dict:
    """One `qgraph compile --stream` in a child process: wall seconds, the child's peak RSS, its report."""
    cmd = [sys.executable, "-m", "qgraph.cli", "compile", str(model), "-r", recipe, "-o", str(out), "--stream", "-q",
           "--calib-windows", str(calib_windows), "--ctx", str(ctx)]
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t
    stderr = child.stderr.read().decode(errors="replace")
    child.stdout.close()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compile failed ({' '.join(cmd)}):\n{stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "report": report}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x: (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return a, b, 1.0 - ss_res / ss_tot if ss_tot else 1.0


def main() -> None:
    import scale_llama

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="w4a16-awq,w8a8-qsm")
    ap.add_argument("--depths", default="0.25x,0.5x,1x")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--root", type=Path, default=None, help="Where the 1x model is (built there when missing).")
    ap.add_argument("--out", type=Path, default=None, help="Keep the artifacts here (default: a temporary folder).")
    ap.add_argument("--json", action="store_true", help="Print one JSON line (the default prints it too).")
    args = ap.parse_args()
    print(describe_host(), file=sys.stderr)
    family = scale_llama.family(args.root) if args.root else scale_llama.family()
    depths = [d for d in args.depths.split(",") if d]
    unknown = [d for d in depths if d not in family]
    if unknown:
        raise SystemExit(f"unknown depth {unknown[0]!r}: choose from {', '.join(family)}")
    out_root = args.out or Path(tempfile.mkdtemp(prefix="qgraph-scale."))
    models = {}
    for depth in depths:
        folder = family[depth]
        config = json.loads((folder / "config.json").read_text())
        models[depth] = {"path": str(folder), "layers": config["num_hidden_layers"],
                         "params": scale_llama.param_count(config), "fp32_bytes": scale_llama.fp32_bytes(folder)}
    result: dict = {"host": describe_host(), "models": models, "calib_windows": args.calib_windows, "ctx": args.ctx,
                    "recipes": {}}
    try:
        for recipe in [r for r in args.recipes.split(",") if r]:
            runs = {}
            for depth in depths:
                out = out_root / f"{recipe}-{depth}"
                print(f"compiling {depth} ({models[depth]['layers']} layers) with {recipe} ...", file=sys.stderr)
                run = compile_once(Path(models[depth]["path"]), recipe, out, args.calib_windows, args.ctx)
                streaming = run["report"]["streaming"]
                runs[depth] = {
                    "layers": models[depth]["layers"],
                    "seconds": run["seconds"],
                    "peak_rss_bytes": run["peak_rss_bytes"],
                    "rss_over_fp32": round(run["peak_rss_bytes"] / models[depth]["fp32_bytes"], 3),
                    "seconds_per_block": streaming["seconds_per_block"],
                    "capture_seconds": run["report"]["timings_s"].get("capture"),
                    "save_seconds": run["report"]["timings_s"].get("save"),
                    "artifact_bytes": run["report"]["sizes_bytes"]["model_files"],
                    "quantized_layers": run["report"]["quantized_layers"],
                    # Where the time went: each recipe pass summed over the parts.
                    "pass_seconds": {p["pass"]: p["seconds"] for p in run["report"]["passes"] if p["seconds"] >= 0.5},
                }
                # Within the run: the time to finish block i against i (one model, no fixed costs mixed in).
                blocks = [p["seconds"] for p in streaming["parts"] if p["part"] not in ("prologue", "epilogue")]
                if len(blocks) >= 3:
                    done = [sum(blocks[:i + 1]) for i in range(len(blocks))]
                    _, slope, r2 = fit_line(list(range(1, len(blocks) + 1)), done)
                    runs[depth].update(block_seconds_min_max=[min(blocks), max(blocks)],
                                       within_run_seconds_per_layer=round(slope, 2), within_run_r2=round(r2, 4))
                print(json.dumps({recipe: {depth: runs[depth]}}), file=sys.stderr)
                if args.out is None:
                    shutil.rmtree(out, ignore_errors=True)
            entry: dict = {"depths": runs}
            if len(runs) >= 2:
                intercept, slope, r2 = fit_line([r["layers"] for r in runs.values()], [r["seconds"] for r in runs.values()])
                entry.update(seconds_per_layer=round(slope, 2), fixed_seconds=round(intercept, 1), r2=round(r2, 4))
            result["recipes"][recipe] = entry
    finally:
        if args.out is None:
            shutil.rmtree(out_root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
