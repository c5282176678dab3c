# `make test` works on a fresh machine: without an active virtual environment
# it creates .venv and installs entropo with its test extras first.
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
  VENV_PY := $(VIRTUAL_ENV)/bin/python
else
  VENV_PY := .venv/bin/python
endif
PYTEST_ARGS ?=

.PHONY: install test test-fast demo study bench clean

$(VENV_PY):
	$(PYTHON) -m venv .venv

.venv/.installed: setup.py pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install --quiet --upgrade pip
	$(VENV_PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

ifdef VIRTUAL_ENV
install:
	$(VENV_PY) -m pip install --quiet -e ".[test,bench]"
else
install: .venv/.installed
endif

test: install
	$(VENV_PY) -m pytest -n 2 $(PYTEST_ARGS)

test-fast: install
	$(VENV_PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

WORKDIR ?= workdir/demo

demo: install
	$(VENV_PY) -m experiments.main --config=experiments/configs/countdown.py \
	  --workdir=$(WORKDIR)

# The study of docs/results.md (about 66 minutes on 2 CPU cores; resumable).
STUDY_DIR ?= workdir/study

study: install
	$(VENV_PY) -m experiments.study --workdir=$(STUDY_DIR)

bench: install
	$(VENV_PY) benchmarks/fused_head.py
	$(VENV_PY) benchmarks/trainer.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache
