"""Few-step solvers on a trained network: the digits demo's EMA denoiser, whose ODE has no closed form.

End-point error of every solver x step schedule at 5-35 NFE against an adaptive Dormand-Prince solve of the
same network's probability-flow ODE (tight tolerance, float64), as a ratio to EDM's Heun at 35 NFE; then
sample quality at 10 NFE beside Heun-35 on 1,000 class-conditional samples: the Frechet distance of Gaussian
fits in pixel space against the real digits (FID has no Inception features at 8x8) and the class accuracy
of an SVC trained on real digits.

    python benchmarks/trained_solvers.py                  # trains the demo (`python train.py`), then measures
    python benchmarks/trained_solvers.py --run-dir DIR    # an existing run folder of the digits demo

Writes benchmarks/results/trained_solvers.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_demo import gaussian_fd, real_digits, train_demo  # noqa: E402
from few_step import FIT_NFES, FITTED, GRIDS, METHODS, NFES, PILOT_SEED, SIGMA_MAX, SIGMA_MIN  # noqa: E402

from edmlab.sampling import sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_TOL = 1e-7        # adaptive reference; its own error is checked against a solve at 10x the tolerance
QUALITY_NFE = 10
TABLE_GRIDS = ("edm", "logsnr", "ays (svd)")  # every method; the model-fitted steps (gits, fitted) for FITTED only
QUALITY_METHODS = (("dpmpp_2m", "edm"), ("dpmpp_3m", "edm"), ("unipc-3 bh2", "ays (svd)"),
                   ("unipc-3 + AFS", "fitted"), ("ipndm + AFS", "fitted"), ("ipndm + AFS", "gits"))


def latents_and_labels(n: int, label_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n unit-Gaussian 1x8x8 latents (float64) and one-hot labels cycling through the classes."""
    latents = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return latents, torch.eye(label_dim, dtype=torch.float64)[torch.arange(n) % label_dim]


def solve(denoiser, latents, labels, method, grid_options: dict, budget: int, mean, cache: Path, pilots: int):
    """(samples, NFE used) of one method at one NFE budget."""
    extra = {"pilots": pilots, "search_seed": PILOT_SEED, "steps_cache": str(cache)} \
        if grid_options.get("discretization") == "optimized" else {}
    return sample(denoiser, latents, solver=method.solver, num_steps=method.steps(budget), class_labels=labels,
                  analytic_first_step=method.afs, data_mean=mean, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                  return_nfe=True, **dict(method.options), **grid_options, **extra)


def grid_options(grid: str) -> dict:
    return {"discretization": "optimized"} if grid == "fitted" else dict(GRIDS[grid])


@torch.no_grad()
def error_table(denoiser, mean, n: int, pilots: int, nfes, cache: Path) -> dict:
    """RMS end-point error per coordinate against the adaptive reference, for every method x grid x NFE."""
    latents, labels = latents_and_labels(n, denoiser.label_dim, seed=100)
    common = dict(class_labels=labels, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, return_nfe=True)
    start = time.perf_counter()
    ref, ref_nfe = sample(denoiser, latents, solver="adaptive", rtol=REFERENCE_TOL, atol=REFERENCE_TOL, **common)
    ref_seconds = time.perf_counter() - start
    loose, _ = sample(denoiser, latents, solver="adaptive", rtol=10 * REFERENCE_TOL, atol=10 * REFERENCE_TOL,
                      **common)
    rms = lambda x: (x - ref).square().mean().sqrt().item()  # noqa: E731
    heun, heun_nfe = sample(denoiser, latents, solver="heun", num_steps=18, **common)
    rows = {}
    runs = [(m, grid, nfes) for grid in TABLE_GRIDS for m in METHODS]
    runs += [(m, grid, [b for b in nfes if b in FIT_NFES]) for grid in ("gits", "fitted") for m in FITTED]
    for m, grid, budgets in runs:
        cells = []
        for budget in nfes:
            if budget not in budgets:
                cells.append(None)
                continue
            x, used = solve(denoiser, latents, labels, m, grid_options(grid), budget, mean, cache, pilots)
            cells.append((rms(x), used))
        rows[(m.label, grid)] = cells
        print(f"{m.label} / {grid}: " + ", ".join("" if c is None else f"{c[0] / rms(heun):.2f}" for c in cells),
              flush=True)
    return {"n": n, "pilots": pilots, "nfes": list(nfes), "heun35": (rms(heun), heun_nfe), "rows": rows,
            "reference": {"nfe": ref_nfe, "seconds": ref_seconds, "vs_10x_tol": rms(loose),
                          "scale": ref.square().mean().sqrt().item()}}


