"""Log-likelihoods against exact answers: closed-form mixture densities, a scipy ODE solve, Hutchinson's mean."""

import math

import numpy as np
import pytest
import torch

from edmlab import analytic
from edmlab.likelihood import bits_per_dim, dequantize, hutchinson_probes, log_likelihood
from edmlab.process import NAMES as PROCESSES

MIXTURE = analytic.GaussianMixture([1, 2, 1], [[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5], [0.0, 1.0, -1.0]],
                                   [[0.3, 0.5, 0.4], [0.6, 0.2, 0.3], [0.4, 0.4, 0.2]])
X = MIXTURE.sample(5, generator=torch.Generator().manual_seed(0))


def reference_log_likelihood(denoiser, x, sigma_min, sigma_max):
    """scipy DOP853 on d x_hat / d ln sigma = x_hat - D, d delta / d ln sigma = d - tr dD/dx (full Jacobian)."""
    from scipy.integrate import solve_ivp

    n, d = x.shape

    def rhs(log_sigma, y):
        z = torch.from_numpy(y[: n * d].copy()).reshape(n, d)
        sigma = math.exp(log_sigma)
        D = denoiser(z, sigma)
        jac = torch.autograd.functional.jacobian(lambda v: denoiser(v, sigma), z, vectorize=True)  # [n, d, n, d]
        trace = torch.einsum("iaia->i", jac)
        return np.concatenate([(z - D).reshape(-1).numpy(), (d - trace).numpy()])

    y0 = np.concatenate([x.reshape(-1).numpy(), np.zeros(n)])
    sol = solve_ivp(rhs, (math.log(sigma_min), math.log(sigma_max)), y0, method="DOP853", rtol=1e-9, atol=1e-10)
    z, delta = torch.from_numpy(sol.y[: n * d, -1]).reshape(n, d), torch.from_numpy(sol.y[n * d:, -1])
    log_prior = -0.5 * (z / sigma_max).square().sum(1) - d * math.log(sigma_max * math.sqrt(2 * math.pi))
    return log_prior + delta


def test_exact_trace_equals_reference_ode_solve():
    ref = reference_log_likelihood(MIXTURE, X, 0.01, 20.0)
    errors = [(log_likelihood(MIXTURE, X, sigma_min=0.01, sigma_max=20.0, num_steps=n) - ref).abs().max()
              for n in (64, 256)]
    assert errors[1] < 1e-6 and errors[0] / errors[1] > 100  # RK4: 4 doublings of h cost 2^8 in error


def test_closed_form_density_at_sigma_min():
    """With sigma_max large, the prior is the noised law itself: log p(x; sigma_min) of the mixture in closed form.

    The prior ignores the data mean m, an error of about |m| / sigma_max nats: sigma_max = 1e5 makes it 3e-6.
    """
    lp = log_likelihood(MIXTURE, X, sigma_min=0.05, sigma_max=1e5, num_steps=192)
    torch.testing.assert_close(lp, MIXTURE.log_prob(X, 0.05), rtol=0, atol=2e-5)
    # a single Gaussian N(0, c^2 I) in 4-D, at EDM's sigma_min
    g, x = analytic.Gaussian(0.5, 4), torch.randn(3, 4, generator=torch.Generator().manual_seed(2)) * 0.5
    torch.testing.assert_close(log_likelihood(g, x.double(), sigma_max=4000.0), g.log_prob(x, 0.002),
                               rtol=0, atol=1e-4)


def test_processes_agree():
    """edm, vp, ve and fm step in different t, yet give one density (to RK4's error; VE's t = sigma^2 is worst)."""
    lp = {p: log_likelihood(MIXTURE, X, process=p, sigma_min=0.01, sigma_max=20.0, num_steps=128) for p in PROCESSES}
    spread = (torch.stack(list(lp.values())) - lp["edm"]).abs().max()
    assert spread < 1e-4 and (lp["edm"] - MIXTURE.log_prob(X, 0.01)).abs().max() > 1e-2  # vs the prior's error


