"""Post-hoc EMA reconstruction (EDM2 Sec. 3.2, App. C.3): any sigma_rel from the stored snapshots.

`reconstruct` combines the snapshots' weights (`edmlab.checkpoints.phema`, the file format) with EDM2's
least-squares coefficients (`posthoc_coefficients`) into one state dict, reading one snapshot at a time so
memory stays at two copies of the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edmlab.checkpoints.phema import SnapshotInfo, list_snapshots, load_snapshot, save_snapshot
from edmlab.training.ema import posthoc_coefficients

__all__ = ["reconstruct", "reconstruct_denoiser", "SnapshotInfo", "list_snapshots", "save_snapshot"]


def reconstruct(snapshots: Sequence[SnapshotInfo], sigma_rel: float,
                nimg: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict of the sigma_rel EMA at time nimg, snapshot metadata) as sum_i x_i theta_i (EDM2 eq. 8)."""
    nimg = max(s.nimg for s in snapshots) if nimg is None else int(nimg)
    if not any(s.nimg == nimg for s in snapshots):
        raise ValueError(f"nimg={nimg} is not the time of any snapshot; choose one of "
                         f"{sorted({s.nimg for s in snapshots})}")
    used = [s for s in snapshots if 0 < s.nimg <= nimg]  # later snapshots cannot describe an earlier average
    x = posthoc_coefficients([s.nimg for s in used], [s.sigma_rel for s in used], nimg, sigma_rel)
    acc: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for path in sorted({s.path for s in used}):
        snap = load_snapshot(path)
        meta = meta or {k: snap[k] for k in ("network", "precond", "config")}
        for s, w in zip(used, x, strict=True):
            if s.path != path:
                continue
            for key, value in snap["state_dicts"][s.index].items():
                if not value.is_floating_point():
                    acc[key] = value.clone()
                else:  # float buffers are equal in every profile and the weights sum to 1: they stay put
                    acc[key] = acc.get(key, 0) + float(w) * value.double()
    dtypes = {k: v.dtype for k, v in load_snapshot(used[0].path)["state_dicts"][used[0].index].items()}
    return {k: v.to(dtypes[k]) for k, v in acc.items()}, meta


def reconstruct_denoiser(snapshots: Sequence[SnapshotInfo], sigma_rel: float, nimg: int | None = None):
    """The reconstructed EMA as a Denoiser (rebuilt from the snapshot's network and precond), in eval mode."""
    from edmlab.checkpoints.weights import load_weights, precond_kwargs
    from edmlab.networks import build
    from edmlab.precond import Denoiser

    state, meta = reconstruct(snapshots, sigma_rel, nimg)
    if not meta.get("network"):
        raise ValueError("the snapshots hold no network build config; they were not written by edmlab training")
    denoiser = Denoiser(build(**dict(meta["network"])), **precond_kwargs(meta))
    load_weights(denoiser, state, source="post-hoc EMA reconstruction")
    return denoiser.eval(), meta
