"""Training: every experiment x process runs; EMA, LR, NaN-guard numbers; config/resume errors."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from torch.utils.data import DataLoader

from edmlab.checkpoints import EMA_PREFIX, IncompatibleCheckpoint, load_any
from edmlab.cli.train import CONFIG_DIR, build_model, train
from edmlab.training.ema import (
    EMA,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    reconstruct_posthoc,
    sigma_rel_to_gamma,
)
from edmlab.training.module import LearningRate

EXPERIMENTS = ("digits_edm", "toy2d", "cifar_edm", "cifar_vp", "cifar_ve", "cifar_fm")
PROCESSES = ("edm", "vp", "ve", "fm")
TINY_NET = {  # per network family: the smallest network that still has every block type
    "unet": ["network.model_channels=8", "network.channel_mult=[1,1]", "network.num_blocks=1",
             "network.attn_resolutions=[]"],
    "mlp": ["network.hidden_channels=16", "network.num_blocks=1"],
}
FAST = ["logger=csv", "extras.print_config=false", "callbacks.sample_grid.every_kimg=null",
        "callbacks.progress.print_every_seconds=1000", "callbacks.sample_grid.per_class=1",
        "callbacks.sample_grid.scale=1", "callbacks.sample_grid.num_unconditional=4",
        "trainer.enable_model_summary=false", "data.num_workers=0"]


def write_cifar_folder(root: Path, per_batch: int = 8) -> Path:
    """An extracted CIFAR-10 folder in the official format (pickled dicts with data/labels), tiny."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(y) for y in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return root


def compose_cfg(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        paths = [f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path}/logs",
                 f"paths.data_dir={tmp_path / 'data'}"]
        return compose("train", overrides=[*paths, *overrides])


def tiny(experiment: str, batch: int = 8) -> list[str]:
    net = TINY_NET["mlp" if experiment == "toy2d" else "unet"]
    extra = ["data.dataset.n=64"] if experiment == "toy2d" else []
    return [f"experiment={experiment}", *net, *extra, f"data.batch_size={batch}", "trainer=cpu", *FAST]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("cifar"))


