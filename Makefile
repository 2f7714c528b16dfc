# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv with the CPU torch wheel first; GPU users install torch their own way and `pip install .`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-slow lint clean

$(BIN)/diffprune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/diffprune

demo: venv
	$(BIN)/diffprune demo --output-dir runs/demo --overwrite

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs
