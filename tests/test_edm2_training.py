"""EDM2 training: the log-variance head, the uncertainty-weighted loss, the lr schedule and the configs."""

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from edmlab import loss as losses
from edmlab.checkpoints import load_denoiser, save_denoiser
from edmlab.cli.train import CONFIG_DIR
from edmlab.networks import build
from edmlab.precond import Denoiser
from edmlab.training.module import LearningRate

TINY = dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8)


class FixedError(torch.nn.Module):
    """D(x; sigma) = x (so D - y is the noise) with a given log-variance u per item."""

    def __init__(self, u: torch.Tensor) -> None:
        super().__init__()
        self.u = u

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        return (x, self.u.reshape(-1, 1, 1, 1)) if return_logvar else x


def test_uncertainty_loss_closed_form():
    recipe = losses.get("edm2", P_mean=-0.4, P_std=1.0)
    y = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    u = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    got = losses.denoising_loss(FixedError(u), y, recipe, sigma=sigma, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = lam / u.exp() * sigma**2 * noise.flatten(1).square().sum(1) + 75 * u  # d = 3*5*5
    assert torch.allclose(got, expected, rtol=1e-5)


def test_optimal_log_variance_is_the_log_of_the_mean_weighted_error():
    # d/du [L e^-u + d u] = 0 at u* = ln(L / d): the head learns the expected per-element weighted loss
    recipe = losses.get("edm2")
    y, sigma = torch.randn(1, 1, 4, 4), torch.tensor([1.0])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    L = float(losses.denoising_loss(FixedError(torch.zeros(1)), y, recipe, sigma=sigma, generator=gen()))
    u = torch.tensor([math.log(L / 16)], requires_grad=True)
    losses.denoising_loss(FixedError(u), y, recipe, sigma=sigma, generator=gen()).sum().backward()
    assert abs(float(u.grad)) < 1e-4


def test_logvar_head_names_values_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    denoiser = Denoiser(build("edm2", label_dim=0, **TINY), name="edm", logvar_channels=16).eval()
    names = [n for n in denoiser.state_dict() if not n.startswith("net.")]
    assert names == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]  # as NVlabs
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 1.0, 5.0])
    D, u = denoiser(x, sigma, return_logvar=True)
    assert torch.equal(D, denoiser(x, sigma)) and u.shape == (3, 1, 1, 1)
    c_noise = sigma.log() / 4
    w = denoiser.logvar_linear.weight
    f = denoiser.logvar_fourier
    fourier = math.sqrt(2) * torch.cos(c_noise[:, None] * f.freqs + f.phases)
    expected = fourier @ (w / w.norm() * math.sqrt(16)).t() / math.sqrt(16)  # unit-RMS weight, 1/sqrt(fan_in)
    assert torch.allclose(u.flatten(), expected.flatten(), rtol=1e-3)  # eps = 1e-4 in the normalisation
    again = load_denoiser(save_denoiser(denoiser, tmp_path / "d.pt"))
    assert torch.equal(again(x, sigma, return_logvar=True)[1], u)


def test_plain_denoiser_refuses_the_uncertainty_loss():
    denoiser = Denoiser(build("edm2", label_dim=0, **TINY), name="edm")
    with pytest.raises(ValueError, match="precond=edm2"):
        losses.denoising_loss(denoiser, torch.randn(2, 1, 8, 8), losses.get("edm2"))


def test_inverse_sqrt_learning_rate_equals_nvlabs_schedule():
    def nvlabs(cur_nimg, batch_size, ref_lr=0.01, ref_batches=35000, rampup_Mimg=10):
        lr = ref_lr / math.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
        return lr * min(cur_nimg / (rampup_Mimg * 1e6), 1)

    schedule = LearningRate(batch_size=2048, rampup_kimg=10000, decay_kimg=71680)
    for step in [0, 1, 1000, 4882, 5000, 35000, 70000, 200000]:
        assert 0.01 * schedule(step) == pytest.approx(nvlabs(step * 2048, 2048), rel=1e-12)


@pytest.mark.parametrize("experiment, P, lr, decay, channels", [
    ("img64_edm2", (-0.8, 1.6), 0.010, 71680, 192),
    ("img512_edm2", (-0.4, 1.0), 0.010, 143360, 192),
    ("digits_edm2", (-0.8, 1.6), 0.01, 8, 32),
])
def test_experiment_presets(experiment, P, lr, decay, channels):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/x"])
    assert (cfg.loss.name, cfg.loss.P_mean, cfg.loss.P_std) == ("edm2", *P)
    assert (cfg.precond.name, cfg.precond.logvar_channels) == ("edm", 128)
    assert (cfg.optim.lr, list(cfg.optim.betas)) == (lr, [0.9, 0.99])
    assert cfg.model.lr_decay_kimg == decay and list(cfg.model.phema_sigma_rels) == [0.05, 0.10]
    assert (cfg.network.name, cfg.network.model_channels) == ("edm2", channels)
    assert Path(CONFIG_DIR, "experiment", f"{experiment}.yaml").is_file()
