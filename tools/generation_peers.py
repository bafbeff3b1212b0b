"""Generation with a KV cache: qgraph artifacts against llama.cpp and onnxruntime-genai's model builder.

Run from tools/compare_peers.py --generation. Every row generates on the same machine in the same
process; timing is round-robin (each round times every row once: a 512-token prefill, then --steps
single-token decode steps with the cache), so a busy machine slows every row alike. Perplexity is over
the same 16 x 512-token britannica windows as the main scoreboard, on each row's own runtime:

- qgraph rows: `qgraph compile --kv-cache --format genai` artifacts from the same fp32 KV-cache graph.
  Timed twice: under onnxruntime-genai (og.Generator, the runtime a user deploys) and with qgraph's own
  loop (`qgraph generate`: numpy feeds, one ORT session). Perplexity from the prompt pass (past 0).
- ort-genai-builder int4: `python -m onnxruntime_genai.models.builder -p int4 -e cpu
  --extra_options int4_accuracy_level=4` on the same weights (the GGUF dequantized by transformers,
  saved as a Hugging Face checkpoint). Perplexity from its ONNX graph in ONNX Runtime.
- llama.cpp (llama-cpp-python, `tools/setup_peers.sh`): the shipped SmolLM2 Q4_1 GGUF, and Q8_0 / Q4_0
  made from it by llama.cpp's own quantizer (allow_requantize: the only weights shipped are Q4_1, which
  every row here, qgraph's fp32 included, starts from). Perplexity from the bindings' logits (logits_all).
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ONNX_THREADS = 2
CONTEXT = 512  # prompt tokens before the timed decode steps
VOCAB = 49152  # SmolLM2's: the random prompts' id range


def hf_checkpoint(out: Path) -> Path:
    """The default model's weights (the GGUF dequantized by transformers) as a Hugging Face directory."""
    d = out / "hf-fp32"
    if (d / "config.json").exists():
        return d
    import qgraph

    captured = qgraph.load(progress=False, export=False)
    net = captured.torch_module.net
    config = copy.deepcopy(net.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # transformers refuses to save a model it marks as GGUF-quantized
    plain = type(net)(config)
    plain.load_state_dict(net.state_dict())
    plain.save_pretrained(d)
    captured.tokenizer.save_pretrained(d)
    return d


def set_threads(folder: Path, threads: int) -> None:
    """Pin onnxruntime-genai's intra-op threads in a folder's genai_config.json."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(config, indent=2))


def genai_builder(out: Path, threads: int) -> Path:
    d = out / "ort-genai-builder-int4"
    if not (d / "genai_config.json").exists():
        src = hf_checkpoint(out)
        subprocess_run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(d),
                        "-p", "int4", "-e", "cpu", "-c", str(out / "builder-cache"),
                        "--extra_options", "int4_accuracy_level=4"])
    set_threads(d, threads)
    return d


def subprocess_run(cmd: list[str]) -> None:
    import subprocess

    print(f"[generation] {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


class OgRow:
    """An onnxruntime-genai folder, generating with og.Generator."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og, self.folder = og, folder
        self.model = og.Model(str(folder))

    def time(self, prompt: list[int], steps: int) -> tuple[float, float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False)
        gen = og.Generator(self.model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt)  # the prompt pass (onnxruntime-genai runs it here)
        prefill = time.perf_counter() - t
        gen.generate_next_token()  # first token from the prompt's logits
        t = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        return prefill * 1e3, steps / (time.perf_counter() - t)


class QgraphLoopRow:
    """A qgraph KV-cache artifact generating with qgraph's own loop (qgraph.generate's Decoder)."""

    def __init__(self, folder: Path, threads: int):
        from qgraph.generate import open_decoder

        self.decoder, _ = open_decoder(folder, threads=threads)

    def time(self, prompt: list[int], steps: int) -> tuple[float, float]:
        from qgraph.eval.bench import decode_rate

        del prompt  # decode_rate draws its own prompt of the same length from a seed
        return decode_rate(self.decoder, CONTEXT, steps, vocab=VOCAB)


class LlamaCppRow:
    """A GGUF in llama.cpp through llama-cpp-python."""

    def __init__(self, path: Path, threads: int, ctx: int = 2048):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def time(self, prompt: list[int], steps: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
        return prefill * 1e3, steps / (time.perf_counter() - t)


def llama_cpp_perplexity(path: Path, windows, threads: int) -> float:
    """Perplexity of a GGUF over token windows, from llama.cpp's logits for every position."""
    from llama_cpp import Llama

    from qgraph.eval.perplexity import perplexity

    llm = Llama(model_path=str(path), n_ctx=windows.ctx, n_batch=windows.ctx, n_ubatch=windows.ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)

    def forward(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval(ids[0].tolist())
        return np.asarray(llm.scores[: ids.shape[1]], dtype=np.float32)[None]

    return perplexity(forward, windows, progress=False)["ppl"]


def requantize(src: Path, dst: Path, ftype: str) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize), from the shipped Q4_1 weights."""
    if dst.exists():
        return dst
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = ONNX_THREADS
    code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize {ftype} failed with {code}")
    return dst


def builder_perplexity(folder: Path, windows, threads: int) -> float:
    """The builder's graph in ONNX Runtime, prompt pass with an empty past (its cache dims from genai_config)."""
    import onnxruntime as ort

    from qgraph.eval.perplexity import perplexity

    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / config["filename"]), opts, providers=["CPUExecutionProvider"])

    def forward(ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for v in session.get_inputs():
            if v.name.startswith("past_key_values"):
                feeds[v.name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
        return session.run(["logits"], feeds)[0]

    return perplexity(forward, windows, progress=False)["ppl"]



def generation_board(out: Path, recipes: list[str], *, runs: int, steps: int, windows, threads: int,
                     qgraph_cli, built_seconds, model_bytes, reuse_ppl: bool = False) -> str:
    """Build every row, measure perplexity, time them round-robin; the markdown table.

    reuse_ppl: take each row's perplexity from the previous run's generation.json (same artifacts, same
    windows) and only re-time: a latency re-check on a quieter machine.
    """
    from qgraph.eval.host import describe_host
    from qgraph.eval.perplexity import perplexity
    from qgraph.ir.capture import default_model_location

    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / "qgraph-fp32-kv"
    built_seconds(fp32, "qgraph compile --recipe fp32 --format genai",
                  lambda: qgraph_cli("compile", "--recipe", "fp32", "--format", "genai", "-o", str(fp32), "-q"))
    rows: dict[str, dict] = {}
    for recipe in recipes:
        d = out / f"qgraph-{recipe}-kv"
        if recipe != "fp32":
            built_seconds(d, f"qgraph compile --recipe {recipe} --format genai",
                          lambda d=d, r=recipe: qgraph_cli("compile", str(fp32 / "model.onnx"), "--recipe", r,
                                                           "--format", "genai", "-o", str(d), "-q"))
        set_threads(d, threads)
        rows[f"qgraph {recipe} (onnxruntime-genai)"] = {"dir": d, "make": lambda d=d: OgRow(d)}
        rows[f"qgraph {recipe} (qgraph generate)"] = {"dir": d, "make": lambda d=d: QgraphLoopRow(d, threads)}
    builder = genai_builder(out, threads)
    rows["ort-genai-builder int4 (acc. level 4)"] = {"dir": builder, "make": lambda: OgRow(builder)}
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
        print("[generation] llama-cpp-python is not installed (tools/setup_peers.sh): no llama.cpp rows", file=sys.stderr)
    if have_llama:
        directory, name = default_model_location()
        q41 = out / "llama.cpp" / name
        if not q41.exists():
            q41.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(directory / name, q41)
        for ftype, path in (("Q4_1", q41), ("Q8_0", requantize(q41, q41.with_name("SmolLM2-135M.Q8_0.gguf"), "Q8_0")),
                            ("Q4_0", requantize(q41, q41.with_name("SmolLM2-135M.Q4_0.gguf"), "Q4_0"))):
            rows[f"llama.cpp {ftype}"] = {"file": path, "make": lambda p=path: LlamaCppRow(p, threads)}

    previous = {}
    if reuse_ppl and (out / "generation.json").exists():
        previous = json.loads((out / "generation.json").read_text())["rows"]
    for name, row in rows.items():
        if name in previous:
            row["ppl"], row["size_mb"] = previous[name]["ppl"], previous[name]["size_mb"]
            continue
        print(f"[generation] perplexity {name}", file=sys.stderr, flush=True)
        if "file" in row:
            row["ppl"], row["size_mb"] = llama_cpp_perplexity(row["file"], windows, threads), row["file"].stat().st_size / 1e6
        elif name.startswith("ort-genai-builder"):
            row["ppl"], row["size_mb"] = builder_perplexity(row["dir"], windows, threads), model_bytes(row["dir"]) / 1e6
        else:
            twin = next((r for n, r in rows.items() if r.get("dir") == row["dir"] and "ppl" in r), None)
            if twin is None:
                import qgraph

                row["ppl"] = perplexity(qgraph.open_runner(row["dir"], threads=threads).forward, windows, progress=False)["ppl"]
            else:
                row["ppl"] = twin["ppl"]
            row["size_mb"] = model_bytes(row["dir"]) / 1e6

    runners = {name: row["make"]() for name, row in rows.items()}
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=CONTEXT).tolist()
    for r in runners.values():
        r.time(prompt[:64], 4)  # warm-up
    pre: dict[str, list[float]] = {n: [] for n in runners}
    dec: dict[str, list[float]] = {n: [] for n in runners}
    for i in range(runs):
        print(f"[generation] round {i + 1}/{runs}", file=sys.stderr, flush=True)
        for name, r in runners.items():
            p, d = r.time(prompt, steps)
            pre[name].append(p)
            dec[name].append(d)
    base = next(n for n in runners if n.startswith("llama.cpp Q4_1")) if have_llama else None
    lines = [f"Generation: SmolLM2-135M, {threads} threads, prompt {CONTEXT} tokens then {steps} decode steps with the "
             f"KV cache, {runs} round-robin rounds; perplexity over {windows.count} x {windows.ctx}-token windows "
             "of britannica-11th.txt.", "", f"Host: {describe_host()}.", "",
             "| row | ppl | size MB | prefill 512 ms (med) | decode tok/s at ctx 512 (med / max) | decode x llama.cpp Q4_1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in runners:
        rate = statistics.median(dec[name])
        ratio = f"{rate / statistics.median(dec[base]):.2f}" if base else "-"
        lines.append(f"| {name} | {rows[name]['ppl']:.2f} | {rows[name]['size_mb']:.1f} | {statistics.median(pre[name]):.0f} | "
                     f"{rate:.1f} / {max(dec[name]):.1f} | {ratio} |")
    table = "\n".join(lines)
    (out / "generation.md").write_text(table + "\n")
    (out / "generation.json").write_text(json.dumps(
        {"host": describe_host(), "rows": {n: {"ppl": rows[n]["ppl"], "size_mb": rows[n]["size_mb"], "prefill_ms": pre[n],
                                               "decode_tokens_per_s": dec[n]} for n in runners}}, indent=2))
    return table
