"""Samplers against exact answers: Gaussian closed form, Gaussian-mixture reference ODE solves, EDM anchors."""

import math

import numpy as np
import pytest
import torch

from edmlab import analytic
from edmlab.process import NAMES as PROCESSES
from edmlab.sampling import DISCRETIZATIONS, sample, sigma_steps

C = 0.5  # data std of the Gaussian tests


class Counted:
    """A denoiser that counts its calls; everything else is the wrapped one's."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __getattr__(self, name):
        return getattr(self.denoiser, name)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.denoiser(x, sigma, class_labels=class_labels)


def gaussian_end(latents, sigmas):
    """Exact sampler output for N(0, C^2 I): the PF-ODE from sigma_max to sigma_min, then D(.; sigma_min)."""
    lo, hi = sigmas[-2].item(), sigmas[0].item()
    return latents * hi * C**2 / math.sqrt(C**2 + lo**2) / math.sqrt(C**2 + hi**2)


def convergence_slope(solver, process, discretization, sigma_min, sigma_max, steps=(32, 64, 128, 256)):
    data = analytic.Gaussian(C, 3)
    latents = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in steps:
        sigmas = sigma_steps(discretization, n, sigma_min=sigma_min, sigma_max=sigma_max, process=process)
        x = sample(data, latents, solver=solver, num_steps=n, discretization=discretization, process=process,
                   sigma_min=sigma_min, sigma_max=sigma_max)
        errors.append((x - gaussian_end(latents, sigmas)).abs().max().item())
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


ORDER = {"euler": (0.85, 1.3), "heun": (1.8, 2.6)}


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("discretization", DISCRETIZATIONS)
def test_order_of_convergence(solver, process, discretization):
    lo, hi = ORDER[solver]
    # EDM's range, except uniform t of the t-linear processes, which needs a narrow range to be asymptotic
    # (h << sigma_min); VP's refitted steps degenerate on narrow ranges (EDM's VP refit), so not the reverse.
    narrow = discretization == "uniform_t" and process in ("edm", "ve")
    assert lo < convergence_slope(solver, process, discretization, *((0.2, 5.0) if narrow else (0.002, 80.0))) < hi


def test_heun_nfe():
    data = analytic.Gaussian(C, 2)
    latents = torch.randn(3, 2, dtype=torch.float64)
    for n, nfe in [(18, 35), (40, 79), (1, 1)]:
        assert sample(data, latents, solver="heun", num_steps=n, return_nfe=True)[1] == nfe
    for solver in ["euler", "ddim", "dpmpp_2m", "euler_maruyama", "ddpm_ancestral"]:
        assert sample(data, latents, solver=solver, num_steps=18, return_nfe=True)[1] == 18


def test_edm_anchors():
    """EDM's code: on the 0.5-std Gaussian, 18 Heun steps overshoot by 5.5% (EDM), VP within 0.8%, VE 41%."""
    data = analytic.Gaussian(C, 1)
    one = torch.ones(1, 1, dtype=torch.float64)

    def ratio(name):
        sigmas = sigma_steps(name, 18, process=name)
        return (sample(data, one, num_steps=18, discretization=name, process=name) / gaussian_end(one, sigmas)).item()

    assert ratio("edm") == pytest.approx(1.055, abs=0.001)
    assert abs(ratio("vp") - 1) < 0.0085
    assert ratio("ve") == pytest.approx(0.41, abs=0.006)


def test_edm_sigma_steps():
    """The 18 sigmas of EDM's edm_sampler (rho 7, 0.002..80)."""
    want = [80, 57.5860, 40.7856, 28.3746, 19.3525, 12.9101, 8.40094, 5.31519, 3.25682, 1.92334, 1.08817,
            0.585348, 0.296442, 0.139516, 0.0599473, 0.0229345, 0.00752802, 0.002, 0]
    assert sigma_steps("edm", 18).tolist() == pytest.approx(want, rel=1e-5)
    vp = sigma_steps("vp", 10, sigma_min=0.002, sigma_max=80)
    assert (vp[0].item(), vp[-2].item()) == pytest.approx((80, 0.002))
    ve = sigma_steps("ve", 5)
    assert ve[:-1].tolist() == pytest.approx((100 * (0.02 / 100) ** (np.arange(5) / 4)).tolist())
    assert sigma_steps("iddpm", 10)[0].item() == pytest.approx(80.2037, rel=1e-5)  # u_8: sigma_max 81
    fm = sigma_steps("uniform_t", 4, process="fm", sigma_min=0.25, sigma_max=4)  # t from 0.8 to 0.2
    assert (fm / (1 + fm)).tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2, 0])