# ---------------------------------------------------------------- every experiment under every process
@pytest.mark.parametrize("process", PROCESSES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_two_steps_under_every_process(experiment, process, tmp_path, cifar_root):
    overrides = [*tiny(experiment), f"process={process}", f"precond={process}", f"loss={process}",
                 "trainer.max_steps=2", "model.lr_rampup_kimg=0.016"]  # the ramp ends after 2 steps of 8
    if experiment.startswith("cifar"):
        overrides.append(f"paths.data_dir={cifar_root}")
    cfg = compose_cfg(tmp_path, overrides)
    result = train(cfg)
    run = tmp_path / "run"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta = ckpt["edmlab"]
    assert ckpt["global_step"] == 2
    assert meta["precond"]["name"] == process and meta["config"]["loss"]["name"] == process
    assert meta["config"]["sampler"]["process"]["name"] == process
    assert math.isfinite(result["train/loss"]) and math.isfinite(result["final/ema_loss"])
    # lr = lr_ref x min(images before the step / 16, 1): 0 on step 1, lr_ref / 2 on step 2 (EDM's ramp)
    lr_ref = cfg.optim.lr
    assert ckpt["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(lr_ref * 1.0)  # for the 3rd step
    assert result["train/lr"] == pytest.approx(lr_ref * 0.5)
    # the EMA after step 2: half-life min(h, 0.05 x 8 images) -> beta = 0.5^(8 / 0.4) = 0.5^20
    net = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.")}
    beta = 0.5**20
    for key, value in net.items():
        ema = ckpt["state_dict"][EMA_PREFIX + key[len("denoiser."):]]
        if value.is_floating_point():
            assert torch.allclose(ema, value, atol=beta * 10 + 1e-7), key
    cifar_like = experiment.startswith("cifar")
    assert meta["network"]["augment_dim"] == (9 if cifar_like else 0)  # EDM's 9 augment labels on CIFAR
    assert meta["data_shape"] == ([3, 32, 32] if cifar_like else [2] if experiment == "toy2d" else [1, 8, 8])
    assert Path(result["samples"]).is_file()
    # the exported EMA denoiser and the one rebuilt from last.ckpt agree
    from edmlab.checkpoints import load_denoiser

    exported = load_denoiser(run / "checkpoints" / "last_ema.pt")
    rebuilt = load_any(run / "checkpoints" / "last.ckpt").denoiser
    x = torch.randn(3, *meta["data_shape"])
    labels = torch.eye(rebuilt.label_dim)[:3] if rebuilt.label_dim else None
    assert torch.equal(exported(x, 1.0, class_labels=labels), rebuilt(x, 1.0, class_labels=labels))


def test_mixed_groups_accumulation_bf16_and_posthoc_ema(tmp_path):
    """Groups are independent: a VP-time sampler on an FM-preconditioned net trained with the VE loss; plus
    gradient accumulation, bf16 autocast and EDM2 power-function EMA snapshots."""
    cfg = compose_cfg(tmp_path, [*tiny("digits_edm"), "process=vp", "precond=fm", "loss=ve",
                                 "sampler=dpmpp_2m", "trainer.max_steps=2",
                                 "trainer.accumulate_grad_batches=2", "trainer.precision=bf16-mixed",
                                 "model.phema_sigma_rels=[0.05,0.10]",
                                 "callbacks.checkpoint.snapshot_every_kimg=0.008"])
    result = train(cfg)
    checkpoints = tmp_path / "run" / "checkpoints"
    ckpt = torch.load(checkpoints / "last.ckpt", weights_only=True)
    meta = ckpt["edmlab"]
    assert (meta["precond"]["name"], meta["config"]["loss"]["name"]) == ("fm", "ve")
    assert meta["config"]["sampler"]["solver"] == "dpmpp_2m" and Path(result["samples"]).is_file()
    # 2 optimizer steps of the global batch 8, each as 2 micro-batches of 4
    assert ckpt["global_step"] == 2 and ckpt["ImageDataModule"]["images"] == 16
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 4
    snapshots = sorted(p.name for p in checkpoints.glob("network-snapshot-*.pt"))
    assert snapshots == ["network-snapshot-step0000001.pt", "network-snapshot-step0000002.pt"]
    snap = torch.load(checkpoints / "phema-step0000002.pt", weights_only=True)
    assert snap["nimg"] == 16 and snap["sigma_rels"] == [0.05, 0.10]
    stored = zip(snap["sigma_rels"], snap["state_dicts"], strict=True)
    rebuilt = reconstruct_posthoc([{"nimg": 16, "sigma_rel": r, "state_dict": sd} for r, sd in stored], 0.05)
    for key, value in snap["state_dicts"][0].items():  # a stored profile is reconstructed as itself
        assert torch.allclose(rebuilt[key].float(), value.float(), atol=1e-5), key


def test_iddpm_precond_network_predicts_a_variance_too(tmp_path):
    cfg = compose_cfg(tmp_path, [*tiny("digits_edm"), "precond=iddpm", "loss=vp", "trainer.max_steps=2"])
    train(cfg)
    meta = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["edmlab"]
    assert meta["network"]["out_channels"] == 2 and meta["precond"]["name"] == "iddpm"  # 2 x img_channels


# ---------------------------------------------------------------- numbers
def test_cifar_edm_recipe_is_edms(tmp_path):
    cfg = compose_cfg(tmp_path, ["experiment=cifar_edm"])
    assert cfg.data.batch_size == 512 and cfg.duration_kimg == 200_000
    assert cfg.trainer.max_steps == 390_625  # 200 Mimg / 512, EDM's CIFAR-10 recipe
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.eps) == (1e-3, [0.9, 0.999], 1e-8)
    model = cfg.model
    assert (model.lr_rampup_kimg, model.ema_halflife_kimg, model.ema_rampup_ratio) == (10000, 500, 0.05)
    assert cfg.network.name == "ddpmpp" and cfg.network.dropout == 0.13 and cfg.model.augment_pipe.p == 0.12
    assert (cfg.precond.name, cfg.loss.name, cfg.data.use_labels) == ("edm", "edm", True)
    for p in ("vp", "ve", "fm"):
        other = compose_cfg(tmp_path, [f"experiment=cifar_{p}"])
        assert (other.process.name, other.precond.name, other.loss.name) == (p, p, p)
        assert other.network == cfg.network and other.optim == cfg.optim and other.model == cfg.model


def test_default_config_is_the_digits_experiment(tmp_path):
    """`python train.py` with no arguments trains exactly experiment=digits_edm (but for the task name)."""
    from omegaconf import OmegaConf

    default = OmegaConf.to_container(compose_cfg(tmp_path, []), resolve=True)
    digits = OmegaConf.to_container(compose_cfg(tmp_path, ["experiment=digits_edm"]), resolve=True)
    assert (default.pop("task_name"), digits.pop("task_name")) == ("train", "digits_edm")
    for cfg in (default, digits):
        cfg["logger"]["wandb"].pop("name")  # <task_name>-<run folder>
    assert default == digits
    assert default["trainer"]["max_steps"] == 1000 and default["data"]["batch_size"] == 128


def test_learning_rate_ramp_in_images():
    lr = LearningRate(batch_size=512, rampup_kimg=10000)
    assert lr(0) == 0.0  # EDM: the first step runs with lr = 0
    assert lr(19531) == pytest.approx(19531 * 512 / 1e7) and lr(19532) == 1.0  # 19,531 ramp steps on CIFAR
    decay = LearningRate(batch_size=2048, rampup_kimg=0, decay_kimg=70000 * 2048 / 1000)
    assert decay(70000) == 1.0 and decay(4 * 70000) == pytest.approx(0.5)  # EDM2 eq. 16: 1/sqrt(t / t_ref)


def test_edm_ema_half_life_and_ramp():
    net = torch.nn.Linear(3, 3)
    ema = EMA(net, halflife_kimg=500, rampup_ratio=0.05)
    assert ema.beta(0, 512) == 0.0  # the first update copies the network
    assert ema.beta(20_000_000, 512) == pytest.approx(0.99929, abs=5e-6)  # 0.5^(512 / 500k), EDM's half-life
    assert ema.halflife_nimg(1_000_000) == 50_000  # ramp: 0.05 x images seen
    with torch.no_grad():
        before = [p.clone() for p in ema.module.parameters()]
        net.weight.add_(1.0)
    beta = ema.update(net, nimg=1_000_000, batch_size=512)
    assert beta == pytest.approx(0.5 ** (512 / 50_000))
    for p_ema, p0, p_net in zip(ema.module.parameters(), before, net.parameters(), strict=True):
        assert torch.allclose(p_ema, beta * p0 + (1 - beta) * p_net, atol=1e-6)


def test_power_function_ema_profiles():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 Sec. 3.1: gamma 16.97 <-> 0.05
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)  # and 6.94 <-> 0.10
    assert gamma_to_sigma_rel(sigma_rel_to_gamma(0.07)) == pytest.approx(0.07)
    # a scalar "weight" theta_t = sin(t / 50): track gammas directly and reconstruct another one post hoc
    steps, batch = 2000, 1
    rels, target = [0.05, 0.10], 0.08
    param = torch.nn.Parameter(torch.zeros(()))
    holder = torch.nn.Module()
    holder.p = param
    tracked = PowerFunctionEMA(holder, rels + [target])
    snapshots = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            param.fill_(math.sin(t / 50) + t / 1000)
        tracked.update(holder, nimg_after=t * batch, batch_size=batch)
        if t % 250 == 0:
            snapshots += [{"nimg": t, "sigma_rel": r, "state_dict": {"p": e.p.detach().clone()}}
                          for r, e in zip(rels, tracked.emas[:2], strict=True)]
    rebuilt = reconstruct_posthoc(snapshots, target)["p"]
    truth = tracked.emas[2].p.detach()
    assert abs(float(rebuilt - truth)) < 0.02 * abs(float(truth))
    # a target equal to one stored profile is reproduced by that snapshot alone
    x = posthoc_coefficients([1000, 1000], [0.05, 0.10], 1000, 0.10)
    assert x == pytest.approx([0, 1], abs=1e-6)


