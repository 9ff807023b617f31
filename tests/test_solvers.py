"""The few-step solvers, the registry and the fitted steps, against closed forms and independent re-derivations."""

import math

import numpy as np
import pytest
import torch
from test_sampling import Counted  # the call-counting denoiser wrapper

from edmlab import analytic
from edmlab.sampling import SOLVERS, ays_steps, register, sample, sigma_steps

C = 0.5
GAUSS = analytic.Gaussian(C, 3)
LATENTS = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def exact_end(sigmas):
    """PF-ODE of N(0, C^2 I) from sigma_max to sigma_min, then D(.; sigma_min)."""
    lo, hi = sigmas[-2].item(), sigmas[0].item()
    return LATENTS * hi * C**2 / math.sqrt(C**2 + lo**2) / math.sqrt(C**2 + hi**2)


def slope(solver, steps=(32, 64, 128, 256), **options):
    errors = [(sample(GAUSS, LATENTS, solver=solver, num_steps=n, discretization="ve", **options)
               - exact_end(sigma_steps("ve", n))).abs().max().item() for n in steps]
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


@pytest.mark.parametrize("solver,options,order", [
    ("dpmpp_2m", {}, 2), ("dpmpp_3m", {}, 3), ("dpmpp_3m", {"lower_order_final": True}, 3),
    ("dpmpp_3m", {"kdiffusion": True}, 2),
    ("dpmpp_3m_sde", {"eta": 0.0}, 3), ("unipc", {"order": 1}, 2), ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3, "lower_order_final": False}, 4), ("unipc", {"order": 3}, 3),
    ("unipc", {"order": 2, "variant": "bh1"}, 3),
    ("unipc", {"order": 3, "corrector": False, "lower_order_final": False}, 3), ("ipndm", {"variable_step": True}, 4),
    ("ipndm", {}, 2), ("restart", {"restarts": 0}, 2),
])
def test_measured_order(solver, options, order):
    """UniPC-p with its corrector gains one order; fixed-weight iPNDM is 2nd order on non-uniform steps."""
    assert order - 0.4 < slope(solver, **options) < order + 2.0  # a Gaussian can converge faster


def kdiffusion_3m_sde(D, x, sigmas, eta, noise):
    """k-diffusion's sample_dpmpp_3m_sde, re-derived from its formulas."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        d = D(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return d
        h = sigmas[i].log() - sigmas[i + 1].log()
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * d
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
            x = x + phi_2 * (d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)) - (phi_2 / h_eta - 0.5) * (d1_0 - d1_1) / (r0 + r1)
        elif h_1 is not None:
            x = x + phi_2 * (d - d_1) / (h_1 / h)
        if eta:
            x = x + noise(x) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt()
        d_1, d_2, h_1, h_2 = d, d_1, h, h_1
    return x


def kdiffusion_2m_sde(D, x, sigmas, eta, noise):
    """k-diffusion's sample_dpmpp_2m_sde (midpoint), re-derived from its formulas."""
    old = h_last = None
    for i in range(len(sigmas) - 1):
        d = D(x, sigmas[i])
        if sigmas[i + 1] == 0:
            return d
        h = sigmas[i].log() - sigmas[i + 1].log()
        x = sigmas[i + 1] / sigmas[i] * (-eta * h).exp() * x + (-h - eta * h).expm1().neg() * d
        if old is not None:
            x = x + 0.5 * (-h - eta * h).expm1().neg() * (h / h_last) * (d - old)
        if eta:
            x = x + noise(x) * sigmas[i + 1] * (-2 * eta * h).expm1().neg().sqrt()
        old, h_last = d, h
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_dpmpp_sde_agree_with_kdiffusion(eta):
    gm = analytic.GaussianMixture([1.0, 2.0], [[0.5, -0.5, 0.0], [-1.0, 0.2, 0.3]], [0.1, 0.2])
    sigmas = sigma_steps("edm", 12)
    for ours, theirs, extra in [("dpmpp_3m_sde", kdiffusion_3m_sde, {"kdiffusion": True}),
                                ("dpmpp_2m_sde", kdiffusion_2m_sde, {})]:
        g = torch.Generator().manual_seed(3)
        x = sample(gm, LATENTS, solver=ours, num_steps=12, eta=eta, generator=g, **extra)
        g_ref = torch.Generator().manual_seed(3)
        ref = theirs(lambda x, s: gm(x, s), LATENTS * sigmas[0], sigmas, eta,
                     lambda x, g=g_ref: torch.randn(x.shape, generator=g, dtype=x.dtype))
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-12)
    ode = sample(gm, LATENTS, solver="dpmpp_2m", num_steps=12)
    torch.testing.assert_close(sample(gm, LATENTS, solver="dpmpp_2m_sde", num_steps=12, eta=0.0), ode,
                               rtol=0, atol=1e-12)


