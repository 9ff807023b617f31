"""edmlab.networks: EDM's exact architectures (counts, weight names), layer maths, forward shapes and dtypes."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from edmlab.networks import NAMES, build, num_parameters
from edmlab.networks.layers import Conv2d, PositionalEmbedding, self_attention, weight_init
from edmlab.precond import Denoiser

CONFIGS = "configs/network"

# Small configurations per network (the count tests use the paper sizes).
SMALL = {
    "ddpmpp": dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[4], dropout=0.0),
    "ncsnpp": dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[4], dropout=0.0),
    "adm": dict(img_resolution=8, img_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4], dropout=0.0),
    "mlp": dict(img_resolution=1, img_channels=2, hidden_channels=32, num_blocks=2, emb_channels=16),
    "edm2": dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[4], channels_per_head=8),
}


def randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised output layers would hide the conditioning paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def small(name: str, label_dim: int = 0, augment_dim: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize(build(name, label_dim=label_dim, augment_dim=augment_dim, **SMALL[name])).eval()


# ---------------------------------------------------------------------------- 1. EDM's exact sizes


@pytest.mark.parametrize("name, label_dim, augment_dim, count", [
    ("ddpmpp", 10, 9, 55_735_299),
    ("ddpmpp", 0, 9, 55_733_891),
    ("ddpmpp", 10, 0, 55_735_299 - 1_152),
    ("ddpmpp", 0, 0, 55_733_891 - 1_152),
    ("ncsnpp", 10, 9, 56_400_643),
    ("ncsnpp", 0, 9, 56_397_827),
    ("ncsnpp", 10, 0, 56_400_643 - 2_304),
    ("ncsnpp", 0, 0, 56_397_827 - 2_304),
])
def test_song_unet_counts_equal_edm_cifar10(name, label_dim, augment_dim, count):
    with torch.device("meta"):
        net = build(name, img_resolution=32, img_channels=3, label_dim=label_dim, augment_dim=augment_dim)
    assert num_parameters(net) == count


@pytest.mark.parametrize("label_dim, count", [(1000, 295_899_267), (0, 295_131_267)])
def test_adm_counts_equal_edm_imagenet64(label_dim, count):
    with torch.device("meta"):
        net = build("adm", img_resolution=64, img_channels=3, label_dim=label_dim)
    assert num_parameters(net) == count


@pytest.mark.parametrize("yaml, shape, count", [
    ("ddpmpp", (32, 3, 10, 9), 55_735_299),
    ("ncsnpp", (32, 3, 10, 9), 56_400_643),
    ("adm", (64, 3, 1000, 0), 295_899_267),
    ("unet_small", (8, 1, 10, 0), 982_401),
])
def test_hydra_configs_build_the_paper_networks(yaml, shape, count):
    partial = instantiate(OmegaConf.load(f"{CONFIGS}/{yaml}.yaml"))
    res, ch, labels, aug = shape
    with torch.device("meta"):
        net = partial(img_resolution=res, img_channels=ch, label_dim=labels, augment_dim=aug)
    assert num_parameters(net) == count
    assert all(type(v) in (int, float, str, bool, list) for v in net.build_config.values())


# (number of tensors, sha256 prefix of the newline-joined state_dict keys) of NVlabs/edm's SongUNet and
# DhariwalUNet built with the same settings from its training/networks.py: official weights map by name.
EDM_KEYS = {
    ("ddpmpp", 32, 10, 9): (427, "64ef645abe86d5ff"),
    ("ncsnpp", 32, 10, 9): (434, "16616f827f8ce409"),
    ("adm", 64, 1000, 0): (553, "235e4adf29c4fa6f"),
}


@pytest.mark.parametrize("config", list(EDM_KEYS))
def test_weight_names_equal_edm(config):
    name, res, labels, aug = config
    with torch.device("meta"):
        keys = list(build(name, img_resolution=res, img_channels=3, label_dim=labels, augment_dim=aug).state_dict())
    assert (len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]) == EDM_KEYS[config]
    expected = {"ddpmpp": ["map_label.weight", "map_augment.weight", "map_layer0.weight", "enc.32x32_conv.weight",
                           "enc.32x32_block0.conv0.weight", "enc.16x16_block0.qkv.weight",
                           "dec.32x32_aux_norm.weight", "dec.32x32_aux_conv.weight"],
                "ncsnpp": ["map_noise.freqs", "enc.16x16_aux_residual.weight", "enc.16x16_down.conv0.resample_filter"],
                "adm": ["map_label.weight", "enc.64x64_conv.weight", "enc.32x32_block0.qkv.weight", "out_norm.weight",
                        "out_conv.weight"]}[name]
    assert set(expected) <= set(keys)


# ---------------------------------------------------------------------------- layer maths


def test_positional_embedding_values():
    x = torch.tensor([1.0, 2.0])
    emb = PositionalEmbedding(4, endpoint=True)(x)  # frequencies 1 and 1e-4
    freqs = torch.tensor([1.0, 1e-4])
    expected = torch.cat([torch.outer(x, freqs).cos(), torch.outer(x, freqs).sin()], dim=1)
    torch.testing.assert_close(emb, expected)


def test_box_resampling_is_average_pool_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 8)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1])
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1])
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("mode, draw, scale", [
    ("xavier_uniform", lambda s: torch.rand(*s) * 2 - 1, math.sqrt(6 / (5 + 7))),
    ("xavier_normal", lambda s: torch.randn(*s), math.sqrt(2 / (5 + 7))),
    ("kaiming_uniform", lambda s: torch.rand(*s) * 2 - 1, math.sqrt(3 / 5)),
    ("kaiming_normal", lambda s: torch.randn(*s), math.sqrt(1 / 5)),
])
def test_weight_init_is_edms_formula_bit_for_bit(mode, draw, scale):
    """The same draws, scaled as NVlabs' weight_init writes it (out of place): equal to the last bit."""
    torch.manual_seed(3)
    expected = scale * draw([7, 5])
    torch.manual_seed(3)
    assert torch.equal(weight_init([7, 5], mode, fan_in=5, fan_out=7), expected)


