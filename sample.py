"""Generate images from a checkpoint: `python sample.py ckpt=...` (lands with the sampling issue)."""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: not implemented yet; `edmlab.sampling.sample` is the library API meanwhile.")
