"""Post-hoc EMA (EDM2 Sec. 3.2): the EMA of any length from the phema-*.pt snapshots of a training run.

    python scripts/reconstruct_phema.py logs/train/runs/<stamp>/checkpoints --sigma-rel 0.05 0.1 0.15 \\
        --outdir phema/
    python sample.py ckpt=phema/phema-0000128-0.100.pt

Each output is an edmlab inference checkpoint (edmlab.checkpoints.save_denoiser) that sample.py loads. The
snapshots come from training with model.phema_sigma_rels=[0.05,0.10] (written at every
callbacks.checkpoint.snapshot_every_kimg and with every checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edmlab.checkpoints import save_denoiser
from edmlab.training.ema import posthoc_coefficients
from edmlab.training.phema import list_snapshots, reconstruct_denoiser

MAX_SIGMA_REL = 12**-0.5  # gamma > 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", nargs="+", type=Path, help="phema-*.pt files or folders holding them")
    parser.add_argument("--sigma-rel", nargs="+", type=float, default=[], help="relative EMA lengths to build")
    parser.add_argument("--nimg", type=int, default=None, help="training time (images) of the reconstruction; "
                                                               "default: the latest snapshot")
    parser.add_argument("--outdir", type=Path, default=Path("phema"), help="where the checkpoints go")
    parser.add_argument("--list", action="store_true", help="print the stored profiles and exit")
    args = parser.parse_args(argv)

    snapshots = list_snapshots(args.snapshots)
    if args.list or not args.sigma_rel:
        for s in snapshots:
            print(f"{s.path.name}: nimg {s.nimg}, sigma_rel {s.sigma_rel:.3f}")
        if not args.list:
            print("pass --sigma-rel to reconstruct", file=sys.stderr)
        return 0 if args.list else 2
    bad = [s for s in args.sigma_rel if not 0 < s < MAX_SIGMA_REL]
    if bad:
        parser.error(f"--sigma-rel must lie in (0, {MAX_SIGMA_REL:.4f}); got {bad}")
    nimg = max(s.nimg for s in snapshots) if args.nimg is None else args.nimg
    for sigma_rel in args.sigma_rel:
        denoiser, meta = reconstruct_denoiser(snapshots, sigma_rel, nimg)
        used = [s for s in snapshots if 0 < s.nimg <= nimg]
        x = posthoc_coefficients([s.nimg for s in used], [s.sigma_rel for s in used], nimg, sigma_rel)
        config = {"phema": {"sigma_rel": sigma_rel, "nimg": nimg, "coefficients": [float(v) for v in x],
                            "sources": [f"{s.path.name}[{s.sigma_rel:g}]" for s in used]},
                  "train_config": meta.get("config")}
        out = save_denoiser(denoiser, args.outdir / f"phema-{nimg // 1000:07d}-{sigma_rel:.3f}.pt", config=config)
        print(f"sigma_rel {sigma_rel:.3f} at {nimg} images from {len(used)} profiles -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
