"""Training and sampling throughput, edmlab against a plain PyTorch loop of the same math, side by side.

Training, three ways on one device in one process, step by step in lockstep over the same batches:
  (a) plain:   a loop written here in NVlabs/edm's shape: EDM loss, backward, Adam, parameter-loop EMA, fp32;
  (b) edmlab:  what `python train.py` builds with default settings (EDMModule + Lightning Trainer + callbacks);
  (c) fast:    (b) with trainer=gpu_fast's switches (bf16 autocast, TF32, channels_last, fused Adam, SDPA).
Sampling: images/s of edmlab.generation (what sample.py runs) at 35 NFE against 35 x one network forward at the
same batch; the sampler's overhead as the time generate() spends outside the network over the time inside it,
both clocked in the same call (so machine load cancels); and `python sample.py` end to end for the digits net.
On a GPU, CIFAR's DDPM++ samples on sample.py's fast path too (speed_report.FAST_SAMPLING, batch 256): the report
turns each CIFAR row into the time for 50,000 samples.

    python benchmarks/speed.py                  # this machine's CPU (or GPU), bounded to ~10 minutes on 2 cores
    python benchmarks/speed.py --device cuda    # the recipe's per-GPU batches

Writes benchmarks/results/speed.md (+ speed.json, the raw numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_report import ADM_CPU, FAST_SAMPLING, NFE, RESULTS, write_report  # noqa: E402
from speed_setup import (  # noqa: E402
    FAST_BATCH,
    MODELS,
    ROOT,
    SMALL,
    compose,
    datamodule_for,
    peak_mib,
    reset_peak,
    sync_clock,
)


# ------------------------------------------------------------------------------------ the three ways
def plain_steps(cfg, datamodule, model, device: torch.device):
    """(a) NVlabs/edm training_loop.py's step, written out: no framework, fp32, TF32 off, EDM's attention ops.
    A generator: one optimizer step per next(), so it can run in lockstep with a Lightning fit."""
    from edmlab.networks import layers

    denoiser, augment_pipe = model.denoiser.to(device).train(), model.augment_pipe
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    batch, sigma_data = model.batch_size, float(denoiser.sigma_data)
    P_mean, P_std = float(cfg.loss.get("P_mean", -1.2)), float(cfg.loss.get("P_std", 1.2))
    opt = torch.optim.Adam(denoiser.parameters(), lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas),
                           eps=float(cfg.optim.eps))
    batches = iter(datamodule.batches())
    backends = torch.backends
    for step in itertools.count():
        # the other way may have switched these process-wide flags: (a) runs with EDM's
        saved = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, layers._attention["backend"])
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
        layers.set_attention("einsum")
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if labels is not None and model.label_dim else None
        for group in opt.param_groups:  # linear LR ramp in images
            group["lr"] = float(cfg.optim.lr) * min(step * batch / 1000 / float(cfg.model.lr_rampup_kimg), 1)
        sigma = (torch.randn(len(images), device=device) * P_std + P_mean).exp()
        weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        noise = torch.randn_like(y) * sigma.reshape(-1, 1, 1, 1)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        D = denoiser(y + noise, sigma, labels, **extra)
        loss = (weight.reshape(-1, 1, 1, 1) * (D - y) ** 2).sum(dim=(1, 2, 3)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in denoiser.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        halflife = min(float(cfg.model.ema_halflife_kimg) * 1000, step * batch * float(cfg.model.ema_rampup_ratio))
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), denoiser.parameters(), strict=True):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved[:2]
        layers.set_attention(saved[2])
        yield


def lightning_fit(cfg, datamodule, model, extra_callbacks=()) -> None:
    """(b)/(c): the Trainer, callbacks and loggers `train.py` builds from the composed config."""
    from edmlab.cli.extras import apply_extras
    from edmlab.cli.train import _instantiate_all, _make_trainer

    apply_extras(cfg)
    with _quiet_lightning():
        # train.py's callbacks and loggers; its final losses are timed apart (end_of_run)
        callbacks = [*_instantiate_all(cfg.get("callbacks"), "callbacks.").values(), *extra_callbacks]
        trainer = _make_trainer(cfg, callbacks, list(_instantiate_all(cfg.get("logger"), "logger.").values()))
        trainer.fit(model, datamodule=datamodule)
    from edmlab.networks.layers import set_attention

    set_attention("einsum")


def lockstep(plain, device: torch.device, warmup: int, times: dict):
    """A callback: after each Lightning step, one plain step; both timed, so each pair shares the machine's load."""
    from lightning.pytorch.callbacks import Callback

    class Lockstep(Callback):
        def __init__(self) -> None:
            self.count, self.t_start = 0, None

        def on_train_batch_end(self, *args) -> None:
            now = sync_clock(device)
            if self.t_start is not None and self.count > warmup:
                times["lightning"].append(now - self.t_start)
            next(plain)
            done = sync_clock(device)
            if self.t_start is not None and self.count > warmup:
                times["plain"].append(done - now)
            self.t_start, self.count = done, self.count + 1

    return Lockstep()