def test_hutchinson_is_unbiased():
    """Mean over 400 per-seed probes equals the exact trace's value (same grid) within 4 standard errors."""
    x = X[:2].repeat_interleave(200, 0)
    exact = log_likelihood(MIXTURE, X[:2], sigma_min=0.01, sigma_max=20.0, num_steps=16)
    for probe in ("rademacher", "gaussian"):
        gens = [torch.Generator().manual_seed(s) for s in range(len(x))]
        est = log_likelihood(MIXTURE, x, sigma_min=0.01, sigma_max=20.0, num_steps=16, divergence="hutchinson",
                             generator=gens, probe=probe).reshape(2, 200)
        se = est.std(1) / math.sqrt(200)
        assert (se > 1e-3).all()  # the estimate does vary with the probe
        assert ((est.mean(1) - exact).abs() < 4 * se).all(), (probe, est.mean(1), exact, se)
    # per-seed probes: item k's estimate depends on its seed only, not on the batch it is in
    alone = log_likelihood(MIXTURE, x[5:8], sigma_min=0.01, sigma_max=20.0, num_steps=16, divergence="hutchinson",
                           generator=[torch.Generator().manual_seed(s) for s in range(5, 8)], probe="gaussian")
    torch.testing.assert_close(alone, est.flatten()[5:8], rtol=0, atol=1e-12)


def test_probes_have_unit_second_moment():
    eps = hutchinson_probes((20000, 3), torch.Generator().manual_seed(0))
    assert set(eps.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(eps.T @ eps / len(eps), torch.eye(3, dtype=torch.float64), rtol=0, atol=0.03)


def test_bits_per_dim_of_uniform_bins():
    """A density uniform over [-1 - 1/255, 1 + 1/255]^d spreads P = 1/256 per bin: exactly 8 bits per dimension."""
    d = 5
    log_p = torch.tensor([-d * math.log(2 + 2 / 255)], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_p, d), torch.tensor([8.0], dtype=torch.float64))
    u = torch.tensor([[0, 128, 255]])
    x = dequantize(u, torch.Generator().manual_seed(0))
    assert ((x - (u / 127.5 - 1)).abs() <= 0.5 / 127.5).all() and not torch.equal(x, u / 127.5 - 1)
    with pytest.raises(ValueError, match="8-bit"):
        dequantize(torch.tensor([256.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(MIXTURE, X, divergence="trace")
    with pytest.raises(ValueError, match="sigma_min"):
        log_likelihood(MIXTURE, X, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="one per sample"):
        log_likelihood(MIXTURE, X, divergence="hutchinson", generator=[torch.Generator()])


def test_likelihood_script_matches_library(tmp_path):
    """scripts/likelihood.py ckpt=... data=digits subset=heldout: per-seed values, held-out images, a summary."""
    import json
    import runpy
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from edmlab import checkpoints
    from edmlab.cli.sample import CONFIG_DIR
    from edmlab.data import DigitsDataset
    from edmlab.likelihood import image_bits_per_dim
    from edmlab.networks import build
    from edmlab.precond import Denoiser

    torch.manual_seed(0)
    net = build("ddpmpp", img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1],
                num_blocks=1, attn_resolutions=[])
    ckpt = checkpoints.save_denoiser(Denoiser(net), tmp_path / "model.pt")
    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "likelihood.py"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("likelihood", overrides=[f"ckpt={ckpt}", "data.max_size=1700", "subset=heldout", "max_images=3",
                                               "num_steps=2", "noise_seed=5", "progress=false", "device=cpu",
                                               f"outdir={tmp_path / 'out'}"])
    summary = script["run"](cfg)
    with np.load(tmp_path / "out" / "likelihood.npz") as f:
        index, bpd = f["index"], f["bits_per_dim"]
    kept = np.sort(np.random.RandomState(0).permutation(1797)[:1700])
    assert len(index) == 3 and not set(index) & set(kept)  # images the training subset does not hold
    data = DigitsDataset()
    pixels = torch.from_numpy(data.images[index])
    labels = torch.eye(10)[torch.from_numpy(data.raw_labels[index])]
    expected = image_bits_per_dim(checkpoints.load_denoiser(ckpt), pixels, labels, seeds=[5, 6, 7], num_steps=2,
                                  divergence="hutchinson")["bits_per_dim"]
    np.testing.assert_allclose(bpd, expected.numpy(), rtol=0, atol=1e-9)
    assert json.loads((tmp_path / "out" / "likelihood.json").read_text())["bits_per_dim"] == summary["bits_per_dim"]
    np.testing.assert_allclose(summary["bits_per_dim"], bpd.mean())
