"""Solver benchmark: end-point error of every deterministic solver and time grid against an exact ODE solve, vs NFE.

The data laws have ideal denoisers in closed form (`edmlab.analytic`), so the
probability-flow ODE has a reference answer (`ode_reference`, DOP853 at
rtol 1e-10) and the error is pure truncation error of the sampler (EDM Sec. 3,
Fig. 2 measures the same against FID). Two laws: a 16-D Gaussian mixture
(smooth, the asymptotic order shows) and the empirical law of scikit-learn's
8x8 digits scaled to [-1, 1] (a finite point set: what a model that memorised
its training set integrates). Every run starts at sigma_max = 80 and stops at
sigma_min = 0.002 (iDDPM's grid: its table's nearest entries), followed by the
final step to sigma = 0, which is D itself.

    python benchmarks/solvers.py            # full: benchmarks/results/solvers.{md,png}, few-step section first
    python benchmarks/solvers.py --fast     # seconds: benchmarks/results/solvers_fast.{md,png}

The full run starts with benchmarks/few_step.py: every solver x grid at 5-35 NFE as a
ratio to EDM's Heun-35, measured orders and the solver overhead (about 8 minutes here).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edmlab import analytic
from edmlab.fileio import atomic_write
from edmlab.sampling import DISCRETIZATIONS, sample, sigma_steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import few_step  # noqa: E402
from few_step import digits, gaussian_mixture  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    """One sampler: solver, time grid, and the process whose t the solver steps in."""

    solver: str
    discretization: str
    process: str = "edm"

    @property
    def label(self) -> str:
        return f"{self.solver} / {self.discretization} grid / {self.process}"


def configs() -> list[Config]:
    """Every deterministic solver x every grid under EDM's process, plus Heun on EDM's grid under each process."""
    grid = [Config(s, d) for s in DETERMINISTIC for d in DISCRETIZATIONS]
    return grid + [Config("heun", "edm", p) for p in ("vp", "ve", "fm")]


def num_steps_for(solver: str, nfe: int) -> int:
    """Heun costs 2N - 1 evaluations for N steps (the last step is Euler); the others one per step."""
    return (nfe + 1) // 2 if solver == "heun" else nfe


def fitted_order(nfe: list[int], error: list[float], tail: int, floor: float = 1e-12) -> float:
    """-slope of log(error) against log(NFE), least squares over the `tail` largest NFEs (nan: error at the floor).

    Errors at the floor are dropped: on a finite set a sample that ends on the reference's point has error 0.
    """
    keep = [(n, e) for n, e in zip(nfe[-tail:], error[-tail:], strict=True) if e > floor]
    if len(keep) < 2:
        return math.nan
    x, y = np.log([n for n, _ in keep]), np.log([e for _, e in keep])
    return float(-np.polyfit(x, y, 1)[0])


def other_point(denoiser, x: torch.Tensor, reference: torch.Tensor) -> int:
    """How many samples end nearest to a different training point than the reference (finite sets only)."""
    if not isinstance(denoiser, analytic.FiniteSet):
        return -1
    nearest = lambda y: torch.cdist(y, denoiser.means).argmin(-1)  # noqa: E731
    return int((nearest(x) != nearest(reference)).sum())


def run_dataset(denoiser, latents: torch.Tensor, nfes: list[int], tail: int) -> dict[Config, dict]:
    """RMS error per coordinate at each NFE, and the fitted order, for every config."""
    references: dict[tuple[float, float], torch.Tensor] = {}
    out: dict[Config, dict] = {}
    for cfg in configs():
        errors, used, wrong = [], [], []
        for nfe in nfes:
            n = num_steps_for(cfg.solver, nfe)
            sigmas = sigma_steps(cfg.discretization, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, process=cfg.process)
            ends = (round(sigmas[0].item(), 12), round(sigmas[-2].item(), 12))
            if ends not in references:  # iDDPM's grid starts and ends on its table's entries
                references[ends] = analytic.ode_reference(denoiser, latents, sigma_max=ends[0], sigma_min=ends[1])
            x, used_nfe = sample(denoiser, latents, solver=cfg.solver, num_steps=n, discretization=cfg.discretization,
                                 process=cfg.process, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, return_nfe=True)
            errors.append((x - references[ends]).square().mean().sqrt().item())
            used.append(used_nfe)
            wrong.append(other_point(denoiser, x, references[ends]))
        out[cfg] = {"nfe": used, "error": errors, "order": fitted_order(used, errors, tail), "other_point": wrong}
    return out


def markdown(results: dict[str, dict[Config, dict]], meta: dict) -> str:
    lines = ["# Solver benchmark: end-point error vs NFE", "",
             f"Generated by `{meta['command']}` in {meta['seconds']:.0f} s (torch {torch.__version__}, CPU, float64).",
             "", "RMS error per coordinate of the sampler output against `edmlab.analytic.ode_reference` (DOP853, "
             "rtol 1e-10) from the same latents; every run integrates from sigma_max = 80 to sigma_min = 0.002 "
             "and then takes the final step to sigma = 0 (D itself). iDDPM's grid uses its table's entries nearest "
             "that range (71.3 to 0.0064), with its own reference. Order = -slope of log error vs log NFE over the "
             f"{meta['tail']} largest NFEs. Heun with N steps costs 2N - 1 evaluations; the others N.", "",
             "Under EDM's process (s = 1, sigma = t) Euler and DDIM are the same method: their rows agree. "
             "NFE stops at 513: iDDPM's table has only 991 entries in range, and `sigma_steps` refuses more steps.",
             ""]
    for name, rows in results.items():
        nfes = next(iter(rows.values()))["nfe"]
        lines += [f"## {meta['datasets'][name]}", "",
                  "| solver | grid | process | " + " | ".join(f"NFE {n}" for n in nfes) + " | order |",
                  "|---|---|---|" + "---:|" * (len(nfes) + 1)]
        for cfg, r in rows.items():
            assert r["nfe"] == nfes, f"{cfg.label}: NFE {r['nfe']} differ from {nfes}"
            cells = " | ".join(f"{e:.2e}" for e in r["error"])
            order = "-" if math.isnan(r["order"]) else f"{r['order']:.2f}"
            lines.append(f"| {cfg.solver} | {cfg.discretization} | {cfg.process} | {cells} | {order} |")
        lines.append("")
        if next(iter(rows.values()))["other_point"][0] >= 0:
            n = meta["samples"][name]
            lines += [f"The final denoiser step snaps every sample onto a training point, so a sample's error is 0 or "
                      f"the distance to another digit: samples (of {n}) ending on a different point than the "
                      "reference ('-' order: all on the reference's points at the largest NFEs):", "",
                      "| solver | grid | process | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                      "|---|---|---|" + "---:|" * len(nfes)]
            for cfg, r in rows.items():
                cells = " | ".join(str(k) for k in r["other_point"])
                lines.append(f"| {cfg.solver} | {cfg.discretization} | {cfg.process} | {cells} |")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[Config, dict]], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(DETERMINISTIC, ("tab:blue", "tab:red", "tab:green", "tab:purple"), strict=True))
    styles = dict(zip(DISCRETIZATIONS, ("-", "--", ":", "-.", (0, (1, 3))), strict=True))
    markers = {"vp": "o", "ve": "s", "fm": "^"}
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], results.items(), strict=True):
        for cfg, r in rows.items():
            variant = cfg.process != "edm"
            points = [(n, e) for n, e in zip(r["nfe"], r["error"], strict=True) if e > 1e-12]  # log axes: no zeros
            if not points:
                continue
            ax.loglog(*zip(*points, strict=True), color="black" if variant else colors[cfg.solver],
                      linestyle="-" if variant else styles[cfg.discretization], marker=markers.get(cfg.process),
                      markersize=4, linewidth=1.2, label=cfg.label, alpha=0.85)
        ax.set_title(meta["datasets"][name])
        ax.set_xlabel("NFE (denoiser evaluations)")
        ax.set_ylabel("RMS end-point error per coordinate")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Deterministic samplers vs an exact PF-ODE solve (sigma 80 -> 0.002 -> 0)")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[Config, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="few samples and NFEs (test suite, seconds)")
    parser.add_argument("--outdir", type=Path, default=RESULTS, help="where solvers[_fast].{md,png} go")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tensors are tiny: threads only add synchronisation (20x slower with 2)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, dict[Config, dict]]:
    start = time.perf_counter()
    if args.fast:  # NFE = 2^k + 1 so that Heun's 2N - 1 lands on the same columns
        nfes, tail, n_mixture, n_digits = [9, 17, 33, 65, 129], 3, 16, 8
    else:
        nfes, tail, n_mixture, n_digits = [5, 9, 17, 33, 65, 129, 257, 513], 3, 128, 64
    data = {"mixture": (gaussian_mixture(), n_mixture), "digits": (digits(), n_digits)}
    meta = {"datasets": {"mixture": f"16-D Gaussian mixture, 8 components ({n_mixture} samples)",
                         "digits": f"Finite set: sklearn 8x8 digits, 1,797 points in 64-D ({n_digits} samples)"},
            "samples": {"mixture": n_mixture, "digits": n_digits}, "tail": tail,
            "command": "python benchmarks/solvers.py" + (" --fast" if args.fast else "")}
    results = {}
    for i, (name, (denoiser, n)) in enumerate(data.items()):
        latents = torch.randn(n, denoiser.dim, generator=torch.Generator().manual_seed(1 + i), dtype=torch.float64)
        results[name] = run_dataset(denoiser, latents, nfes, tail)
    meta["seconds"] = time.perf_counter() - start
    few = ""
    if not args.fast:
        few = few_step.markdown(few_step.run()) + "\n## Convergence: end-point error vs NFE\n\n"
    args.outdir.mkdir(parents=True, exist_ok=True)
    stem = "solvers_fast" if args.fast else "solvers"
    text = markdown(results, meta)
    if few:
        head, _, rest = text.partition("\n\n")
        text = head + "\n\n" + few + rest
    with atomic_write(args.outdir / f"{stem}.md", "w") as f:
        f.write(text)
    plot(results, meta, args.outdir / f"{stem}.png")
    heun = results["mixture"][Config("heun", "edm")]["order"]
    print(f"wrote {args.outdir / stem}.md/.png in {meta['seconds']:.1f} s; Heun/EDM order on the mixture: {heun:.2f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
