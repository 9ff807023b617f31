"""Noise processes: closed forms vs autograd, SDE coefficients, quadrature, forward-SDE Monte Carlo."""

import math

import pytest
import torch

from edmlab import process as P

T = {  # interior grids of t per process
    "vp": torch.linspace(1e-3, 1, 11, dtype=torch.float64),
    "ve": torch.linspace(0.02**2, 100.0**2, 11, dtype=torch.float64),
    "edm": torch.linspace(0.002, 80, 11, dtype=torch.float64),
    "fm": torch.linspace(0.002, 0.98, 11, dtype=torch.float64),
}


def beta(t):
    return 0.1 + 19.9 * t


SDE = {  # (f, g) of each built-in process
    "vp": (lambda t: -beta(t) / 2, lambda t: beta(t).sqrt()),
    "ve": (lambda t: 0 * t, lambda t: 1 + 0 * t),
    "edm": (lambda t: 0 * t, lambda t: (2 * t).sqrt()),
    "fm": (lambda t: -1 / (1 - t), lambda t: (2 * t / (1 - t)).sqrt()),
}


@pytest.mark.parametrize("name", P.NAMES)
def test_closed_form_derivatives_match_autograd(name):
    p, t = P.get(name), T[name]
    auto = P.from_schedule(p._s, p._sigma, t_min=p.t_min, t_max=p.t_max)
    torch.testing.assert_close(p.s_deriv(t), auto.s_deriv(t), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(p.sigma_deriv(t), auto.sigma_deriv(t), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", P.NAMES)
def test_sde_coefficients_and_inverse(name):
    p, t = P.get(name), T[name]
    f, g = SDE[name]
    torch.testing.assert_close(p.f(t), f(t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.g(t), g(t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(p.sigma_inv(p.sigma(t)), t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", P.NAMES)
def test_floats_and_float32(name):
    p, t = P.get(name), T[name]
    t_mid = float(t[5])
    assert isinstance(p.sigma(t_mid), float) and isinstance(p.g(t_mid), float)
    assert p.sigma(t_mid) == pytest.approx(float(p.sigma(t[5])), rel=1e-12)
    out = p.sigma(t.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), p.sigma(t), rtol=1e-5, atol=1e-6)
    x0, noise = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(p.marginal(x0, t_mid, noise), p.s(t_mid) * (x0 + p.sigma(t_mid) * noise))


def test_builtin_constants():
    vp = P.get("vp")
    assert vp.sigma(1.0) == pytest.approx(152.167, rel=1e-5)  # EDM's VP sigma_max: sigma(1) = 152.167
    assert vp.sigma(1e-3) == pytest.approx(0.010486, rel=1e-4)
    assert vp.sigma(1e-5) == pytest.approx(0.0010005, rel=1e-4)
    # DDPM's alpha_bar = s^2 = 1 / (1 + sigma^2)
    assert vp.s(0.3) ** 2 == pytest.approx(1 / (1 + vp.sigma(0.3) ** 2), rel=1e-12)
    assert (P.get("ve").sigma_min, P.get("ve").sigma_max) == pytest.approx((0.02, 100))
    assert (P.get("edm").sigma_min, P.get("edm").sigma_max) == pytest.approx((0.002, 80))
    assert P.get("fm").sigma_max == pytest.approx(80)


@pytest.mark.parametrize("name", P.NAMES)
def test_from_sde_reproduces_schedule(name):
    p, t = P.get(name), T[name]
    q = P.from_sde(*SDE[name], t_min=p.t_min, t_max=p.t_max)
    torch.testing.assert_close(q.s(t), p.s(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.sigma(t), p.sigma(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.sigma_deriv(t), p.sigma_deriv(t), rtol=1e-6, atol=0)
    torch.testing.assert_close(q.sigma_inv(p.sigma(t)), t, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", P.NAMES)
def test_from_schedule_reproduces_sde(name):
    p, t = P.get(name), T[name]
    q = P.from_schedule(p._s, p._sigma, t_min=p.t_min, t_max=p.t_max)  # no derivatives, no inverse given
    f, g = SDE[name]
    torch.testing.assert_close(q.f(t), f(t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q.g(t), g(t), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(q.sigma_inv(p.sigma(t)), t, rtol=1e-9, atol=1e-12)


FORWARD_T = {"vp": 1.0, "ve": 100.0, "edm": 10.0, "fm": 0.9}


@pytest.mark.parametrize("name", P.NAMES)
def test_forward_sde_monte_carlo(name):
    """Euler-Maruyama on dx = f x dt + g dw from x0 matches N(s x0, s^2 sigma^2) at three times."""
    p, T_end, x0, n, steps = P.get(name), FORWARD_T[name], 1.5, 20_000, 3000
    gen = torch.Generator().manual_seed(1)
    ts = torch.linspace(0, T_end, steps + 1, dtype=torch.float64)
    checks = {steps // 4, steps // 2, steps}
    x = torch.full((n,), x0, dtype=torch.float64)
    f, g = SDE[name]  # the known coefficients, so t = 0 (sigma = 0) is no special case
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        x = x + f(ts[i]) * x * dt + g(ts[i]) * dt.sqrt() * torch.randn(n, generator=gen, dtype=torch.float64)
        if i + 1 in checks:
            t = float(ts[i + 1])
            mean, std = p.s(t) * x0, p.s(t) * p.sigma(t)
            assert abs(x.mean().item() - mean) < 4 * std / math.sqrt(n), (t, x.mean().item(), mean)
            assert abs(x.std().item() - std) < 4 * std / math.sqrt(2 * n), (t, x.std().item(), std)


def test_unknown_process_lists_names():
    with pytest.raises(ValueError, match="vp, ve, edm, fm"):
        P.get("ddpm")
