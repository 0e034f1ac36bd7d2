# Two commands for a fresh machine with Python >= 3.10 and pip:
#   make demo   - the main job on the embedded default
#   make test   - the test suite
#   make bench  - the benchmarks of bench/, JSON into $(BENCH_OUT)
# Both create (or reuse) the virtualenv $(VENV) and install what they need.

PYTHON ?= python3
VENV ?= .venv
# Extra pip flags for torch (a CPU-only test reference). Point them at the
# PyTorch CPU wheel index on machines whose default torch wheel is a CUDA
# build, e.g. PIP_TORCH_FLAGS='--index-url <cpu wheel index>'.
PIP_TORCH_FLAGS ?=
# --durations: the slowest tests in every run, CI logs included.
PYTEST_FLAGS ?= -n auto --durations=25
BENCH_OUT ?= bench/results/latest

BIN := $(VENV)/bin
STAMP := $(VENV)/.mov-jax-installed
# glibc malloc set up for XLA on CPU, for the benchmarks: faster CPU steps for
# a higher peak host memory (mov_jax/host_memory.py). Settings already in
# GLIBC_TUNABLES win.
TUNED := GLIBC_TUNABLES="$$($(BIN)/python -m mov_jax.host_memory)"

.PHONY: demo test bench install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first and alone: the CPU build, never a CUDA one.
	$(BIN)/python -m pip install --quiet $(PIP_TORCH_FLAGS) 'torch==2.13.0'
	$(BIN)/python -c "import torch, sys; sys.exit('torch is a CUDA build; set PIP_TORCH_FLAGS to a CPU wheel index' if torch.version.cuda else 0)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mov_jax.demo

test: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest $(PYTEST_FLAGS) tests

# On whatever backend JAX finds (CPU, GPU or TPU); not part of the tests.
# --overwrite: $(BENCH_OUT) holds the latest run, which this one replaces.
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(TUNED) $(BIN)/python bench/train_step.py --overwrite --out=$(BENCH_OUT)/train_step.json
	$(TUNED) $(BIN)/python bench/matmul_floor.py --overwrite --out=$(BENCH_OUT)/matmul_floor.json
	$(TUNED) $(BIN)/python bench/packing.py --overwrite --out=$(BENCH_OUT)/packing.json
	$(TUNED) $(BIN)/python bench/scaling.py --overwrite --out=$(BENCH_OUT)/scaling.json
	$(TUNED) $(BIN)/python bench/scoring.py --overwrite --out=$(BENCH_OUT)/scoring.json
	$(TUNED) $(BIN)/python bench/mov_site.py --overwrite --out=$(BENCH_OUT)/mov_site.json

clean:
	rm -rf $(VENV) build *.egg-info
