"""benchmarks/fashion.py's row bookkeeping: every row is saved as measured, and --resume keeps them."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("edmlab_fashion_benchmark", ROOT / "benchmarks" / "fashion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(solver: str, nfe: int, fid: float) -> dict:
    return dict(solver=solver, steps=nfe, nfe=nfe, fid=fid, accuracy=0.5, sample_ips=1.0)


def test_rows_survive_a_kill_and_resume_skips_them(bench, tmp_path):
    path = tmp_path / "fashion.json"
    first = bench.Progress(path, "/runs/a", 10_000, resume=False)
    first.floor = 2.5
    first.save()
    first.add(_row("dpmpp_2m", 10, 49.6))
    first.add(_row("heun", 35, 48.4))  # the process dies here: the file already holds both rows
    kept = bench.Progress(path, "/runs/a", 10_000, resume=True)
    assert kept.floor == 2.5
    assert kept.has("heun", 35) and kept.has("dpmpp_2m", 10) and not kept.has("heun", 5)
    kept.add(_row("heun", 5, 200.0))
    kept.add(_row("unipc-3 + AFS / fitted", 10, 49.5))
    order = [(r["solver"], r["nfe"]) for r in json.loads(path.read_text())["rows"]]
    assert order == [("heun", 5), ("heun", 35), ("dpmpp_2m", 10), ("unipc-3 + AFS / fitted", 10)]
    assert bench.Progress(path, "/runs/a", 10_000, resume=False).rows == []  # without --resume: start over


def test_resume_refuses_another_run_or_sample_count(bench, tmp_path):
    path = tmp_path / "fashion.json"
    bench.Progress(path, "/runs/a", 500, resume=False).save()
    with pytest.raises(SystemExit, match="N = 500"):
        bench.Progress(path, "/runs/a", 10_000, resume=True)
    with pytest.raises(SystemExit, match="/runs/a"):
        bench.Progress(path, "/runs/b", 500, resume=True)
