"""Guidance and likelihood on a trained conditional run: class accuracy and pixel Frechet distance vs the
guidance weight (classifier-free, with and without a guidance interval, and autoguidance), and bits/dim on
the images the run did not train on, with its standard error.

    python benchmarks/guidance.py                                  # train the digits demo (held-out split), evaluate
    python benchmarks/guidance.py --run-dir DIR [--guide CKPT]     # any conditional run folder (e.g. Fashion-MNIST)
    python benchmarks/guidance.py --run-dir DIR --fid-ref REF.npz  # and FID (real Inception) against REF

The classifier (an SVC on flattened pixels) and the Frechet distance use the run's own data config, so a
Fashion-MNIST run folder works as it is. Budget: ~10 min on 2 CPU cores for the digits defaults.
Writes benchmarks/results/guidance.md (or --out).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_demo import gaussian_fd, train_demo  # noqa: E402

from edmlab.guidance import GuidedDenoiser, guided  # noqa: E402
from edmlab.likelihood import image_bits_per_dim  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAIN_SUBSET = 1437  # 80% of the 1,797 digits; the other 360 are the held-out test split
DEMO_NOTE = (f"the digits demo, `python train.py data.max_size={TRAIN_SUBSET} callbacks.checkpoint."
             "snapshot_every_kimg=16` (80% of the digits; label dropout 0.1, the default), EMA weights, 18-step "
             "Heun (35 sampler evaluations).")


def load_run(run_dir: Path):
    """(EMA denoiser, sampler, data module) of a run folder, from its exported checkpoint and stored config."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import edmlab.cli  # noqa: F401 - the resolvers a stored config may name
    from edmlab.checkpoints import load_denoiser

    ckpt = run_dir / "checkpoints" / "last_ema.pt"
    config = torch.load(ckpt, weights_only=True)["config"]
    return load_denoiser(ckpt), instantiate(OmegaConf.create(config["sampler"])), instantiate(config["data"])


def default_guide(run_dir: Path) -> Path | None:
    """Autoguidance's guide: the earliest EMA snapshot of the same run (a less-trained model, Karras et al. 2024)."""
    snapshots = sorted((run_dir / "checkpoints").glob("network-snapshot-*.pt"))
    return snapshots[0] if snapshots else None