@torch.no_grad()
def quality(denoiser, mean, per_class: int, cache: Path, pilots: int) -> list[dict]:
    """Pixel FD vs the real digits and SVC accuracy, Heun-35 and the QUALITY_METHODS at QUALITY_NFE."""
    from sklearn.svm import SVC

    x_real, y_real = real_digits()
    svc = SVC().fit(x_real, y_real)
    latents, labels = latents_and_labels(per_class * denoiser.label_dim, denoiser.label_dim, seed=200)
    classes = labels.argmax(1).numpy()
    methods = {m.label: m for m in (*METHODS, *FITTED)}
    runs = [("heun", "edm", 35), *[(label, grid, QUALITY_NFE) for label, grid in QUALITY_METHODS]]
    out = []
    for label, grid, budget in runs:
        start = time.perf_counter()
        x, used = solve(denoiser, latents, labels, methods[label], grid_options(grid), budget, mean, cache, pilots)
        pixels = x.clamp(-1, 1).reshape(len(x), -1).numpy()
        out.append({"method": label, "grid": grid, "nfe": used, "seconds": time.perf_counter() - start,
                    "fd": gaussian_fd(pixels, x_real), "accuracy": float((svc.predict(pixels) == classes).mean())})
        print(out[-1], flush=True)
    return out