def test_loss_is_per_image_sum_averaged_over_batch(tmp_path):
    from edmlab import loss as losses

    cfg = compose_cfg(tmp_path, [*tiny("digits_edm", batch=6)])
    datamodule, model = build_model(cfg)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    labels = torch.eye(10)[:6]
    torch.manual_seed(7)
    sigma = model.recipe.sample_sigma(6)
    expected = losses.denoising_loss(model.denoiser, images, model.recipe, class_labels=labels, sigma=sigma)
    expected = expected.mean()
    torch.manual_seed(7)
    model.log = lambda *a, **k: None  # no trainer attached
    got = model.training_step((images, labels), 0)
    assert torch.allclose(got, expected)


def test_reference_loss_uses_edms_weighting_with_fixed_draws():
    """The yardstick of sweeps: EDM's sigma law and lambda whatever the run's loss, same draws every call."""
    from edmlab.training.module import reference_loss

    class Identity(torch.nn.Module):  # D(x; sigma) = x: the loss is lambda(sigma) sigma^2 ||n||^2
        sigma_data = 0.5

        def forward(self, x, sigma, class_labels=None):
            return x

    images = torch.rand(10, 1, 4, 4) * 2 - 1
    got = reference_loss(Identity(), images, seed=3, repeats=2, chunk=4)
    assert got == reference_loss(Identity(), images, seed=3, repeats=2, chunk=4)
    g, expected = torch.Generator().manual_seed(3), []
    for _ in range(2):
        for lo in range(0, 10, 4):
            n = len(images[lo:lo + 4])
            sigma = (torch.randn(n, generator=g) * 1.2 - 1.2).exp()  # ln sigma ~ N(-1.2, 1.2^2)
            noise = torch.randn(n, 1, 4, 4, generator=g)
            lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
            expected.append(lam * sigma**2 * noise.square().flatten(1).sum(1))
    assert got == pytest.approx(float(torch.cat(expected).double().mean()), rel=1e-5)


