# edmlab: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
TORCH  ?= 2.13.0
PIP     = $(PYTHON) -m pip install --disable-pip-version-check -q

.PHONY: install demo test test-slow lint bench docker

install:  ## torch pinned in the same pip call as everything else (never an unpinned resolve)
	$(PIP) "torch==$(TORCH)" -e ".[dev,cluster]"

demo: install  ## the main job on the embedded default: no download
	$(PYTHON) scripts/demo_processes.py --out outputs/processes.png

test: install
	WANDB_MODE=disabled $(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	WANDB_MODE=disabled $(PYTHON) -m pytest -q -m slow

lint:
	ruff check src tests scripts benchmarks train.py sample.py

bench: install
	$(PYTHON) benchmarks/solvers.py
