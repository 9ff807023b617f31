"""The report of benchmarks/speed.py: benchmarks/results/speed.md from the measured rows."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NFE = 35  # EDM's CIFAR-10 sampler: 18 Heun steps
FAST_SAMPLING = "precision=bf16 channels_last=true attention=sdpa"  # sample.py's GPU fast path
ADM_CPU = ["network.model_channels=32"]  # a narrow ADM on CPU (the full 296M one needs minutes per step here)


def write_report(device: torch.device, train: dict, sample: dict, e2e: dict | None, end: dict | None,
                 seconds: float) -> Path:
    lines = ["# Training and sampling speed", "",
             f"`python benchmarks/speed.py{' --device cuda' if device.type == 'cuda' else ''}` on {machine(device)}; "
             f"{seconds:.0f} s in all, torch {torch.__version__}; load average at the end "
             f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine: rows measured once, such as the "
             "big networks' sampling, carry its noise; the lockstep ratios do not).", ""]
    if device.type == "cpu":
        lines += ["**GPU rows: unmeasured.** No GPU was lent to this run; `python benchmarks/speed.py --device cuda` "
                  "(or `bash benchmarks/gpu_check.sh`, with the CUDA tests) measures them (the recipe's per-GPU "
                  "batches). Every GPU-only switch is covered by a CPU test of what it computes "
                  "(tests/test_fast_path.py; tests/test_cuda.py on a GPU). On CPU the batches are tiny, the ADM is "
                  f"narrowed ({ADM_CPU[0]}) and bf16 autocast is emulated, so (c) is no forecast of a GPU.", ""]
    lines += ["## Training (median step, in lockstep)", "",
              "(a) plain PyTorch loop in NVlabs/edm's shape (fp32, parameter-loop EMA); (b) edmlab as `train.py` "
              "runs it by default (EDMModule + Lightning + checkpoint/sample-grid/progress callbacks + CSV logger; the "
              "end-of-run grid, which follows the last step, is timed apart below); (c) (b) with `trainer=gpu_fast`'s "
              "switches.", "",
              "| model | params | batch | (a) plain img/s | (b) edmlab img/s | (c) fast img/s | (b)/(a) step time "
              "| (c) speed / (a) | peak MiB (a / b / c) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in train.items():
        a, b, c = r["plain"], r["edmlab"], r["fast"]
        peak = "process peak RSS" if device.type == "cpu" else "max allocated"  # RSS: with what earlier runs left
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['batch']} | {a['img_s']:.3g} | {b['img_s']:.3g} | "
                     f"{c['img_s']:.3g} | **{b['vs_plain']:.3f}** | {1 / c['vs_plain']:.2f}x | "
                     f"{a['peak_mib']:.0f} / {b['peak_mib']:.0f} / {c['peak_mib']:.0f} ({peak}) |")
    lines += ["", "Ratios are medians over step pairs: (b) and (c) each ran in lockstep with a plain loop of their "
              "own (one plain step after every Lightning step, in the same process), so both steps of a pair "
              "saw the same machine load; the img/s columns are medians over all steps of a way, so their ratios "
              "move with the load. Pairs measured per model (after warm-up): "
              f"{', '.join(str(r['edmlab']['steps']) for r in train.values())}. Peak memory: each way alone "
              "for 2 steps.", "",
              f"## Sampling ({NFE} NFE, Heun)", "",
              "Sampler overhead: the time generate() spends outside the network (solver steps, per-seed noise, "
              "uint8 conversion, the npz write; sample.py's PNGs are written in a background thread while the next "
              "batch samples) over the time inside it, both clocked in the same call, median "
              "over rounds; the last column compares generate() with separately timed forwards instead, which "
              "carries the machine's load between the two timings.", "",
              f"| model | batch | edmlab.generation img/s | {NFE} x forward img/s | sampler overhead | "
              f"vs separate {NFE} x forward |", "|---|---|---|---|---|---|"]
    for name, r in sample.items():
        lines.append(f"| {name} | {r['batch']} | {r['gen_img_s']:.3g} | {r['net_img_s']:.3g} | "
                     f"**{100 * r['overhead']:.2f}%** | {100 * r['overhead_vs_forwards']:+.1f}% |")
    cifar = {name: r for name, r in sample.items() if name.startswith("cifar_edm")}
    if device.type == "cuda" and cifar:
        lines += ["", f"50,000 CIFAR-10 samples at {NFE} NFE on this one GPU (the goal: at most 10 minutes on an "
                  "H100-class GPU), from the rows above: "
                  + "; ".join(f"{name} at batch {r['batch']}: **{50_000 / r['gen_img_s'] / 60:.1f} min**"
                              for name, r in cifar.items()) + "."]
    if e2e is not None:
        net_s = e2e["net_s"]
        lines += ["", f"`python sample.py` for 64 digits images, end to end (fresh process, median of 2): "
                  f"{e2e['wall_s']:.2f} s = {e2e['wall_s'] / net_s:.1f}x its network time ({net_s:.2f} s)."]
    if end is not None:
        lines += ["", "## After the last step (digits demo)", "",
                  f"`final_losses` ({end['spec']}): {end['losses_s']:.1f} s ({end['losses_1_s']:.1f} s with "
                  "`final_losses.repeats=1`, none with `final_losses=null`); `callbacks.sample_grid`'s end-of-run "
                  f"grid ({end['grid']}, {NFE} NFE): {end['grid_s']:.1f} s (none with "
                  "`callbacks.sample_grid.at_train_end=false`)."]
    path = RESULTS / "speed.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

