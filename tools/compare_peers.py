#!/usr/bin/env python
"""The scoreboard: qgraph recipes and ONNX Runtime's own quantizer, side by side, measured in one run.

Every row starts from the same fp32 artifact (out/compare/fp32/model.onnx), calibrates on the same
8 x 512 tokens from token 8,192 and is evaluated on the same 16 x 512-token windows from token 0 of
britannica-11th.txt. Latency is timed round-robin over all rows in one process (2 threads), min and
median of --runs rounds, so a busy machine slows every row alike.

The `tvm-llvm` rows are TVM builds (qgraph's llvm backend) of the qgraph fp32, w8a8 and w4a16
artifacts in the table: the same graphs, so their perplexity should match the ORT rows to 0.5 %.

qgraph rows are opened as `qgraph eval` / `bench` open them (qgraph.backends.host_int8): int8 weights stored
for the portable u8 x u8 kernel run on ORT's u8 x s8 kernel where a probe finds it exact on this host; the
row `w8a8-qsm (as stored: u8u8)` runs the same artifact on the stored kernel. ORT's own rows run as stored.

The `--int8-kernel` rows are w8a8-qsm lowered for ORT's other int8 GEMMs (qgraph.backends.int8_kernels):
`s7` (7-bit weights, exact everywhere) and `u8s8` (exact only on VNNI / ARM64 hosts; the header says
which this one is). The ORT quantize_static rows use ORT's default u8 x s8 format: they saturate on a
host without VNNI, as qgraph's u8s8 row does.

The `-norot` rows are recipe files in tools/recipes/: w4a8-rot and w4a4-rot with the rotate pass
removed, to show what the rotations buy. kv4 / kv2 quantize only the KV cache (fp32 weights).

    python tools/compare_peers.py [--out out/compare] [--runs 10] [--windows 16] [--tvm fp32,w8a8,w4a16]
                                  [--int8-kernels s7,u8s8]

`--generation` runs the generation board instead (tools/generation_peers.py): KV-cache artifacts under
onnxruntime-genai and qgraph's own loop, onnxruntime-genai's model builder int4, and llama.cpp on the
same GGUF (install it first with tools/setup_peers.sh), decode tokens/s at context 512 and perplexity:

    python tools/compare_peers.py --generation [--out out/compare-gen] [--gen-recipes fp32,w8a8-qsm,w4a16-awq,w4a16-q41,w4a8-rot]

`--vision` runs the CNN board instead (tools/bench_vision.py): qgraph w8a8-cnn against fp32 and ORT's
quantize_static on the same graphs and data, including a pretrained classifier on photos (ppocr-cls):

    python tools/compare_peers.py --vision [--models resnet18,mobilenetv2,ppocr-cls] [--batch 4] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgraph.calib.data import calibration_windows, evaluation_windows  # noqa: E402
from qgraph.eval.bench import round_robin  # noqa: E402
from qgraph.eval.host import describe_host  # noqa: E402
from qgraph.eval.perplexity import perplexity  # noqa: E402
from qgraph.ir.capture import load_tokenizer  # noqa: E402

TVM_RECIPES = ["fp32", "w8a8", "w4a16", "w4a8-smooth"]
QGRAPH_RECIPES = ["w8a8", "w8a8-smooth", "w8a8-qsm", "w4a8-qsm", "w4a8-smooth", "w4a16", "w4a16-awq", "fp8", "fp4",
                  "fp4-noreparam", "fp32-rot", "w4a8-rot", "tools/recipes/w4a8-norot.yaml", "w4a4-rot",
                  "tools/recipes/w4a4-norot.yaml", "kv4", "kv2", "tools/recipes/kv4-qk.yaml", "tools/recipes/kv2-qk.yaml",
                  "w4a8-rot-kv4", "w8a8-qllm", "w4a4-flat", "w4a4-spin"]


def qgraph_cli(*args: str) -> None:
    """Run the qgraph CLI (a separate process: its wall time includes start-up, as a user sees it)."""
    exe = shutil.which("qgraph") or str(Path(sys.executable).parent / "qgraph")
    subprocess.run([exe, *args], check=True)


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.name.startswith("model.onnx") or p.suffix == ".data" or p.name in ("model.so", "params.npz"))


def built_seconds(directory: Path, what: str, build) -> float:
    """Wall seconds of build(), which writes the artifact `directory`; reused from DIR.wall.json when both exist."""
    wall = directory.with_name(directory.name + ".wall.json")
    if not (directory / "manifest.json").exists() or not wall.exists():
        print(f"[compare] {what}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        build()
        wall.write_text(json.dumps({"seconds": time.perf_counter() - t}))
    return json.loads(wall.read_text())["seconds"]


def tvm_rows(out: Path, recipes: list[str], rows: dict[str, dict]) -> dict[str, dict]:
    """Build (or reuse) the TVM llvm artifact of each listed qgraph row; returns rows with their build seconds."""
    if not recipes:
        return {}
    try:
        from qgraph.backends.tvm.artifact import lower_onnx_artifact
    except ImportError as exc:
        raise SystemExit(f"TVM rows need pip install 'qgraph[tvm]' ({exc}); or pass --tvm ''") from None
    built = {}
    for recipe in recipes:
        source = rows.get(f"qgraph {recipe}")
        if source is None:
            raise SystemExit(f"--tvm {recipe}: the table has no 'qgraph {recipe}' row to build from; add it to --recipes")
        d = out / f"tvm-llvm-{recipe}"
        seconds = built_seconds(d, f"TVM llvm build of qgraph {recipe}",
                                lambda d=d, src=source["dir"]: lower_onnx_artifact(src, d, progress=False))
        # quant wall: the qgraph compile of the source row plus the TVM build
        built[f"tvm-llvm {recipe}"] = {"dir": d, "quant_s": source["quant_s"] + seconds}
    return built


def block_linear_nodes(fp32_onnx: Path) -> list[str]:
    import qgraph

    captured = qgraph.load(fp32_onnx, progress=False)
    from qgraph.ir.regions import find_linears

    return [layer.node.name for layer in find_linears(captured.model) if layer.role == "block"]


class CalibReader:
    """onnxruntime.quantization CalibrationDataReader over qgraph's calibration windows."""

    def __init__(self, windows: np.ndarray):
        self.rows = iter(windows)

    def get_next(self):
        row = next(self.rows, None)
        return None if row is None else {"input_ids": row[None, :]}


