# `make bench` and `make test` each create/refresh .venv from requirements-dev.txt, build the
# extension incrementally (build/ keeps the objects), then run the harness or the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-stamp

.PHONY: test bench build cmake clean gpu-check

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "import os, site; open(os.path.join(site.getsitepackages()[0], 'diffkern-dev.pth'), 'w').write(os.path.abspath('python') + '\\n')"

# Test processes (pytest-xdist): the suite is mostly single-threaded Python (the Triton interpreter), so
# one worker per core; whole files go to one worker, so a module's expensive fixture (a benchmark run, a
# kernel build) is set up once, except the AOT compile files, whose tests are handed out one by one at the end
# (tests/conftest.py: SPREAD_OVER_WORKERS).
TEST_JOBS ?= 2

test: build
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

# make bench: the headline rows in a few minutes; make bench FULL=1: every traffic count in the interpreter.
bench: build
	$(PY) benchmarks/run.py --out results $(if $(FULL),--full)

# make gpu-check: on a machine with one NVIDIA GPU and a preinstalled torch, Triton and nvcc (no venv, no
# network): build in place for that GPU only (GPU_ARCH, one CPU kernel variant), then prove and time every op
# (python -m diffkern.gpu_check) into $(OUT); the driver gets what the build left of GPU_CHECK_BUDGET_S
# seconds (at least 60).
OUT ?= gpu_check_out
GPU_ARCH ?= 9.0a
GPU_CHECK_BUDGET_S ?= 480
MAX_JOBS ?= $(shell nproc)

gpu-check:
	start=$$(date +%s) && \
	TORCH_CUDA_ARCH_LIST="$(GPU_ARCH)" DIFFKERN_CUDA=1 DIFFKERN_CPU_ARCH=native MAX_JOBS=$(MAX_JOBS) \
		$(PYTHON) setup.py --quiet build_ext --inplace && \
	left=$$(( $(GPU_CHECK_BUDGET_S) - $$(date +%s) + start )) && \
	PYTHONPATH=python $(PYTHON) -m diffkern.gpu_check --out $(OUT) --budget-s $$(( left > 60 ? left : 60 ))

cmake: $(STAMP)
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build-cmake -j 2

clean:
	rm -rf build build-cmake python/diffkern/_C*.so python/diffkern/_build_info.py
