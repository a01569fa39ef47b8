# Two entry points: `make demo` (the main job on the bundled model) and `make test`.
# Each creates/reuses .venv and installs everything it needs. torch is pinned here (CPU wheel),
# never in pyproject, so GPU boxes keep their own torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/headscope demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) demo_out
