"""Train an EDM denoiser: `python train.py experiment=cifar_edm` (lands with the training issue)."""

import sys

if __name__ == "__main__":
    sys.exit("train.py: training is not implemented yet; run `python scripts/demo_processes.py` for the core demo.")
