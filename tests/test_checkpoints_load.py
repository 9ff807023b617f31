"""edmlab.checkpoints: the one resolver (file, run folder, `last`), `load_any` reporting what it loaded, and the
version check of a training checkpoint's metadata."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from test_checkpoints_edm import edm_network, write_edm_snapshot
from test_checkpoints_edm2 import edm2_denoiser, write_edm2_snapshot

from edmlab.checkpoints import (
    CheckpointFormatError,
    IncompatibleCheckpoint,
    Loaded,
    content_hash,
    load_any,
    load_denoiser,
    load_training_checkpoint,
    resolve,
    save_denoiser,
)
from edmlab.checkpoints.resolve import RUN_CANDIDATES
from edmlab.checkpoints.training import EMA_PREFIX, META_FORMAT, META_VERSION, RAW_PREFIX
from edmlab.networks import build
from edmlab.precond import Denoiser

# ------------------------------------------------------------------------------------------- the resolver


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_run_folder_candidates_in_order():
    assert [str(p) for p in RUN_CANDIDATES] == ["checkpoints/last.ckpt", "last.ckpt", "checkpoints/last_ema.pt",
                                                "last_ema.pt"]


def test_run_folder_resolves_to_its_first_candidate(tmp_path):
    run = tmp_path / "run"
    files = [touch(run / candidate) for candidate in reversed(RUN_CANDIDATES)]  # last_ema.pt first
    for expected in reversed(files):  # each removal uncovers the next candidate in order
        assert resolve(run) == expected
        expected.unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt=.*run: a folder without checkpoints/last.ckpt or "
                                                r"last_ema.pt; pass a checkpoint file or a run folder"):
        resolve(run)


def test_training_accepts_only_last_ckpt(tmp_path):
    run = tmp_path / "run"
    touch(run / "checkpoints" / "last_ema.pt")
    touch(run / "last_ema.pt")
    assert resolve(run) == run / "checkpoints" / "last_ema.pt"
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*run: folder has no checkpoints/last.ckpt \(nor "
                                                r"last.ckpt\); pass a run folder of `python train.py` or a .ckpt"):
        resolve(run, training=True)
    assert resolve(touch(run / "last.ckpt"), training=True) == run / "last.ckpt"
    assert resolve(run, training=True) == run / "last.ckpt"
    assert resolve(touch(run / "checkpoints" / "last.ckpt"), training=True) == run / "checkpoints" / "last.ckpt"
    assert resolve(run, training=True) == run / "checkpoints" / "last.ckpt"


def test_files_unset_and_missing(tmp_path):
    f = touch(tmp_path / "any name.bin")
    assert resolve(f) == f and resolve(f, training=True) == f and resolve(str(f)) == f
    assert resolve(None, training=True) is None and resolve("", training=True) is None  # a fresh run
    with pytest.raises(ValueError, match="ckpt is not set"):
        resolve(None)
    with pytest.raises(FileNotFoundError, match=r"ckpt=.*missing.pt: no such file$"):
        resolve(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing.pt: no such file or folder; use "
                                                r"ckpt_path=last, a run folder or a .ckpt file"):
        resolve(tmp_path / "missing.pt", training=True)


def test_last_prefers_its_own_folder_then_the_newest_run(tmp_path):
    runs, mine = tmp_path / "runs", tmp_path / "runs" / "mine"
    old, new = touch(runs / "old" / "checkpoints" / "last.ckpt"), touch(runs / "new" / "checkpoints" / "last.ckpt")
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))
    assert resolve("last", training=True, runs_dir=runs, output_dir=mine) == new
    own = touch(mine / "checkpoints" / "last.ckpt")
    os.utime(own, (500, 500))  # older than both: still its own
    assert resolve("last", training=True, runs_dir=runs, output_dir=mine) == own
    assert resolve("last", training=True, runs_dir=tmp_path / "nowhere", output_dir=tmp_path / "fresh") is None
    assert resolve("last", training=True, runs_dir=runs, output_dir=tmp_path / "fresh", own_only=True) is None


# ------------------------------------------------------------------------------------------- what load_any reports


def mlp_denoiser(seed: int) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(build("mlp", img_resolution=1, img_channels=2, hidden_channels=8, num_blocks=1)).eval()


def write_training_checkpoint(path: Path, step: int = 12, **meta) -> tuple[Path, Denoiser, Denoiser]:
    """A last.ckpt as edmlab's training writes it (EMA and raw weights, checkpoint['edmlab']), without Lightning."""
    ema, raw = mlp_denoiser(0), mlp_denoiser(1)
    export = torch.load(save_denoiser(ema, path.with_suffix(".export")), weights_only=True)
    state = {**{EMA_PREFIX + k: v for k, v in ema.state_dict().items()},
             **{RAW_PREFIX + k: v for k, v in raw.state_dict().items()}}
    entry = {"format": META_FORMAT, "version": META_VERSION, "network": export["network"],
             "precond": export["precond"], "config": {"seed": 3}, "sha256": content_hash(state), **meta}
    torch.save({"global_step": step, "pytorch-lightning_version": "2.6.0", "state_dict": state, "edmlab": entry}, path)
    return path, ema, raw


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_reports_kind_path_step_and_config(tmp_path):
    denoiser = mlp_denoiser(0)
    path = save_denoiser(denoiser, tmp_path / "run" / "checkpoints" / "last_ema.pt", config={"seed": 5},
                         global_step=7)
    loaded = load_any(tmp_path / "run")  # the run folder resolves to the file
    assert isinstance(loaded, Loaded)
    assert (loaded.kind, loaded.path, loaded.step) == ("export", path, 7)
    assert loaded.meta["config"] == {"seed": 5} and loaded.meta["sha256"] == content_hash(denoiser.state_dict())
    assert "state_dict" not in loaded.meta and same_weights(loaded.denoiser, denoiser)
    assert load_any(save_denoiser(denoiser, tmp_path / "nostep.pt")).step is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.step = 8


