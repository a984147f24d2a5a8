# Two commands from a fresh clone: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
# torch comes from plain pip (local wheels on our machines); override for another platform
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the device runtime alone (no torch): the torch-free tests run bundles through it
RUNTIME_VENV ?= .venv-runtime
RUNTIME_EXTRA ?= runtime-onnxruntime
RUNTIME_STAMP := $(RUNTIME_VENV)/.installed

.PHONY: demo test install install-runtime clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

install-runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -m pip install --quiet -e ".[$(RUNTIME_EXTRA)]"
	touch $(RUNTIME_STAMP)

demo: $(STAMP)
	@$(BIN)/edgetransfer demo --out runs/demo || { status=$$?; \
	  echo "edgetransfer demo exited $$status (1: a gate failed; the failing reports and their gates:)"; \
	  $(BIN)/edgetransfer reports runs/demo --failed; \
	  exit $$status; }

test: $(STAMP) $(RUNTIME_STAMP)
	EDGETRANSFER_RUNTIME_PYTHON=$(abspath $(RUNTIME_VENV))/bin/python $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) runs .pytest_cache
