"""Train an EDM denoiser: `python train.py` (the digits demo, CPU) or `python train.py experiment=cifar_edm`.

Configuration: configs/train.yaml (Hydra); see `python train.py --help` for the groups and their options.
"""

from edmlab.cli.train import main

if __name__ == "__main__":
    main()