def diffusers_unipc_bh2_order2(D, x, sigmas):
    """diffusers' UniPC (predict_x0, bh2, solver_order 2, corrector on), its update formulas written out."""
    lam = lambda s: -s.log()  # noqa: E731
    ms, last = [], None
    for i in range(len(sigmas) - 1):
        m = D(x, sigmas[i])
        if last is not None:  # UniC of the order the last predictor used
            x_prev, p = last
            h = lam(sigmas[i]) - lam(sigmas[i - 1])
            base = sigmas[i] / sigmas[i - 1] * x_prev + (-torch.expm1(-h)) * ms[-1]
            B = torch.expm1(-h)
            if p == 1:
                x = base - B * 0.5 * (m - ms[-1])
            else:
                rk = (lam(sigmas[i - 2]) - lam(sigmas[i - 1])) / h
                hpk = torch.expm1(-h) / -h - 1
                b = torch.stack([hpk / B, (hpk / -h - 0.5) * 2 / B])
                R = torch.stack([torch.ones(2, dtype=torch.float64), torch.stack([rk, torch.ones_like(rk)])])
                rho = torch.linalg.solve(R, b)
                x = base - B * (rho[0] * (ms[-2] - ms[-1]) / rk + rho[1] * (m - ms[-1]))
        if sigmas[i + 1] == 0:
            return m
        ms.append(m)
        p = min(2, len(ms))
        h = lam(sigmas[i + 1]) - lam(sigmas[i])
        x_new = sigmas[i + 1] / sigmas[i] * x + (-torch.expm1(-h)) * m
        if p == 2:
            rk = (lam(sigmas[i - 1]) - lam(sigmas[i])) / h
            x_new = x_new - torch.expm1(-h) * 0.5 * (ms[-2] - m) / rk
        last, x = (x, p), x_new
    return x


def test_unipc_agrees_with_diffusers_formulas():
    gm = analytic.GaussianMixture([1.0, 2.0], [[0.5, -0.5, 0.0], [-1.0, 0.2, 0.3]], [0.1, 0.2])
    sigmas = sigma_steps("edm", 10)
    ref = diffusers_unipc_bh2_order2(lambda x, s: gm(x, s), LATENTS * sigmas[0], sigmas)
    torch.testing.assert_close(sample(gm, LATENTS, solver="unipc", order=2, num_steps=10), ref, rtol=0, atol=1e-12)


def test_unused_options_are_refused_and_callback_sees_every_step():
    for solver in ("ddim", "dpmpp_2m", "ddpm_ancestral", "euler_maruyama"):
        with pytest.raises(ValueError, match=f"solver '{solver}' does not use S_churn"):
            sample(GAUSS, LATENTS, solver=solver, S_churn=10.0)
    with pytest.raises(ValueError, match="does not use order; it takes eta=1.0"):
        sample(GAUSS, LATENTS, solver="dpmpp_2m_sde", order=3)
    steps = []
    x, nfe = sample(GAUSS, LATENTS, solver="unipc", num_steps=8, callback=steps.append, return_nfe=True)
    sigmas = sigma_steps("edm", 8)
    assert nfe == 8 and [s.i for s in steps] == list(range(8))
    assert [s.sigma.item() for s in steps] == pytest.approx(sigmas[:-1].tolist())
    torch.testing.assert_close(steps[-1].denoised, x)


def test_user_solver_plugs_in_without_touching_sample():
    @register("test_exponential_euler")
    def exponential_euler(D, x, sigmas, callback, ctx, *, scale: float = 1.0):
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = D(x, sigma) + sigma_next / sigma * (x - D(x, sigma)) * scale
        return x

    try:
        torch.testing.assert_close(sample(GAUSS, LATENTS, solver="test_exponential_euler", num_steps=9),
                                   sample(GAUSS, LATENTS, solver="ddim", num_steps=9), rtol=0, atol=1e-12)
        assert SOLVERS["test_exponential_euler"].options == {"scale": 1.0}
    finally:
        SOLVERS.pop("test_exponential_euler")


def test_analytic_first_step_saves_one_nfe_and_is_exact_for_a_gaussian():
    base, nfe = sample(GAUSS, LATENTS, solver="ipndm", num_steps=10, return_nfe=True)
    afs, nfe_afs = sample(GAUSS, LATENTS, solver="ipndm", num_steps=10, analytic_first_step=True, data_std=C,
                          return_nfe=True)
    assert (nfe, nfe_afs) == (10, 9)
    torch.testing.assert_close(afs, base, rtol=0, atol=1e-12)  # N(0, C^2): mean + Gaussian posterior is D itself


def test_adaptive_reaches_its_tolerance_and_restart_costs():
    gm = analytic.GaussianMixture([1.0, 2.0], [[0.5, -0.5, 0.0], [-1.0, 0.2, 0.3]], [0.1, 0.2])
    ref = analytic.ode_reference(gm, LATENTS, 80.0, 0.002)
    errors, nfes = [], []
    for method, tol in [("dopri5", 1e-4), ("dopri5", 1e-7), ("bosh3", 1e-6)]:
        x, nfe = sample(gm, LATENTS, solver="adaptive", method=method, rtol=tol, atol=tol, return_nfe=True)
        errors.append((x - ref).abs().max().item())
        nfes.append(nfe)
    assert errors[1] < 1e-5 < errors[0] < 1e-2 and errors[2] < 1e-4 and nfes[0] < nfes[1]
    _, nfe = sample(gm, LATENTS, solver="restart", num_steps=10, restarts=2, restart_steps=3, return_nfe=True,
                    generator=torch.Generator().manual_seed(0))
    assert nfe == 2 * 10 - 1 + 2 * 2 * 3


