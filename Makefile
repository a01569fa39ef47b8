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
	@echo "== creating the virtual environment $(VENV) and upgrading pip"
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@echo "== installing $(TORCH_PIN) into $(VENV) (the largest download; a minute or more)"
	$(BIN)/python -m pip install $(TORCH_PIN)
	@echo "== installing headscope (editable) with its dependencies and test tools: pip install -e .[test]"
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)
	@echo "== $(VENV) is ready"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/headscope demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) demo_out
