"""Hostile inputs: every bad option, file, graph, weight, text or output path gets one line and the right exit code.

User errors exit 2 with one line naming the thing and the fix; internal errors exit 1 with one line pointing at
--debug; Ctrl-C exits 130 and leaves no partial artifact. Graphs qgraph can compile (control flow, weights fed at
run time, shared initializers) compile, run in ONNX Runtime and report what stayed in float. The README's
troubleshooting table quotes the fragments asserted here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import typer
from onnx import TensorProto, helper, numpy_helper

import qgraph
from qgraph import cli
from qgraph.backends.onnx_qdq import session_from_file
from qgraph.calib.data import TokenWindows, calibration_windows
from qgraph.errors import QGraphError
from qgraph.ir.capture import EncoderHidden
from qgraph.recipes import available
from tests.conftest import tiny_bert, tiny_llama, word_tokenizer, write_text


@pytest.fixture
def run(capsys, monkeypatch):
    """`qgraph ARGS` in this process: (exit code, stderr lines), QGRAPH_DEBUG set to `debug` (--debug sets it to 1)."""

    def call(*args, debug="0"):
        monkeypatch.setenv("QGRAPH_DEBUG", debug)  # restored after the test
        code = 0
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.strip()]

    return call


def one_line(result, code, *fragments):
    got, lines = result
    assert got == code, (got, lines[-20:])
    assert len(lines) == 1, lines
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def save_llama(directory, edit=None):
    """The tiny Llama as a Hugging Face directory, after edit(module) changed its weights in place."""
    module = tiny_llama()
    if edit is not None:
        with torch.no_grad():
            edit(module)
    module.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


def assert_nothing_left(parent, name):
    """No artifact, no temporary sibling .NAME.*, no write probe."""
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith((f".{name}.", ".qgraph-"))]


# --- the command line: usage errors and internal errors ----------------------------------------------------


COMMANDS = sorted(typer.main.get_command(cli.app).commands)


@pytest.mark.parametrize("command", COMMANDS)
def test_mistyped_option_is_one_line_on_every_subcommand(run, command):
    one_line(run(command, "--no-such-option"), 2,
             f"qgraph: error: no such option --no-such-option for 'qgraph {command}'", f"see qgraph {command} --help")


@pytest.mark.parametrize("command", [c for c in COMMANDS if any(
    p.required for p in typer.main.get_command(cli.app).commands[c].params)])
def test_missing_argument_is_one_line(run, command):
    one_line(run(command), 2, "qgraph: error: missing", f"for 'qgraph {command}' -- see qgraph {command} --help")


def test_other_usage_errors_are_one_line(run):
    one_line(run("compile", "-o", "x", "--recipe"), 2,
             "option '--recipe' requires an argument for 'qgraph compile'")
    one_line(run("eval", "--windws", "3"), 2, "no such option --windws (did you mean --windows?) for 'qgraph eval'")
    one_line(run("compile", "-o", "x", "--calib-windows", "many"), 2, "invalid value for '--calib-windows'")
    one_line(run("inspect", "a", "b"), 2, "got unexpected extra argument(s) (b) for 'qgraph inspect'")
    one_line(run("compil"), 2, "no such command 'compil' (did you mean 'compile'?) for 'qgraph' -- see qgraph --help")


def test_usage_error_from_the_real_entry_point():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", "qgraph.cli", "compile", "--no-such-option"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "qgraph: error: no such option --no-such-option for 'qgraph compile' -- see qgraph compile --help"]


def test_internal_error_is_one_line_with_a_debug_pointer(run, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(qgraph, "bench", broken)
    expected = "qgraph: internal error: RuntimeError: kernel exploded -- rerun with --debug for the traceback"
    assert one_line(run("bench", "x"), 1) == expected
    for args in (("--debug", "bench", "x"), ("bench", "x", "--debug")):  # --debug anywhere
        code, lines = run(*args)
        assert code == 1 and lines[0].startswith("Traceback") and lines[-1] == expected
    code, lines = run("bench", "x", debug="1")
    assert code == 1 and lines[0].startswith("Traceback")


# --- damaged ONNX files -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, llama_captured):
    return qgraph.compile(llama_captured, "fp32", progress=False).save(
        tmp_path_factory.mktemp("hostile") / "fp32", progress=False) / "model.onnx"


def _every_reader(run, model, tmp_path, text):
    """compile, eval, bench and inspect of one model file: (exit code, lines) each."""
    return [run("compile", model, "-r", "fp32", "-o", tmp_path / "out", "-q"),
            run("eval", model, "--text", text, "--ctx", "16", "--windows", "1", "--json"),
            run("bench", model, "--runs", "1", "--json"),
            run("inspect", model, "--json")]


def test_corrupt_and_truncated_onnx(run, tmp_path, fp32_onnx, text_file):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 40)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(fp32_onnx.read_bytes()[:20000])
    for bad in (garbage, cut):
        compile_, eval_, bench, inspect = _every_reader(run, bad, tmp_path, text_file)
        one_line(compile_, 2, f"cannot read ONNX file '{bad}'", "re-export the model")
        one_line(inspect, 2, f"cannot read ONNX file '{bad}'")
        one_line(eval_, 2, f"ONNX Runtime cannot load '{bad}'", "re-export or recompile the model")
        one_line(bench, 2, f"ONNX Runtime cannot load '{bad}'")
    assert_nothing_left(tmp_path, "out")


def test_missing_or_truncated_external_data(run, tmp_path, fp32_onnx, text_file):
    model = tmp_path / "ext" / "model.onnx"
    model.parent.mkdir()
    ir.save(ir.load(fp32_onnx), model, external_data="model.onnx.data")
    data = model.parent / "model.onnx.data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    for result in _every_reader(run, model, tmp_path, text_file):
        one_line(result, 2, f"cannot read ONNX file '{model}': its external data file '{data}' is truncated: "
                            f"{size // 2} bytes, initializer", "put the complete .data file beside the .onnx file")
    data.unlink()
    for result in _every_reader(run, model, tmp_path, text_file):
        one_line(result, 2, f"its external data file '{data}' (initializer", "is missing")
    assert_nothing_left(tmp_path, "out")


# --- graphs: unknown domains, control flow, weights fed at run time, shared initializers ---------------------

VOCAB, WIDTH = 64, 32


def token_graph(kind: str) -> onnx.ModelProto:
    """input_ids -> Gather(emb) -> [custom op] -> MatMul(w1) 'layers.0.fc1' -> Relu -> [kind] -> MatMul(head) -> logits.

    kind: plain, unknown_domain, dynamic_weight (w1 a graph input), overridable_weight (w1 an initializer that is
    also an input), shared (w1 read again by 'layers.0.fc2'), copied (fc2 reads its own copy of w1), if (the
    branches' MatMuls read w_then and w1), loop (a MatMul in a Loop body, two iterations).
    """
    rng = np.random.default_rng(0)

    def weight(name, *shape, gain=0.3):
        return numpy_helper.from_array(rng.normal(0, gain, shape).astype(np.float32), name)

    inits = [weight("emb", VOCAB, WIDTH), weight("w1", WIDTH, WIDTH), weight("head", WIDTH, VOCAB)]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "T"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "T", VOCAB])]
    opsets = [helper.make_opsetid("", 21)]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed")]
    x = "h"
    if kind == "unknown_domain":
        nodes.append(helper.make_node("Foo", ["h"], ["h2"], name="custom", domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
        x = "h2"
    if kind == "dynamic_weight":
        inits = [i for i in inits if i.name != "w1"]
    if kind in ("dynamic_weight", "overridable_weight"):
        inputs.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [WIDTH, WIDTH]))
    nodes += [helper.make_node("MatMul", [x, "w1"], ["a"], name="layers.0.fc1"),
              helper.make_node("Relu", ["a"], ["r"], name="act")]
    y = "r"
    if kind in ("shared", "copied"):
        if kind == "copied":
            inits.append(numpy_helper.from_array(numpy_helper.to_array(inits[1]).copy(), "w1_copy"))
        nodes.append(helper.make_node("MatMul", ["r", "w1" if kind == "shared" else "w1_copy"], ["b"], name="layers.0.fc2"))
        y = "b"
    if kind == "if":  # then when the token ids sum to more than zero
        inits.append(weight("w_then", WIDTH, WIDTH))
        zero = numpy_helper.from_array(np.array(0, np.int64))
        nodes += [helper.make_node("ReduceSum", ["input_ids"], ["total"], keepdims=0, name="sum"),
                  helper.make_node("Constant", [], ["zero"], value=zero, name="zero"),
                  helper.make_node("Greater", ["total", "zero"], ["cond"], name="positive")]
        branch = {}
        for side, w in (("then", "w_then"), ("else", "w1")):
            branch[f"{side}_branch"] = helper.make_graph(
                [helper.make_node("MatMul", ["r", w], [f"{side}_out"], name=f"layers.0.{side}_fc")], side, [],
                [helper.make_tensor_value_info(f"{side}_out", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["cond"], ["b"], name="branch", **branch))
        y = "b"
    if kind == "loop":
        inits.append(weight("w_loop", WIDTH, WIDTH, gain=0.15))
        trips = numpy_helper.from_array(np.array(2, np.int64))
        body = helper.make_graph(
            [helper.make_node("MatMul", ["s_in", "w_loop"], ["m"], name="layers.0.loop_fc"),
             helper.make_node("Tanh", ["m"], ["s_out"], name="loop_tanh"),
             helper.make_node("Identity", ["c_in"], ["c_out"], name="loop_cond")],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("s_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
        nodes += [helper.make_node("Constant", [], ["trips"], value=trips, name="trips"),
                  helper.make_node("Loop", ["trips", "", "r"], ["b"], body=body, name="repeat")]
        y = "b"
    nodes.append(helper.make_node("MatMul", [y, "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(nodes, kind, inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


CALIB = TokenWindows(np.random.default_rng(1).integers(1, VOCAB, (4, 16)).astype(np.int64), 0, "random tokens")


def compile_graph(tmp_path, kind: str, recipe: str):
    """Save token_graph(kind), compile it with `recipe` on random calibration tokens: (source, artifact, report)."""
    source = tmp_path / f"{kind}.onnx"
    onnx.save(token_graph(kind), source)
    compiled = qgraph.compile(qgraph.load(source, progress=False), recipe, calib=CALIB, progress=False)
    out = compiled.save(tmp_path / f"{kind}-{recipe}", progress=False)
    return source, out / "model.onnx", compiled.report


def run_onnx(path, **feeds):
    return session_from_file(path).run(None, feeds)[0]


def relative_error(y, ref):
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_unknown_op_domain_is_refused(run, tmp_path):
    source = tmp_path / "custom.onnx"
    onnx.save(token_graph("unknown_domain"), source)
    one_line(run("compile", source, "-r", "fp32", "-o", tmp_path / "out"), 2,
             "node 'custom' is com.example::Foo, an op domain ONNX Runtime does not know",
             "export the model with standard ONNX ops")
    assert_nothing_left(tmp_path, "out")


@pytest.mark.parametrize("recipe,bound", [("w8a8", 0.03), ("w4a16", 0.15)])
@pytest.mark.parametrize("kind,bodies", [("if", ["then_branch of If 'branch'", "else_branch of If 'branch'"]),
                                         ("loop", ["body of Loop 'repeat'"])])
def test_control_flow_compiles_with_bodies_left_in_float(tmp_path, kind, bodies, recipe, bound):
    source, artifact, report = compile_graph(tmp_path, kind, recipe)
    assert report["quantized_layers"] == 1  # layers.0.fc1; lm_head stays float
    reasons = " ".join(n["reason"] for n in report["not_quantized"])
    for body in bodies:
        assert f"inside the {body}: qgraph quantizes linears of the main graph only" in reasons
    ids = CALIB.ids[:1]
    for feed in (ids, np.zeros_like(ids)):  # all-zero ids take the If's else branch, which reads w1 in float
        ref = run_onnx(source, input_ids=feed)
        assert relative_error(run_onnx(artifact, input_ids=feed), ref) < bound


def test_weight_fed_at_run_time_is_left_in_float_or_refused(tmp_path):
    source, artifact, report = compile_graph(tmp_path, "dynamic_weight", "w4a16")  # no calibration: compiles
    assert report["not_quantized"] == [
        {"node": "layers.0.fc1", "reason": "its weight 'w1' is a graph input (fed at run time), not a constant"}]
    w1 = np.random.default_rng(2).normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32)
    ids = CALIB.ids[:1]
    np.testing.assert_allclose(run_onnx(artifact, input_ids=ids, w1=w1), run_onnx(source, input_ids=ids, w1=w1),
                               rtol=1e-5, atol=1e-5)  # nothing else to quantize: lm_head stays float
    with pytest.raises(QGraphError) as exc:
        compile_graph(tmp_path, "dynamic_weight", "w8a8")
    assert str(exc.value) == ("graph input 'w1' has no value, and calibration feeds only the token ids "
                              "('input_ids') -- store it as initializers (default values), or use a recipe "
                              "without calibration (fp32, w4a16)")


def test_initializer_that_is_also_an_input_stays_overridable(tmp_path):
    source, artifact, report = compile_graph(tmp_path, "overridable_weight", "w8a8")
    assert report["quantized_layers"] == 0 and report["not_quantized"][0]["node"] == "layers.0.fc1"
    ids = CALIB.ids[:1]
    w1 = np.random.default_rng(3).normal(0, 0.3, (WIDTH, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(artifact, input_ids=ids, w1=w1), run_onnx(source, input_ids=ids, w1=w1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "w8a8-qsm"])
def test_shared_initializer_is_quantized_correctly_for_both_readers(tmp_path, recipe):
    _, shared, report = compile_graph(tmp_path, "shared", recipe)
    source, copied, _ = compile_graph(tmp_path, "copied", recipe)
    assert report["quantized_layers"] == 2
    ids = CALIB.ids[:1]
    y = run_onnx(shared, input_ids=ids)
    np.testing.assert_array_equal(y, run_onnx(copied, input_ids=ids))  # as if each MatMul had its own copy
    assert relative_error(y, run_onnx(source, input_ids=ids)) < 0.15


# --- weights: non-finite, all-zero, constant channels -------------------------------------------------------


def test_nan_or_inf_weights_are_refused_naming_the_initializer(run, tmp_path):
    def nan_in_down_proj(m):
        m.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")

    def inf_in_norm(m):
        m.model.layers[0].post_attention_layernorm.weight[2] = float("inf")

    nan_dir = save_llama(tmp_path / "nan", nan_in_down_proj)
    one_line(run("compile", nan_dir, "-r", "w8a8", "-o", tmp_path / "out", "-q"), 2,
             "(the weight of linear 'model.layers.1.mlp.down_proj') has 1 NaN and 0 infinite values (first at index",
             "fix the source model's weights")
    inf_dir = save_llama(tmp_path / "inf", inf_in_norm)
    one_line(run("compile", inf_dir, "-r", "fp32", "-o", tmp_path / "out", "-q"), 2,
             "initializer 'net.model.layers.0.post_attention_layernorm.weight' (the scale of norm "
             "'model.layers.0.post_attention_layernorm') has 0 NaN and 1 infinite values (first at index (2,))")
    assert_nothing_left(tmp_path, "out")


def _non_finite_initializers(artifact) -> list[str]:
    """Names of the artifact's float-valued initializers (float32 / float8 / float4 scales and weights) with NaN or Inf."""
    bad = []
    for name, value in ir.load(artifact / "model.onnx").graph.initializers.items():
        array = value.const_value.numpy()
        if array.dtype.kind in "iub":
            continue
        if not np.isfinite(array.astype(np.float32)).all():
            bad.append(name)
    return bad


@pytest.fixture(scope="module")
def dead_llama(tmp_path_factory, text_file):
    """The tiny Llama with all-zero weight rows and columns, a zeroed norm channel and an all-zero v_proj."""

    def kill(m):
        l0, l1 = m.model.layers
        l0.self_attn.q_proj.weight[3] = 0  # an output channel
        l0.self_attn.q_proj.weight[:, 5] = 0  # an input channel
        l0.input_layernorm.weight[7] = 0  # q/k/v read an all-zero activation channel
        l0.mlp.up_proj.weight[11] = 0  # down_proj reads an all-zero gated channel
        l0.mlp.down_proj.weight[:, 13] = 0
        l0.mlp.down_proj.weight[2] = 0
        l1.self_attn.v_proj.weight.zero_()  # o_proj's whole input is zero
        l1.mlp.gate_proj.weight[:, 4] = 0

    directory = save_llama(tmp_path_factory.mktemp("dead") / "llama", kill)
    captured = qgraph.load(directory, progress=False)
    return captured, calibration_windows(captured.tokenizer, text_file, windows=4, ctx=64)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no 0/0 or log(0) on the way either
@pytest.mark.parametrize("recipe", available())
def test_zero_weights_and_dead_channels_give_finite_scales(tmp_path, dead_llama, recipe):
    captured, windows = dead_llama
    out = qgraph.compile(captured, recipe, calib=windows, progress=False).save(tmp_path / recipe, progress=False)
    assert _non_finite_initializers(out) == []
    assert np.isfinite(run_onnx(out / "model.onnx", input_ids=windows.ids[:1])).all()


@pytest.fixture(scope="module")
def constant_bert():
    """The tiny BERT with constant activation channels (zero weight row + bias) and a zeroed LayerNorm channel."""
    module = tiny_bert()
    with torch.no_grad():
        layer = module.encoder.layer[0]
        layer.intermediate.dense.weight[5] = 0
        layer.intermediate.dense.bias[5] = 0.5  # output.dense reads GELU(0.5) on every token
        layer.attention.self.value.weight[3] = 0
        layer.attention.self.value.bias[3] = -0.7  # a constant value channel through Softmax x V
        layer.attention.output.LayerNorm.weight[9] = 0
        layer.attention.output.LayerNorm.bias[9] = 0.3  # a constant residual channel
        module.encoder.layer[1].output.dense.weight[:, 2] = 0
    ids = torch.arange(12).reshape(1, 12) % 200
    return qgraph.load(EncoderHidden(module), example_inputs=(ids,), progress=False)


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-smooth", "w8a8-qsm", "w4a8-smooth", "fp8", "fp4"])
def test_constant_activation_channels_give_finite_scales(tmp_path, constant_bert, recipe):
    windows = TokenWindows(np.random.default_rng(0).integers(0, 200, (16, 12)).astype(np.int64), 0, "random tokens")
    out = qgraph.compile(constant_bert, recipe, calib=windows, progress=False).save(tmp_path / recipe, progress=False)
    assert _non_finite_initializers(out) == []
    assert np.isfinite(run_onnx(out / "model.onnx", input_ids=windows.ids[:1])).all()


# --- calibration and evaluation text ------------------------------------------------------------------------


def test_bad_calibration_text(run, tmp_path, llama_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("w1 w2 caf\u00e9 w3".encode("latin-1"))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("w1 w2 w3", encoding="utf-16")
    short = write_text(tmp_path / "short.txt", 40)
    cases = [
        (empty, f"text file '{empty}' is empty", "pass a UTF-8 text file"),
        (binary, f"text file '{binary}' is binary (a NUL byte at offset 4), not text", "pass a UTF-8 text file"),
        (latin, f"text file '{latin}' is not UTF-8 (byte 0xe9 at offset 9)", "iconv -f latin1 -t utf-8"),
        (utf16, f"text file '{utf16}' is UTF-16, not UTF-8", "iconv -f utf-16 -t utf-8"),
        (tmp_path, f"text file '{tmp_path}' is a directory", "pass an existing UTF-8 text file"),
        (short, "text 'short.txt' has 40 tokens, too short for 8 calibration windows of 64 tokens from token 0 "
                "(needs 512; 0 fit)", "use a longer text or a smaller --ctx"),
    ]
    for text, *fragments in cases:
        one_line(run("compile", llama_dir, "-r", "w8a8", "-o", tmp_path / "out", "--calib-text", text, "--ctx", "64"),
                 2, *fragments)
    one_line(run("eval", llama_dir, "--text", latin), 2, f"text file '{latin}' is not UTF-8")
    assert_nothing_left(tmp_path, "out")


# --- output paths -------------------------------------------------------------------------------------------


def test_output_that_is_a_file_or_under_a_file(run, tmp_path, llama_dir):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    one_line(run("compile", llama_dir, "-r", "fp32", "-o", afile), 2, f"output '{afile}' is a file, not a directory",
             "choose a new -o OUT_DIR")
    one_line(run("compile", llama_dir, "-r", "fp32", "-o", afile / "out"), 2,
             f"output '{afile / 'out'}' cannot be created: '{afile}' is a file, not a directory")
    assert afile.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory: chmod proves nothing")
def test_output_in_a_read_only_directory(run, tmp_path, llama_dir):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        one_line(run("compile", llama_dir, "-r", "fp32", "-o", locked / "a" / "out"), 2,
                 f"directory '{locked}' is not writable (Permission denied)", "choose -o OUT_DIR in a directory you can")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def _refuses_writes(directory: str) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=directory))
    except OSError:
        return True
    return False


