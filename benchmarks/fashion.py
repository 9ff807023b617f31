"""Fashion-MNIST, measured as users measure: train `experiment=fashion_edm`, then FID with the real Inception
weights against the test set's statistics for Heun and DPM-Solver++(2M) at 5-35 NFE, the train-vs-test FID
floor at the same sample count, the class accuracy of a CNN trained on the real training set (on samples
vs on the real test set), and training / sampling images per second.

    python benchmarks/fashion.py                       # CPU budget: --budget-min 40, sample count chosen
    python benchmarks/fashion.py --full                # EDM's protocol: 10,000 samples, all test images
    python benchmarks/fashion.py --run-dir DIR         # evaluate an existing run folder only
    python benchmarks/fashion.py --run-dir DIR --full --resume --heun-steps 3 5   # add rows to a report

Every measured row (and the floor) is saved to OUT/fashion.json as soon as it exists, so a killed run keeps
them; `--resume` reuses that file's floor and rows (same run folder and N) and measures only what is missing.

The sample count N (without --num / --full) is chosen after measuring Inception and sampling throughput,
so that the whole benchmark fits in --budget-min. FID is biased upwards at small N (by roughly D/N for
D = 2048 features): numbers are comparable across solvers and with the floor at the same N only.
Writes benchmarks/results/fashion.md, fashion.png (samples) and fashion_fid.png (FID vs NFE).
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from fashion_eval import classify, fid_of, make_sampler, sample_uint8, test_stats, train_classifier  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
HEUN_STEPS = (3, 6, 18)           # NFE 2n - 1: 5, 11, 35
DPM_STEPS = (5, 12, 35)           # NFE n
# --few-step: 10-NFE methods (11 levels, the analytic first step saves one call), steps from the model's own pilots
FEW_STEP = {
    "ipndm + AFS / gits": dict(solver="ipndm", num_steps=11, discretization="optimized", fit=False),
    "unipc-3 + AFS / fitted": dict(solver="unipc", order=3, num_steps=11, discretization="optimized"),
}


def nfe(solver: str, steps: int) -> int:
    return 2 * steps - 1 if solver == "heun" else steps


def train(run_dir: Path, kimg: float, batch: int, extra: list[str]) -> float:
    """`train.py experiment=fashion_edm` into run_dir (FID callback off: this script measures FID itself)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=fashion_edm", f"hydra.run.dir={run_dir}",
           f"duration_kimg={kimg}", f"data.batch_size={batch}", "~callbacks.fid", "logger=csv",
           "callbacks.progress.print_every_seconds=60", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def train_rate(run_dir: Path) -> tuple[float | None, float | None]:
    """(images/s of the fit, its seconds) from the progress callback's final line."""
    text = "".join(p.read_text() for p in sorted(run_dir.glob("*.log")))  # <task_name>.log
    found = re.findall(r"trained ([\d.]+) kimg in ([\d.]+) s", text)
    if not found:
        return None, None
    kimg, seconds = map(float, found[-1])
    return kimg * 1000 / seconds, seconds


