"""Whole-graph CUDA artifacts of the tiny Llama: qgraph's fused kernels in the source, a cubin per arch, the fatbin
embedded in model.so, and a one-line error where no GPU is (CUDA cannot run here)."""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

import qgraph  # noqa: E402
from qgraph.backends.tvm import artifact as A  # noqa: E402
from qgraph.backends.tvm import cuda as C  # noqa: E402
from qgraph.calib.data import TokenWindows  # noqa: E402
from tests.backends.tvm.test_kernels_cuda import kernel_bodies  # noqa: E402

LENGTHS = (1, 16)  # 1 row: the GEMV schedules; 16 rows: the tiled prefill schedules
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)


@pytest.fixture(scope="module")
def artifact(llama_captured, tmp_path_factory):
    """recipe -> artifact dir; one CUDA build per recipe (~8 s each: lowering, TVM build, two nvcc runs).

    w8a8 goes through an ONNX Runtime artifact (lower_onnx_artifact), w4a16 straight from the compiled model.
    """
    cache = {}

    def get(recipe):
        if recipe not in cache:
            windows = TokenWindows(np.random.default_rng(9).integers(0, 256, size=(3, 32), dtype=np.int64), 0, "random")
            compiled = qgraph.compile(llama_captured, recipe, calib=windows, progress=False)
            out = tmp_path_factory.mktemp("cuda") / recipe
            if recipe == "w8a8":  # the other way in: from an ONNX Runtime artifact directory
                ort = compiled.save(out.with_name("ort"), progress=False)
                cache[recipe] = A.lower_onnx_artifact(ort, out, target="cuda", lengths=LENGTHS, progress=False)
            else:
                cache[recipe] = A.save_artifact(compiled, out, target="cuda", lengths=LENGTHS, progress=False)
        return cache[recipe]

    return get


def bodies(out) -> dict[str, str]:
    return kernel_bodies((out / C.SOURCE).read_text())


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8"])
def test_cubin_per_arch_and_fatbin_embedded(artifact, recipe):
    out = artifact(recipe)
    manifest = json.loads((out / "manifest.json").read_text())
    info = manifest["tvm"]
    assert manifest["backend"] == "tvm" and manifest["recipe"] == recipe
    assert info["device"] == "cuda" and info["archs"] == ["sm_80", "sm_90"]
    assert info["functions"].keys() == {"seq1", "seq16"}
    for arch in ("sm_80", "sm_90"):
        cubin = (out / info["cubins"][arch]).read_bytes()
        assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000, arch
    # model.so carries the device code as a fatbin (no compiler needed to load it), not the CUDA source
    library = (out / "model.so").read_bytes()
    assert FATBIN_MAGIC in library and b"__global__" not in library
    report = json.loads((out / "report.json").read_text())["tvm_cuda"]
    assert report["kernels"] == info["kernels"] == len(bodies(out)) > 20


def test_w4a16_source_holds_the_fused_int4_kernels(artifact):
    found = bodies(artifact("w4a16"))
    q4 = {name: body for name, body in found.items() if name.startswith("q4_")}
    # the tiny Llama's 4 weight shapes at both lengths, deduplicated across layers
    assert {re.sub(r"_m\d+_kernel$", "", n) for n in q4} == {"q4_k64_n64_g128", "q4_k64_n32_g128", "q4_k64_n160_g128",
                                                            "q4_k160_n64_g128"}
    for name, body in q4.items():
        # shift, mask, zero and scale happen inside the matmul kernel itself
        assert "w_ptr[" in body and "(uint)15" in body and "scales_ptr[" in body and ">>" in body, name
    decode, prefill = found["q4_k64_n160_g128_m1_kernel"], found["q4_k64_n160_g128_m16_kernel"]
    assert "threadIdx.y" in decode and "__shared__" in prefill
    # the float ops are scheduled on the GPU too (bound to threads, not one serial thread)
    others = [body for name, body in found.items() if not name.startswith(("q4_", "f32_"))]
    assert others and all("threadIdx.x" in body for body in others)


def test_w8a8_source_holds_the_int8_rescale_kernels(artifact):
    found = bodies(artifact("w8a8"))
    i8 = {name: body for name, body in found.items() if name.startswith("i8_")}
    assert len(i8) == 8  # 4 shapes x (decode, prefill)
    for name, body in i8.items():
        # int32 accumulation of int8 products, then acc - a_zero * colsum, times a_scale * w_scale[n], in the
        # matmul kernel (prefill reads colsum and w_scale as int2 / float2 vectors, hence no "[")
        assert all(f"{v}_ptr" in body for v in ("a", "w", "a_zero", "w_colsum", "a_scale", "w_scale", "rescale")), name
        assert re.search(r"alignas\(64\) int2? matmul\w*_local_ptr\[", body), name  # int32 accumulator registers


def test_eval_without_a_gpu_is_a_one_line_error(artifact, text_file):
    from tests.test_cli import assert_user_error
    from tests.test_cli import qgraph as cli

    out = artifact("w4a16")
    with pytest.raises(qgraph.errors.QGraphError, match="needs a CUDA GPU"):
        qgraph.api.open_runner(out)
    assert_user_error(cli("eval", out, "--text", text_file, "--windows", "1", "--ctx", "16"), "needs a CUDA GPU")
    assert_user_error(cli("bench", out, "--runs", "1"), "needs a CUDA GPU")


def test_bench_script_without_a_gpu_says_so(artifact, capsys):
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[3] / "tools" / "bench_tvm_cuda.py"))
    assert script["main"]([str(artifact("w4a16"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_embed_fatbin_rewrites_only_the_cuda_payload():
    table = b"\x01\x00\x00\x00\x00\x00\x00\x00table"
    payload = C._string(b"cuda") + table + C._string(b"__global__ src")
    body = (struct.pack("<QQ", 1, 0) + struct.pack("<QQQ", 2, 1, 2)  # import tree: two u64 arrays
            + C._string(b"_lib") + C._string(b"cuda") + C._string(payload))
    blob = struct.pack("<Q", len(body)) + body
    assert [k for k, _ in C.modules_in_blob(blob)] == ["_lib", "cuda"]
    new = C.embed_fatbin(blob, "__global__ src", FATBIN_MAGIC + b"image")
    (kind, (start, end)), = [e for e in C.modules_in_blob(new) if e[0] == "cuda"]
    assert new[start:end] == C._string(b"fatbin") + table + C._string(FATBIN_MAGIC + b"image")
    assert struct.unpack_from("<Q", new)[0] == len(new) - 8


def test_arch_list_parsing():
    assert C.parse_archs(None) == ("sm_80", "sm_90") and C.parse_archs("sm_90, sm_80,sm_90") == ("sm_90", "sm_80")
    with pytest.raises(qgraph.errors.QGraphError, match="not of the form sm_XY"):
        C.parse_archs("ampere")