def mixture(dim=16, k=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 0.5
    return analytic.GaussianMixture(weights, means, torch.full((k,), 0.1))


def test_heun_matches_reference_ode():
    gm = mixture()
    latents = torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = analytic.ode_reference(gm, latents, 80.0, 0.002)
    x = sample(gm, latents, solver="heun", num_steps=256)
    assert (x - ref).square().mean().sqrt().item() < 2e-4


def recovered(gm, x):
    """Component weights and per-component std of samples, by nearest mean."""
    k = torch.cdist(x, gm.means).argmin(1)
    weights = torch.bincount(k, minlength=len(gm.weights)) / len(x)
    stds = torch.stack([(x[k == j] - gm.means[j]).square().mean().sqrt() for j in range(len(gm.weights))])
    return weights, stds


@pytest.mark.parametrize("solver,num_steps,options", [
    ("euler", 128, {}), ("heun", 64, {}), ("ddim", 128, {}), ("dpmpp_2m", 64, {}),
    ("edm_stochastic", 64, {"S_churn": 40}), ("euler_maruyama", 256, {}), ("ddpm_ancestral", 512, {}),
])
def test_mixture_recovered(solver, num_steps, options):
    gm = mixture()
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(4000, 16, generator=g, dtype=torch.float64)
    x = sample(gm, latents, solver=solver, num_steps=num_steps, generator=g, **options)
    weights, stds = recovered(gm, x)
    assert (weights - gm.weights).abs().max().item() < 0.03
    assert ((stds / 0.1) - 1).abs().max().item() < 0.05, stds


def test_one_model_four_processes():
    """The process changes the time variable, not the ODE: the same end points (RMS per coordinate).

    VE steps in t = sigma^2, whose larger truncation error (41% at 18 steps in EDM's code) needs 256
    Heun steps for 1e-3; at 128 it is within 2e-3 while VP, EDM and FM agree to 3e-4.
    """
    gm = mixture()
    latents = torch.randn(64, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = analytic.ode_reference(gm, latents, 80.0, 0.002)

    def rms(process, n):
        x = sample(gm, latents, solver="heun", num_steps=n, process=process, sigma_min=0.002, sigma_max=80)
        return (x - ref).square().mean().sqrt().item()

    for p in ("vp", "edm", "fm"):
        assert rms(p, 128) < 3e-4
    assert rms("ve", 128) < 2e-3
    assert rms("ve", 256) < 1e-3


def test_per_item_generators_make_batches_irrelevant():
    gm = mixture(dim=4, k=3)
    seeds = [5, 6, 7]

    def run(batch):
        gens = [torch.Generator().manual_seed(s) for s in batch]
        latents = torch.stack([torch.randn(4, generator=g, dtype=torch.float64) for g in gens])
        return sample(gm, latents, solver="edm_stochastic", num_steps=8, S_churn=20, generator=gens)

    together = run(seeds)
    alone = torch.cat([run([s]) for s in seeds])
    assert torch.equal(together, alone)


def test_stochastic_draws_noise_every_step():
    """EDM's edm_sampler calls randn on every step, even with S_churn = 0 (EDM's generate.py)."""
    gm, latents = mixture(dim=2, k=2), torch.zeros(1, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sample(gm, latents, solver="edm_stochastic", num_steps=5, generator=g)
    g_ref = torch.Generator().manual_seed(0)
    for _ in range(5):
        torch.randn(1, 2, generator=g_ref, dtype=torch.float64)
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=g_ref))


@pytest.mark.parametrize("kwargs,match", [
    ({"solver": "rk45"}, "valid names: euler, heun"),
    ({"discretization": "cosine"}, "valid names: edm, vp"),
    ({"process": "ddpm"}, "valid names: vp, ve"),
    ({"num_steps": 0}, "num_steps"),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
])
def test_bad_input(kwargs, match):
    data = Counted(analytic.Gaussian(C, 2))
    with pytest.raises(ValueError, match=match):
        sample(data, torch.zeros(1, 2), **kwargs)
    assert data.calls == 0  # refused before any work


def test_a_plain_function_is_not_a_denoiser():
    with pytest.raises(TypeError, match="sample: a function is not a denoiser; it lacks label_dim, sigma_min"):
        sample(lambda x, sigma, class_labels=None: x, torch.zeros(1, 2))


def test_non_finite_latents():
    with pytest.raises(ValueError, match="NaN or Inf"):
        sample(analytic.Gaussian(C, 2), torch.tensor([[0.0, math.nan]]))


def test_finite_set_denoiser_limits():
    pts = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    fs = analytic.FiniteSet(pts)
    x = torch.tensor([[0.9, 2.1], [10.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(fs(x, 1e-3)[0], pts[1])  # small sigma: the nearest point
    torch.testing.assert_close(fs(x, 1e4)[1], pts.mean(0), atol=1e-3, rtol=0)  # large sigma: the mean
    ends = sample(fs, torch.randn(50, 2, dtype=torch.float64), num_steps=32)
    assert torch.cdist(ends, pts).min(1).values.max().item() < 1e-2  # samples land on the set


def test_mixture_score_and_log_prob():
    gm = mixture(dim=3, k=2)
    x = torch.randn(5, 3, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x, 0.7).sum(), x)
    torch.testing.assert_close(gm.score(x.detach(), 0.7), grad)
    # one Gaussian: D = c^2/(c^2+sigma^2) x
    g = analytic.Gaussian(0.5, 3)
    torch.testing.assert_close(g(x.detach(), 2.0), 0.25 / 4.25 * x.detach())


def test_math_modules_import_torch_only():
    """The math modules are usable without Lightning or Hydra."""
    import subprocess
    import sys

    code = ("import sys; import edmlab.process, edmlab.precond, edmlab.loss, edmlab.sampling, edmlab.analytic; "
            "print(sorted(m for m in ('lightning', 'hydra', 'omegaconf', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_repeated_levels_are_safe():
    with pytest.raises(ValueError, match="table entries"):
        sigma_steps("iddpm", 1000)

    class Snapped(analytic.Gaussian):
        def round_sigma(self, sigma):  # a coarse table: many EDM steps snap to the same level
            return torch.as_tensor(sigma).log2().round().exp2()

    data = Snapped(C, 2)
    x = sample(data, torch.randn(3, 2, dtype=torch.float64), solver="dpmpp_2m", num_steps=64)
    assert torch.isfinite(x).all()
