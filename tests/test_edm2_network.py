"""EDM2's magnitude-preserving U-Net: NVlabs' exact sizes and names, and the magnitude-preservation maths."""

import math

import pytest
import torch

from edmlab.networks import EDM2_PRESETS, build, num_parameters
from edmlab.networks.mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from edmlab.precond import Denoiser

# NVlabs/edm2 presets, label_dim 1000, U-Net alone (counted on the meta device: nothing is allocated).
COUNTS = [
    (3, "xs", 124_710_821), (3, "s", 280_209_253), (3, "m", 497_803_045), (3, "l", 777_492_197),
    (3, "xl", 1_119_276_709),
    (4, "xs", 124_713_125), (4, "s", 280_212_709), (4, "m", 497_807_653), (4, "l", 777_497_957),
    (4, "xl", 1_119_283_621), (4, "xxl", 1_523_164_645),
]
TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], channels_per_head=8)


@pytest.mark.parametrize("channels, preset, count", COUNTS)
def test_preset_counts_equal_nvlabs(channels, preset, count):
    with torch.device("meta"):
        net = build("edm2", img_resolution=64, img_channels=channels, label_dim=1000,
                    model_channels=EDM2_PRESETS[preset])
    assert num_parameters(net) == count


def test_state_dict_names_follow_nvlabs():
    with torch.device("meta"):
        net = build("edm2", img_resolution=64, img_channels=4, label_dim=1000, model_channels=128)
    names = list(net.state_dict())
    assert names[:6] == ["out_gain", "emb_fourier.freqs", "emb_fourier.phases", "emb_noise.weight",
                         "emb_label.weight", "enc.64x64_conv.weight"]
    assert names[-1] == "out_conv.weight"
    for name in ["enc.64x64_block0.emb_gain", "enc.32x32_down.conv_res0.weight", "enc.16x16_block0.attn_qkv.weight",
                 "enc.32x32_block0.conv_skip.weight", "dec.8x8_in0.attn_proj.weight", "dec.8x8_in1.conv_res1.weight",
                 "dec.64x64_up.emb_linear.weight", "dec.64x64_block3.conv_skip.weight"]:
        assert name in names, name
    assert not any(n.endswith(".bias") for n in names)  # no biases anywhere
    assert "enc.64x64_block0.attn_qkv.weight" not in names  # attention only at 16 and 8
    # encoder: conv + 3 blocks at 64, then down + 3 blocks per level; decoder: in0, in1, then up + 4 blocks
    assert sum(n.startswith("enc.") and n.endswith("emb_gain") for n in names) == 3 + 3 * 4
    assert sum(n.startswith("dec.") and n.endswith("emb_gain") for n in names) == 2 + 4 + 3 * 5


# ---------------------------------------------------------------------------- magnitude preservation


def test_silu_magnitude_constant_is_exact_gaussian_rms():
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    rms = math.sqrt(float(torch.trapezoid(torch.nn.functional.silu(x) ** 2 * density, x)))
    assert rms == pytest.approx(0.596, abs=5e-4)  # NVlabs' rounded constant
    assert float(torch.trapezoid(mp_silu(x) ** 2 * density, x)) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("t", [0.3, 0.5, 0.9])