@contextlib.contextmanager
def _quiet_lightning():
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "edmlab")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def bench_training(name: str, device: torch.device, steps: int, warmup: int, tmp: Path) -> dict:
    """Speed: (b) and (c) each in lockstep with their own (a); memory: each way alone for a few steps."""
    import gc

    from edmlab.cli.train import build_model

    overrides, shape, label_dim, cpu_batch, gpu_batch = MODELS[name]
    batch = gpu_batch if device.type == "cuda" else cpu_batch
    accel = "gpu" if device.type == "cuda" else "cpu"
    common = [*overrides, *(ADM_CPU if "ADM" in name and device.type == "cpu" else []), f"data.batch_size={batch}",
              "logger=csv", "extras.print_config=false", f"paths.output_dir={tmp}/{abs(hash(name))}",
              f"paths.log_dir={tmp}/logs", "trainer.enable_model_summary=false", "data.num_workers=0",
              # after the last step, outside every timed step: end_of_run times it (15 min for DDPM++ on CPU)
              "callbacks.sample_grid.at_train_end=false"]
    ways = {"edmlab": [*common, f"trainer={accel}"],
            "fast": [*common, "trainer=gpu_fast", f"trainer.accelerator={accel}"]}

    def build(way: str, max_steps: int):
        cfg = compose([*ways[way], f"trainer.max_steps={max_steps}"])
        torch.manual_seed(0)
        datamodule = datamodule_for(cfg, shape, label_dim, device)
        return cfg, datamodule, build_model(cfg, datamodule=datamodule)[1]

    out: dict = {"batch": batch}
    for way in ways:
        times = {"plain": [], "lightning": []}
        cfg, datamodule, model = build(way, warmup + 2 + steps)
        plain_cfg, plain_data, plain_model = build("edmlab", 1)
        out["params"] = sum(p.numel() for p in plain_model.denoiser.parameters())
        plain = plain_steps(plain_cfg, plain_data, plain_model, device)
        lightning_fit(cfg, datamodule, model, [lockstep(plain, device, warmup, times)])
        ratios = [b / a for a, b in zip(times["plain"], times["lightning"], strict=True)]
        out[way] = {"img_s": batch / statistics.median(times["lightning"]), "steps": len(ratios),
                    "vs_plain": statistics.median(ratios),
                    "plain_img_s": batch / statistics.median(times["plain"])}
        del model, plain_model, plain
        gc.collect()
    for way in ("plain", *ways):  # peak memory, each way alone
        cfg, datamodule, model = build("edmlab" if way == "plain" else way, 2)
        reset_peak(device)
        if way == "plain":
            plain = plain_steps(cfg, datamodule, model, device)
            next(plain), next(plain)
        else:
            lightning_fit(cfg, datamodule, model)
        out.setdefault(way, {})["peak_mib"] = peak_mib(device)
        del model, datamodule
        plain = None  # the plain loop's weights, EMA and Adam state must not count in the next way's peak
        gc.collect()
    out["plain"]["img_s"] = statistics.median([out["edmlab"]["plain_img_s"], out["fast"]["plain_img_s"]])
    return out


