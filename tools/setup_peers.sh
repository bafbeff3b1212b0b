#!/usr/bin/env bash
# Peers for `python tools/compare_peers.py --generation`, kept out of the default install:
# llama.cpp through llama-cpp-python (built from source: no wheel on PyPI for this CPU build) and
# onnxruntime-genai (its model builder and runtime). Measured on the 2-core AMD EPYC: the llama.cpp
# build took the time `time` prints below (about 25 minutes at nice 19 beside a busy machine).
set -euo pipefail
PY=${PY:-.venv/bin/python}
# Not -march=native: on a Xeon whose CPUID lists AMX, a native build compiled ggml's AMX kernels and
# died with SIGILL in this VM (the guest never enables AMX tile state). The ISA flags below are the
# ones /proc/cpuinfo lists, AMX left out.
has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
ARGS="$ARGS -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c)"
ARGS="$ARGS -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AVX512=$(has avx512f)"
ARGS="$ARGS -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_VBMI=$(has avx512_vbmi)"
echo "llama.cpp build flags: $ARGS"
time CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL=2 "$PY" -m pip install --no-deps --no-cache-dir --force-reinstall \
    llama-cpp-python==0.3.36
"$PY" -m pip install --no-deps diskcache jinja2 typing-extensions
"$PY" -m pip install onnxruntime-genai==0.18.0
