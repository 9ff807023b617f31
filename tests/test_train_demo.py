"""The embedded demo's quality, measured on a real `python train.py` run (~2 minutes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_default_demo_samples_are_the_requested_digits(tmp_path):
    import digits_demo

    run = tmp_path / "run"
    digits_demo.train_demo(run)
    assert (run / "samples.png").is_file() and (run / "checkpoints" / "last_ema.pt").is_file()
    m = digits_demo.evaluate(run, per_class=100)
    assert m["num_samples"] == 1000
    assert m["svc_accuracy_real_heldout"] > 0.95  # the judge itself is good
    assert m["svc_accuracy_samples"] >= 0.90  # >= 90% labelled as the class they were asked for
    # pixel-space Gaussian fits: as close to the real digits as two halves of the real data are to each other
    assert m["fd_samples_vs_real"] < 2 * m["fd_real_half_vs_half"]