def dataset_arrays(datamodule, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, C, H, W] and class indices [N] of the base dataset."""
    base = datamodule.base_dataset
    indices = range(len(base)) if indices is None else indices
    items = [base[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]).numpy(), torch.stack([y for _, y in items]).argmax(1).numpy()


@torch.no_grad()
def draw(denoiser, sampler, label_dim: int, per_class: int, batch: int = 250) -> tuple[torch.Tensor, int]:
    """per_class samples of every class (sample i from seed i, as sample.py draws it) [N, C, H, W] in [-1, 1],
    and the network forwards."""
    from edmlab.generation import iterate_batches

    classes = np.repeat(np.arange(label_dim), per_class).tolist()
    out = [b.images for b in iterate_batches(denoiser, range(len(classes)), sampler, batch_size=batch,
                                             class_labels=classes, device="cpu")]
    nfe = denoiser.nfe if isinstance(denoiser, GuidedDenoiser) else None
    return torch.cat(out).clamp(-1, 1), nfe


def guidance_table(run_dir: Path, guide_path: Path | None, weights, interval, per_class: int,
                   fid_ref: Path | None = None) -> dict:
    from sklearn.svm import SVC

    from edmlab.checkpoints import load_denoiser
    from edmlab.generation import to_uint8
    from edmlab.metrics import InceptionV3FID, calc, load_stats

    denoiser, sampler, datamodule = load_run(run_dir)
    images, labels = dataset_arrays(datamodule)
    real = images.reshape(len(images), -1) / 127.5 - 1
    fit = np.random.default_rng(0).permutation(len(real))[:5000]
    svc = SVC().fit(real[fit], labels[fit])
    guide = load_denoiser(guide_path) if guide_path is not None else None
    settings = [("none", 1.0, None, None)]
    settings += [("classifier-free", w, None, None) for w in weights if w != 1]
    settings += [("classifier-free + interval", w, interval, None) for w in weights if w != 1]
    if guide is not None:
        settings += [("autoguidance", w, None, guide) for w in weights if w != 1]
    n = per_class * denoiser.label_dim
    subset = np.random.default_rng(1).permutation(len(real))[:n]
    floor = gaussian_fd(real[subset], real)
    fid = None
    if fid_ref is not None:  # the real Inception weights against the given statistics
        detector, ref = InceptionV3FID(download_ok=False), load_stats(fid_ref)
        fid = lambda x: calc(x, ref, num=None, detector=detector, batch_size=50, device="cpu",  # noqa: E731
                             progress=False)[0].fid
    fid_floor = fid(torch.from_numpy(images[subset])) if fid else None
    rows = []
    for kind, w, iv, g in settings:
        start = time.perf_counter()
        model = guided(denoiser, w, guide=g, interval=iv)
        images_w, nfe = draw(model, sampler, denoiser.label_dim, per_class)
        samples = images_w.reshape(n, -1).double().numpy()
        classes = np.repeat(np.arange(denoiser.label_dim), per_class)
        seconds = time.perf_counter() - start  # sampling only: the Inception's time is not the sampler's
        rows.append({"kind": kind, "w": w, "interval": iv, "accuracy": float((svc.predict(samples) == classes).mean()),
                     "fd": gaussian_fd(samples, real), "fid": fid(to_uint8(images_w)) if fid else None,
                     "seconds": seconds, "forwards_per_batch": None if nfe is None else nfe / math.ceil(n / 250)})
        print(rows[-1], flush=True)
    return {"rows": rows, "n": n, "fd_floor": floor, "real_accuracy": float((svc.predict(real) == labels).mean()),
            "guide": str(guide_path) if guide_path else None, "fid_floor": fid_floor,
            "fid_ref": str(fid_ref) if fid_ref else None}


def heldout_data(run_dir: Path, max_images: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(uint8 images, classes, what they are) the run did not train on: its dataset's test split when it has one,
    else the images outside its data.max_size subset; None when neither exists."""
    from hydra.utils import instantiate

    config = torch.load(run_dir / "checkpoints" / "last_ema.pt", weights_only=True)["config"]["data"]
    if (config.get("dataset") or {}).get("split") == "train":
        datamodule = instantiate({**config, "dataset": {**config["dataset"], "split": "test"}, "max_size": None})
        images, labels = dataset_arrays(datamodule, range(min(max_images, len(datamodule.base_dataset))))
        return images, labels, f"the first {len(images)} images of the test split"
    _, _, datamodule = load_run(run_dir)
    kept = getattr(datamodule.dataset, "indices", None)
    if kept is None:
        return None
    held = np.setdiff1d(np.arange(len(datamodule.base_dataset)), kept)[:max_images]
    images, labels = dataset_arrays(datamodule, held)
    return images, labels, f"{len(held)} images outside the run's data.max_size subset (not trained on)"


def heldout_bpd(run_dir: Path, max_images: int, num_steps: int) -> dict | None:
    """Bits/dim (Hutchinson, per-seed noise and probes) on images the run did not train on."""
    held = heldout_data(run_dir, max_images)
    if held is None:
        return None
    images, labels, what = held
    denoiser, _, _ = load_run(run_dir)
    out = {}
    one_hot = torch.eye(denoiser.label_dim)[torch.as_tensor(labels)]
    for name, y in (("conditional", one_hot), ("unconditional", torch.zeros_like(one_hot))):
        start = time.perf_counter()
        bpd = image_bits_per_dim(denoiser, torch.as_tensor(images), y, num_steps=num_steps,
                                 divergence="hutchinson", batch_size=100)["bits_per_dim"].numpy()
        out[name] = {"bpd": float(bpd.mean()), "se": float(bpd.std(ddof=1) / math.sqrt(len(bpd))),
                     "seconds": time.perf_counter() - start}
        print(name, out[name], flush=True)
    out.update(n=len(images), what=what, num_steps=num_steps)
    return out


