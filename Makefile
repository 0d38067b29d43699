# HierVL developer commands. Everything a user needs starts here:
#   make quickstart   set up if needed, pretrain a small CLIP and train the tiny model on the
#                     built-in data (semi-supervised vs labelled-only), evaluate, demo
#   make test         set up if needed, run the whole test suite (both stacks) and lint
# Other targets: setup, setup-modern, lint, format, bench, gpu-suite, clean.
# QUICKSTART_ARGS passes options, e.g. QUICKSTART_ARGS="--seed 3".

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        := .venv
VENV_MODERN := .venv-modern
PY          := $(VENV)/bin/python
PY_MODERN   := $(VENV_MODERN)/bin/python
CUDA_HOME   ?= /usr/local/cuda
TORCH_CUDA_ARCH_LIST ?= 9.0
OP_SOURCES  := setup.py $(shell find hiervl/ops/csrc -type f 2>/dev/null)
PYTEST_ARGS ?=
BENCH_ARGS  ?=
# The op build: hide setuptools' generic editable-install banner; on failure say what to do;
# afterwards fail unless the kernels just built import (args: label, device that must work).
OP_WARNINGS    := ignore:Editable installation
OP_BUILD_HELP  := ERROR: building the MSDeformAttn op (hiervl._C) failed; the compiler output is above. See INSTALL.md, 'Troubleshooting'.
OP_CHECK       := import sys; from hiervl.ops import compiled_available, kernel_status; print(f'[{sys.argv[1]}]', kernel_status()); sys.exit(0 if compiled_available(sys.argv[2]) else 'ERROR: hiervl._C has no ' + sys.argv[2] + ' kernel after the build; see INSTALL.md')
# pip prints one warning per package for this machine kind's empty extra indexes.
PIP_QUIET   := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

