# edmlab on CUDA: the official PyTorch image of the pinned torch, edmlab installed on top with the same pin
# (pip keeps the image's CUDA build instead of resolving another torch).
#   make docker                                   # = docker build --build-arg TORCH=2.13.0 -t edmlab:2.13.0 .
#   docker run --rm edmlab:2.13.0                 # python train.py --help
#   docker run --rm --gpus all --shm-size=16g -v "$PWD/data:/opt/edmlab/data" -v "$PWD/logs:/opt/edmlab/logs" \
#     edmlab:2.13.0 experiment=cifar_edm trainer.devices=8
#   docker run --rm --gpus all -v ... edmlab:2.13.0 sample ckpt=/opt/edmlab/logs/...   # sample.py
# Pick another CUDA flavour of the same torch with --build-arg CUDA=... (tags: hub.docker.com/r/pytorch/pytorch).
ARG TORCH=2.13.0
ARG CUDA=12.8
ARG CUDNN=9
FROM pytorch/pytorch:${TORCH}-cuda${CUDA}-cudnn${CUDNN}-runtime

ARG TORCH
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDMLAB_ROOT=/opt/edmlab \
    XDG_CACHE_HOME=/opt/edmlab/data/.cache \
    MPLCONFIGDIR=/tmp/matplotlib

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/edmlab

# The package first (this layer is rebuilt only when pyproject.toml or src/ change). torch is named with
# the pin in the same pip call: it is already installed, so nothing is downloaded for it (DL3013: the
# other requirements come from pyproject.toml).
COPY pyproject.toml README.md ./
COPY src ./src
# hadolint ignore=DL3013
RUN python -c "import sys; assert sys.version_info >= (3, 11), f'edmlab needs Python >= 3.11, the base image has {sys.version}'" \
 && python -m pip install "torch==${TORCH}" ".[cluster]" \
 && python -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '${TORCH}' else f'torch {v} in the image, ${TORCH} pinned')" \
 && rm -rf build src/*.egg-info

COPY configs ./configs
COPY train.py sample.py ./
COPY scripts ./scripts
COPY docker/entrypoint.sh /usr/local/bin/edmlab-entrypoint

# Runs as an unprivileged user; data (datasets, download cache) and logs (run folders) are volumes.
# Run with --user "$(id -u):$(id -g)" to own what it writes on bind mounts.
RUN useradd --create-home --uid 1000 --shell /bin/bash edm \
 && mkdir -p /opt/edmlab/data /opt/edmlab/logs \
 && chown -R edm:edm /opt/edmlab/data /opt/edmlab/logs \
 && chmod 0755 /usr/local/bin/edmlab-entrypoint
USER 1000:1000
VOLUME ["/opt/edmlab/data", "/opt/edmlab/logs"]

ENTRYPOINT ["/usr/local/bin/edmlab-entrypoint"]
CMD ["--help"]