def test_training_checkpoint_reports_kind_path_step_and_both_weight_sets(tmp_path):
    path, ema, raw = write_training_checkpoint(tmp_path / "last.ckpt", step=12)
    for use_ema, weights in ((True, ema), (False, raw)):
        loaded = load_any(path, use_ema=use_ema)
        assert (loaded.kind, loaded.path, loaded.step) == ("training", path, 12)
        assert loaded.meta["config"] == {"seed": 3} and loaded.meta["format"] == META_FORMAT
        assert same_weights(loaded.denoiser, weights)


def test_edm_and_edm2_pickles_report_their_kind(tmp_path):
    edm = write_edm_snapshot(tmp_path / "network-snapshot-000000.pkl", edm_network("ddpmpp", 0, 0), "EDMPrecond",
                             "ddpmpp")
    loaded = load_any(edm)
    assert (loaded.kind, loaded.path, loaded.step) == ("edm-pickle", edm, None)
    assert loaded.meta["precond_class"] == "EDMPrecond" and loaded.meta["encoder"] is None

    edm2 = write_edm2_snapshot(tmp_path / "edm2.pkl", edm2_denoiser(label_dim=0))
    loaded = load_any(edm2)
    assert (loaded.kind, loaded.path, loaded.step) == ("edm2-pickle", edm2, None)
    assert loaded.meta["precond_class"] == "Precond" and loaded.meta["encoder"]["kind"] == "sd_vae"


# ------------------------------------------------------------------------------------------- metadata version


