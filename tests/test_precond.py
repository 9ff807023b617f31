"""Preconditioning: Table 1 in float64, the iDDPM table, and the Denoiser wrapper."""

import math

import pytest
import torch
from torch import nn

from edmlab import precond as C

SIGMAS = [0.002, 0.5, 1.0, 80.0]
SD = 0.5


def vp_t(sigma, beta_d=19.9, beta_min=0.1):
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d


TABLE1 = {  # written out independently of the implementation, float64
    "edm": lambda s: (SD**2 / (s**2 + SD**2), s * SD / math.sqrt(s**2 + SD**2), 1 / math.sqrt(s**2 + SD**2),
                      math.log(s) / 4),
    "vp": lambda s: (1.0, -s, 1 / math.sqrt(s**2 + 1), 999 * vp_t(s)),
    "ve": lambda s: (1.0, s, 1.0, math.log(s / 2)),
    "fm": lambda s: (1 / (1 + s), -s / (1 + s), 1 / (1 + s), s / (1 + s)),
}


@pytest.mark.parametrize("name", TABLE1)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_table1_float64(name, sigma):
    got = [float(c) for c in C.coefficients(name, sigma)]
    assert got == pytest.approx(TABLE1[name](sigma), rel=1e-12, abs=1e-12)


def test_reference_float32_values():
    """Values measured from the reference code (float32)."""
    ref = {0.002: (0.99998403, 0.001999984, 1.999984, -1.553652), 0.5: (0.5, 0.35355338, 1.4142135, -0.1732868),
           1.0: (0.2, 0.44721359, 0.89442718, 0.0), 80.0: (3.906e-5, 0.49999022, 0.012499755, 1.0955067)}
    for sigma, values in ref.items():
        got = [float(c) for c in C.coefficients("edm", torch.tensor(sigma, dtype=torch.float32))]
        assert got == pytest.approx(values, rel=2e-4, abs=1e-6)
    for sigma, vp_noise, ve_noise in [(0.5, 144.66911, -1.386294), (1.0, 258.70132, -0.693147),
                                      (80.0, 932.57764, 3.688880)]:
        assert float(C.coefficients("vp", sigma)[3]) == pytest.approx(vp_noise, rel=1e-6)
        assert float(C.coefficients("ve", sigma)[3]) == pytest.approx(ve_noise, rel=1e-6)


def test_iddpm_table():
    u = C.iddpm_u()
    assert u[0].item() == pytest.approx(20291.17, abs=0.01)
    assert u[1].item() == pytest.approx(641.66, abs=0.01)
    assert u[8].item() == pytest.approx(80.2037, abs=1e-4)
    assert u[999].item() == pytest.approx(0.0064254, abs=1e-7)
    assert u[1000].item() == 0
    assert C.iddpm_u(dtype=torch.float32)[999].item() == pytest.approx(0.0064223, abs=2e-6)  # EDM's float32 table
    # c_noise = M - 1 - argmin_j |u_j - sigma| (values of EDM's code)
    assert [float(C.coefficients("iddpm", s)[3]) for s in SIGMAS] == [-1, 289, 495, 991]
    p = C.get("iddpm")
    assert (p.sigma_min, p.sigma_max) == (u[999].item(), u[0].item())
    assert p.round_sigma(torch.tensor([79.0, 0.001])).tolist() == pytest.approx([u[8].item(), 0.0])
    c_skip, c_out, c_in, _ = C.coefficients("iddpm", 0.7)  # c_in, c_out use the unrounded sigma
    assert (float(c_out), float(c_in)) == pytest.approx((-0.7, 1 / math.sqrt(1.49)))


def test_vp_precond_range():
    p = C.get("vp")
    assert p.sigma_max == pytest.approx(152.167, rel=1e-5)
    assert p.sigma_min == pytest.approx(0.0010005, rel=1e-4)


class Affine(nn.Module):
    """F(x, c_noise) = a x + c_noise, with optional extra output channels."""

    label_dim = 0

    def __init__(self, extra: int = 0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.3))
        self.extra = extra

    def forward(self, x, c_noise, class_labels=None, augment_labels=None):
        y = self.a * x + c_noise.reshape(-1, 1, 1, 1)
        return torch.cat([y, torch.full_like(y[:, : self.extra], 1e6)], 1) if self.extra else y


@pytest.mark.parametrize("name", C.NAMES)
def test_denoiser_wraps_table1(name):
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    D = C.Denoiser(Affine(extra=2 if name == "iddpm" else 0).double(), name)
    out = D(x, sigma)
    for i in range(3):
        c_skip, c_out, c_in, c_noise = C.coefficients(name, sigma[i])
        want = c_skip * x[i] + c_out * (0.3 * c_in * x[i] + c_noise)
        torch.testing.assert_close(out[i], want)
    torch.testing.assert_close(D(x, 1.0), D(x, torch.ones(3, dtype=torch.float64)))


def test_denoiser_runs_net_in_its_dtype():
    D = C.Denoiser(Affine())  # float32 net
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    assert D(x, 0.5).dtype == torch.float64


def test_unknown_precond_lists_names():
    with pytest.raises(ValueError, match="vp, ve, iddpm, edm, fm"):
        C.get("ddpm")


def test_every_denoiser_is_denoiser_like_with_its_own_values():
    """Denoisers of each network family, GuidedDenoiser and the analytic laws: DenoiserLike, with exact values."""
    from edmlab import analytic
    from edmlab.guidance import GuidedDenoiser
    from edmlab.networks import build

    def net(name, **kwargs):
        small = {"mlp": dict(hidden_channels=8, num_blocks=1, emb_channels=8)}.get(name, dict(
            model_channels=32 if name == "adm" else 16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]))
        return build(name, **{**small, **kwargs})

    u = C.iddpm_u()
    vp_sigma = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1)  # noqa: E731 - EDM Table 1, VP
    ddpmpp = C.Denoiser(net("ddpmpp", img_resolution=8, img_channels=3, label_dim=10))
    ve = C.Denoiser(net("ncsnpp", img_resolution=8, img_channels=3, label_dim=10), "ve")
    expected = [  # (denoiser, label_dim, sigma_min, sigma_max, data_shape)
        (ddpmpp, 10, 0.0, math.inf, (3, 8, 8)),
        (ve, 10, 0.02, 100.0, (3, 8, 8)),
        (C.Denoiser(net("adm", img_resolution=8, img_channels=3, label_dim=4, out_channels=6), "iddpm"),
         4, float(u[999]), float(u[0]), (3, 8, 8)),
        (C.Denoiser(net("edm2", img_resolution=8, img_channels=4, channels_per_head=8), logvar_channels=8),
         0, 0.0, math.inf, (4, 8, 8)),
        (C.Denoiser(net("mlp", img_resolution=1, img_channels=5), "vp"), 0, vp_sigma(1e-5), vp_sigma(1.0), (5,)),
        (C.Denoiser(net("mlp", img_resolution=4, img_channels=2), "fm"), 0, 0.0, math.inf, (2, 4, 4)),
        (GuidedDenoiser(ddpmpp, 2.0), 10, 0.0, math.inf, (3, 8, 8)),
        (GuidedDenoiser(ddpmpp, 2.0, guide=ve), 10, 0.02, 100.0, (3, 8, 8)),  # where both are defined
        (analytic.GaussianMixture([1, 2], [[0.0, 0, 0], [1, 1, 1]], [0.1, 0.2]), 0, 0.0, math.inf, (3,)),
        (analytic.Gaussian(0.5, 4), 0, 0.0, math.inf, (4,)),
        (analytic.FiniteSet(torch.zeros(5, 1, 2, 2)), 0, 0.0, math.inf, (1, 2, 2)),
        (C.Denoiser(Affine()), 0, 0.0, math.inf, None),  # F not built by edmlab.networks.build
        (C.Denoiser(Affine(), data_shape=[2, 4, 4]), 0, 0.0, math.inf, (2, 4, 4)),
    ]
    for D, label_dim, sigma_min, sigma_max, data_shape in expected:
        assert isinstance(D, C.DenoiserLike), type(D).__name__
        assert (D.label_dim, D.data_shape) == (label_dim, data_shape), type(D).__name__
        assert (D.sigma_min, D.sigma_max) == pytest.approx((sigma_min, sigma_max), rel=1e-12), type(D).__name__
    sigma = torch.tensor([79.0, 0.001], dtype=torch.float64)  # iDDPM's table: u_8 and u_1000 = 0
    iddpm, law = expected[2][0], expected[8][0]
    for D in (iddpm, GuidedDenoiser(iddpm, 2.0)):
        assert D.round_sigma(sigma).tolist() == [u[8].item(), 0.0]
    assert torch.equal(law.round_sigma(sigma), sigma)  # every sigma is representable


def test_what_is_not_a_denoiser_is_refused_naming_what_it_lacks():
    with pytest.raises(TypeError, match="sample: a function is not a denoiser; it lacks label_dim, sigma_min, "
                                        "sigma_max, data_shape, round_sigma"):
        C.check_denoiser(lambda x, sigma, class_labels=None: x, "sample")
    with pytest.raises(TypeError, match="Linear has no label_dim: a network F must state how many classes"):
        C.Denoiser(nn.Linear(2, 2))
