"""The embedded demo, measured: `python train.py`, then 1000 class-conditional samples
judged by an SVC trained on real digits, and the Frechet distance of Gaussian fits in pixel space next to
the same distance between two halves of the real data.

    python benchmarks/digits_demo.py                 # train the default demo, evaluate, write the report
    python benchmarks/digits_demo.py --run-dir DIR   # evaluate an existing run folder only

Writes benchmarks/results/digits_demo.md and benchmarks/results/digits_demo.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as the data module feeds them: [N, 64] in [-1, 1] (uint8 / 127.5 - 1)."""
    from edmlab.data import DigitsDataset

    data = DigitsDataset()
    x = data.images.reshape(len(data), -1).astype(np.float64) / 127.5 - 1
    return x, data.raw_labels.copy()


def train_demo(run_dir: Path, extra: list[str] | None = None) -> float:
    """`python train.py` (the default demo) into run_dir; returns the wall-clock seconds of the command."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true"}
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *(extra or [])]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


@torch.no_grad()
def generate(run_dir: Path, per_class: int = 100, batch: int = 250) -> tuple[np.ndarray, np.ndarray, float]:
    """per_class samples of every class from the run's EMA denoiser with its own sampler config (seed i)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import edmlab.cli  # noqa: F401 - the resolvers the stored config may name
    from edmlab.checkpoints import load_denoiser

    ckpt = run_dir / "checkpoints" / "last_ema.pt"
    denoiser = load_denoiser(ckpt)
    config = torch.load(ckpt, weights_only=True)["config"]
    sampler = instantiate(OmegaConf.create(config["sampler"]))
    label_dim = denoiser.label_dim
    classes = np.repeat(np.arange(label_dim), per_class)
    out = []
    start = time.perf_counter()
    for lo in range(0, len(classes), batch):
        seeds = range(lo, min(lo + batch, len(classes)))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        latents = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
        labels = torch.eye(label_dim)[torch.as_tensor(classes[lo:lo + len(gens)])]
        out.append(sampler(denoiser, latents, class_labels=labels, generator=gens))
    seconds = time.perf_counter() - start
    samples = torch.cat(out).clamp(-1, 1).reshape(len(classes), -1).double().numpy()
    return samples, classes, seconds


def gaussian_fd(a: np.ndarray, b: np.ndarray) -> float:
    from edmlab.metrics.fid import frechet_distance

    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def evaluate(run_dir: Path, per_class: int = 100) -> dict:
    """SVC accuracy on the samples (and on held-out real digits), Frechet distances in pixel space."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, y = real_digits()
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    svc = SVC().fit(x_fit, y_fit)
    samples, classes, sample_seconds = generate(run_dir, per_class)
    rng = np.random.default_rng(0)
    half = rng.permutation(len(x))
    a, b = x[half[: len(x) // 2]], x[half[len(x) // 2:]]
    per_class_acc = [(svc.predict(samples[classes == k]) == k).mean() for k in range(10)]
    return {
        "num_samples": len(samples),
        "svc_accuracy_samples": float((svc.predict(samples) == classes).mean()),
        "svc_accuracy_per_class": [float(v) for v in per_class_acc],
        "svc_accuracy_real_heldout": float((svc.predict(x_held) == y_held).mean()),
        "fd_samples_vs_real": gaussian_fd(samples, x),
        "fd_real_half_vs_half": gaussian_fd(a, b),
        "fd_samples_vs_real_half": gaussian_fd(samples, a),
        "sample_seconds": sample_seconds,
    }


def _train_seconds(run_dir: Path) -> float | None:
    """Seconds of the fit itself, from the progress callback's final log line."""
    log = run_dir / "train.log"
    found = re.findall(r"trained [\d.]+ kimg in ([\d.]+) s", log.read_text()) if log.is_file() else []
    return float(found[-1]) if found else None


def _table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def write_report(metrics: dict, run_dir: Path, wall: float | None, out: Path = RESULTS) -> Path:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "samples.png", out / "digits_demo.png")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    meta, steps = ckpt["edmlab"], ckpt["global_step"]
    net, sampler = meta["network"], meta["config"]["sampler"]
    params = sum(v.numel() for k, v in ckpt["state_dict"].items()
                 if k.startswith("denoiser.net.") and v.is_floating_point())
    setup = [
        ("command", "`python train.py` (wandb offline)"),
        ("machine", f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} (CPU)"),
        ("wall time of the command", f"{wall:.0f} s" if wall else "n/a"),
        ("of which the fit (steps, checkpoints, grids)", f"{metrics['train_log_seconds']:.0f} s"
         if metrics.get("train_log_seconds") else "n/a"),
        ("network", f"{net['name']}, {net.get('model_channels')} channels x {net.get('channel_mult')}, "
                    f"{params / 1e6:.2f}M parameters, label_dim {net['label_dim']}"),
        ("recipe", f"EDM precond + loss, batch {meta['batch_size']}, {steps} steps "
                   f"({steps * meta['batch_size'] / 1000:.0f} kimg), EMA weights"),
        ("sampler", f"{sampler['solver']}, {sampler['num_steps']} steps ({2 * sampler['num_steps'] - 1} "
                    "network evaluations)"),
    ]
    per_class = ", ".join(f"{k}: {v:.0%}" for k, v in enumerate(metrics["svc_accuracy_per_class"]))
    quality = [
        ("SVC (fit on 70% of the real digits) labels a sample as the class it was asked for",
         f"**{metrics['svc_accuracy_samples']:.1%}**"),
        ("the same SVC on the held-out 30% of real digits", f"{metrics['svc_accuracy_real_heldout']:.1%}"),
        ("per requested class", per_class),
        ("Frechet distance of Gaussian fits (pixels in [-1, 1]): samples vs all real digits",
         f"**{metrics['fd_samples_vs_real']:.3f}**"),
        ("the same between two random halves of the real digits (898 vs 899)",
         f"{metrics['fd_real_half_vs_half']:.3f}"),
        ("samples vs one real half", f"{metrics['fd_samples_vs_real_half']:.3f}"),
        ("time to draw the 1,000 samples", f"{metrics['sample_seconds']:.1f} s"),
    ]
    text = "\n\n".join([
        "# Digits demo: `python train.py`",
        "The embedded default trains a class-conditional EDM denoiser on scikit-learn's 8x8 digits "
        "(1,797 real images, no download) on CPU, then writes `samples.png` (one row per class) in its run "
        "folder.",
        "![samples](digits_demo.png)",
        _table(setup),
        f"## Quality ({metrics['num_samples']:,} samples: {metrics['num_samples'] // 10} per class, "
        f"seed i for sample i)",
        _table(quality, ("measure", "value")),
        "Reproduce: `python benchmarks/digits_demo.py` (trains, evaluates, rewrites this file); "
        "`python benchmarks/digits_demo.py --run-dir <run folder>` evaluates an existing run.",
    ]) + "\n"
    path = out / "digits_demo.md"
    path.write_text(text)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="evaluate this run folder, no training")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--no-report", action="store_true", help="print the numbers only")
    args = parser.parse_args()
    wall = None
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="digits_demo_"))
        wall = train_demo(run_dir)
    metrics = evaluate(run_dir, args.per_class)
    metrics["train_log_seconds"] = _train_seconds(run_dir)
    for key, value in metrics.items():
        print(f"{key}: {value}")
    if not args.no_report:
        print(f"report: {write_report(metrics, run_dir, wall)}")


if __name__ == "__main__":
    main()
