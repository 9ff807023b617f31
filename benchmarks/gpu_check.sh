#!/usr/bin/env bash
# One GPU session, prepared: the CUDA tests (tests/test_cuda.py), then the GPU rows of
# benchmarks/results/speed.md, inside 10 minutes (speed.py writes each finished row at once).
#   make gpu-wheels                # where the package registry is: hydra-core, omegaconf, antlr4 into .whl/
#   bash benchmarks/gpu_check.sh   # on the GPU machine (no network needed); logs under $OUT (default gpu_out/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/edmlab-site .whl/*.whl || {
    echo "hydra-core/omegaconf missing and no .whl/ to install them from: run make gpu-wheels first"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/edmlab-site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; } | tee "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log"
timeout 390 python3 benchmarks/speed.py --device cuda 2>&1 | tee "$OUT/speed.log"
cp benchmarks/results/speed.md benchmarks/results/speed.json "$OUT/" 2>/dev/null || true