def markdown(errors: dict, rows: list[dict], setup: dict) -> str:
    nfes, (h_rms, h_nfe) = errors["nfes"], errors["heun35"]
    ref = errors["reference"]
    lines = ["# Few-step solvers on a trained network (digits demo)", "",
             f"Network: the EMA denoiser of `python train.py` ({setup['run']}), run in {setup['dtype']} (solver "
             f"states in float64, as `sample()` keeps them). Measured in {setup['seconds']:.0f} s on "
             f"{setup['machine']}.", "",
             "## End-point error against an adaptive reference solve", "",
             f"{errors['n']} latents (class i mod 10), sigma {SIGMA_MAX:g} -> {SIGMA_MIN:g} -> 0. Reference: "
             f"adaptive Dormand-Prince 5(4) at rtol = atol = {REFERENCE_TOL:g} ({ref['nfe']} NFE, "
             f"{ref['seconds']:.0f} s); it differs from the same solve at 10x the tolerance by {ref['vs_10x_tol']:.1e} "
             f"RMS (end points have RMS {ref['scale']:.2f}). Cells: RMS error per coordinate divided by Heun-35's "
             f"({h_rms:.3e}, {h_nfe} NFE). Methods and step schedules as in solvers.md; the schedules fitted to the "
             f"model (gits: dynamic programming on {errors['pilots']} pilot trajectories from another seed; fitted: "
             "gits refined on the solver's own end-point error) for the two few-step methods at 6-10 NFE. AFS: the "
             "first network call replaced by the data mean. Heun's budget N is 2*ceil(N/2) - 1 NFE (NFE 6 uses 5).", "",
             "| solver | grid | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---:|" * len(nfes)]
    best = (math.inf, "")
    for (label, grid), cells in errors["rows"].items():
        text = []
        for cell in cells:
            if cell is None:
                text.append("")
                continue
            ratio = cell[0] / h_rms
            if cell[1] <= 10 and ratio < best[0]:
                best = (ratio, f"{label} / {grid} at {cell[1]} NFE")
            text.append(f"{ratio:.2f}")
        lines.append(f"| {label} | {grid} | " + " | ".join(text) + " |")
    lines += ["", f"Best at <= 10 NFE: **{best[1]}, {best[0]:.2f}x Heun-35's end-point error** "
              f"({'goal met' if best[0] <= 1 else 'goal not met'}: <= 1x).", "",
              f"## Sample quality at {QUALITY_NFE} NFE beside Heun-35", "",
              f"{setup['quality_n']} samples ({setup['quality_n'] // 10} per class, latents from another seed). "
              "FD: Frechet distance of Gaussian fits in pixel space ([-1, 1]) against all 1,797 real digits "
              f"(two halves of the real digits are {setup['fd_floor']:.3f} apart). Accuracy: an SVC trained on "
              "the real digits labels the sample as the class it was asked for.", "",
              "| solver | grid | NFE | pixel FD | FD / Heun-35's | SVC accuracy | seconds |",
              "|---|---|---:|---:|---:|---:|---:|"]
    base = rows[0]["fd"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['grid']} | {r['nfe']} | {r['fd']:.4f} | {r['fd'] / base:.3f} | "
                     f"{r['accuracy']:.1%} | {r['seconds']:.1f} |")
    within = [r for r in rows[1:] if r["fd"] / base <= 1.15]
    lines += ["", f"Within 1.15x Heun-35's FD at {QUALITY_NFE} NFE: " +
              (", ".join(f"{r['method']} / {r['grid']} ({r['fd'] / base:.3f}x)" for r in within) or "none") + ".",
              "", "Reproduce: `python benchmarks/trained_solvers.py` (or `--run-dir` for an existing demo run)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a digits demo run folder (default: train one)")
    parser.add_argument("--n", type=int, default=100, help="latents for the end-point errors")
    parser.add_argument("--pilots", type=int, default=16, help="pilot trajectories of the fitted grids")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class for FD and accuracy")
    parser.add_argument("--float64", action="store_true", help="run the network in float64 (about 2x slower)")
    parser.add_argument("--fast", action="store_true", help="few latents and NFEs (seconds, for the test suite)")
    parser.add_argument("--out", type=Path, default=RESULTS / "trained_solvers.md")
    args = parser.parse_args(argv)
    import platform

    from edmlab.checkpoints import load_denoiser

    start = time.perf_counter()
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="digits_demo_"))
        train_demo(run_dir)
    denoiser = load_denoiser(run_dir / "checkpoints" / "last_ema.pt")
    if args.float64:
        denoiser = denoiser.double()
    x_real, _ = real_digits()
    mean = torch.as_tensor(x_real.mean(0)).reshape(1, 8, 8)
    nfes = (5, 10, 35) if args.fast else NFES
    with tempfile.TemporaryDirectory() as tmp:
        errors = error_table(denoiser, mean, 20 if args.fast else args.n, 8 if args.fast else args.pilots, nfes,
                             Path(tmp) / "steps.json")
        rows = quality(denoiser, mean, 5 if args.fast else args.per_class, Path(tmp) / "steps.json",
                       8 if args.fast else args.pilots)
    rng = np.random.default_rng(0).permutation(len(x_real))
    setup = {"run": "trained by this script" if args.run_dir is None else f"run folder `{run_dir.name}`",
             "dtype": "float64" if args.float64 else "float32",
             "seconds": time.perf_counter() - start,
             "quality_n": (5 if args.fast else args.per_class) * denoiser.label_dim,
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             "fd_floor": gaussian_fd(x_real[rng[: len(rng) // 2]], x_real[rng[len(rng) // 2:]])}
    text = markdown(errors, rows, setup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
