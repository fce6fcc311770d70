# fastres — the two README commands:
#   make bench   set up (if needed) and run the main job: python -m fastres bench
#   make test    set up (if needed) and run the whole test suite
#   make test-gpustack   the GPU machine's stack (Python 3.12, torch 2.11.0, torchvision
#                0.26.0, triton 3.6.0, numpy 2.5) in .venv-gpustack, and a representative
#                test subset on it (CI's second leg)
# Set-up is a virtual environment in .venv with the pinned torch/torchvision, the
# test/bench requirements and fastres installed editable (building fastres._C:
# C++ always, CUDA where nvcc exists; FASTRES_SKIP_CUDA=1 skips CUDA).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
CSRC   := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup test test-fast bench check info cmake clean setup-gpustack test-gpustack

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
	rm -rf build cmake-build fastres/*.so *.egg-info $(VENV)/.fastres-built $(GPUSTACK_VENV)/.fastres-built

# --- the GPU machine's stack (issue 8) -------------------------------------------------
# Python 3.12 (pyenv's newest 3.12.x; GPUSTACK_PYTHON=... to choose), torch 2.11.0,
# torchvision 0.26.0, triton 3.6.0 from PyPI, numpy 2.5, in $(GPUSTACK_VENV), with the
# venv's own pip (23.2 on 3.12.1) and fastres installed as there:
# pip install --no-build-isolation --no-deps -e .
# torch 2.11 on PyPI is the CUDA build: it does not import without the CUDA libraries it
# links (libcudnn.so.9, libcublas.so.13, ...), which a CPU machine loads but never runs.
# Their wheels (nvidia-*, ~2.6 GB, ~6 min to fetch and unpack here) are not installed
# when the main venv already has the same CUDA major's libraries: those are linked in
# (site-packages/nvidia -> $(VENV)'s) and `import torch` is checked; otherwise, or with
# GPUSTACK_FULL_CUDA_DEPS=1, pip installs torch's own pinned ones.
# fastres._C: CPU kernels only (GPUSTACK_CUDA=1 also builds the CUDA kernels, ~minutes).
GPUSTACK_VENV   ?= .venv-gpustack
GPUSTACK_PYTHON ?= $(shell ls -d $(HOME)/.pyenv/versions/3.12*/bin/python 2>/dev/null | sort -V | tail -n 1)
GPUSTACK_PIN    := torch==2.11.0 torchvision==0.26.0 triton==3.6.0
GPUSTACK_NUMPY  := numpy==2.5.*
GPUSTACK_CUDA   ?= 0
GPUSTACK_FULL_CUDA_DEPS ?= 0
GP              := $(GPUSTACK_VENV)/bin/python
# The subset: the compat checks, op parity on every CPU backend (cpp, triton under the
# interpreter, the torch reference), the Triton kernels, blocks, models, eval folding,
# validation, torch.compile(fullgraph=True) with aot_eager on every backend, the fused conv
# (forward/backward kernels under Triton 3.6's interpreter, blocks, higher-order autograd),
# drop-in (TorchScript, fx, export/ONNX), torch 2.11's own module_db / op_db cases for
# BatchNorm2d and F.batch_norm, the CPU eval plan, checkpointing, and every
# Triton kernel compiled for sm_90/sm_80 by Triton 3.6 itself (tools/aot_compile.py --quick);
# every interpreted kernel bounds-checked by Triton 3.6's interpreter patch (tests/triton_bounds.py).
GPUSTACK_TESTS  ?= tests/test_compat.py tests/test_batchnorm_parity.py tests/test_triton_kernels.py \
                   tests/test_blocks.py tests/test_models.py tests/test_fold.py tests/test_validation.py \
                   tests/test_ops_registration.py tests/test_conv_act.py tests/test_conv_bwd_kernels.py \
                   tests/test_fused_conv_blocks.py tests/test_conv_higher_order.py tests/test_higher_order.py \
                   tests/test_dropin.py tests/test_inference.py tests/test_saving.py tests/test_checkpointing.py \
                   tests/test_aot_compile.py tests/test_conv_aten_backends.py tests/test_torch_module_db.py \
                   tests/test_triton_bounds.py
# Left out (the main leg runs them on 2.14): inductor compiles, the Triton gradchecks
# (test_triton_kernels checks those gradients in fp64), the big archs in fp64 / fp32.
GPUSTACK_PYTEST ?= -m "not slow" -k "not inductor and not (gradcheck_functional and triton) \
                   and not (arch_fp64_eval_and_train and not resnet18) and not (fp32_layouts and not resnet18) \
                   and not (bf16_autocast and resnet50) and not (same_init and resnet50) and not (imagenet_twins and resnet34)"

$(GPUSTACK_VENV)/.deps: requirements-test.txt
	@test -n "$(GPUSTACK_PYTHON)" || { echo "test-gpustack: no Python 3.12 (looked for ~/.pyenv/versions/3.12*/bin/python; set GPUSTACK_PYTHON)"; exit 1; }
	rm -rf $(GPUSTACK_VENV)
	$(GPUSTACK_PYTHON) -m venv $(GPUSTACK_VENV)
	$(GP) -m pip install -q --no-deps $(GPUSTACK_PIN)
	$(GP) -c "import importlib.metadata as m; print('\n'.join(r for d in ('torch', 'torchvision') for r in (m.requires(d) or []) if 'extra ==' not in r and not r.lower().startswith(('nvidia', 'cuda', 'triton', 'torch'))))" > $(GPUSTACK_VENV)/torch-deps.txt
	$(GP) -m pip install -q -r $(GPUSTACK_VENV)/torch-deps.txt "$(GPUSTACK_NUMPY)" wheel ninja -r requirements-test.txt
	@site=$$($(GP) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	nv=$$(ls -d $(VENV)/lib/python3*/site-packages/nvidia 2>/dev/null | head -n 1); \
	if [ "$(GPUSTACK_FULL_CUDA_DEPS)" != 1 ] && [ -n "$$nv" ]; then \
	  ln -sfn "$$(cd "$$nv" && pwd)" "$$site/nvidia" && echo "test-gpustack: CUDA libraries linked from $$nv"; fi; \
	if ! $(GP) -c "import torch" 2>/dev/null; then \
	  rm -f "$$site/nvidia"; echo "test-gpustack: installing torch's CUDA library wheels"; \
	  $(GP) -m pip install -q $(GPUSTACK_PIN); fi
	$(GP) -c "import torch, torchvision, triton, numpy, sys; print('test-gpustack: Python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	touch $@

$(GPUSTACK_VENV)/.fastres-built: $(GPUSTACK_VENV)/.deps setup.py pyproject.toml $(CSRC)
	FASTRES_SKIP_CUDA=$(if $(filter 1,$(GPUSTACK_CUDA)),0,1) $(GP) -m pip install -q --no-build-isolation --no-deps -e .
	TRITON_INTERPRET=1 $(GP) -m fastres info
	touch $@

setup-gpustack: $(GPUSTACK_VENV)/.fastres-built

test-gpustack: setup-gpustack
	$(GP) -m pytest $(GPUSTACK_TESTS) -q -ra $(GPUSTACK_PYTEST) $(PYTEST_ARGS)
