# Every setup path installs torch==2.13.0 (the CPU build) first, so that the
# package's own range `torch>=2.2` is already satisfied and no CUDA build is pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lipdeq-installed

.PHONY: install demo test lint bench
install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,plots]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lipdeq demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/lipdeq bench solvers
