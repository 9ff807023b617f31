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
