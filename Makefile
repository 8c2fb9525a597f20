# Two commands do everything on a machine with only Python 3.11+:
#   make demo   - create .venv, install, run examples/quickstart.py
#   make test   - create .venv, install, run the whole test suite on 3.11 (.venv), then on
#                 3.12 and 3.13 (nox sessions in .nox/, see noxfile.py)
#   make bench  - run every benchmark under benchmarks/ (prints figures, asserts nothing)
#   make fuzz   - a long property-based fuzzing session (not part of make test)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The official client, pinned, for the wire-compatibility tests (installed --no-deps).
OFFICIAL_MOONDREAM := tests/requirements-official-client.txt
# The runner of the other Pythons' sessions (noxfile.py), installed into .venv.
NOX := nox>=2025.5.1
# Every Python `make test` covers: the one .venv was made with (3.11 on CI) runs the suite in
# .venv, each other one runs it in a nox session (noxfile.py).
ALL_PYTHONS := 3.11 3.12 3.13
OTHER_SESSIONS = $$($(BIN)/python -c 'import sys; v = "%d.%d" % sys.version_info[:2]; print(" ".join("tests-" + p for p in "$(ALL_PYTHONS)".split() if p != v))')
INTEGRATIONS := $(wildcard integrations/*/pyproject.toml)

.PHONY: demo test bench fuzz install clean

install: $(STAMP)

$(STAMP): pyproject.toml $(INTEGRATIONS) $(OFFICIAL_MOONDREAM) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[testing,dev,cli,mcp,ray,video]" $(foreach p,$(INTEGRATIONS),-e "$(dir $(p))[dev]") "$(NOX)"
	$(BIN)/python -m pip install --quiet --no-deps -r "$(OFFICIAL_MOONDREAM)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/nox --non-interactive --sessions $(OTHER_SESSIONS) -- $(PYTEST_ARGS)

bench: $(STAMP)
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/core/test_fuzz.py -m fuzz -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .nox build *.egg-info .pytest_cache
