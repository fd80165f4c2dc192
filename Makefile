# The two commands of the README. Each does all of its own set-up and is idempotent:
#   make demo   - a real run on a simulated 4-rank cluster (CPU processes over gloo)
#   make test   - the whole test suite
# On a CPU-only machine torch comes from the pinned CPU wheel (no multi-GB CUDA download). On a machine
# that already has a CUDA torch, `make test SYSTEM_TORCH=1` builds the venv on top of it instead.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# where torch comes from: pip's default (this project's machines find the CPU wheel there); elsewhere
# TORCH_INDEX=https://download.pytorch.org/whl/cpu avoids PyPI's CUDA build
TORCH_INDEX ?=
EXTRAS ?= dev,triton,deepspeed,ray,data,hf
SYSTEM_TORCH ?=
STAMP := $(VENV)/.longctx-installed
PYTEST_ARGS ?=
# the tested versions of every other package (see constraints.txt); `PIN=` installs the newest instead
PIN ?= $(if $(SYSTEM_TORCH),,-c constraints.txt)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test lint mutants gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
	@if [ -z "$(SYSTEM_TORCH)" ]; then \
	  $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; \
	else \
	  $(BIN)/python -c "import torch; print('using existing torch', torch.__version__)"; \
	fi
	$(BIN)/python -m pip install -q $(PIN) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: setup
	$(BIN)/longctx demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# not part of `make test`: deliberate bugs, one at a time, each of which some test must catch (~35 min)
mutants: setup
	$(BIN)/python tools/mutants.py

# the one prepared script for a lent GPU (about 8 minutes; see tools/gpu_check.py). It installs nothing from
# an index, so it does not depend on `setup`: on the GPU machine it runs with that machine's python3.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) tools/gpu_check.py

lint: setup
	$(BIN)/ruff check longctx tests tools

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .cache
