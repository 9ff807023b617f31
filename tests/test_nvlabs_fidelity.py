"""Fidelity to NVlabs/edm to float32 rounding: VP c_noise, iDDPM time steps; sampler keys named."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from edmlab import analytic
from edmlab.networks import build
from edmlab.precond import Denoiser, get
from edmlab.sampling import sample, sigma_steps

BETA_D, BETA_MIN, M = 19.9, 0.1, 1000


def nvlabs_vp_c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """NVlabs/edm training/networks.py VPPrecond: (M - 1) * sigma_inv(sigma), sigma cast to float32."""
    sigma = sigma.to(torch.float32)
    return (M - 1) * (((BETA_MIN**2 + 2 * BETA_D * (1 + sigma**2).log()).sqrt() - BETA_MIN) / BETA_D)


@functools.lru_cache
def _nvlabs_u(C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    u = torch.zeros(M + 1, dtype=torch.float64)
    alpha_bar = lambda j: (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2  # noqa: E731
    for j in torch.arange(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def nvlabs_iddpm_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 81.0) -> torch.Tensor:
    """NVlabs/edm generate.py ablation_sampler, discretization='iddpm' (before round_sigma)."""
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    u = _nvlabs_u()
    u_filtered = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
    return u_filtered[((len(u_filtered) - 1) / (num_steps - 1) * step_indices).round().to(torch.int64)]


@pytest.mark.parametrize("net_dtype", [torch.float32, torch.float64])
def test_vp_c_noise_is_nvlabs_float32_formula_for_float32_networks(net_dtype):
    """The network sees NVlabs' float32 c_noise whatever the sampler's state dtype; float64 networks the exact t."""
    sigma = torch.logspace(-3, 2.2, 4001, dtype=torch.float64)
    seen = []
    net = build("mlp", img_resolution=1, img_channels=2, hidden_channels=8, num_blocks=1).to(net_dtype)
    net.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    Denoiser(net, name="vp")(torch.zeros(len(sigma), 2, dtype=torch.float64), sigma)
    if net_dtype == torch.float32:
        assert torch.equal(seen[0], nvlabs_vp_c_noise(sigma))
        assert torch.equal(get("vp").coefficients(sigma.float())[3], nvlabs_vp_c_noise(sigma))
    else:
        exact = 999 * get("vp").process.sigma_inv(sigma)
        assert torch.allclose(seen[0], exact, rtol=1e-13, atol=0)


def test_ncsnpp_under_vp_matches_nvlabs_forward():
    """D(x; sigma) of NVlabs' VPPrecond around the same NCSN++ (its forward, float32) to float32 rounding."""
    torch.manual_seed(0)
    net = build("ncsnpp", img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[]).eval()
    denoiser = Denoiser(net, name="vp")
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 5
    sigma = torch.tensor([0.002, 0.05, 0.7, 3.0, 20.0, 152.0], dtype=torch.float64)
    with torch.no_grad():
        x32, s32 = x.to(torch.float32), sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        F_x = net((1 / (s32**2 + 1).sqrt()) * x32, nvlabs_vp_c_noise(s32).flatten(), class_labels=None)
        reference = x32 + (-s32) * F_x
        ours = denoiser(x, sigma)
    assert (ours - reference.double()).abs().max() <= 2e-5 * (1 + reference.abs().max())


def test_iddpm_steps_round_as_nvlabs_for_every_n():
    for num_steps in range(2, 400):
        assert torch.equal(sigma_steps("iddpm", num_steps)[:-1], nvlabs_iddpm_steps(num_steps)), num_steps
    assert math.isclose(float(sigma_steps("iddpm", 18)[0]), float(nvlabs_iddpm_steps(18)[0]))


def test_unknown_sampler_key_names_it_and_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown sampler key\(s\) num_step; valid keys: solver, num_steps, "):
        sample(analytic.Gaussian(0.5, 2), torch.zeros(1, 2), num_step=4)