def test_ays_and_optimized_steps(tmp_path):
    assert ays_steps(10)[:-1].tolist() == pytest.approx([700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403,
                                                        0.173, 0.034])
    assert ays_steps(10, model="sd15")[[0, 9, 10]].tolist() == pytest.approx([14.615, 0.152, 0.0])
    for n in (5, 10, 19):  # cut to EDM's range: ends pinned, strictly decreasing, log-linear between the entries
        svd = ays_steps(n, sigma_min=0.002, sigma_max=80.0)
        assert (svd[0].item(), svd[-2].item(), svd[-1].item()) == (80.0, 0.002, 0.0)
        assert (svd[1:-1] < svd[:-2]).all() and len(svd) == n + 1

    gm = analytic.GaussianMixture([1.0, 2.0], [[0.5, -0.5, 0.0], [-1.0, 0.2, 0.3]], [0.1, 0.2])
    counted = Counted(gm)
    cache = tmp_path / "ckpt.steps.json"
    opts = dict(solver="dpmpp_2m", num_steps=6, discretization="optimized", pilots=8, fine_steps=64,
                steps_cache=str(cache), callback=None)
    seen = []
    x = sample(counted, LATENTS, **{**opts, "callback": seen.append})
    levels = [s.sigma.item() for s in seen]
    assert cache.is_file() and len(levels) == 6 and levels[0] == 80.0 and levels[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False))
    n = counted.calls
    seen.clear()
    torch.testing.assert_close(sample(counted, LATENTS, **{**opts, "callback": seen.append}), x)  # from the cache
    assert counted.calls - n == 6 and [s.sigma.item() for s in seen] == levels
    cache.unlink()
    sample(counted, LATENTS, **{**opts, "callback": seen.append})  # recomputed from the same seed: the same steps
    assert [s.sigma.item() for s in seen[6:]] == levels
    ref = analytic.ode_reference(gm, LATENTS, 80.0, 0.002)
    edm = sample(gm, LATENTS, solver="dpmpp_2m", num_steps=6)
    assert (x - ref).square().mean() < (edm - ref).square().mean()


@pytest.mark.slow
@pytest.mark.parametrize("solver,options", [
    ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {}),
    ("restart", {"restarts": 2, "restart_sigma_max": 2.0, "restart_steps": 16}),  # 4 inner steps: stds 10% wide
])
def test_stochastic_solvers_recover_the_mixture(solver, options):
    """The SDE variants and restart sample the data law: component weights and stds of a 16-D mixture."""
    g = torch.Generator().manual_seed(0)
    weights, means = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.randn(6, 16, generator=g) * 0.5
    gm = analytic.GaussianMixture(weights, means.double(), torch.full((6,), 0.1))
    latents = torch.randn(3000, 16, generator=g, dtype=torch.float64)
    x = sample(gm, latents, solver=solver, num_steps=48, generator=g, **options)
    k = torch.cdist(x, gm.means).argmin(1)
    found = torch.bincount(k, minlength=6) / len(x)
    stds = torch.stack([(x[k == j] - gm.means[j]).square().mean().sqrt() for j in range(6)])
    assert (found - gm.weights).abs().max().item() < 0.03
    assert ((stds / 0.1) - 1).abs().max().item() < 0.06, stds


def test_dpmpp_3m_lower_order_final_is_second_order_into_sigma_min():
    """With lower_order_final the step into sigma_min is the exponential integrator with D linear in lambda
    (x' = e^-h x + phi_1 D + phi_2 h D'); every earlier level equals the plain 3M trajectory."""
    gm = analytic.GaussianMixture([1.0, 2.0], [[0.5, -0.5, 0.0], [-1.0, 0.2, 0.3]], [0.1, 0.2])
    runs = {}
    for lof in (False, True):
        steps = []
        sample(gm, LATENTS, solver="dpmpp_3m", num_steps=6, lower_order_final=lof, callback=steps.append)
        runs[lof] = steps
    plain, final = runs[False], runs[True]
    for a, b in zip(plain[:-1], final[:-1], strict=True):  # the last callback is the step from sigma_min to 0
        torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    prev, last, end = final[-3], final[-2], final[-1]
    h, h_1 = (last.sigma / end.sigma).log(), (prev.sigma / last.sigma).log()
    phi_1 = 1 - torch.exp(-h)
    phi_2 = 1 - phi_1 / h
    expected = torch.exp(-h) * last.x + phi_1 * last.denoised + phi_2 * (last.denoised - prev.denoised) * h / h_1
    torch.testing.assert_close(end.x, expected, rtol=0, atol=1e-12)
    assert (plain[-1].x - end.x).abs().max() > 1e-6  # the plain 3M step into sigma_min differs
