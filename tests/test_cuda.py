"""The CUDA paths CI cannot run: each fast-path switch, compile and sampling on the GPU against a reference.

Skipped without a CUDA device. `EDMLAB_TEST_DEVICE=cpu pytest -m cuda` runs the same checks on the CPU (their
logic, not the kernels); benchmarks/gpu_check.sh runs them on a GPU beside the speed benchmark.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fast_path import assert_close_grads, perturbed_denoiser

from edmlab import loss as losses
from edmlab.generation import with_precision
from edmlab.networks import layers
from edmlab.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("EDMLAB_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                    reason="no CUDA device (EDMLAB_TEST_DEVICE=cpu runs the logic)")]


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off and einsum attention: the reference path; each test switches on what it checks."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, layers._attention["backend"])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    layers.set_attention("einsum")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    layers.set_attention(saved[2])


def inputs(n: int = 8, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean images, noise, sigma) drawn on the CPU, so every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    sigma = (torch.randn(n, generator=g) * 1.2 - 1.2).exp()
    return images, torch.randn(images.shape, generator=g), sigma


def edm_loss(denoiser, images, noise, sigma) -> torch.Tensor:
    """EDM's loss on noise drawn on the CPU (denoising_loss would draw it on the device, with other numbers)."""
    weight = losses.get("edm").weight(sigma)
    D = denoiser(images + noise * sigma[:, None, None, None], sigma)
    return (weight[:, None, None, None] * (D - images) ** 2).sum((1, 2, 3)).mean()


def loss_and_grads(denoiser, device, memory_format=torch.contiguous_format, autocast: bool = False):
    denoiser = denoiser.to(device)
    denoiser.zero_grad(set_to_none=True)
    images, noise, sigma = (t.to(device) for t in inputs())
    images = images.contiguous(memory_format=memory_format)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        loss = edm_loss(denoiser, images, noise, sigma)
    loss.backward()
    return loss.detach().cpu(), [p.grad.cpu() for p in denoiser.parameters()]


def test_the_device_computes_the_cpu_loss_and_gradients():
    loss_cpu, grads_cpu = loss_and_grads(perturbed_denoiser(attn_resolutions=[4]), "cpu")
    loss_dev, grads_dev = loss_and_grads(perturbed_denoiser(attn_resolutions=[4]), DEVICE)
    # cuDNN may pick other float32 algorithms (FFT, Winograd): rounding of ~1e-5, not more
    assert abs(float(loss_dev) - float(loss_cpu)) <= 1e-4 * float(loss_cpu)
    assert_close_grads(grads_cpu, grads_dev, rtol=1e-3)


@pytest.mark.parametrize("switch", ["sdpa", "channels_last", "tf32"])
def test_each_float32_switch_keeps_the_loss_and_gradients(switch):
    loss_ref, grads_ref = loss_and_grads(perturbed_denoiser(attn_resolutions=[8, 4]), DEVICE)
    fast = perturbed_denoiser(attn_resolutions=[8, 4])
    memory_format, rtol = torch.contiguous_format, 1e-4
    if switch == "sdpa":
        layers.set_attention("sdpa")
    elif switch == "channels_last":
        fast, memory_format = fast.to(memory_format=torch.channels_last), torch.channels_last
    else:  # TF32 rounds matmul and convolution inputs to 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        rtol = 1e-2
    loss_fast, grads_fast = loss_and_grads(fast, DEVICE, memory_format)
    assert abs(float(loss_fast) - float(loss_ref)) <= rtol * float(loss_ref)
    assert_close_grads(grads_ref, grads_fast, rtol=rtol if switch == "tf32" else 1e-3)


