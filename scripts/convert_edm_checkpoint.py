"""Convert an official EDM snapshot (network-snapshot-*.pkl) to an edmlab checkpoint, running nothing from it.

    python scripts/convert_edm_checkpoint.py edm-cifar10-32x32-cond-vp.pkl edm-cifar10-cond-vp.pt
    python scripts/convert_edm_checkpoint.py edm2-img512-s-2147483-0.130.pkl edm2-img512-s.pt   # EDM2 too
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edmlab.checkpoints import read_edm_snapshot, save_denoiser
from edmlab.networks import num_parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="EDM snapshot pickle (network-snapshot-*.pkl)")
    parser.add_argument("dst", type=Path, help="edmlab checkpoint to write (.pt)")
    parser.add_argument("--key", default="ema", help="snapshot entry holding the network (default: ema)")
    args = parser.parse_args(argv)

    snapshot = read_edm_snapshot(args.src, key=args.key)
    config = {"converted_from": str(args.src), "edm_snapshot": snapshot.metadata()}
    save_denoiser(snapshot.denoiser, args.dst, config=config)
    net = snapshot.denoiser.net
    print(f"{args.src} -> {args.dst}: {snapshot.precond_class} -> precond={snapshot.denoiser.precond.name}, "
          f"network={net.build_config['name']} ({num_parameters(net):,} parameters, "
          f"{net.img_resolution}x{net.img_resolution}x{net.img_channels}, label_dim={net.label_dim})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
