# Two entry points for a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clfpipe-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/clfpipe demo --workdir runs/demo --recipe recipes/demo.toml

test: install
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -ra -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