# ------------------------------------------------------------------------------------------- sampling
def bench_sampling(name: str, device: torch.device, rounds: int, tmp: Path, fast: bool = False,
                   batch: int | None = None) -> dict:
    """generate() at NFE against its own network time; fast: sample.py's GPU fast path (`FAST_SAMPLING`)."""
    from hydra.utils import instantiate

    from edmlab.cli.train import build_model
    from edmlab.generation import with_precision
    from edmlab.networks.layers import set_attention

    overrides, shape, label_dim, cpu_batch, gpu_batch = MODELS[name]
    batch = batch or (64 if shape == (1, 8, 8) else (gpu_batch if device.type == "cuda" else cpu_batch))
    cfg = compose([*overrides, *(ADM_CPU if "ADM" in name and device.type == "cpu" else []), "logger=csv",
                   "extras.print_config=false"])
    _, model = build_model(cfg, datamodule=datamodule_for(cfg, shape, label_dim, device))
    denoiser = model.ema.module.to(device).eval()
    sampler = with_precision(instantiate(cfg.sampler), device, "bf16" if fast else "fp32")
    if fast:
        set_attention("sdpa")
        denoiser.to(memory_format=torch.channels_last)
    try:
        return _time_sampling(denoiser, sampler, batch, shape, label_dim, device, rounds,
                              tmp / f"gen-{abs(hash(name))}-{fast:d}", fast)
    finally:
        set_attention("einsum")


def _time_sampling(denoiser, sampler, batch: int, shape, label_dim: int, device: torch.device, rounds: int,
                   tmp: Path, fast: bool) -> dict:
    from edmlab.generation import generate

    x = torch.randn(batch, *shape, device=device)
    labels = torch.eye(label_dim, device=device)[torch.arange(batch, device=device) % label_dim]
    gen, net, inside = [], [], []
    forward, clock = denoiser.forward, [0.0]

    def timed_forward(*args, **kwargs):  # clocks the network inside generate(): the rest is the sampler's
        t = sync_clock(device)
        out = forward(*args, **kwargs)
        clock[0] += sync_clock(device) - t
        return out

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast)  # the forwards as the sampler runs them
    with torch.no_grad():
        with autocast:
            denoiser(x, torch.full((batch,), 1.0, device=device), labels)
        for r in range(rounds):
            denoiser.forward, clock[0] = timed_forward, 0.0
            t0 = sync_clock(device)
            generate(denoiser, list(range(r * batch, (r + 1) * batch)), tmp / str(r), sampler,
                     batch_size=batch, class_labels="all", format="npz", device=device, progress=False)
            gen.append(sync_clock(device) - t0)
            inside.append(clock[0])
            denoiser.forward = forward
            t0 = sync_clock(device)
            with autocast:
                for _ in range(NFE):
                    denoiser(x, torch.full((batch,), 1.0, device=device), labels)
            net.append(sync_clock(device) - t0)
    g, n = statistics.median(gen), statistics.median(net)
    return {"batch": batch, "gen_img_s": batch / g, "net_img_s": batch / n, "overhead_vs_forwards": g / n - 1,
            "overhead": statistics.median(a / b - 1 for a, b in zip(gen, inside, strict=True))}


def sampling_rows(name: str, device: torch.device, tmp: Path) -> dict[str, dict]:
    """The sampling rows of one model; on a GPU, CIFAR's DDPM++ also on sample.py's fast path (the 50k goal)."""
    gpu = device.type == "cuda"
    rows = {name: bench_sampling(name, device, 3 if name.startswith(SMALL) or gpu else 1, tmp)}
    if gpu and name.startswith("cifar_edm"):
        rows[f"{name}, {FAST_SAMPLING}"] = bench_sampling(name, device, 3, tmp, fast=True, batch=FAST_BATCH)
    for row, result in rows.items():
        print(row, result, flush=True)
    return rows


