"""Guidance against exact answers: class-conditional ideal denoisers and a Heun loop written out here."""

import functools
import math

import pytest
import torch

from edmlab import analytic
from edmlab.guidance import GuidedDenoiser, guided
from edmlab.networks import build
from edmlab.precond import Denoiser
from edmlab.sampling import sample

MEANS = [[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.0]]
CLASSES = [0, 0, 1, 1]  # component k belongs to class CLASSES[k]


class ClassConditional:
    """Ideal denoisers of a labelled mixture: a one-hot row means that class's mixture, a zero row the whole one."""

    sigma_min, sigma_max = 0.0, math.inf
    label_dim = 2
    data_shape = (2,)

    def __init__(self, stds):
        self.full = analytic.GaussianMixture([1, 2, 1, 1], MEANS, stds)
        w = self.full.weights
        self.per_class = [analytic.GaussianMixture(w[[k for k in range(4) if CLASSES[k] == c]],
                                                   [MEANS[k] for k in range(4) if CLASSES[k] == c],
                                                   [stds[k] for k in range(4) if CLASSES[k] == c]) for c in (0, 1)]
        self.calls = 0

    def round_sigma(self, sigma):
        return sigma

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        out = self.full(x, sigma)
        if class_labels is not None:
            for c, mixture in enumerate(self.per_class):
                rows = class_labels[:, c] > 0
                if rows.any():
                    out[rows] = mixture(x[rows], sigma[rows])
        return out