def test_mp_sum_of_orthogonal_unit_vectors_has_unit_magnitude(t):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1000, generator=g, dtype=torch.float64)
    b = b - (a @ b) / (a @ a) * a  # orthogonal to a
    a, b = a / a.square().mean().sqrt(), b / b.square().mean().sqrt()
    assert float(mp_sum(a, b, t).square().mean()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("t", [0.5, 0.2])
def test_mp_cat_keeps_unit_magnitude_and_balance(t):
    g = torch.Generator().manual_seed(1)
    a = normalize(torch.randn(2, 96, 4, 4, generator=g, dtype=torch.float64), eps=0)
    b = normalize(torch.randn(2, 32, 4, 4, generator=g, dtype=torch.float64), eps=0)
    y = mp_cat(a, b, t=t)
    assert y.shape == (2, 128, 4, 4)
    assert y.square().mean(dim=[1, 2, 3]).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    # the two parts carry energy in the ratio (1 - t)^2 : t^2
    ea, eb = y[:, :96].square().sum(), y[:, 96:].square().sum()
    assert float(ea / eb) == pytest.approx((1 - t) ** 2 / t**2, rel=1e-6)


def test_mp_fourier_has_unit_magnitude_over_phases():
    f = MPFourier(6)
    f.freqs.copy_(torch.full([6], 1.7))
    f.phases.copy_(torch.arange(6) * 2 * math.pi / 6)  # evenly spaced phases: exact average of 2 cos^2
    y = f(torch.tensor([0.3, -2.0, 5.0]))
    assert y.square().mean(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)


def test_mpconv_forced_weight_normalisation_and_unit_output():
    torch.manual_seed(0)
    n, out = 64, 16
    layer = MPConv(n, out, kernel=[])
    with torch.no_grad():
        layer.weight.mul_(7.0)  # any norm: the layer's output does not depend on it
    x = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0].float() * math.sqrt(n)  # orthogonal, unit RMS
    layer.eval()
    y_eval = layer(x)
    assert float(layer.weight.detach().norm(dim=1).mean()) > 10  # eval mode leaves the stored weight alone
    layer.train()
    y_train = layer(x)
    row_norms = layer.weight.detach().double().norm(dim=1)
    assert row_norms.tolist() == pytest.approx([math.sqrt(n)] * out, rel=1e-3)  # forced: unit RMS per output
    assert torch.allclose(y_eval, y_train, rtol=1e-3, atol=1e-3)  # eps = 1e-4 of the first norm
    assert float(y_train.detach().double().square().mean()) == pytest.approx(1.0, abs=1e-3)  # unit in -> unit out
    assert torch.allclose(layer(x, gain=2.5), 2.5 * y_train, rtol=1e-5, atol=1e-5)


def test_mpconv_gradient_is_orthogonal_to_the_weight():
    torch.manual_seed(0)
    layer = MPConv(8, 4, kernel=[3, 3]).eval()
    layer(torch.randn(2, 8, 5, 5)).square().sum().backward()
    w, g = layer.weight.detach().flatten(1), layer.weight.grad.flatten(1)
    cosine = (w * g).sum(1) / (w.norm(dim=1) * g.norm(dim=1))
    assert cosine.abs().max() < 1e-3  # normalisation removes the radial component (EDM2 Sec. 2.3)


# ---------------------------------------------------------------------------- the network


def tiny(label_dim=0):
    torch.manual_seed(0)
    net = build("edm2", label_dim=label_dim, **TINY)
    return net


def test_zero_output_gain_makes_the_denoiser_c_skip_x():
    denoiser = Denoiser(tiny(label_dim=10), name="edm").eval()
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    labels = torch.eye(10)[:3]
    c_skip = 0.25 / (sigma**2 + 0.25)
    assert torch.allclose(denoiser(x, sigma, labels), c_skip[:, None, None, None] * x, atol=1e-6)


def test_forward_shape_conditioning_and_batch_independence():
    net = tiny(label_dim=10).eval()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)  # emb gains: let the noise and label embeddings reach the blocks
    x, c_noise = torch.randn(4, 3, 8, 8), torch.tensor([-1.0, 0.0, 0.5, 1.0])
    labels = torch.eye(10)[[0, 1, 2, 3]]
    y = net(x, c_noise, labels)
    assert y.shape == (4, 3, 8, 8) and torch.isfinite(y).all()
    assert not torch.allclose(net(x, c_noise, torch.eye(10)[[5, 5, 5, 5]]), y, atol=1e-4)
    assert not torch.allclose(net(x, c_noise + 0.3, labels), y, atol=1e-4)
    assert torch.allclose(net(x[1:2], c_noise[1:2], labels[1:2]), y[1:2], atol=1e-5)


def test_training_forward_normalises_every_weight_and_builds_from_config():
    net = tiny().train()
    net(torch.randn(2, 3, 8, 8), torch.zeros(2)).sum().backward()
    for name, p in net.named_parameters():
        if p.ndim >= 2:
            rms = p.detach().flatten(1).square().mean(1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3), name
    again = build(**net.build_config)
    assert list(again.state_dict()) == list(net.state_dict())


def test_augment_labels_enter_through_a_zero_gain():
    net = build("edm2", augment_dim=9, **TINY).eval()
    assert "emb_augment.weight" in net.state_dict() and float(net.augment_gain.detach()) == 0
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        x, c_noise, augment = torch.randn(2, 3, 8, 8), torch.zeros(2), torch.randn(2, 9)
        base = net(x, c_noise)
        assert torch.equal(net(x, c_noise, augment_labels=augment), base)  # ignored at initialisation
        net.augment_gain.fill_(1.0)
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(1.0)
        assert not torch.allclose(net(x, c_noise, augment_labels=augment), net(x, c_noise), atol=1e-4)
