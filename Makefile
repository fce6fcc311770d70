# fastres — the two README commands:
#   make bench   set up (if needed) and run the main job: python -m fastres bench
#   make test    set up (if needed) and run the whole test suite
# Set-up is a virtual environment in .venv with the pinned torch/torchvision, the
# test/bench requirements and fastres installed editable (building fastres._C:
# C++ always, CUDA where nvcc exists; FASTRES_SKIP_CUDA=1 skips CUDA).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
CSRC   := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup test test-fast bench check info cmake clean

setup: $(VENV)/.fastres-built

$(VENV)/.deps: requirements-test.txt $(wildcard requirements-bench.txt)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -r requirements-test.txt $(if $(wildcard requirements-bench.txt),-r requirements-bench.txt)
	touch $@

$(VENV)/.fastres-built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m fastres info
	touch $@

# The whole suite. On a CPU machine Triton runs under its interpreter.
test: setup
	$(PY) -m pytest tests -q -ra $(PYTEST_ARGS)

bench: setup
	$(PY) -m fastres bench

check: setup
	$(PY) -m fastres check

info: setup
	$(PY) -m fastres info

cmake: $(VENV)/.deps
	PYTHON=$(abspath $(PY)) bash tools/cmake_build.sh

clean:
	rm -rf build cmake-build fastres/*.so *.egg-info $(VENV)/.fastres-built
