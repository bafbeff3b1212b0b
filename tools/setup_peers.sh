#!/usr/bin/env bash
# Peers for `python tools/compare_peers.py --generation`, kept out of the default install:
# llama.cpp through llama-cpp-python (built from source: no wheel on PyPI for this CPU build) and
# onnxruntime-genai (its model builder and runtime). Measured on the 2-core AMD EPYC: the llama.cpp
# build took the time `time` prints below (about 25 minutes at nice 19 beside a busy machine).
set -euo pipefail
PY=${PY:-.venv/bin/python}
time CMAKE_BUILD_PARALLEL_LEVEL=2 "$PY" -m pip install --no-deps llama-cpp-python==0.3.36
"$PY" -m pip install --no-deps diskcache jinja2 typing-extensions
"$PY" -m pip install onnxruntime-genai==0.18.0
