"""benchmarks/solvers.py in its fast mode: it runs, writes its table and plot, and Heun converges with order ~2."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("edmlab_solver_benchmark", ROOT / "benchmarks" / "solvers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_fitted_order_of_exact_power_laws(bench):
    nfe = [9, 17, 33, 65, 129]
    assert bench.fitted_order(nfe, [3.0 * n**-2 for n in nfe], tail=3) == pytest.approx(2.0, abs=1e-12)
    assert bench.fitted_order(nfe, [0.1, 0.05, 0.02, 0.0, 0.0], tail=3) != bench.fitted_order(nfe, [1] * 5, tail=3)
    assert np.isnan(bench.fitted_order(nfe, [0.1, 0.05, 0.02, 0.0, 0.0], tail=2))  # all at the floor: no order


def test_fast_mode_table_plot_and_heun_order(bench, tmp_path):
    results = bench.main(["--fast", "--outdir", str(tmp_path)])
    configs = bench.configs()
    assert len(configs) == 4 * 5 + 3 and set(results) == {"mixture", "digits"}
    assert all(list(rows) == configs for rows in results.values())

    mixture = results["mixture"]
    heun, euler = mixture[bench.Config("heun", "edm")], mixture[bench.Config("euler", "edm")]
    assert heun["nfe"] == euler["nfe"] == [9, 17, 33, 65, 129]  # Heun's 2N - 1 lands on the same columns
    assert 1.7 <= heun["order"] <= 2.5
    assert heun["error"][-1] < 1e-2 * heun["error"][0] and heun["error"][-1] < 0.1 * euler["error"][-1]
    # Under EDM's process Euler and DDIM are one method (s = 1, sigma = t): identical end points.
    assert mixture[bench.Config("ddim", "edm")]["error"] == pytest.approx(euler["error"], rel=1e-9)
    # On the finite set the final step snaps onto training points: more steps, fewer wrong points.
    snapped = results["digits"][bench.Config("heun", "edm")]["other_point"]
    assert snapped[0] > 0 and snapped[-1] == 0

    table = (tmp_path / "solvers_fast.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| heun | edm | edm |"))
    assert row.endswith(f"| {heun['order']:.2f} |") and f"{heun['error'][-1]:.2e}" in row
    assert "## 16-D Gaussian mixture" in table and "## Finite set" in table
    with PIL.Image.open(tmp_path / "solvers_fast.png") as image:
        assert image.width > 1000 and image.height > 400


def test_conditioning_marks_latents_on_a_decision_boundary(bench):
    """Two equal components at +-m: a latent orthogonal to m lies on the flow's boundary (by symmetry); one far
    along +m does not."""
    import torch

    from edmlab import analytic

    m = torch.zeros(4, dtype=torch.float64)
    m[0] = 1.0
    law = analytic.GaussianMixture(torch.ones(2, dtype=torch.float64), torch.stack([m, -m]),
                                   torch.full((2, 4), 0.1, dtype=torch.float64))
    on = torch.tensor([0.0, 0.5, -0.3, 0.2], dtype=torch.float64)
    k_on = int(bench.few_step.component(law, analytic.ode_reference(law, on[None], 80.0, 0.002))[0])
    assert 0.1 < bench.few_step.conditioning(law, on, k_on) < 0.9
    far = torch.tensor([2.0, 0.5, -0.3, 0.2], dtype=torch.float64)
    assert bench.few_step.conditioning(law, far, 0) == 0.0
