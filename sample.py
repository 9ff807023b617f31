"""Generate images from a checkpoint, one per seed as EDM does: `python sample.py ckpt=PATH seeds=0-49999`.

Configuration: configs/sample.yaml (Hydra); `python sample.py --help` lists the options and groups.
"""

from edmlab.cli.sample import main

if __name__ == "__main__":
    main()