def test_bf16_autocast_on_the_device_is_the_fp32_loss_to_bf16_precision():
    loss_fp32, _ = loss_and_grads(perturbed_denoiser(attn_resolutions=[4]), DEVICE)
    loss_bf16, grads = loss_and_grads(perturbed_denoiser(attn_resolutions=[4]), DEVICE, autocast=True)
    assert abs(float(loss_bf16) - float(loss_fp32)) < 2e-2 * float(loss_fp32)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fused_adam_on_the_device_takes_foreachs_steps():
    g = torch.Generator().manual_seed(5)
    initial = [torch.randn(s, generator=g) for s in [(32, 16, 3, 3), (64,), (10, 32)]]
    grads = [[torch.randn(p.shape, generator=g) * 10.0 ** -(i + j) for j, p in enumerate(initial)] for i in range(4)]
    runs = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone().to(DEVICE)) for p in initial]
        opt = torch.optim.Adam(params, lr=1e-2, fused=fused, foreach=None if fused else True)
        for step in grads:
            for p, grad in zip(params, step, strict=True):
                p.grad = grad.to(DEVICE)
            opt.step()
        runs.append([p.detach().cpu() for p in params])
    for a, b, p0 in zip(*runs, initial, strict=True):
        assert (a - b).abs().max() <= 1e-4 * (a - p0).abs().max()


@pytest.mark.skipif(DEVICE != "cuda" and not os.environ.get("EDMLAB_TEST_COMPILE"),
                    reason="a CPU compile costs 20-90 s (EDMLAB_TEST_COMPILE=1 runs it)")
def test_compiled_network_gives_the_eager_loss_and_gradients():
    eager, compiled = perturbed_denoiser(attn_resolutions=[4]), perturbed_denoiser(attn_resolutions=[4])
    compiled.net.compile()
    loss_eager, grads_eager = loss_and_grads(eager, DEVICE)
    loss_compiled, grads_compiled = loss_and_grads(compiled, DEVICE)
    assert abs(float(loss_compiled) - float(loss_eager)) <= 1e-5 * float(loss_eager)
    assert_close_grads(grads_eager, grads_compiled, rtol=1e-3)


@pytest.mark.parametrize("solver,steps", [("heun", 6), ("dpmpp_2m", 8), ("unipc", 8)])
def test_sampling_on_the_device_ends_where_the_cpu_ends(solver, steps):
    denoiser = perturbed_denoiser(attn_resolutions=[4]).eval()
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        on_cpu = sample(denoiser, latents, solver=solver, num_steps=steps)
        on_device = sample(copy.deepcopy(denoiser).to(DEVICE), latents.to(DEVICE), solver=solver, num_steps=steps)
    assert on_device.device.type == torch.device(DEVICE).type
    assert (on_device.cpu() - on_cpu).abs().max() <= 1e-4 * on_cpu.abs().max()


def test_sample_py_fast_path_on_the_device_ends_near_fp32():
    """precision=bf16 + channels_last + SDPA, as sample.py applies them: the fp32 samples to bf16 rounding."""
    denoiser = perturbed_denoiser(attn_resolutions=[4]).eval().to(DEVICE)
    latents = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    heun = functools.partial(sample, num_steps=6)
    with torch.no_grad():
        reference = heun(denoiser, latents)
        layers.set_attention("sdpa")
        fast = with_precision(heun, DEVICE, "bf16")(denoiser.to(memory_format=torch.channels_last), latents)
    assert fast.dtype == reference.dtype == torch.float32
    assert 0 < (fast - reference).abs().max() <= 3e-2 * reference.abs().max()


def test_train_py_with_gpu_fast_trains_and_saves(tmp_path):
    """The recommended GPU switches end to end: 8 steps of the digits demo, a checkpoint pair, finite weights."""
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=digits_edm", "trainer=gpu_fast",
           f"trainer.accelerator={accelerator}", "trainer.max_steps=8", "data.batch_size=32", "logger=csv",
           f"hydra.run.dir={tmp_path}", "final_losses=null", "callbacks.sample_grid.at_train_end=false",
           "extras.print_config=false"]
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))  # keeps carried wheels
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": path}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "checkpoints" / "last_ema.pt").is_file()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