def write_report(table: dict, bpd: dict | None, note: str, interval, wall: float, out: Path,
                 name: str = "guidance", guide_note: str | None = None) -> Path:
    guide = (f"`{Path(table['guide']).name}` ({guide_note or 'an early EMA snapshot of the same run'})."
             if table["guide"] else
             "none (the run kept no EMA snapshots: `callbacks.checkpoint.snapshot_every_kimg`).")
    fid = table.get("fid_ref") is not None
    lines = ["# Guidance and likelihood", "", f"Run: {note}",
             f"Machine: {platform.machine()}, torch {torch.__version__} (CPU, {torch.get_num_threads()} thread(s)); "
             "whole benchmark "
             f"{wall:.0f} s.", "",
             f"## Class accuracy and pixel Frechet distance ({table['n']} samples, seed i for sample i)", "",
             "Accuracy: an SVC fit on the real images (it scores "
             f"{table['real_accuracy']:.1%} on them) labels the sample as its requested class. FD: Frechet "
             "distance of Gaussian fits in pixel space ([-1, 1]) to all real images; "
             f"{table['n']} random real images score **{table['fd_floor']:.3f}** (the floor at this sample size). "
             f"Interval: w applies for sigma in ({interval[0]}, {interval[1]}], 1 elsewhere. Autoguidance's guide: "
             f"{guide}"]
    if fid:
        lines += ["", f"FID: the real Inception weights, the {table['n']} samples against the statistics in "
                  f"`{Path(table['fid_ref']).name}`; {table['n']} random real training images score "
                  f"**{table['fid_floor']:.2f}** against them (the floor at this sample size: FID is biased "
                  "upwards at small N, so compare rows with each other and with the floor)."]
    lines += ["", "| guidance | w | class accuracy | pixel FD |" + (" FID |" if fid else "")
              + " network forwards / batch | seconds |", "|---|---|---|---|---|---|" + ("---|" if fid else "")]
    for r in table["rows"]:
        fwd = "35" if r["forwards_per_batch"] is None else f"{r['forwards_per_batch']:.0f}"
        lines.append(f"| {r['kind']} | {r['w']:g} | {r['accuracy']:.1%} | {r['fd']:.3f} | "
                     + (f"**{r['fid']:.2f}** | " if fid else "") + f"{fwd} | {r['seconds']:.0f} |")
    lines += ["", "Forwards: classifier-free guidance runs the conditional and unconditional rows as one forward "
              "of a doubled batch (counted once); autoguidance runs two networks.", ""]
    if bpd is not None:
        lines += [f"## Bits/dim on held-out images ({bpd['what']})", "",
                  f"Uniform dequantization (per-image seed), PF-ODE log-likelihood at sigma_min = 0.002 with "
                  f"Hutchinson's trace (one Rademacher probe per image), {bpd['num_steps']} RK4 steps in ln sigma "
                  "(on the digits demo 32 and 64 steps differ by < 0.001 bits/dim).", "",
                  "| model | bits/dim | standard error | seconds |", "|---|---|---|---|"]
        for branch in ("conditional", "unconditional"):
            b = bpd[branch]
            what = "log p(x \\| class)" if branch == "conditional" else "log p(x) (the label-dropout branch)"
            lines.append(f"| {what} | **{b['bpd']:.3f}** | {b['se']:.3f} | {b['seconds']:.0f} |")
        lines += [""]
    lines += ["Reproduce: `OMP_NUM_THREADS=1 python benchmarks/guidance.py` (trains the run first, then "
              "evaluates); `--run-dir DIR --guide CKPT` evaluates any conditional run folder (e.g. Fashion-MNIST).",
              ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="evaluate this run folder, no training")
    parser.add_argument("--guide", type=Path, default=None, help="autoguidance guide (default: earliest snapshot)")
    parser.add_argument("--guide-note", default=None, help="what the guide is, for the report")
    parser.add_argument("--fid-ref", type=Path, default=None,
                        help="Inception statistics (.npz) of real images: adds an FID column (real weights)")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--interval", type=float, nargs=2, default=[0.28, 5.42])
    parser.add_argument("--bpd-images", type=int, default=120)
    parser.add_argument("--bpd-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="guidance", help="report file name: <out>/<name>.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the published digits numbers)")
    parser.add_argument("--note", default=None,
                        help="what the run is, for the report ('demo': the digits demo command)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    run_dir = args.run_dir
    if run_dir is None:
        args.note = args.note or DEMO_NOTE
        run_dir = Path(tempfile.mkdtemp(prefix="guidance_digits_"))
        train_demo(run_dir, ["logger=csv", f"data.max_size={TRAIN_SUBSET}",
                             "callbacks.checkpoint.snapshot_every_kimg=16"])
    guide = args.guide or default_guide(run_dir)
    table = guidance_table(run_dir, guide, args.weights, args.interval, args.per_class, args.fid_ref)
    bpd = heldout_bpd(run_dir, args.bpd_images, args.bpd_steps)
    note = DEMO_NOTE if args.note == "demo" else args.note or f"`{run_dir}`, EMA weights, its own sampler config."
    path = write_report(table, bpd, note, args.interval, time.perf_counter() - start, args.out, args.name,
                        args.guide_note)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