@pytest.mark.parametrize("meta, found", [
    ({"format": "someone-else"}, f"format 'someone-else' version {META_VERSION}"),
    ({"version": META_VERSION + 1}, f"format '{META_FORMAT}' version {META_VERSION + 1}"),
])
def test_another_format_or_a_newer_version_is_refused_naming_both(tmp_path, meta, found):
    path, _, _ = write_training_checkpoint(tmp_path / "last.ckpt", **meta)
    reads = f"this edmlab reads format '{META_FORMAT}' up to version {META_VERSION}"
    with pytest.raises(IncompatibleCheckpoint) as err:
        load_training_checkpoint(path)
    assert str(err.value).startswith(f"cannot resume: {path}: ") and found in str(err.value)
    assert reads in str(err.value)
    with pytest.raises(CheckpointFormatError) as err:
        load_any(path)
    assert str(err.value).startswith(f"{path}: ") and found in str(err.value) and reads in str(err.value)


def test_metadata_without_format_and_version_is_an_older_edmlab_file(tmp_path):
    path, ema, _ = write_training_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["edmlab"]["format"], ckpt["edmlab"]["version"]
    torch.save(ckpt, path)
    assert load_training_checkpoint(path)["global_step"] == 12
    assert same_weights(load_any(path).denoiser, ema)
    older = write_training_checkpoint(tmp_path / "older.ckpt", version=0)[0]  # older versions are read too
    assert load_training_checkpoint(older)["edmlab"]["version"] == 0


def test_files_that_store_the_precond_row_under_kind_still_load(tmp_path):
    """Exports, last.ckpt metadata and post-hoc EMA snapshots written with precond {"kind": ...} read as `name`."""
    from types import SimpleNamespace

    from edmlab.checkpoints.weights import precond_kwargs
    from edmlab.training.phema import list_snapshots, reconstruct_denoiser
    from edmlab.training.resume import check_compatible

    net = build("mlp", img_resolution=1, img_channels=2, hidden_channels=8, num_blocks=1, emb_channels=8)
    D = Denoiser(net, name="vp", beta_d=10.0).eval()
    old = {"kind": "vp", "sigma_data": 0.5, "beta_d": 10.0}
    assert precond_kwargs({"precond": old}) == {"name": "vp", "sigma_data": 0.5, "beta_d": 10.0}
    x, sigma = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0.01, 0.3, 2.0, 40.0])

    export = torch.load(save_denoiser(D, tmp_path / "old.pt"), weights_only=True)
    assert export["precond"] == {"name": "vp", "sigma_data": 0.5, "beta_d": 10.0}
    torch.save({**export, "precond": old}, tmp_path / "old.pt")
    state = {k: v.detach().clone() for k, v in D.state_dict().items()}
    meta = {"network": dict(net.build_config), "precond": old, "data_shape": [2]}
    torch.save({"edmlab": meta, "state_dict": {f"ema.module.{k}": v for k, v in state.items()},
                "pytorch-lightning_version": "2.6"}, tmp_path / "last.ckpt")
    torch.save({"format": "edmlab-phema", "version": 1, "nimg": 1000, "sigma_rels": [0.05], "state_dicts": [state],
                "network": dict(net.build_config), "precond": old, "config": None}, tmp_path / "phema-000001.pt")
    loaded = [load_denoiser(tmp_path / "old.pt"), load_any(tmp_path / "last.ckpt").denoiser,
              reconstruct_denoiser(list_snapshots(tmp_path), 0.05)[0]]
    with torch.no_grad():
        for other in loaded:
            assert (other.precond.name, other.precond_params) == ("vp", {"sigma_data": 0.5, "beta_d": 10.0})
            assert torch.equal(other(x, sigma), D(x, sigma))

    own = SimpleNamespace(state_dict=dict)  # check_compatible reads the module's metadata and tensors
    own.edmlab_metadata = lambda: {"network": {}, "precond": {"name": "vp", "sigma_data": 0.5, "beta_d": 10.0}}
    check_compatible({"edmlab": meta}, own)  # the same row: resumable
    own.edmlab_metadata = lambda: {"network": {}, "precond": {"name": "ve", "sigma_data": 0.5, "beta_d": 10.0}}
    with pytest.raises(IncompatibleCheckpoint, match=r"precond\.name: checkpoint 'vp' vs this run 've'"):
        check_compatible({"edmlab": meta}, own)
