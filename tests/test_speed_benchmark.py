"""benchmarks/speed.py's measuring parts run against today's code (a GPU session must find them working)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("edmlab_speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_training_lockstep_measures_every_way(bench, tmp_path, monkeypatch):
    """The digits row at batch 8 (seconds, not minutes): (b) and (c) each time 3 step pairs after warm-up."""
    tiny = (["experiment=digits_edm", "callbacks.sample_grid.at_train_end=false"], (1, 8, 8), 10, 8, 8)
    monkeypatch.setitem(bench.MODELS, "tiny", tiny)
    out = bench.bench_training("tiny", torch.device("cpu"), steps=2, warmup=1, tmp=tmp_path)
    assert out["batch"] == 8
    for way in ("edmlab", "fast"):
        assert out[way]["steps"] == 3 and out[way]["img_s"] > 0 and out[way]["vs_plain"] > 0
        assert out[way]["peak_mib"] > 0
    assert out["params"] > 0.5e6 and out["plain"]["img_s"] > 0


def test_end_of_run_times_its_parts(bench):
    out = bench.end_of_run(torch.device("cpu"), ("final_losses.num_images=64", "callbacks.sample_grid.per_class=1"))
    assert out["losses_s"] > 0 and out["losses_1_s"] > 0 and out["grid_s"] > 0
    assert out["spec"].startswith("64 images x 4 repeats") and out["grid"] == "1 per class x 10 classes"


@pytest.mark.parametrize("fast", [False, True])
def test_sampling_times_generate_against_its_own_network_time(bench, tmp_path, fast):
    from edmlab.networks import layers

    out = bench.bench_sampling("digits (unet_small, 0.98M)", torch.device("cpu"), 2, tmp_path, fast=fast, batch=8)
    assert out["batch"] == 8 and out["gen_img_s"] > 0 and out["net_img_s"] > 0
    assert 0 <= out["overhead"] < 1  # time outside the network over time inside it, in the same calls
    assert layers._attention["backend"] == "einsum"  # the fast path's SDPA switch is undone


def test_gpu_report_states_the_50k_sample_time(bench, tmp_path, monkeypatch):
    import speed_report

    monkeypatch.setattr(speed_report, "RESULTS", tmp_path)
    monkeypatch.setattr(speed_report, "machine", lambda device: "a GPU")
    row = {"batch": 64, "gen_img_s": 250.0, "net_img_s": 251.0, "overhead": 0.004, "overhead_vs_forwards": 0.004}
    sample = {"cifar_edm DDPM++ (55.7M)": row, f"cifar_edm DDPM++ (55.7M), {speed_report.FAST_SAMPLING}":
              {**row, "batch": 256, "gen_img_s": 1000.0}}
    text = speed_report.write_report(torch.device("cuda"), {}, sample, None, None, 1.0).read_text()
    assert "cifar_edm DDPM++ (55.7M) at batch 64: **3.3 min**" in text  # 50,000 / 250 img/s = 200 s
    assert f"{speed_report.FAST_SAMPLING} at batch 256: **0.8 min**" in text
    assert "GPU rows: unmeasured" not in text
