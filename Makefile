# One-command set-up on a fresh machine (see README):
#   make test    venv + torch + build (CUDA sources compiled where a toolkit is) + ctest + pytest
#   make demo    the main job: SSA and BP on the embedded digits data, compared (python -m ssa train)
#   make compare every method x 3 seeds on digits, table + plots (python -m ssa compare, docs/results.md)
#   make bench   pytest-benchmark over every op and provider available here
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS ?= 2
export MAX_JOBS

# Without a visible GPU torch would compile for every architecture: default to Hopper there.
NO_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 || echo 1)
ifeq ($(NO_GPU),1)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

.PHONY: venv install test pytest ctest bench demo compare demo-ops lint clean

$(VENV)/.deps: pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q setuptools wheel ninja "cmake>=3.30" pytest pytest-benchmark expecttest hypothesis scikit-learn mlxtend ruff tqdm matplotlib pyyaml
	touch $@

venv: $(VENV)/.deps

install: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps .

ctest: venv
	PYTHON=$(PY) PATH=$(abspath $(VENV))/bin:$$PATH scripts/ctest.sh

pytest: install
	SSA_KERNELS_EXPECT_EXT=1 SSA_KERNELS_EXPECT_CUDA=$$($(PY) tools/cuda_env.py --expect-cuda) \
	  $(VENV)/bin/pytest tests

test: install lint ctest pytest

bench: install
	$(VENV)/bin/pytest benchmarks --benchmark-only

demo: install
	$(PY) -m ssa train --model mlp --dataset digits --method ssa,dfa,bp --epochs 30 --out runs/digits

compare: install
	$(PY) -m ssa compare --config configs/digits_mlp.yaml --quiet

demo-ops: install
	$(PY) examples/digits_ssa_ops.py

lint: venv
	$(VENV)/bin/python -m ruff check .

clean:
	rm -rf build *.egg-info ssa_kernels/*.so
