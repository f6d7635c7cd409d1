# Two commands for a newcomer:  `make demo` (install + run the main job) and `make test` (install + tests).
# torch is installed first and pinned: a plain `pip install torch` pulls the multi-GB CUDA build.
# With a GPU, install your CUDA torch build into .venv first (or set TORCH_SPEC), then run make.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench-quick lint
install: $(STAMP)

$(STAMP): pyproject.toml requirements-offline.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"  # the `deepspeed` extra; setup.py imports torch
	$(BIN)/python -m pip install -q --no-deps -r requirements-offline.txt
	touch $(STAMP)

demo: install
	$(BIN)/python train.py fit --config configs/quickstart.yaml

test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench-quick: install
	for b in bench/*.py; do $(BIN)/python $$b --quick || exit 1; done

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
