"""The fast path's switches compute what the default path computes (each on the CPU; speeds in benchmarks/)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from edmlab import loss as losses
from edmlab.networks import build, layers
from edmlab.precond import Denoiser
from edmlab.training.ema import EMA, _lerp_into
from edmlab.training.module import EDMModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def perturbed_denoiser(attn_resolutions=(), seed: int = 0, **kwargs) -> Denoiser:
    """A DDPM++ at 8x8 with every weight perturbed (zero-initialised output layers make D = c_skip x)."""
    torch.manual_seed(seed)
    net = build("ddpmpp", img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=list(attn_resolutions), dropout=0.0, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return Denoiser(net)


def assert_close_grads(grads_a: list, grads_b: list, rtol: float = 1e-4) -> None:
    """Per tensor, ||a - b|| <= rtol ||a||: float32 sums in another order, nothing else."""
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.linalg.vector_norm(a - b) <= rtol * torch.linalg.vector_norm(a), (a - b).abs().max()


def loss_and_grads(denoiser: Denoiser, images: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, list]:
    denoiser.zero_grad(set_to_none=True)
    recipe = losses.get("edm")
    g = torch.Generator().manual_seed(seed)
    sigma = recipe.sample_sigma(len(images), generator=g)
    loss = losses.denoising_loss(denoiser, images, recipe, generator=g, sigma=sigma).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in denoiser.parameters()]


def images_8x8(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1


# ------------------------------------------------------------------------------------------------ EMA
def edm_parameter_loop(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """NVlabs/edm training_loop.py: for p_ema, p_net: p_ema.copy_(p_net.detach().lerp(p_ema, beta))."""
    with torch.no_grad():
        for p_ema, p_net in zip(ema.parameters(), net.parameters(), strict=True):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        for b_ema, b_net in zip(ema.buffers(), net.buffers(), strict=True):
            b_ema.copy_(b_net)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_foreach_ema_is_bit_identical_to_edms_parameter_loop(dtype):
    net = perturbed_denoiser().to(dtype)
    ema_loop, ema_foreach = copy.deepcopy(net), copy.deepcopy(net)
    g = torch.Generator().manual_seed(3)
    half_up = float(np.nextafter(np.float32(0.5), np.float32(1)))
    for beta in (0.0, 0.25, 0.5, half_up, 0.7, 0.9, 0.999, 0.9999307, 1 - 2**-20):
        with torch.no_grad():  # the network moves between updates, as in training
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(dtype))
        edm_parameter_loop(ema_loop, net, beta)
        _lerp_into(ema_foreach, net, beta)
        for a, b in zip(ema_loop.state_dict().values(), ema_foreach.state_dict().values(), strict=True):
            assert torch.equal(a, b), f"beta={beta}"
    assert not torch.equal(ema_loop.net.enc["8x8_conv"].weight, net.net.enc["8x8_conv"].weight)


def test_ema_update_uses_edms_beta_and_first_copies_the_network():
    net = perturbed_denoiser()
    ema = EMA(net, halflife_kimg=0.5, rampup_ratio=None)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2)
    reference = copy.deepcopy(ema.module)
    beta = ema.update(net, nimg=10_000, batch_size=64)
    assert beta == pytest.approx(0.5 ** (64 / 500))
    edm_parameter_loop(reference, net, beta)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), ema.module.parameters(), strict=True))


# ------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("heads,resolution", [(1, 16), (4, 8), (3, 5)])
def test_sdpa_attention_equals_einsum_attention(heads, resolution):
    c = 8 * heads
    qkv = torch.randn(2, 3 * c, resolution, resolution, generator=torch.Generator().manual_seed(4))
    exact = layers.self_attention(qkv.double(), heads, backend="einsum")
    # the closed form for one head, pixel by pixel: softmax_k(q_i . k_k / sqrt(c)) v_k
    q, k, v = qkv.double().reshape(2, heads, c // heads, 3, -1).unbind(3)
    w = torch.softmax(torch.einsum("nhcq,nhck->nhqk", q, k) / (c // heads) ** 0.5, dim=-1)
    assert torch.allclose(exact, torch.einsum("nhqk,nhck->nhcq", w, v).reshape(exact.shape), atol=1e-12)
    for backend in ("einsum", "sdpa"):
        out = layers.self_attention(qkv, heads, backend=backend)
        assert out.dtype == torch.float32 and (out.double() - exact).abs().max() < 1e-5, backend


def test_sdpa_in_a_unet_gives_the_same_loss_and_gradients():
    denoiser = perturbed_denoiser(attn_resolutions=[8, 4])
    images = images_8x8()
    loss_einsum, grads_einsum = loss_and_grads(denoiser, images)
    layers.set_attention("sdpa")
    try:
        loss_sdpa, grads_sdpa = loss_and_grads(denoiser, images)
    finally:
        layers.set_attention("einsum")
    assert abs(float(loss_sdpa) - float(loss_einsum)) <= 1e-5 * float(loss_einsum)
    assert_close_grads(grads_einsum, grads_sdpa)
    with pytest.raises(ValueError, match="einsum, sdpa"):
        layers.set_attention("flash")


# -------------------------------------------------------------------------------- layout and precision
def module_for(denoiser: Denoiser, **kwargs) -> EDMModule:
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    return EDMModule(denoiser, losses.get("edm"), optimizer, batch_size=6, data_shape=[3, 8, 8], **kwargs)


def test_channels_last_gives_the_same_loss_and_gradients():
    images = images_8x8()
    reference, fast = perturbed_denoiser(attn_resolutions=[4]), perturbed_denoiser(attn_resolutions=[4])
    module = module_for(fast, channels_last=True)
    keys = list(module.state_dict())
    module.configure_model()
    conv = fast.net.enc["8x8_conv"].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert module.ema.module.net.enc["8x8_conv"].weight.is_contiguous(memory_format=torch.channels_last)
    assert list(module.state_dict()) == keys
    loss_ref, grads_ref = loss_and_grads(reference, images)
    loss_fast, grads_fast = loss_and_grads(fast, images.contiguous(memory_format=torch.channels_last))
    assert abs(float(loss_fast) - float(loss_ref)) <= 1e-5 * float(loss_ref)
    assert_close_grads(grads_ref, grads_fast)


def test_bf16_autocast_loss_is_the_fp32_loss_to_bf16_precision():
    denoiser, images = perturbed_denoiser(attn_resolutions=[4]), images_8x8(16)
    loss_fp32, _ = loss_and_grads(denoiser, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, grads_bf16 = loss_and_grads(denoiser, images)
    assert loss_bf16.dtype == torch.float32  # the loss itself is reduced in float32
    assert abs(float(loss_bf16) - float(loss_fp32)) < 2e-2 * float(loss_fp32)
    assert all(g.dtype == torch.float32 for g in grads_bf16)  # weights and their gradients stay float32


def test_fused_adam_takes_the_same_steps():
    g = torch.Generator().manual_seed(5)
    shapes = [(32, 16, 3, 3), (64,), (10, 32)]
    initial = [torch.randn(shape, generator=g) for shape in shapes]
    # the same gradients for both (a network's would differ by rounding): magnitudes from 1e-5 to 1
    grads = [[torch.randn(shape, generator=g) * 10.0 ** -(i + j) for j, shape in enumerate(shapes)] for i in range(4)]
    runs = []
    for fused in (None, True):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, fused=fused)
        for step_grads in grads:
            for p, grad in zip(params, step_grads, strict=True):
                p.grad = grad.clone()
            opt.step()
        runs.append([p.detach() for p in params])
    for a, b, p0 in zip(*runs, initial, strict=True):
        assert (a - b).abs().max() <= 1e-4 * (a - p0).abs().max()


# ------------------------------------------------------------------------------------------ compile
def test_compile_switch_compiles_the_network_forward_only(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):  # a real compile costs 20-90 s here: record the call, run eagerly
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    denoiser = perturbed_denoiser()
    module = module_for(denoiser, torch_compile={"mode": "max-autotune", "dynamic": False})
    keys = list(module.state_dict())
    images = images_8x8()
    loss_eager, _ = loss_and_grads(denoiser, images)
    module.configure_model()
    module.configure_model()  # Lightning calls it once per fit: compiled once
    assert calls == [{"mode": "max-autotune", "dynamic": False}]
    assert denoiser.net._compiled_call_impl is not None and module.ema.module.net._compiled_call_impl is None
    assert list(module.state_dict()) == keys  # checkpoints keep their keys (no _orig_mod. prefix)
    assert torch.equal(loss_and_grads(denoiser, images)[0], loss_eager)
    assert module_for(perturbed_denoiser()).torch_compile is False


@pytest.mark.slow
def test_a_real_compile_gives_the_eager_loss():
    denoiser, images = perturbed_denoiser(), images_8x8()
    loss_eager, grads_eager = loss_and_grads(denoiser, images)
    module = module_for(denoiser, torch_compile=True)
    module.configure_model()
    loss_compiled, grads_compiled = loss_and_grads(denoiser, images)
    assert abs(float(loss_compiled) - float(loss_eager)) <= 1e-5 * float(loss_eager)
    assert_close_grads(grads_eager, grads_compiled)


# --------------------------------------------------------------------------------- config plumbing
def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import edmlab.cli  # noqa: F401 - the edmlab.* resolvers

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def test_trainer_gpu_fast_sets_every_switch_and_the_cli_applies_them():
    from edmlab.cli.extras import apply_extras
    from edmlab.cli.train import build_model

    quiet = ["logger=csv", "extras.print_config=false"]
    default, fast = compose(quiet), compose([*quiet, "trainer=gpu_fast"])
    assert (default.trainer.precision, fast.trainer.precision) == ("32-true", "bf16-mixed")
    assert (default.trainer.accelerator, fast.trainer.accelerator) == ("cpu", "gpu")
    assert fast.trainer.max_steps == default.trainer.max_steps
    _, model = build_model(fast)
    assert model.channels_last is True and model.torch_compile is False
    assert model.optimizer_factory.keywords["fused"] is True
    backends = torch.backends
    saved = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark)
    try:
        apply_extras(fast)
        assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32 and backends.cudnn.benchmark
        assert layers._attention["backend"] == "sdpa"
        apply_extras(default)  # EDM's settings: true fp32, cuDNN autotuning, EDM's attention ops
        assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32 and backends.cudnn.benchmark
        assert layers._attention["backend"] == "einsum"
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = saved
        layers.set_attention("einsum")


def test_pinned_memory_reaches_the_loader():
    from hydra.utils import instantiate

    cfg = compose(["logger=csv", "trainer=gpu_fast", "extras.print_config=false"])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    assert datamodule.train_dataloader().pin_memory is True