def choose_num(budget_s: float, inception_ips: float, eval_ips: float, runs: list[tuple[str, int]],
               fixed_s: float) -> int:
    """The largest N whose Inception (runs + train-set floor) and sampling time fit in what is left."""
    per_n = (len(runs) + 1) / inception_ips + sum(nfe(s, n) for s, n in runs) / eval_ips
    per_n += 1 / inception_ips  # the test-set reference at the same N
    return int(np.clip((budget_s - fixed_s) / per_n, 50, 10_000))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, default=None, help="evaluate this run folder (no training)")
    p.add_argument("--kimg", type=float, default=6.0, help="training images (thousands); default 6 (CPU)")
    p.add_argument("--batch", type=int, default=32, help="training batch (default 32: more steps on CPU)")
    p.add_argument("--budget-min", type=float, default=40.0, help="total minutes for the automatic N")
    p.add_argument("--num", type=int, default=None, help="samples per FID (default: fit the budget)")
    p.add_argument("--full", action="store_true", help="EDM protocol: 10,000 samples vs all 10,000 test images")
    p.add_argument("--classifier-images", type=int, default=10_000, help="real training images for the CNN")
    p.add_argument("--heun-steps", type=int, nargs="+", default=list(HEUN_STEPS), help="Heun steps (NFE 2n-1)")
    p.add_argument("--dpm-steps", type=int, nargs="+", default=list(DPM_STEPS), help="DPM-Solver++(2M) steps")
    p.add_argument("--few-step", nargs="*", default=None, metavar="SOLVER",
                   help=f"also the 10-NFE methods {', '.join(FEW_STEP)} (all, or those of the solvers named)")
    p.add_argument("--ref-stats", type=Path, default=None,
                   help="the test set's Inception statistics: read when the file exists, else computed and saved")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true",
                   help="reuse OUT/fashion.json's floor and rows (same run folder and N); measure the rest")
    p.add_argument("train_overrides", nargs="*", help="extra train.py overrides, e.g. trainer=gpu")
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)

    from edmlab.data import IdxDataset
    from edmlab.metrics import InceptionV3FID

    detector = InceptionV3FID(download_ok=False)  # the real weights (`make inception`); never a random net
    run_dir, train_wall = args.run_dir, None
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="fashion_edm_"))
        train_wall = train(run_dir, args.kimg, args.batch, args.train_overrides)
    train_ips, train_s = train_rate(run_dir)
    denoiser, sampler_cfg = make_sampler(run_dir)
    device = next(denoiser.parameters()).device

    test = IdxDataset("fashion_mnist", split="test")
    real_train = IdxDataset("fashion_mnist", split="train")
    runs = [("heun", n) for n in args.heun_steps] + [("dpmpp_2m", n) for n in args.dpm_steps]
    few = {} if args.few_step is None else few_step_overrides(
        real_train, Path(tempfile.mkdtemp(prefix="fashion_steps_")), args.few_step)

    # throughputs first: they set N
    probe = torch.from_numpy(test.images[:16])
    with torch.no_grad():
        detector(probe[:2])
        t = time.perf_counter()
        detector(probe)
        inception_ips = 16 / (time.perf_counter() - t)
        x, s = torch.randn(64, *denoiser_shape(denoiser), device=device), torch.ones(64, device=device)
        denoiser(x, s, class_labels=torch.eye(10, device=device)[torch.arange(64, device=device) % 10])
        t = time.perf_counter()
        denoiser(x, s, class_labels=torch.eye(10, device=device)[torch.arange(64, device=device) % 10])
        eval_ips = 64 / (time.perf_counter() - t)
    if args.full:
        num = 10_000  # EDM's protocol here: 10k samples vs all 10k test images
    elif args.num is not None:
        num = args.num
    else:
        elapsed = time.perf_counter() - start
        num = choose_num(args.budget_min * 60, inception_ips, eval_ips, runs, fixed_s=elapsed + 240)
    print(f"Inception {inception_ips:.2f} img/s, denoiser {eval_ips:.0f} img/s per evaluation -> N = {num}",
          flush=True)

    ref = test_stats(test, detector, None if args.full else num, device, cache=args.ref_stats)
    progress = Progress(args.out / "fashion.json", str(run_dir.resolve()), num, args.resume)
    if progress.floor is None:
        progress.floor = fid_of(torch.from_numpy(real_train.images), detector, ref, num, device, subset_seed=1)
        progress.save()
    floor = progress.floor
    print(f"floor: FID(train {num} vs test) = {floor:.2f}", flush=True)
    cnn = train_classifier(real_train, args.classifier_images, device)
    acc_real = classify(cnn, torch.from_numpy(test.images), torch.from_numpy(test.raw_labels), device)
    print(f"classifier on the real test set: {acc_real:.1%}", flush=True)

    grid_images = None
    for solver, steps in runs + [(label, 10) for label in few]:
        if progress.has(solver, nfe(solver, steps)):
            print(f"kept from {progress.path}: {solver} at {nfe(solver, steps)} NFE", flush=True)
            continue
        overrides = few.get(solver, dict(solver=solver, num_steps=steps))
        sampler = make_sampler(run_dir, **overrides)[1]
        t = time.perf_counter()
        images, labels = sample_uint8(denoiser, sampler, num, device)
        sample_s = time.perf_counter() - t
        fid = fid_of(images, detector, ref, None, device)
        acc = classify(cnn, images, labels, device)
        progress.add(dict(solver=solver, steps=overrides["num_steps"], nfe=nfe(solver, steps), fid=fid,
                          accuracy=acc, sample_ips=num / sample_s))
        if solver == "heun" and steps == max(args.heun_steps):
            grid_images, grid_labels = images, labels
    if grid_images is None:  # the grid's row was kept: its first seeds again (classes repeat within ~200)
        sampler = make_sampler(run_dir, solver="heun", num_steps=max(args.heun_steps))[1]
        grid_images, grid_labels = sample_uint8(denoiser, sampler, 300, device)
    rows = progress.rows

    from fashion_report import write_report

    meta = dict(num=num, full=args.full, floor=floor, acc_real=acc_real, inception_ips=inception_ips,
                eval_ips=eval_ips, train_ips=train_ips, train_s=train_s, train_wall=train_wall,
                total_s=time.perf_counter() - start, classifier_images=args.classifier_images,
                machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
                        f"({device.type})", run_dir=str(run_dir), sampler=sampler_cfg)
    print(f"report: {write_report(rows, meta, grid_images, grid_labels, run_dir, args.out)}")