STDS = [0.3, 0.5, 0.4, 0.6]
MODEL = ClassConditional(STDS)
WEAK = ClassConditional([2 * s for s in STDS])  # a guide with the same conditioning, blurrier
LABELS = torch.eye(2, dtype=torch.float64)[torch.tensor([0, 1, 1, 0, 1, 0])]
LATENTS = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def reference_heun(D_w, latents, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Algorithm 1 (deterministic Heun in sigma, last step to 0 is D itself) on a given D_w(x, sigma)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    x = latents * sigmas[0]
    for k in range(num_steps - 1):
        s, s_next = sigmas[k], sigmas[k + 1]
        d = (x - D_w(x, s)) / s
        x_euler = x + (s_next - s) * d
        x = x + (s_next - s) * (d + (x_euler - D_w(x_euler, s_next)) / s_next) / 2
    return D_w(x, sigmas[-1])


def cfg_reference(w, interval=None):
    def D_w(x, sigma):
        cond, uncond = MODEL.__call__(x, sigma, LABELS), MODEL.__call__(x, sigma, None)
        inside = interval is None or interval[0] < sigma <= interval[1]
        return uncond + (w if inside else 1.0) * (cond - uncond)
    return D_w


@pytest.mark.parametrize("w", [0.0, 1.5, 3.0])
def test_cfg_equals_reference_heun(w):
    guide_model = GuidedDenoiser(MODEL, w)
    x = sample(guide_model, LATENTS, solver="heun", num_steps=18, class_labels=LABELS)
    torch.testing.assert_close(x, reference_heun(cfg_reference(w), LATENTS), rtol=1e-12, atol=1e-12)
    assert guide_model.nfe == 35 and guide_model.items == 35 * 2 * len(LATENTS)  # one doubled batch per call


def test_cfg_pulls_samples_into_their_class():
    """w > 1 moves each sample toward its own class's components (the point of guidance)."""
    means = torch.tensor(MEANS, dtype=torch.float64)
    own = torch.tensor(CLASSES)[None] == LABELS.argmax(1)[:, None]

    def class_margin(x):
        d = torch.cdist(x, means)
        return (d.masked_fill(~own, math.inf).min(1).values - d.masked_fill(own, math.inf).min(1).values).mean()

    margins = [class_margin(sample(GuidedDenoiser(MODEL, w), LATENTS, class_labels=LABELS)) for w in (0.0, 1.0, 4.0)]
    assert margins[0] > margins[1] > margins[2]


def test_autoguidance_equals_reference_heun():
    w = 2.5
    guide_model = GuidedDenoiser(MODEL, w, guide=WEAK)

    def D_w(x, sigma):
        D, G = MODEL(x, sigma, LABELS), WEAK(x, sigma, LABELS)
        return G + w * (D - G)

    x = sample(guide_model, LATENTS, solver="heun", num_steps=18, class_labels=LABELS)
    torch.testing.assert_close(x, reference_heun(D_w, LATENTS), rtol=1e-12, atol=1e-12)
    assert guide_model.nfe == 2 * 35  # D and the guide: two forwards per sampler evaluation


def test_guidance_interval_equals_reference_heun():
    w, interval = 3.0, (0.28, 5.42)
    guide_model = GuidedDenoiser(MODEL, w, interval=interval)
    x = sample(guide_model, LATENTS, solver="heun", num_steps=18, class_labels=LABELS)
    torch.testing.assert_close(x, reference_heun(cfg_reference(w, interval), LATENTS), rtol=1e-12, atol=1e-12)
    full = sample(GuidedDenoiser(MODEL, w), LATENTS, solver="heun", num_steps=18, class_labels=LABELS)
    assert (x - full).abs().max() > 1e-3  # the interval changes the result
    # Heun's sigma evaluations on the EDM grid: 35 calls, those inside (0.28, 5.42] run both branches
    i = torch.arange(18, dtype=torch.float64)
    sig = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    evaluated = torch.cat([sig[:-1], sig[1:], sig[-1:]])
    assert guide_model.nfe == 35
    assert guide_model.items == len(LATENTS) * (35 + int(((evaluated > 0.28) & (evaluated <= 5.42)).sum()))


def test_guidance_one_is_bit_identical():
    base = sample(MODEL, LATENTS, solver="heun", num_steps=12, class_labels=LABELS)
    for wrapped in (guided(MODEL, 1.0), GuidedDenoiser(MODEL, 1.0), GuidedDenoiser(MODEL, 1.0, guide=WEAK),
                    GuidedDenoiser(MODEL, 1.0, interval=(0.1, 1.0))):
        assert torch.equal(sample(wrapped, LATENTS, solver="heun", num_steps=12, class_labels=LABELS), base)
    assert guided(MODEL, 1.0) is MODEL
    # outside the interval the guided denoiser is D itself, bit for bit
    g = GuidedDenoiser(MODEL, 3.0, interval=(0.5, 1.0))
    assert torch.equal(g(LATENTS, 2.0, LABELS), MODEL(LATENTS, 2.0, LABELS))
    assert torch.equal(g(LATENTS, 0.5, LABELS), MODEL(LATENTS, 0.5, LABELS))  # the interval is (lo, hi]


def test_per_item_sigma_inside_and_outside():
    g = GuidedDenoiser(MODEL, 2.0, interval=(0.5, 1.0))
    sigma = torch.tensor([0.3, 0.7, 1.0, 2.0, 0.9, 5.0], dtype=torch.float64)
    out = g(LATENTS, sigma, LABELS)
    D, G = MODEL(LATENTS, sigma, LABELS), MODEL(LATENTS, sigma, None)
    inside = ((sigma > 0.5) & (sigma <= 1.0))[:, None]
    torch.testing.assert_close(out, torch.where(inside, G + 2.0 * (D - G), D), rtol=0, atol=1e-14)


def tiny_network(seed):
    """A small conditional DDPM++ with random weights everywhere (its zero-initialised output would ignore labels)."""
    torch.manual_seed(seed)
    net = build("ddpmpp", img_resolution=8, img_channels=1, label_dim=3, model_channels=16, channel_mult=[1],
                num_blocks=1, attn_resolutions=[])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net


def test_network_cfg_is_one_batched_forward():
    net = tiny_network(0)
    denoiser = Denoiser(net.double(), "iddpm").eval()
    g = GuidedDenoiser(denoiser, 2.0)
    forwards = []
    net.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1])
    with torch.no_grad():
        out = g(x, 1.5, labels)
        D, G = denoiser(x, 1.5, labels), denoiser(x, 1.5, None)
    assert forwards[0] == 8 and g.nfe == 1  # [cond; uncond] as one batch of 2N
    assert (D - G).abs().max() > 1e-3
    torch.testing.assert_close(out, G + 2.0 * (D - G), rtol=1e-10, atol=1e-10)
    # the attributes samplers read are the wrapped denoiser's
    assert g.label_dim == 3 and g.precond.name == "iddpm" and g.sigma_max == denoiser.sigma_max
    assert torch.equal(g.round_sigma(torch.tensor(1.3)), denoiser.round_sigma(torch.tensor(1.3)))
    assert next(g.parameters()) is next(denoiser.parameters())
    with pytest.raises(ValueError, match="needs class labels"):
        g(x, 1.5, None)


