# `make test` works on a fresh machine: it creates two virtual environments,
# installs entropo with its test extras into each at the exact versions of
# constraints/, and runs the suite in both (the two legs of CI, .ci/run):
#   test-py311  .venv,    Python 3.11, the lower bounds (jax 0.10.2), with the
#               torch/transformers peer of the Hugging Face parity tests;
#   test-py312  .venv312, Python 3.12, jax 0.11; no torch or transformers (no
#               CPU wheel for 3.12), so the parity tests skip. Both legs run
#               every test.
# With a virtual environment active, `make test` runs one leg, in it: it
# installs entropo's test extras there without constraints (the environment
# is yours, e.g. beside a CUDA jax); the parity tests run if `.[hf]` is there.
# `make demo` installs only what the main job needs (no test extras, no torch).
SHELL := /bin/bash
PYTHON ?= python3.11
# pyenv picks the interpreter by PYENV_VERSION; elsewhere it is ignored.
PYTHON312 ?= PYENV_VERSION=3.12.1 python3.12
PYTEST_ARGS ?=
PIP_QUIET ?= --quiet

.PHONY: install install-runtime install-py312 test test-py311 test-py312 \
  test-fast demo study study-agents bench clean

# pytest exits 5 when it collected nothing: a leg that ran no test has failed,
# and says so. $(1): the python, $(2): the leg's name, $(3): pytest options.
define run_pytest
	@echo "== $(2): $$($(1) -c 'import sys, jax, flax; print("Python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__)')"
	@rc=0; $(1) -m pytest -n 2 --dist worksteal --durations=30 $(3) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  echo "== $(2): FAILED: pytest collected no test (exit status 5)" >&2; \
	elif [ $$rc -ne 0 ]; then \
	  echo "== $(2): FAILED (pytest exit status $$rc)" >&2; \
	fi; exit $$rc
endef

.venv/bin/python:
	$(PYTHON) -m venv .venv

.venv312/bin/python:
	$(PYTHON312) -m venv .venv312

.venv/.installed: setup.py pyproject.toml constraints/py311.txt \
  | .venv/bin/python
	.venv/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	.venv/bin/python -m pip install $(PIP_QUIET) -c constraints/py311.txt \
	  -e ".[test,hf,bench]"
	touch $@ .venv/.installed-runtime

.venv/.installed-runtime: setup.py constraints/py311.txt | .venv/bin/python
	.venv/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	.venv/bin/python -m pip install $(PIP_QUIET) -c constraints/py311.txt -e .
	touch $@

.venv312/.installed: setup.py pyproject.toml constraints/py312.txt \
  | .venv312/bin/python
	.venv312/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	.venv312/bin/python -m pip install $(PIP_QUIET) -c constraints/py312.txt \
	  -e ".[test,bench]"
	touch $@

install-py312: .venv312/.installed

test-py311: .venv/.installed
	$(call run_pytest,.venv/bin/python,test-py311 (.venv))

test-py312: .venv312/.installed
	$(call run_pytest,.venv312/bin/python,test-py312 (.venv312))

ifdef VIRTUAL_ENV
VENV_PY := $(VIRTUAL_ENV)/bin/python

install:
	$(VENV_PY) -m pip install $(PIP_QUIET) -e ".[test,bench]"

install-runtime:
	$(VENV_PY) -m pip install $(PIP_QUIET) -e .

test: install
	$(call run_pytest,$(VENV_PY),test ($(VIRTUAL_ENV)))

test-fast: install
	$(call run_pytest,$(VENV_PY),test-fast ($(VIRTUAL_ENV)),-m "not slow")
else
VENV_PY := .venv/bin/python

install: .venv/.installed

install-runtime: .venv/.installed-runtime

# Both legs, the second even when the first fails; fails if either does.
# The 3.12 environment installs (mostly downloads) while the 3.11 leg runs,
# after the 3.11 one (both editable installs write entropo.egg-info here);
# its output goes to .venv312.install.log, and if it failed, test-py312
# installs again in the open, so the error is in the log of `make test`.
test: .venv/.installed
	@rc=0; \
	$(MAKE) --no-print-directory .venv312/.installed \
	  > .venv312.install.log 2>&1 & install=$$!; \
	$(MAKE) --no-print-directory test-py311 || rc=1; \
	wait $$install || echo "== the Python 3.12 environment's install failed; again:"; \
	$(MAKE) --no-print-directory test-py312 || rc=1; \
	exit $$rc

test-fast: .venv/.installed
	$(call run_pytest,$(VENV_PY),test-fast (.venv),-m "not slow")
endif

WORKDIR ?= workdir/demo

demo: install-runtime
	$(VENV_PY) -m experiments.main --config=experiments/configs/countdown.py \
	  --workdir=$(WORKDIR)

# The study of docs/results.md (about 66 minutes on 2 CPU cores for sections 1-5,
# about 3 hours more for the regime stages of sections 6-10; resumable).
STUDY_DIR ?= workdir/study

study: install-runtime
	$(VENV_PY) -m experiments.study --workdir=$(STUDY_DIR)

# The agents stage (docs/results.md): algorithms on a multi-turn environment.
study-agents: install-runtime
	$(VENV_PY) -m experiments.study_agents --workdir=workdir/agents

bench: install
	$(VENV_PY) benchmarks/fused_head.py
	$(VENV_PY) benchmarks/trainer.py

clean:
	rm -rf .venv .venv312 .venv312.install.log build *.egg-info .pytest_cache
