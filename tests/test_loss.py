"""Losses: Monte-Carlo value on Gaussian data, unit effective weight, sigma distributions."""

import math

import pytest
import torch

from edmlab import loss as L
from edmlab import precond as C
from edmlab.analytic import Gaussian


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_gaussian_loss_value(sigma, gen):
    """E ||D*(y+n) - y||^2 = d c^2 sigma^2 / (c^2 + sigma^2) for y ~ N(0, c^2 I) and the ideal D*."""
    c, d, n = 0.7, 4, 20_000
    data = Gaussian(c, d)
    y = data.sample(n, generator=gen)
    recipe = L.get("edm")
    per_item = L.denoising_loss(data, y, recipe, generator=gen, sigma=torch.tensor(sigma)) / recipe.weight(
        torch.tensor(sigma, dtype=torch.float64))
    exact = d * c**2 * sigma**2 / (c**2 + sigma**2)
    se = per_item.std().item() / math.sqrt(n)
    assert abs(per_item.mean().item() - exact) < 4 * se


@pytest.mark.parametrize("name", ["edm", "vp", "ve", "fm"])
def test_unit_effective_weight(name):
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_out = C.coefficients(name, sigma)[1]
    torch.testing.assert_close(L.get(name).weight(sigma) * c_out**2, torch.ones_like(sigma))


def test_sigma_distributions(gen):
    n = 200_000
    s = L.get("edm").sample_sigma(n, generator=gen)
    assert s.median().item() == pytest.approx(math.exp(-1.2), rel=0.02)  # 0.3012
    assert s.log().std().item() == pytest.approx(1.2, rel=0.01)
    s = L.get("ve").sample_sigma(n, generator=gen)
    assert 0.02 <= s.min() and s.max() <= 100
    assert s.log().mean().item() == pytest.approx((math.log(0.02) + math.log(100)) / 2, abs=0.02)
    s = L.get("vp").sample_sigma(n, generator=gen)
    assert s.min().item() >= 0.00099 and s.max().item() <= 152.17
    t = L.get("vp").process.sigma_inv(s.double())
    assert t.mean().item() == pytest.approx((1 + 1e-5) / 2, abs=0.005)  # t ~ U(eps_t, 1)
    for schedule in ("uniform", "logit_normal"):
        s = L.get("fm", schedule=schedule).sample_sigma(n, generator=gen)
        t = s / (1 + s)
        assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    t = L.get("fm", schedule="logit_normal").sample_sigma(n, generator=gen)
    assert torch.logit(t / (1 + t)).std().item() == pytest.approx(1.0, rel=0.02)


def test_fm_loss_is_velocity_mse(gen):
    """lambda ||D - y||^2 == ||F - (eps - x0)||^2 under FM preconditioning."""

    class Const(torch.nn.Module):
        label_dim = 0

        def forward(self, x, c_noise, class_labels=None, augment_labels=None):
            return torch.zeros_like(x)

    y = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    sigma = torch.rand(5, generator=gen, dtype=torch.float64) * 3 + 0.1
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss = L.denoising_loss(C.Denoiser(Const().double(), "fm"), y, L.get("fm"), generator=g1, sigma=sigma)
    eps = torch.randn(y.shape, generator=g2, dtype=torch.float64)  # the noise the loss drew (after sigma)
    torch.testing.assert_close(loss, (eps - y).square().sum(1))


def test_unknown_loss_lists_names():
    with pytest.raises(ValueError, match="vp, ve, edm, fm"):
        L.get("ddpm")