def test_bad_settings():
    with pytest.raises(ValueError, match="guidance_interval"):
        GuidedDenoiser(MODEL, 2.0, interval=(5.0, 1.0))
    with pytest.raises(ValueError, match="finite"):
        GuidedDenoiser(MODEL, math.nan)
    with pytest.raises(TypeError, match="guidance: the guide: a function is not a denoiser; it lacks label_dim"):
        GuidedDenoiser(MODEL, 2.0, guide=lambda x, sigma, class_labels=None: x)


def tiny_checkpoint(path, seed):
    from edmlab import checkpoints

    return checkpoints.save_denoiser(Denoiser(tiny_network(seed)), path)


def test_sample_cli_guidance(tmp_path):
    """`python sample.py ckpt=... guidance=2 guide=... guidance_interval=[...]` = generate() on the guided denoiser."""
    import numpy as np
    from hydra import compose, initialize_config_dir
    from test_generate import pixels

    from edmlab.checkpoints import load_any
    from edmlab.cli.sample import CONFIG_DIR, run
    from edmlab.generation import generate_batch, npz_name

    ckpt, weak = tiny_checkpoint(tmp_path / "a.pt", 0), tiny_checkpoint(tmp_path / "b.pt", 1)
    common = [f"ckpt={ckpt}", "seeds=0-2", "num_steps=4", "format=npz", "progress=false", "device=cpu"]
    heun = functools.partial(sample, solver="heun", num_steps=4)
    for extra, wrapped in [
        ([], load_any(ckpt).denoiser),
        (["guidance=2"], GuidedDenoiser(load_any(ckpt).denoiser, 2.0)),
        (["guidance=3", f"guide={weak}", "guidance_interval=[0.28,5.42]"],
         GuidedDenoiser(load_any(ckpt).denoiser, 3.0, guide=load_any(weak).denoiser, interval=(0.28, 5.42))),
    ]:
        out = tmp_path / f"out{len(extra)}"
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            run(compose("sample", overrides=[*common, *extra, f"outdir={out}"]))
        with np.load(out / npz_name([0, 1, 2])) as f:
            images = f["images"]
        np.testing.assert_array_equal(images, pixels(generate_batch(wrapped, [0, 1, 2], heun)[0]))
        if not extra:
            unguided = images
    assert not np.array_equal(images, unguided)


def test_preview_grid_takes_a_guidance_setting():
    from types import SimpleNamespace

    import numpy as np

    from edmlab.generation.grid import preview_samples, render
    from edmlab.training.samples import draw_samples

    denoiser = Denoiser(tiny_network(0)).eval()
    module = SimpleNamespace(ema=SimpleNamespace(module=denoiser), data_shape=[1, 8, 8], label_dim=3, device="cpu")
    heun = functools.partial(sample, solver="heun", num_steps=4)
    image = np.asarray(draw_samples(module, heun, per_class=2, guidance=2.0, guidance_interval=[0.1, 10.0]))
    expected = render(*preview_samples(GuidedDenoiser(denoiser, 2.0, interval=(0.1, 10.0)), heun, [1, 8, 8],
                                       per_class=2), per_class=2)
    np.testing.assert_array_equal(image, np.asarray(expected))
    assert not np.array_equal(image, np.asarray(draw_samples(module, heun, per_class=2)))


@pytest.mark.parametrize("experiment", [None, "digits_edm", "cifar_edm"])
def test_conditional_experiments_train_with_label_dropout(experiment):
    from hydra import compose, initialize_config_dir

    from edmlab.cli.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"] if experiment else [])
    assert cfg.data.use_labels and cfg.network.label_dropout == 0.1
    assert cfg.callbacks.sample_grid.guidance == 1.0


def test_sample_takes_guidance_arguments_like_the_wrapper():
    """sample(..., guidance=w, guide=..., guidance_interval=...) is the sampler on guided(denoiser, w, ...)."""
    for w, guide, interval in ((1.0, None, None), (2.0, None, None), (2.0, None, (0.28, 5.42)), (2.0, WEAK, None)):
        via_kwargs = sample(MODEL, LATENTS, num_steps=8, class_labels=LABELS, guidance=w, guide=guide,
                            guidance_interval=interval)
        via_wrapper = sample(guided(MODEL, w, guide=guide, interval=interval), LATENTS, num_steps=8,
                             class_labels=LABELS)
        assert torch.equal(via_kwargs, via_wrapper)
    assert torch.equal(sample(MODEL, LATENTS, num_steps=8, class_labels=LABELS, guidance=1.0),
                       sample(MODEL, LATENTS, num_steps=8, class_labels=LABELS))