def test_fir_filter_is_normalised_binomial():
    conv = Conv2d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    torch.testing.assert_close(conv.resample_filter[0, 0], torch.outer(f, f))
    torch.testing.assert_close(conv(torch.ones(1, 1, 8, 8))[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))


def test_self_attention_matches_reference_heads():
    n, heads, c, h, w = 2, 2, 4, 3, 3
    qkv = torch.randn(n, 3 * heads * c, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # EDM's layout: channels ordered (head, channel, q/k/v).
    q, k, v = qkv.reshape(n * heads, c, 3, h * w).unbind(2)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    torch.testing.assert_close(self_attention(qkv, heads), ref.transpose(1, 2).reshape(n, heads * c, h, w))


# ---------------------------------------------------------------------------- 2. forward shapes and dtypes


def inputs(name: str, label_dim: int, augment_dim: int, with_labels: bool, with_augment: bool):
    g = torch.Generator().manual_seed(1)
    cfg = SMALL[name]
    shape = (2, cfg["img_channels"]) if name == "mlp" else (2, cfg["img_channels"], 8, 8)
    x = torch.randn(shape, generator=g)
    labels = F.one_hot(torch.tensor([3, 7]), label_dim).float() if with_labels and label_dim else None
    augment = torch.randn(2, augment_dim, generator=g) if with_augment and augment_dim else None
    return x, torch.tensor([0.3, -0.8]), labels, augment


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("label_dim, augment_dim", [(0, 0), (10, 9)])
def test_forward_shape_dtype_fp32_and_bf16_autocast(name, label_dim, augment_dim):
    net = small(name, label_dim, augment_dim)
    for with_labels in (False, True):
        for with_augment in (False, True):
            x, c_noise, labels, augment = inputs(name, label_dim, augment_dim, with_labels, with_augment)
            with torch.no_grad():
                y = net(x, c_noise, class_labels=labels, augment_labels=augment)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y16 = net(x, c_noise, class_labels=labels, augment_labels=augment)
            assert y.shape == x.shape and y.dtype == torch.float32 and y.isfinite().all()
            assert y16.shape == x.shape and y16.dtype == torch.bfloat16
            # bf16 keeps ~3 significant digits; errors accumulate over the layers.
            assert (y16.float() - y).norm() <= 0.05 * y.norm()


@pytest.mark.parametrize("name", NAMES)
def test_conditioning_inputs_change_the_output(name):
    net = small(name, label_dim=10, augment_dim=9)
    x, c_noise, labels, augment = inputs(name, 10, 9, True, True)
    with torch.no_grad():
        base = net(x, c_noise)
        assert not torch.allclose(net(x, c_noise, class_labels=labels), base)
        assert not torch.allclose(net(x, c_noise, augment_labels=augment), base)
        assert not torch.allclose(net(x, c_noise + 0.5), base)
        # Integer labels are one-hot encoded; no labels = the all-zero label, as EDM's preconditioning feeds.
        torch.testing.assert_close(net(x, c_noise, class_labels=torch.tensor([3, 7])), net(x, c_noise, labels),
                                   rtol=0, atol=0)
        torch.testing.assert_close(net(x, c_noise, class_labels=torch.zeros(2, 10)), base, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_network_inside_denoiser_and_bf16_weights(name):
    net = small(name, label_dim=10)
    x, _, labels, _ = inputs(name, 10, 0, True, False)
    D = Denoiser(net, name="edm")
    with torch.no_grad():
        out = D(x.double(), torch.tensor([0.5, 2.0]), class_labels=labels)
        assert out.shape == x.shape and out.dtype == torch.float64
        y16 = net.to(torch.bfloat16)(x.bfloat16(), torch.tensor([0.1, 0.2], dtype=torch.bfloat16), labels)
    assert y16.dtype == torch.bfloat16 and y16.shape == x.shape


def test_mlp_on_flattened_images_and_bad_shape():
    net = build("mlp", img_resolution=4, img_channels=1, hidden_channels=16, num_blocks=1, emb_channels=8)
    assert net(torch.randn(3, 1, 4, 4), torch.zeros(3)).shape == (3, 1, 4, 4)
    with pytest.raises(ValueError, match="16 input features"):
        net(torch.randn(3, 5), torch.zeros(3))


# ---------------------------------------------------------------------------- build


def test_build_errors_name_what_is_valid():
    with pytest.raises(ValueError, match="unknown network 'unet'.*ddpmpp, ncsnpp, adm, mlp"):
        build("unet", img_resolution=8, img_channels=1)
    with pytest.raises(ValueError, match="no option.*model_chanels.*model_channels"):
        build("ddpmpp", img_resolution=8, img_channels=1, model_chanels=8)
    with pytest.raises(ValueError, match="encoder_type='resnet'"):
        build("ddpmpp", img_resolution=8, img_channels=1, encoder_type="resnet")


def test_build_config_rebuilds_the_same_network():
    torch.manual_seed(3)
    net = build("ncsnpp", label_dim=10, augment_dim=9, **SMALL["ncsnpp"])
    assert net.build_config == dict(name="ncsnpp", label_dim=10, augment_dim=9, **SMALL["ncsnpp"])
    torch.manual_seed(3)
    again = build(**net.build_config)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))
    assert (net.img_resolution, net.img_channels, net.label_dim, net.augment_dim) == (8, 3, 10, 9)


def test_out_channels_for_learned_variance():
    net = build("adm", out_channels=6, **SMALL["adm"])
    assert net(torch.randn(2, 3, 8, 8), torch.zeros(2)).shape == (2, 6, 8, 8)
    assert math.isclose(net.build_config["out_channels"], 6)