# Python 3.10 for the pinned detectron2 stack: python3.10 on PATH if it runs,
# else the newest 3.10 that pyenv knows. Resolved lazily (only targets that need it).
find_python = $(strip $(shell \
	for c in $(1); do \
	  if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys' >/dev/null 2>&1; then command -v $$c; exit 0; fi; \
	done; \
	if command -v pyenv >/dev/null 2>&1; then \
	  p=$$(ls -d "$$(pyenv root)"/versions/$(2).*/bin/python$(2) 2>/dev/null | sort -V | tail -n 1); \
	  if [ -n "$$p" ]; then echo "$$p"; fi; \
	fi))

.PHONY: help setup setup-modern test test-main test-modern lint format quickstart bench gpu-suite clean

help:
	@sed -n '1,7p' Makefile | sed 's/^# \{0,1\}//'

## --- setup -------------------------------------------------------------------
setup: $(VENV)/.deps-stamp $(VENV)/.op-stamp

$(VENV)/.deps-stamp: requirements/cpu-lock.txt pyproject.toml
	@PY310="$(call find_python,python3.10,3.10)"; \
	if [ -z "$$PY310" ]; then \
	  echo "ERROR: Python 3.10 not found (needed by the pinned detectron2 wheel)."; \
	  echo "       Install it (e.g. 'pyenv install 3.10') or put python3.10 on PATH; see INSTALL.md."; \
	  exit 1; \
	fi; \
	echo "[setup] creating $(VENV) with $$PY310"; \
	[ -x $(PY) ] || "$$PY310" -m venv $(VENV); \
	$(PY) -m pip install -q --upgrade pip setuptools wheel $(PIP_QUIET); \
	$(PY) -m pip install -q -r requirements/cpu-lock.txt $(PIP_QUIET)
	@touch $@

$(VENV)/.op-stamp: $(VENV)/.deps-stamp $(OP_SOURCES)
	@echo "[setup] building hiervl (MSDeformAttn CPU kernel) in $(VENV)"
	@FORCE_CUDA=0 PYTHONWARNINGS="$(OP_WARNINGS)" \
	  $(PY) -m pip install -q --no-deps --no-build-isolation -e . || { echo "$(OP_BUILD_HELP)"; exit 1; }
	@$(PY) -c "$(OP_CHECK)" setup cpu
	@touch $@

setup-modern: $(VENV_MODERN)/.op-stamp

$(VENV_MODERN)/.deps-stamp: requirements/modern.txt
	@PY311="$(call find_python,python3.11,3.11)"; \
	if [ -z "$$PY311" ]; then echo "ERROR: Python 3.11 not found (modern stack)."; exit 1; fi; \
	echo "[setup-modern] creating $(VENV_MODERN) with $$PY311"; \
	[ -x $(PY_MODERN) ] || "$$PY311" -m venv $(VENV_MODERN); \
	$(PY_MODERN) -m pip install -q --upgrade pip setuptools wheel $(PIP_QUIET); \
	$(PY_MODERN) -m pip install -q -r requirements/modern.txt $(PIP_QUIET)
	@touch $@

# The CUDA kernel is compiled whenever nvcc is there (no GPU needed to compile).
$(VENV_MODERN)/.op-stamp: $(VENV_MODERN)/.deps-stamp $(OP_SOURCES)
	@if [ -x "$(CUDA_HOME)/bin/nvcc" ]; then \
	  echo "[setup-modern] building the op with CUDA (CUDA_HOME=$(CUDA_HOME), arch $(TORCH_CUDA_ARCH_LIST))"; \
	  CUDA_HOME=$(CUDA_HOME) FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" PYTHONWARNINGS="$(OP_WARNINGS)" \
	    $(PY_MODERN) -m pip install -q --no-deps --no-build-isolation -e . || { echo "$(OP_BUILD_HELP)"; exit 1; }; \
	  $(PY_MODERN) -c "$(OP_CHECK)" setup-modern cuda; \
	else \
	  echo "[setup-modern] nvcc not found under CUDA_HOME=$(CUDA_HOME): building the CPU kernel only"; \
	  FORCE_CUDA=0 PYTHONWARNINGS="$(OP_WARNINGS)" \
	    $(PY_MODERN) -m pip install -q --no-deps --no-build-isolation -e . || { echo "$(OP_BUILD_HELP)"; exit 1; }; \
	  $(PY_MODERN) -c "$(OP_CHECK)" setup-modern cpu; \
	fi
	@touch $@

## --- tests -------------------------------------------------------------------
test: setup setup-modern
	@$(MAKE) --no-print-directory lint
	@$(MAKE) --no-print-directory test-main
	@$(MAKE) --no-print-directory test-modern

test-main:
	@echo "[test] full suite on $(VENV) (torch 2.3.1 + detectron2)"
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

# Plain-torch suites (no detectron2 in this venv) on the modern torch.
test-modern:
	@echo "[test] plain-torch suites on $(VENV_MODERN) (torch 2.14)"
	$(PY_MODERN) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/ops tests/modeling

lint: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.deps-stamp
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

## --- user jobs ---------------------------------------------------------------
quickstart: setup
	$(PY) -m hiervl.quickstart $(QUICKSTART_ARGS)

bench: setup
	$(PY) benchmarks/bench_msdeformattn.py $(BENCH_ARGS)

# Everything a GPU machine should check, in one run (benchmarks/README.md): builds the CUDA
# op in place, tests and times it, trains and infers the full model; writes gpu_suite.md to
# $(SUITE_OUT) ($OUT when set). Plain python + torch + open_clip: no venv, no detectron2.
SUITE_PY  ?= python3
SUITE_OUT ?= $(if $(OUT),$(OUT),output/gpu_suite)
gpu-suite:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(SUITE_PY) benchmarks/gpu_suite.py --out "$(SUITE_OUT)"

clean:
	rm -rf build *.egg-info hiervl/*.so hiervl/**/*.so $(VENV)/.op-stamp $(VENV_MODERN)/.op-stamp
