"""Post-hoc EMA end to end: closed-form profile algebra, reconstruction of a known EMA, training -> script ->
sample.py's loader."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edmlab import precond
from edmlab.checkpoints import load_any
from edmlab.training.ema import PowerFunctionEMA, _profile_dot, posthoc_coefficients, sigma_rel_to_gamma
from edmlab.training.phema import list_snapshots, reconstruct, save_snapshot

ROOT = Path(__file__).resolve().parents[1]
TAU = np.linspace(0, 1, 400_001)


def profile(t: float, sigma_rel: float) -> np.ndarray:
    """p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (EDM2 eq. 2 in continuous time)."""
    g = sigma_rel_to_gamma(sigma_rel)
    return np.where(TAU <= t, (g + 1) * TAU**g / t ** (g + 1), 0.0)


@pytest.mark.parametrize("ta, ra, tb, rb", [(0.5, 0.05, 1.0, 0.10), (1.0, 0.05, 0.7, 0.10), (0.8, 0.10, 0.8, 0.10)])
def test_profile_inner_products_equal_quadrature(ta, ra, tb, rb):
    quad = np.trapezoid(profile(ta, ra) * profile(tb, rb), TAU)
    closed = _profile_dot(ta, sigma_rel_to_gamma(ra), tb, sigma_rel_to_gamma(rb))
    assert closed == pytest.approx(quad, rel=1e-4)


def test_coefficients_solve_the_least_squares_problem_over_profiles():
    times, rels, target = [0.25, 0.5, 0.75, 1.0], [0.05, 0.10], 0.07
    snaps = [(t, r) for t in times for r in rels]
    x = posthoc_coefficients([t for t, _ in snaps], [r for _, r in snaps], 1.0, target)
    assert x.sum() == pytest.approx(1.0, abs=1e-12)  # normalised as NVlabs'
    P = np.stack([profile(t, r) for t, r in snaps])
    p_target = profile(1.0, target)
    x_quad = np.linalg.lstsq(P @ P.T, P @ p_target, rcond=None)[0]
    x_quad /= x_quad.sum()
    err = lambda c: math.sqrt(np.trapezoid((c @ P - p_target) ** 2, TAU))  # noqa: E731
    assert err(x) == pytest.approx(err(x_quad), rel=1e-2)
    assert err(x) < 0.05 * math.sqrt(np.trapezoid(p_target**2, TAU))  # 3.6% L2 error for this set
    # a stored profile is its own reconstruction
    assert posthoc_coefficients([1.0, 1.0], [0.05, 0.10], 1.0, 0.05) == pytest.approx([1, 0], abs=1e-9)


def test_reconstruction_of_a_tracked_ema_from_a_synthetic_weight_history(tmp_path):
    """theta_t = sin(t / 300) + (t / T)^2: the 0.07 EMA rebuilt from 0.05/0.10 snapshots equals the tracked one."""
    steps, every, rels, target = 4000, 400, [0.05, 0.10], 0.07
    holder = torch.nn.Module()
    holder.net = torch.nn.Linear(1, 2, dtype=torch.float64)
    holder.precond, holder.precond_params = precond.get("edm"), {"sigma_data": 0.5}
    holder.network_config = None  # not built by edmlab.networks.build
    tracked = PowerFunctionEMA(holder, rels)
    truth = PowerFunctionEMA(holder, [target])
    for t in range(1, steps + 1):
        with torch.no_grad():
            holder.net.weight.copy_(torch.tensor([[math.sin(t / 300)], [math.cos(t / 500)]]) + (t / steps) ** 2)
            holder.net.bias.fill_(t / steps)
        tracked.update(holder, t, 1)
        truth.update(holder, t, 1)
        if t % every == 0:
            save_snapshot(tmp_path / f"phema-{t:06d}.pt", tracked, t, holder)
    snapshots = list_snapshots(tmp_path)
    assert [(s.nimg, s.sigma_rel) for s in snapshots[:3]] == [(400, 0.05), (400, 0.10), (800, 0.05)]
    state, _ = reconstruct(snapshots, target)
    expected = truth.emas[0].state_dict()
    for key in ("net.weight", "net.bias"):
        assert torch.allclose(state[key], expected[key], atol=2e-3), key  # weights vary by ~2 over training
    # at an earlier time only the snapshots up to it are used
    early, _ = reconstruct(snapshots, 0.10, nimg=2000)
    stored = torch.load(tmp_path / "phema-002000.pt", weights_only=True)["state_dicts"][1]
    assert torch.allclose(early["net.weight"], stored["net.weight"], atol=1e-9)
    with pytest.raises(ValueError, match="not the time of any snapshot"):
        reconstruct(snapshots, 0.10, nimg=1234)


@pytest.mark.slow
def test_training_snapshots_to_script_to_sampler(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import reconstruct_phema
    from test_train import FAST, compose_cfg

    from edmlab.cli.train import train

    cfg = compose_cfg(tmp_path, ["experiment=digits_edm2", *FAST, "trainer.max_steps=3", "data.batch_size=8",
                                 "network.model_channels=8", "network.channels_per_head=8",
                                 "callbacks.checkpoint.snapshot_every_kimg=0.008"])
    train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("phema-*.pt")) == [f"phema-step000000{i}.pt" for i in (1, 2, 3)]
    outdir = tmp_path / "phema"
    assert reconstruct_phema.main([str(checkpoints), "--sigma-rel", "0.10", "0.07", "--outdir", str(outdir)]) == 0
    # the last stored 0.10 profile comes back as itself, through the file sample.py reads
    rebuilt = load_any(outdir / "phema-0000000-0.100.pt").denoiser
    stored = torch.load(checkpoints / "phema-step0000003.pt", weights_only=True)
    for key, value in stored["state_dicts"][1].items():
        assert torch.allclose(rebuilt.state_dict()[key], value, atol=1e-5), key
    x = torch.randn(2, 1, 8, 8)
    labels = torch.eye(10)[:2]
    D, u = load_any(outdir / "phema-0000000-0.070.pt").denoiser(x, 1.0, class_labels=labels, return_logvar=True)
    assert D.shape == x.shape and torch.isfinite(u).all()