class Progress:
    """The floor and the measured rows of one (run folder, N), saved atomically after each change."""

    def __init__(self, path: Path, run_dir: str, num: int, resume: bool) -> None:
        self.path, self.run_dir, self.num = path, run_dir, num
        self.floor, self.rows = None, []
        if resume and path.is_file():
            kept = json.loads(path.read_text())
            if (kept["run_dir"], kept["num"]) != (run_dir, num):
                raise SystemExit(f"--resume: {path} holds run {kept['run_dir']} at N = {kept['num']}, not "
                                 f"{run_dir} at N = {num}; pass another --out or drop --resume")
            self.floor, self.rows = kept["floor"], kept["rows"]

    def has(self, solver: str, nfe: int) -> bool:
        return any(r["solver"] == solver and r["nfe"] == nfe for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows = sorted([*self.rows, row], key=lambda r: (r["solver"] not in ("heun", "dpmpp_2m"),
                                                            r["solver"] != "heun", r["nfe"]))
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        from edmlab.fileio import atomic_write

        with atomic_write(self.path, "w") as f:
            json.dump(dict(run_dir=self.run_dir, num=self.num, floor=self.floor, rows=self.rows), f, indent=1)


def few_step_overrides(real_train, cache_dir: Path, solvers: list[str]) -> dict[str, dict]:
    """FEW_STEP's sampler settings (those of `solvers`, all when empty): the analytic first step from the
    training images' mean, cached fitted steps."""
    mean = (torch.from_numpy(real_train.images).double() / 127.5 - 1).mean(0)
    common = dict(analytic_first_step=True, data_mean=mean.tolist(), pilots=32, search_seed=7)
    return {label: {**common, **opts, "steps_cache": str(cache_dir / f"steps{i}.json")}
            for i, (label, opts) in enumerate(FEW_STEP.items()) if not solvers or opts["solver"] in solvers}


def denoiser_shape(denoiser) -> tuple[int, ...]:
    from edmlab.generation import data_shape

    return data_shape(denoiser)


if __name__ == "__main__":
    main()
