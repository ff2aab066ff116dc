# The README's two setup commands: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
BUILD  ?= build
JOBS   ?= 2
# Point these at TensorRT headers/libraries outside the repository to build the plugins and the C API.
TensorRT_ROOT ?=
TensorRT_INCLUDE_DIR ?=
CMAKE_ARGS ?=

# Triton Inference Server on CPU for tests/test_triton.py (docs/serving.md): nvidia-pytriton's tritonserver, and numpy < 2
# for its Python backend stub, beside an editable install of this package. A failed install only skips those tests.
TRITON_ENV   := $(BUILD)/triton-env
TRITON_STAMP := $(TRITON_ENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

.PHONY: venv native test test-python test-native triton-env demo eval models sibling bench bench-edge genai-venv clean

$(STAMP): pyproject.toml
	@echo "make: installing $(VENV) with .[export,dev] (torch and the rest; a few minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[export,dev]"
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

$(TRITON_STAMP): pyproject.toml
	@echo "make: building $(TRITON_ENV), a second environment with PyPI's Triton server (nvidia-pytriton) for tests/test_triton.py; once, and again when pyproject.toml changes"
	-rm -rf $(TRITON_ENV) && $(PYTHON) -m venv $(TRITON_ENV) && $(TRITON_ENV)/bin/pip install --quiet --upgrade pip && \
	  $(TRITON_ENV)/bin/pip install --quiet "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.18" -e . && touch $@

triton-env: $(TRITON_STAMP)

native: $(STAMP)
	@echo "make: building the native parts in $(BUILD)/ (operator reference; CUDA kernels, plugins and C API where their toolchains exist)"
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(if $(TensorRT_ROOT),-DTensorRT_ROOT=$(TensorRT_ROOT)) $(if $(TensorRT_INCLUDE_DIR),-DTensorRT_INCLUDE_DIR=$(TensorRT_INCLUDE_DIR)) $(CMAKE_ARGS)
	cmake --build $(BUILD) -j $(JOBS)

test-native: native
	ctest --test-dir $(BUILD) --output-on-failure

test-python: $(STAMP) native triton-env
	@echo "make: running pytest (about 1150 tests: 4-5 minutes on a quiet 2-core machine, longer when the cores are shared)"
	ALIGNER_NATIVE_BUILD=$(abspath $(BUILD)) $(PY) -m pytest -q tests

test: test-native test-python

models: $(STAMP)
	$(PY) -m aligner_export models

demo: $(STAMP)
	$(PY) -m aligner_export.tools.demo

# The full held-out evaluation of the demo's export (every held-out prompt scored, 80 answers per set; it prints its
# expected duration first).
eval: $(STAMP)
	$(PY) -m aligner_export.tools.demo --full

sibling: $(STAMP)
	$(PY) models/smollm2-aligned/train.py

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_export_overhead.py
	$(PY) tests/benchmarks/bench_runtime_vs_torch.py --threads 2
	$(PY) tests/benchmarks/bench_multimodal.py --threads 2

# The onnxruntime-genai builder's own venv (transformers 5.x; never the main one): --exporter genai and bench-edge.
GENAI_VENV ?= $(HOME)/.cache/inferaligner-edge/venv-genai
genai-venv: $(STAMP)
	bash tests/benchmarks/make_genai_venv.sh $(GENAI_VENV) $(VENV)

# Edge speed (issue 11): builds the contestants once, then runs them interleaved (docs/performance.md).
bench-edge: genai-venv
	$(PY) tests/benchmarks/prepare_edge.py --work $(HOME)/.cache/inferaligner-edge/bench-edge
	$(PY) tests/benchmarks/bench_edge.py --config $(HOME)/.cache/inferaligner-edge/bench-edge/bench.json \
		--out $(HOME)/.cache/inferaligner-edge/bench-edge/report.json

clean:
	rm -rf $(BUILD)