def test_nonfinite_gradients_skip_the_step(tmp_path):
    """A batch with a NaN: its step leaves the weights untouched, is counted, and training goes on."""
    import lightning as L

    cfg = compose_cfg(tmp_path, [*tiny("digits_edm", batch=4), "model.lr_rampup_kimg=0"])
    _, model = build_model(cfg)
    good = (torch.rand(4, 1, 8, 8) * 2 - 1, torch.eye(10)[:4])
    bad = (good[0].clone(), good[1])
    bad[0][0, 0, 0, 0] = float("nan")
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in pl_module.denoiser.parameters()])

    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Snap()], accelerator="cpu")
    with pytest.warns(RuntimeWarning, match="non-finite gradients"):
        trainer.fit(model, train_dataloaders=DataLoader([good, bad, good], batch_size=None))
    assert model.skipped_steps == 1 and model.nonfinite_losses == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1], strict=True))  # step 2 skipped
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True))
    assert all(torch.isfinite(p).all() for p in model.denoiser.parameters())


# ---------------------------------------------------------------- bad input
def test_unknown_option_lists_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException, match=r"(?s)Could not find 'process/nope'.*edm.*fm.*ve.*vp"):
        compose_cfg(tmp_path, ["process=nope"])
    with pytest.raises(MissingConfigException, match=r"(?s)experiment/cifar.*cifar_edm.*digits_edm.*toy2d"):
        compose_cfg(tmp_path, ["experiment=cifar"])


def test_checkpoint_from_different_network_refuses_to_resume(tmp_path):
    first = compose_cfg(tmp_path / "a", [*tiny("digits_edm"), "trainer.max_steps=1", "callbacks.sample_grid=null"])
    train(first)
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    other = compose_cfg(tmp_path / "b", [*tiny("digits_edm"), "trainer.max_steps=2", "callbacks.sample_grid=null",
                                         "network.model_channels=16", f"ckpt_path={ckpt}"])
    with pytest.raises(IncompatibleCheckpoint) as err:
        train(other)
    text = str(err.value)
    assert "network.model_channels: checkpoint 8 vs this run 16" in text
    assert "tensor denoiser.net." in text and "(8," in text and "(16," in text
    missing = compose_cfg(tmp_path / "c", [*tiny("digits_edm"), f"ckpt_path={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nothing: no such file or folder"):
        train(missing)