def sample_py_end_to_end(tmp: Path, runs: int = 2) -> dict:
    """`python sample.py` for 64 digits images (a fresh process each) against its network time alone."""
    from edmlab import checkpoints
    from edmlab.cli.train import build_model

    cfg = compose(["experiment=digits_edm", "logger=csv", "extras.print_config=false"])
    _, model = build_model(cfg)
    ckpt = checkpoints.save_denoiser(model.ema.module, tmp / "digits.pt")
    walls = []
    for r in range(runs):
        cmd = [sys.executable, str(ROOT / "sample.py"), f"ckpt={ckpt}", "seeds=0-63", "device=cpu", "format=npz",
               "progress=false", f"outdir={tmp}/e2e{r}"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ,
                                                                               "PYTHONPATH": str(ROOT / "src")})
        walls.append(time.perf_counter() - t0)
    return {"wall_s": statistics.median(walls)}


def end_of_run(device: torch.device, overrides: tuple[str, ...] = ()) -> dict:
    """What train.py does after the last step for the digits demo: final losses and the preview grid."""
    from hydra.utils import instantiate

    from edmlab.cli.train import build_model
    from edmlab.training.final_losses import final_losses
    from edmlab.training.samples import draw_samples

    cfg = compose(["experiment=digits_edm", "logger=csv", "extras.print_config=false", *overrides])
    datamodule, model = build_model(cfg)
    datamodule.setup("fit")
    model.to(device)
    t0 = time.perf_counter()
    final_losses(model, datamodule, cfg.final_losses.num_images, cfg.final_losses.repeats)
    t1 = time.perf_counter()
    final_losses(model, datamodule, cfg.final_losses.num_images, repeats=1)
    t2 = time.perf_counter()
    spec = cfg.callbacks.sample_grid
    draw_samples(model, instantiate(cfg.sampler), per_class=spec.per_class, num_unconditional=spec.num_unconditional,
                 seed=spec.seed, scale=spec.scale)
    t3 = time.perf_counter()
    return {"losses_s": t1 - t0, "losses_1_s": t2 - t1, "grid_s": t3 - t2,
            "spec": f"{cfg.final_losses.num_images} images x {cfg.final_losses.repeats} repeats x 2 networks",
            "grid": f"{spec.per_class} per class x 10 classes"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sampling-only", action="store_true",
                        help="re-measure sampling; keep the other rows of benchmarks/results/speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    t0 = time.perf_counter()
    train, sample = {}, {}
    raw = RESULTS / "speed.json"
    if args.sampling_only:
        kept = json.loads(raw.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models:
                kept["sample"].update(sampling_rows(name, device, Path(tmp)))
        raw.write_text(json.dumps(kept, indent=1))
        print(write_report(device, kept["train"], kept["sample"], kept["e2e"], kept["end"],
                           kept["seconds"] + time.perf_counter() - t0))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            small = name.startswith(SMALL)
            # CPU big nets: 9 pairs, ~1 min each; GPU: ADM's 50 pairs fit in the GPU check's 10 minutes
            steps, warmup = ((100, 10) if small else (50, 5)) if gpu else ((40, 3) if small else (8, 1))
            train[name] = bench_training(name, device, steps, warmup, Path(tmp))
            print(name, {k: v for k, v in train[name].items()}, flush=True)
            sample.update(sampling_rows(name, device, Path(tmp)))
            write_report(device, train, sample, None, None, time.perf_counter() - t0)  # partial results so far
        e2e = sample_py_end_to_end(Path(tmp)) if "digits (unet_small, 0.98M)" in sample and not gpu else None
        if e2e is not None:  # the network time of the same run
            e2e["net_s"] = 64 / sample["digits (unet_small, 0.98M)"]["net_img_s"]
        end = end_of_run(device)
        print(end, flush=True)
    seconds = time.perf_counter() - t0
    raw.write_text(json.dumps({"train": train, "sample": sample, "e2e": e2e, "end": end, "seconds": seconds}, indent=1))
    print(write_report(device, train, sample, e2e, end, seconds))


if __name__ == "__main__":
    main()
