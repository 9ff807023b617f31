# edmlab: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
TORCH  ?= 2.13.0
PIP     = $(PYTHON) -m pip install --disable-pip-version-check -q
DOCKER_CUDA ?= 12.8

.PHONY: install demo test test-slow lint bench docker

install:  ## torch pinned in the same pip call as everything else (never an unpinned resolve)
	$(PIP) "torch==$(TORCH)" -e ".[dev,cluster]"

demo: install  ## the main job on the embedded default: no download
	WANDB_MODE=$${WANDB_MODE:-offline} $(PYTHON) train.py

test: install
	WANDB_MODE=disabled $(PYTHON) -m pytest -q -m "not slow"

test-slow: install
	WANDB_MODE=disabled $(PYTHON) -m pytest -q -m slow

lint:
	ruff check src tests scripts benchmarks train.py sample.py

bench: install
	$(PYTHON) benchmarks/solvers.py
	$(PYTHON) benchmarks/digits_demo.py

docker:  ## CUDA image of the same torch pin (needs a Docker engine); `docker run --rm edmlab:$(TORCH)` = train.py --help
	docker build --build-arg TORCH=$(TORCH) --build-arg CUDA=$(DOCKER_CUDA) -t edmlab:$(TORCH) .