@pytest.mark.skipif(not (os.path.isdir("/sys") and _refuses_writes("/sys")), reason="needs /sys, which no one can write")
def test_output_where_even_root_cannot_write(run, llama_dir):
    one_line(run("compile", llama_dir, "-r", "fp32", "-o", "/sys/qgraph-out"), 2,
             "output '/sys/qgraph-out' cannot be created: directory '/sys' is not writable",
             "choose -o OUT_DIR in a directory you can write to")


# --- Ctrl-C -------------------------------------------------------------------------------------------------


def _compile_process(model, text, out, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "qgraph.cli", "compile", model, "-r", "w8a8", "-o", out,
                             "--calib-text", text, "--ctx", "64", *extra], stderr=subprocess.PIPE, text=True, env=env)


def _interrupt(process) -> str:
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "qgraph: interrupted"
    return err


def _wait_for(process, ready) -> None:
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.005)
    assert process.poll() is None, f"compile ended (exit {process.returncode}) before the moment to interrupt it"


# Compiling from the float artifact's model.onnx skips the torch export: each run takes seconds, not tens.
@pytest.mark.parametrize("existing", [False, True])
def test_sigint_while_saving_leaves_nothing(run, tmp_path, fp32_onnx, text_file, existing):
    out = tmp_path / "out"
    if existing:  # the artifact already there must come through untouched
        assert run("compile", fp32_onnx, "-r", "fp32", "-o", out, "-q")[0] == 0
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    # --report makes saving slow enough (matplotlib) to be caught in the act.
    process = _compile_process(fp32_onnx, text_file, out, "--calib-windows", "4", "--report", "-q")
    _wait_for(process, lambda: any(p.name.startswith(".out.") for p in tmp_path.iterdir()))
    _interrupt(process)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="watches /proc/PID/maps for ONNX Runtime")
def test_sigint_during_calibration_leaves_nothing(tmp_path, fp32_onnx):
    text = write_text(tmp_path.parent / f"{tmp_path.name}-long.txt", 30_000)
    process = _compile_process(fp32_onnx, text, tmp_path / "out", "--calib-windows", "400", "-q")
    maps = f"/proc/{process.pid}/maps"
    # ONNX Runtime is first imported to calibrate: once it is mapped, 400 windows of calibration are under way.
    _wait_for(process, lambda: "onnxruntime_pybind11_state" in open(maps).read())
    _interrupt(process)
    assert list(tmp_path.iterdir()) == []
