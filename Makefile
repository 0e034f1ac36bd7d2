# Two commands for a fresh machine with Python >= 3.10 and pip:
#   make demo   - the main job on the embedded default
#   make test   - the test suite
# Both create (or reuse) the virtualenv $(VENV) and install what they need.

PYTHON ?= python3
VENV ?= .venv
# Extra pip flags for torch (a CPU-only test reference). Point them at the
# PyTorch CPU wheel index on machines whose default torch wheel is a CUDA
# build, e.g. PIP_TORCH_FLAGS='--index-url <cpu wheel index>'.
PIP_TORCH_FLAGS ?=
PYTEST_FLAGS ?= -n auto

BIN := $(VENV)/bin
STAMP := $(VENV)/.mov-jax-installed

.PHONY: demo test install clean

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

clean:
	rm -rf $(VENV) build *.egg-info