def ort_peers(fp32_onnx: Path, out: Path, calib: np.ndarray, block_nodes: list[str]) -> dict[str, float]:
    """Quantize with onnxruntime.quantization; returns {row name: wall seconds}."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    times: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        d = out / name
        if (d / "model.onnx").exists():
            times[name] = json.loads((d / "wall.json").read_text())["seconds"]
            return
        d.mkdir(parents=True, exist_ok=True)
        print(f"[compare] quantizing {name}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        fn(d / "model.onnx")
        times[name] = time.perf_counter() - t
        (d / "wall.json").write_text(json.dumps({"seconds": times[name]}))

    timed("ort-dynamic-int8", lambda o: quantize_dynamic(
        str(fp32_onnx), str(o), weight_type=QuantType.QInt8, use_external_data_format=True))
    timed("ort-static-qdq-perchannel", lambda o: quantize_static(
        str(fp32_onnx), str(o), CalibReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
        op_types_to_quantize=["MatMul"], calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True))
    timed("ort-static-qdq-210-layers", lambda o: quantize_static(
        str(fp32_onnx), str(o), CalibReader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
        op_types_to_quantize=["MatMul"], nodes_to_quantize=block_nodes,
        calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True))
    for block in (32, 128):
        def nbits(o, block=block):
            import onnx

            q = MatMulNBitsQuantizer(onnx.load(str(fp32_onnx)), block_size=block, is_symmetric=True)
            q.process()
            q.model.save_model_to_file(str(o), use_external_data_format=True)

        timed(f"ort-matmulnbits-b{block}", nbits)
    return times


def open_session(path: Path, threads: int):
    """An ORT session at the highest optimization level that accepts the model.

    ORT 1.32 rejects its own quantize_static output at ENABLE_ALL ("output_dtype INT8 does not
    match y_zero_point type UINT8" from its QDQ rewrites); that row then runs at the next level
    that loads, and the table says which.
    """
    import onnxruntime as ort

    from qgraph.backends.onnx_qdq import session_options

    levels = [("all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL), ("extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
              ("basic", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC), ("none", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)]
    for label, level in levels:
        opts = session_options(threads)
        opts.graph_optimization_level = level
        try:
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), label
        except Exception as exc:  # noqa: BLE001 - try the next level, report the last failure
            print(f"[compare] {path.parent.name}: ORT refuses optimization level {label}: {str(exc)[:160]}",
                  file=sys.stderr, flush=True)
    raise SystemExit(f"ONNX Runtime cannot load {path} at any optimization level")


def _int8_label(run: str) -> str:
    """'u8s8 (210 layers; ...)' -> 'u8s8 at load (210)'; rows without a switch say 'as stored'."""
    if run.startswith("u8s8 ("):
        return f"u8s8 at load ({run[6:].split(' ')[0]})"
    return run


def main() -> None:
    if "--vision" in sys.argv[1:]:  # the CNN board takes its own options (--models, --batch, --rounds, ...)
        import bench_vision

        bench_vision.main([a for a in sys.argv[1:] if a != "--vision"])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/compare")
    ap.add_argument("--runs", type=int, default=10, help="timed rounds per row (min and median reported)")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="re-quantize every row")
    ap.add_argument("--recipes", default=",".join(QGRAPH_RECIPES), help="comma-separated qgraph recipes to include")
    ap.add_argument("--generation", action="store_true", help="the generation board (KV cache, tokens/s) instead")
    ap.add_argument("--vision", action="store_true",
                    help="the CNN board instead (tools/bench_vision.py: qgraph w8a8-cnn against ORT quantize_static, "
                         "a pretrained classifier on photos included); the options after --vision go to it")
    ap.add_argument("--latency-only", action="store_true",  # --generation: perplexities from the last generation.json
                    help="time the rows only (no ORT quantizer rows, no perplexity): re-checks latency on an idle machine")
    ap.add_argument("--gen-recipes", default="fp32,w8a8-qsm,w4a16-awq,w4a16-q41,w4a8-rot", help="qgraph rows of --generation")
    ap.add_argument("--steps", type=int, default=32, help="--generation: decode steps timed per round")
    ap.add_argument("--tvm", default=",".join(TVM_RECIPES), help="qgraph rows to also build with TVM llvm ('' for none)")
    ap.add_argument("--int8-kernels", default="s7,u8s8",
                    help="extra w8a8-qsm rows lowered with these --int8-kernel choices ('' for none)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.generation:
        from generation_peers import generation_board  # tools/ is the script's directory, first on sys.path

        from qgraph.ir.capture import default_model_location

        tokenizer = load_tokenizer(*default_model_location())
        print(generation_board(out, [r for r in args.gen_recipes.split(",") if r], runs=args.runs, steps=args.steps,
                               windows=evaluation_windows(tokenizer, windows=args.windows), threads=args.threads,
                               qgraph_cli=qgraph_cli, built_seconds=built_seconds, model_bytes=model_bytes,
                               reuse_ppl=args.latency_only))
        return
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    fp32_dir = out / "fp32"
    if not (fp32_dir / "manifest.json").exists():
        qgraph_cli("compile", "--recipe", "fp32", "-o", str(fp32_dir), "-q")
    fp32_onnx = fp32_dir / "model.onnx"
    tokenizer = load_tokenizer(fp32_dir)
    eval_windows = evaluation_windows(tokenizer, windows=args.windows)
    calib = calibration_windows(tokenizer).ids

    rows: dict[str, dict] = {"qgraph fp32": {"dir": fp32_dir, "quant_s": 0.0}}
    for recipe in [r for r in args.recipes.split(",") if r]:
        name = Path(recipe).stem  # a shipped name, or a recipe file (tools/recipes: the rotation-off rows)
        if recipe.endswith(".yaml") and not Path(recipe).is_absolute():
            recipe = str(ROOT / recipe)
        d = out / f"qgraph-{name}"
        seconds = built_seconds(d, f"qgraph compile --recipe {recipe}",
                                lambda d=d, r=recipe: qgraph_cli("compile", str(fp32_onnx), "--recipe", r, "-o", str(d), "-q"))
        rows[f"qgraph {name}"] = {"dir": d, "quant_s": seconds}
    for kernel in [k for k in args.int8_kernels.split(",") if k]:
        d = out / f"qgraph-w8a8-qsm-{kernel}"
        seconds = built_seconds(d, f"qgraph compile --recipe w8a8-qsm --int8-kernel {kernel}",
                                lambda d=d, k=kernel: qgraph_cli("compile", str(fp32_onnx), "--recipe", "w8a8-qsm",
                                                                 "--int8-kernel", k, "-o", str(d), "-q"))
        rows[f"qgraph w8a8-qsm --int8-kernel {kernel}"] = {"dir": d, "quant_s": seconds}
    tvm = tvm_rows(out, [r for r in args.tvm.split(",") if r], rows)
    peers = {} if args.latency_only else ort_peers(fp32_onnx, out, calib, block_linear_nodes(fp32_onnx))
    for name, seconds in peers.items():
        rows[name] = {"dir": out / name, "quant_s": seconds}

    if "qgraph w8a8-qsm" in rows:  # the portable kernel as stored, beside the host's choice (same artifact)
        rows["qgraph w8a8-qsm (as stored: u8u8)"] = {**rows["qgraph w8a8-qsm"], "int8": "stored"}
    rows.update(tvm)
    sessions = {}
    for name, row in rows.items():
        if name in tvm:
            from qgraph.artifact import read_manifest
            from qgraph.backends.tvm.artifact import open_runner

            sessions[name] = open_runner(row["dir"], read_manifest(row["dir"]), threads=args.threads).forward
            row["ort_opt"], row["size_mb"], row["int8_run"] = "tvm llvm", model_bytes(row["dir"]) / 1e6, "tvm int32"
            continue
        if name.startswith("qgraph"):  # as qgraph eval / bench open it: the int8 kernel exact and fastest here
            from qgraph.backends.host_int8 import open_session as open_qgraph_session

            sess, row["int8_run"] = open_qgraph_session(row["dir"] / "model.onnx", args.threads, row.get("int8", "host"))
            row["ort_opt"] = "all"
        else:
            sess, row["ort_opt"] = open_session(row["dir"] / "model.onnx", args.threads)
            row["int8_run"] = "as stored"
        inp = sess.get_inputs()[0].name
        sessions[name] = (lambda ids, s=sess, i=inp: s.run(None, {i: ids})[0])
        row["size_mb"] = model_bytes(row["dir"]) / 1e6

    for name, fwd in sessions.items():
        if args.latency_only:
            rows[name]["ppl"] = float("nan")
            continue
        print(f"[compare] perplexity {name}", file=sys.stderr, flush=True)
        rows[name]["ppl"] = perplexity(fwd, eval_windows, progress=False)["ppl"]

    # Round-robin latency: each round times every row once (prefill) and 5 times (single token).
    for name, timing in round_robin(sessions, runs=args.runs, label="compare").items():
        rows[name].update(timing)

    base = rows["qgraph fp32"]
    lines = [
        f"Scoreboard: SmolLM2-135M, {eval_windows.count} x 512-token windows of britannica-11th.txt "
        f"({eval_windows.scored_predictions} predictions), {args.threads} threads, {args.runs} round-robin rounds "
        "(decode = one token, no KV cache).",
        "",
        f"Host: {describe_host()}.",
        "",
        "| row | ppl | size MB | prefill ms min / med | prefill x fp32 | decode ms min / med | decode x fp32 "
        "| quant wall s | runtime (ORT opt level) | int8 GEMMs at run time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {r['size_mb']:.1f} | {r['prefill_min']:.0f} / {r['prefill_med']:.0f} | "
            f"{base['prefill_min'] / r['prefill_min']:.2f} | {r['decode_min']:.1f} / {r['decode_med']:.1f} | "
            f"{base['decode_min'] / r['decode_min']:.2f} | {r['quant_s']:.1f} | {r['ort_opt']} | "
            f"{_int8_label(r['int8_run'])} |"
        )
    table = "\n".join(lines)
    print(table)
    stem = "latency" if args.latency_only else "scoreboard"  # a latency re-check keeps the full board's files
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(
        {"host": describe_host(), "rows": {n: {k: v for k, v in r.items() if k != "dir"} for n, r in rows.items()}},
        indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
