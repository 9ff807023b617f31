"""configs/: train.yaml composes with every experiment and every option of every group, resolves, and builds its
cheap parts (precond, loss, sampler); the shared constants are written once and one key moves every user."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import edmlab.cli  # noqa: F401 - the edmlab.* resolvers
from edmlab.cli.train import PRECOND_OUT_CHANNELS, build_model, denoiser_factory
from edmlab.cli.validate import check_sampling
from edmlab.networks import build
from edmlab.process import VP

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = ("process", "precond", "loss", "sampler", "network", "data", "encoder", "optim", "trainer", "logger",
          "callbacks")
# EDM's values (Karras et al. 2022, Table 1), each written once under configs/
SIGMA_DATA, BETA_D, BETA_MIN, EPSILON_T, VE_RANGE = 0.5, 19.9, 0.1, 1e-5, (0.02, 100.0)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def rounds() -> list[list[str]]:
    """Overrides that together pick every option of every group at least once (the first len(options) rounds
    of a group walk through them), its partners shifting each time a group wraps around."""
    n = max(len(options(g)) for g in GROUPS)
    picks = []
    for i in range(n):
        picks.append([f"{g}={options(g)[(i + k * (1 + i // len(options(g)))) % len(options(g))]}"
                      for k, g in enumerate(GROUPS)])
    return picks


@pytest.fixture(scope="module")
def compose_train(tmp_path_factory):
    """compose("train", overrides) (or config="sample") with the run folders under a temporary folder."""
    out = tmp_path_factory.mktemp("configs")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda *overrides, config="train": compose(config, overrides=[
            f"paths.output_dir={out}", f"paths.log_dir={out}/logs", *overrides])


def cheap_parts(cfg):
    """(denoiser around a tiny MLP, loss recipe, sampler, sampler's process) as train.py builds them."""
    make_denoiser, _ = denoiser_factory(cfg.precond)
    denoiser = make_denoiser(build("mlp", img_resolution=1, img_channels=2, hidden_channels=8, num_blocks=1))
    sampler = instantiate(cfg.sampler)
    return denoiser, instantiate(cfg.loss), sampler, sampler.keywords["process"]


def check_constants(resolved: dict) -> None:
    """Every user of a shared constant holds the value the constant's one key resolves to."""
    assert resolved["precond"]["sigma_data"] == resolved["sigma_data"]
    if "sigma_data" in resolved["loss"]:
        assert resolved["loss"]["sigma_data"] == resolved["precond"]["sigma_data"]
    for node, name in (("process", "name"), ("precond", "name"), ("loss", "name")):
        if resolved[node][name] == "vp":
            assert {k: resolved[node][k] for k in ("beta_d", "beta_min")} == \
                {k: resolved["vp"][k] for k in ("beta_d", "beta_min")}
        if resolved[node][name] == "ve":
            assert (resolved[node]["sigma_min"], resolved[node]["sigma_max"]) == \
                (resolved["ve"]["sigma_min"], resolved["ve"]["sigma_max"])


def test_every_option_of_every_group_composes_resolves_and_builds(compose_train):
    picked = set()
    for overrides in rounds():
        cfg = compose_train(*overrides)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        check_constants(resolved)
        assert resolved["sigma_data"] == SIGMA_DATA
        denoiser, recipe, sampler, process = cheap_parts(cfg)
        assert denoiser.sigma_data == SIGMA_DATA and process.name == cfg.process.name
        assert recipe.name == cfg.loss.name and getattr(recipe, "sigma_data", SIGMA_DATA) == SIGMA_DATA
        check_sampling(denoiser, [2], {"sampler": sampler})  # what train.py dry-runs before fit
        picked |= set(overrides)
    assert picked == {f"{g}={o}" for g in GROUPS for o in options(g)}


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_resolves(compose_train, experiment):
    cfg = compose_train(f"experiment={experiment}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task_name"] == experiment
    check_constants(resolved)
    denoiser, recipe, _, _ = cheap_parts(cfg)
    assert denoiser.sigma_data == SIGMA_DATA and getattr(recipe, "sigma_data", SIGMA_DATA) == SIGMA_DATA


def test_shared_constants_are_written_once():
    written: dict[str, list[str]] = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        for line in path.read_text().splitlines():
            match = re.match(r"\s*(sigma_data|beta_d|beta_min|epsilon_t):\s*([-+.\deE]+)\s*(#.*)?$", line)
            if match:
                written.setdefault(match.group(1), []).append(str(path.relative_to(CONFIGS)))
    assert written == {"sigma_data": ["train.yaml"], "beta_d": ["constants/vp.yaml"],
                       "beta_min": ["constants/vp.yaml"], "epsilon_t": ["constants/vp.yaml"]}
    vp, ve = OmegaConf.load(CONFIGS / "constants/vp.yaml").vp, OmegaConf.load(CONFIGS / "constants/ve.yaml").ve
    assert OmegaConf.load(CONFIGS / "train.yaml").sigma_data == SIGMA_DATA
    assert (vp.beta_d, vp.beta_min, vp.epsilon_t, ve.sigma_min, ve.sigma_max) == (BETA_D, BETA_MIN, EPSILON_T,
                                                                                   *VE_RANGE)


@pytest.mark.parametrize("overrides", [
    ["precond=vp", "loss=edm", "sigma_data=0.6"],            # the documented key
    ["precond=edm2", "loss=edm2", "precond.sigma_data=0.6"],  # the precond's own key: the loss follows it
    ["experiment=img512_edm2", "sigma_data=0.6"],             # latents with another std: one override
])
def test_one_sigma_data_key_moves_precond_and_loss(compose_train, overrides):
    denoiser, recipe, _, _ = cheap_parts(compose_train(*overrides))
    assert denoiser.sigma_data == 0.6 and denoiser.precond.sigma_data == 0.6 and recipe.sigma_data == 0.6


def test_vp_constants_move_process_precond_and_loss_together(compose_train):
    cfg = compose_train("process=vp", "precond=vp", "loss=vp", "vp.beta_d=10", "vp.beta_min=0.2", "vp.epsilon_t=1e-4")
    denoiser, recipe, _, process = cheap_parts(cfg)
    for schedule in (process, denoiser.precond.process, recipe.process):
        assert (schedule.beta_d, schedule.beta_min) == (10.0, 0.2)
    assert recipe.epsilon_t == 1e-4 and denoiser.sigma_min == pytest.approx(float(VP(10, 0.2).sigma(1e-4)))
    denoiser, recipe, _, process = cheap_parts(compose_train("process=vp", "precond=vp", "loss=vp"))
    assert (process.beta_d, denoiser.precond.process.beta_d, recipe.process.beta_d) == (BETA_D,) * 3
    assert recipe.epsilon_t == EPSILON_T and denoiser.precond.process.beta_min == BETA_MIN


def test_groups_mix_and_each_reads_the_constants_it_uses(compose_train):
    cfg = compose_train("process=edm", "precond=vp", "loss=vp", "vp.beta_d=10")
    denoiser, recipe, _, process = cheap_parts(cfg)
    assert process.name == "edm" and denoiser.precond.process.beta_d == recipe.process.beta_d == 10
    cfg = compose_train("process=vp", "precond=fm", "loss=ve", "vp.beta_d=10", "ve.sigma_max=80")
    denoiser, recipe, _, process = cheap_parts(cfg)
    assert process.beta_d == 10 and recipe.sigma_max == 80 and denoiser.precond.sigma_data == SIGMA_DATA


def test_ve_range_moves_process_precond_and_loss_together(compose_train):
    denoiser, recipe, _, process = cheap_parts(compose_train("process=ve", "precond=ve", "loss=ve",
                                                             "ve.sigma_min=0.01", "ve.sigma_max=80"))
    assert (denoiser.sigma_min, denoiser.sigma_max) == (recipe.sigma_min, recipe.sigma_max) == (0.01, 80.0)
    assert float(process.sigma(torch.tensor(process.t_max))) == pytest.approx(80.0)


def test_sample_config_composes_with_every_process(compose_train):
    for name in options("process"):
        cfg = compose_train("ckpt=x.pt", f"process={name}", config="sample")
        process = instantiate(cfg.sampler).keywords["process"]
        assert process.name == name and getattr(process, "beta_d", BETA_D) == BETA_D


def test_iddpm_precond_asks_its_network_for_twice_the_channels(compose_train):
    assert OmegaConf.load(CONFIGS / "precond/iddpm.yaml")[PRECOND_OUT_CHANNELS] == 2
    tiny = ["experiment=toy2d", "data.dataset.n=16", "network.hidden_channels=8", "network.num_blocks=1"]
    for precond, per_channel in (("iddpm", 2), ("edm", 1)):
        cfg = compose_train(*tiny, f"precond={precond}")
        _, model = build_model(cfg)  # 2-D points: 2 image channels
        assert denoiser_factory(cfg.precond)[1] == per_channel
        assert model.denoiser.net.build_config.get("out_channels", 2) == 2 * per_channel
        assert model.denoiser(torch.zeros(3, 2), 1.0).shape == (3, 2)  # the variance is not part of D


def readme_train_commands() -> list[list[str]]:
    """The overrides of every `python train.py ...` line in README.md (sweeps: the first value of each list)."""
    import shlex

    text = (CONFIGS.parent / "README.md").read_text()
    commands = []
    for line in re.findall(r"^python train\.py(.*)$", text, flags=re.M):
        words = shlex.split(line.split(" # ")[0].split("  #")[0])
        overrides = [w for w in words if w != "-m" and not w.startswith("hydra/launcher=")]
        commands.append([re.sub(r"=([^=\[,]+),.*$", r"=\1", w) for w in overrides])
    return commands


@pytest.mark.parametrize("overrides", readme_train_commands(), ids=" ".join)
def test_every_readme_train_command_composes(compose_train, overrides):
    """What a user copies from the README composes and resolves: no stale key, group or option."""
    cfg = compose_train(*overrides)
    OmegaConf.to_container(cfg, resolve=True)


def test_callbacks_none_with_an_experiment_builds_no_callbacks(compose_train, caplog):
    """An experiment's callback intervals outlive `callbacks=none`: ignored with a warning, not an error."""
    from edmlab.cli.train import _instantiate_all

    cfg = compose_train("experiment=digits_edm", "callbacks=none")
    assert set(cfg.callbacks) == {"checkpoint", "sample_grid"} and "_target_" not in cfg.callbacks.checkpoint
    with caplog.at_level("WARNING", logger="edmlab.train"):
        assert _instantiate_all(cfg.callbacks, "callbacks.") == {}
    assert "callbacks.checkpoint has settings but no _target_" in caplog.text
    with pytest.raises(ValueError, match="callbacks.bad: expected a config with _target_"):
        _instantiate_all({"bad": 3}, "callbacks.")
