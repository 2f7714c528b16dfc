# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv with the CPU torch wheel first; GPU users install torch their own way and `pip install .`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The CPU build of torch, on a stock machine too: TORCH_INDEX is ADDED to pip's own indexes
# (--extra-index-url; pip.conf / PIP_INDEX_URL mirrors and find-links still count). Its Linux wheels are
# versioned 2.13.0+cpu, which PEP 440 orders after PyPI's 2.13.0 (the CUDA build, ~GBs of nvidia
# packages), so pip takes the CPU one; a local 2.13.0+cpu wheel (find-links) wins the same way.
# A 10-second probe runs first: when TORCH_INDEX cannot be reached (offline CI, a machine that only
# sees its configured mirror), make says so and uses pip's configured indexes alone, instead of pip
# retrying the dead index for torch and each of its dependencies (~8 s each, ~70 s in all).
# `make TORCH_INDEX=` skips the CPU index; GPU: TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (or install torch your own way, then `pip install -e ".[test]"`).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PROBE = import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)

.PHONY: venv demo test test-slow lint check-claims clean

$(BIN)/diffprune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@index="$(TORCH_INDEX)"; \
	if [ -n "$$index" ] && ! $(BIN)/python -c '$(TORCH_PROBE)' "$${index%/}/torch/" >/dev/null 2>&1; then \
		echo "note: TORCH_INDEX $$index is not reachable: torch comes from pip's configured indexes"; index=; \
	fi; \
	echo "$(BIN)/pip install -q $${index:+--extra-index-url $$index }\"$(TORCH_SPEC)\""; \
	$(BIN)/pip install -q $${index:+--extra-index-url "$$index"} "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

venv: $(BIN)/diffprune

demo: venv
	$(BIN)/diffprune demo --output-dir runs/demo --overwrite

# Two pytest-xdist workers (8 min 0 s on 2 cores, 18 min 50 s serial), one torch / OpenMP thread each; the tests
# that start several processes share work or take turns across workers (tests/conftest.py, test_benchmarks_smoke.py).
test: venv
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

# Style is checked by ruff's lint rules (pyproject.toml: lines <= 120 included), not by `ruff format`:
# the formatter's one-argument-per-line layout adds ~14% lines (14,594 -> 16,585 in src/ on 2026-12-06) and
# pushes four modules past the 450-line limit that tests/test_layout.py enforces (docs/ARCHITECTURE.md, "Style").
lint: venv
	$(BIN)/ruff check src tests benchmarks

# Every README figure quoted from benchmarks/results re-read from its JSON (benchmarks/check_claims.py;
# tests/test_claims.py runs it in `make test` too).
check-claims: venv
	$(BIN)/python benchmarks/check_claims.py

clean:
	rm -rf $(VENV) runs
