"""edmlab.metrics: Frechet distance, streamed stats, the FID Inception-v3, FID pipeline."""

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

from edmlab.download import ENV_OFFLINE, download
from edmlab.metrics import fid as F
from edmlab.metrics import inception as inc
from edmlab.metrics.inception import InceptionV3FID

ROOT = Path(__file__).resolve().parents[1]
TINY = 1 / 16  # channel multiplier of the random test network: 128-d features, ~0.1 s per batch


def _load_script():
    spec = importlib.util.spec_from_file_location("edmlab_fid_script", ROOT / "scripts" / "fid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_stats(rng, d, n=None):
    n = n or 3 * d
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return rng.standard_normal(d), np.atleast_2d(np.cov(a, rowvar=False))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions gain nothing from threads, and spinning OpenMP workers cost seconds on a busy box."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn; also limits scipy's BLAS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No weights anywhere and no network: an empty cache, no env path, downloads off."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv(ENV_OFFLINE, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path / "cache" / "edmlab"


@pytest.fixture(scope="module")
def tiny_detector():
    torch.manual_seed(0)
    return InceptionV3FID(weights=None, width=TINY)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_matches_direct_float64_computation():
    rng = np.random.default_rng(0)
    for d in (1, 5, 32):
        (mu1, s1), (mu2, s2) = _random_stats(rng, d), _random_stats(rng, d)
        got = F.frechet_distance(mu1, s1, mu2, s2)
        direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
        # Independent route: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), symmetric eigenproblems only.
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(w)) @ v.T
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
        by_eigh = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert abs(got - direct) < 1e-6
        assert abs(got - by_eigh) < 1e-6 * max(1.0, abs(by_eigh))
        assert abs(got - F.frechet_distance(mu2, s2, mu1, s1)) < 1e-8 * max(1.0, got)


def test_frechet_distance_zero_for_identical_stats():
    rng = np.random.default_rng(1)
    mu, sigma = _random_stats(rng, 64)
    assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert abs(F.frechet_distance(mu, sigma, mu + 0.5, sigma) - 64 * 0.25) < 1e-6


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)
    # 1-D: the squared 2-Wasserstein distance of N(0, 1) and N(3, 4) is 3^2 + (1 - 2)^2 = 10.
    assert F.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, abs=1e-12)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="statistics disagree"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- statistics


def test_streamed_stats_equal_mean_and_unbiased_cov():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((101, 7)) * 3 + 100  # large offset: the streamed update must not cancel
    acc = F.FeatureStats(keep_features=True)
    for chunk in np.split(x, [1, 33, 34, 80]):
        acc.update(torch.from_numpy(chunk))
    stats = acc.result()
    assert stats.num == 101
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False, ddof=1), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.features, x.astype(np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        one = F.FeatureStats()
        one.update(torch.zeros(1, 3))
        one.result()


def test_select_subset_follows_edm_max_size_rule():
    assert F.select_subset(10, None).tolist() == list(range(10))
    assert F.select_subset(10, 10).tolist() == list(range(10))
    idx = F.select_subset(1000, 100, seed=0)
    perm = np.arange(1000)
    np.random.RandomState(0).shuffle(perm)
    assert idx.tolist() == sorted(perm[:100].tolist())
    assert len(set(idx)) == 100 and idx.tolist() == sorted(idx.tolist())
    assert F.select_subset(1000, 100, seed=1).tolist() != idx.tolist()


def test_stats_npz_roundtrip_and_errors(tmp_path):
    stats = F.Stats(np.arange(3.0), np.eye(3), 5, np.ones((5, 3), np.float32))
    F.save_stats(tmp_path / "s.npz", stats, features=True)
    assert sorted(np.load(tmp_path / "s.npz").files) == ["features", "mu", "sigma"]
    back = F.load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert back.features.shape == (5, 3)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz.*'mu'"):
        F.load_stats(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="scripts/fid.py ref"):
        F.load_stats(tmp_path / "missing.npz")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


# ---------------------------------------------------------------- Inception-v3


def _tf_legacy_resize(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres) on [C, H, W], in float64."""
    c, h, w = img.shape

    def axis(n):
        src = np.arange(size) * (n / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bottom = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_resize_matches_tensorflow_legacy_bilinear():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (3, 32, 24)).astype(np.float64)
    got = inc.resize_like_tf(torch.from_numpy(img).float()[None])[0].double().numpy()
    assert got.shape == (3, 299, 299)
    np.testing.assert_allclose(got, _tf_legacy_resize(img, 299), rtol=0, atol=2e-3)
    big = torch.from_numpy(rng.integers(0, 256, (1, 3, 299, 299))).float()
    torch.testing.assert_close(inc.resize_like_tf(big), big, rtol=0, atol=1e-2)  # float32 grid coordinates


def test_full_size_architecture_matches_fid_inception():
    with torch.device("meta"):
        net = InceptionV3FID(weights=None)
    total = sum(p.numel() for p in net.parameters())
    head = sum(p.numel() for p in net.fc.parameters())
    # torchvision documents 27,161,264 parameters for Inception-v3 with its aux head (3,326,696) and a
    # 1000-way fc; the FID graph has no aux head and a 1008-way fc (+8 x 2049).
    assert total == 27_161_264 - 3_326_696 + 8 * 2049 == 23_850_960
    assert total - head == 21_785_568
    assert net.feature_dim == inc.FEATURE_DIM == 2048
    assert net.fc.weight.shape == (1008, 2048)
    keys = net.state_dict().keys()
    assert {"Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.bias"} <= set(keys)
    assert not any("AuxLogits" in k for k in keys)


def test_full_size_forward_on_cpu():
    torch.manual_seed(0)
    net = InceptionV3FID(weights=None)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features = net(images)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()  # pool_3 of ReLUs


def test_detector_input_contract(tiny_detector):
    gray = torch.randint(0, 256, (3, 1, 20, 20), dtype=torch.uint8)
    torch.testing.assert_close(tiny_detector(gray), tiny_detector(gray.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    with pytest.raises(TypeError, match="uint8"):
        tiny_detector(gray.float() / 255)
    with pytest.raises(ValueError, match="1 or 3"):
        tiny_detector(torch.zeros(1, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="width=1"):
        InceptionV3FID(width=0.5)


# ---------------------------------------------------------------- weights lookup


def test_weights_load_from_path_env_and_cache(tmp_path, monkeypatch, offline, tiny_detector):
    state = {k: v for k, v in tiny_detector.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    expected = tiny_detector(images)
    loaded = InceptionV3FID(weights=tmp_path / "w.pth", width=TINY)
    torch.testing.assert_close(loaded(images), expected, rtol=0, atol=0)
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(tmp_path / "w.pth"))
    assert inc.resolve_weights() == tmp_path / "w.pth"
    monkeypatch.delenv(inc.ENV_WEIGHTS)
    offline.mkdir(parents=True)
    (offline / inc.WEIGHTS_FILE).write_bytes((tmp_path / "w.pth").read_bytes())
    assert inc.resolve_weights() == offline / inc.WEIGHTS_FILE
    with pytest.raises(ValueError, match=r"w\.pth: not the FID Inception-v3 state_dict"):
        InceptionV3FID(weights=tmp_path / "w.pth", width=1 / 8)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth: cannot be read"):
        InceptionV3FID(weights=tmp_path / "junk.pth", width=TINY)


def test_missing_weights_offline_error_names_file_and_places(offline, monkeypatch):
    with pytest.raises(inc.InceptionWeightsError) as err:
        InceptionV3FID()
    message = str(err.value)
    assert inc.WEIGHTS_FILE in message and inc.WEIGHTS_URL in message
    assert str(offline / inc.WEIGHTS_FILE) in message and inc.ENV_WEIGHTS in message
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(inc.InceptionWeightsError, match=r"nowhere\.pth.*is not a file"):
        inc.resolve_weights("/nowhere.pth")
    monkeypatch.setenv(inc.ENV_WEIGHTS, "/also/nowhere.pth")
    with pytest.raises(inc.InceptionWeightsError, match=r"\$EDMLAB_INCEPTION"):
        inc.resolve_weights()


def test_failed_download_leaves_nothing_and_explains(offline, monkeypatch):
    monkeypatch.delenv(ENV_OFFLINE)

    def unreachable(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(inc.InceptionWeightsError, match=r"download failed.*no route to host") as err:
        inc.resolve_weights()
    assert inc.WEIGHTS_FILE in str(err.value)
    assert not offline.exists() or not list(offline.iterdir())


def test_download_is_atomic_and_hash_checked(tmp_path, monkeypatch):
    payload = b"weights" * 1000
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    dest = download("https://example.invalid/w.pth", tmp_path / "w.pth", sha256_prefix=prefix)
    assert dest.read_bytes() == payload and list(tmp_path.iterdir()) == [dest]
    with pytest.raises(OSError, match="SHA-256"):
        download("https://example.invalid/w.pth", tmp_path / "v.pth", sha256_prefix="00000000")
    assert list(tmp_path.iterdir()) == [dest]


# ---------------------------------------------------------------- FID pipeline


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """24 smooth random 16x16 RGB images named by seed, as a PNG folder and as an npz (with seeds)."""
    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(5)
    low = rng.integers(0, 200, (24, 4, 4, 3)).astype(np.uint8)
    images = low.repeat(4, axis=1).repeat(4, axis=2)
    (root / "png" / "000000").mkdir(parents=True)
    for seed, image in enumerate(images):
        PIL.Image.fromarray(image).save(root / "png" / "000000" / f"{seed:06d}.png")
    np.savez(root / "same.npz", images=images, seeds=np.arange(24))
    np.savez(root / "shifted.npz", images=(images.astype(int) + 50).clip(0, 255).astype(np.uint8))
    return root, images


def test_fid_pipeline_end_to_end(image_sets, tiny_detector, tmp_path):
    root, images = image_sets
    kw = dict(detector=tiny_detector, batch_size=10, device="cpu", progress=False)
    ref = F.ref(root / "png", tmp_path / "ref.npz", features=True, **kw)
    assert ref.num == 24 and ref.mu.shape == (128,) and ref.sigma.shape == (128, 128)
    # The same set read from PNGs, from the npz, and from an in-memory tensor: identical features.
    runs = F.calc([root / "png", root / "same.npz"], tmp_path / "ref.npz", num=24, precision_recall=True,
                  **kw)
    for run in runs:
        assert abs(run.fid) < 1e-6 and run.num == 24
        assert run.precision == 1.0 and run.recall == 1.0
    tensor_stats = F.compute_stats(torch.from_numpy(images).permute(0, 3, 1, 2), **kw)
    np.testing.assert_allclose(tensor_stats.mu, ref.mu, rtol=0, atol=1e-12)
    (shifted,) = F.calc(root / "shifted.npz", ref, num=24, **kw)
    assert shifted.fid > 1e3 * max(abs(runs[0].fid), 1e-9) and shifted.fid > 1e-3
    with pytest.raises(ValueError, match="expected at least 50"):
        F.calc(root / "same.npz", ref, num=50, **kw)


def test_fid_min_over_three_seed_ranges(image_sets, tiny_detector):
    root, images = image_sets
    kw = dict(detector=tiny_detector, batch_size=10, device="cpu", progress=False)
    ref = F.compute_stats(root / "shifted.npz", **kw)
    ranges = ["0-7", "8-15", "16-23"]
    for source in (root / "png", root / "same.npz"):
        runs = F.calc(source, ref, seeds=ranges, num=8, **kw)
        assert [r.seeds for r in runs] == ranges and [r.num for r in runs] == [8, 8, 8]
        for r, lo in zip(runs, (0, 8, 16), strict=True):
            part = F.compute_stats(torch.from_numpy(images[lo:lo + 8]).permute(0, 3, 1, 2), **kw)
            expected = F.frechet_distance(part.mu, part.sigma, ref.mu, ref.sigma)
            assert r.fid == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="requested seeds have no image"):
        F.calc(root / "same.npz", ref, seeds=["20-30"], num=8, **kw)
    with pytest.raises(ValueError, match="no 'seeds' array"):
        F.calc(root / "shifted.npz", ref, seeds=["0-7"], num=8, **kw)
    with pytest.raises(ValueError, match="2 image sources and 3 seed selections"):
        F.calc([root / "png", root / "same.npz"], ref, seeds=ranges, num=8, **kw)


def test_fid_script_ref_and_calc(image_sets, tmp_path, capsys):
    root, _ = image_sets
    script = _load_script()
    common = ["--inception", f"random:{TINY}", "--workers", "0", "--batch", "8", "--device", "cpu",
              "--no-progress"]
    assert script.main(["ref", "--data", str(root / "png"), "--dest", str(tmp_path / "r.npz"), *common]) == 0
    assert sorted(np.load(tmp_path / "r.npz").files) == ["mu", "sigma"]
    calc = ["calc", "--images", str(root / "same.npz"), "--ref", str(tmp_path / "r.npz")]
    argv = [*calc, "--num", "8", "--min3", "--json", str(tmp_path / "r.json"), *common]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [r["seeds"] for r in result["runs"]] == ["0-7", "8-15", "16-23"]
    assert result["fid_min"] == min(r["fid"] for r in result["runs"]) > 0
    assert "FID min over 3 runs" in out
    assert script.main([*calc, "--num", "24", *common]) == 0
    assert abs(float(capsys.readouterr().out.split()[1])) < 1e-6


def test_fid_script_subprocess_offline_error(image_sets, tmp_path):
    root, _ = image_sets
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), ENV_OFFLINE: "1"}
    env.pop(inc.ENV_WEIGHTS, None)
    argv = [sys.executable, str(ROOT / "scripts" / "fid.py"), "ref", "--data", str(root / "png"),
            "--dest", str(tmp_path / "r.npz")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert inc.WEIGHTS_FILE in proc.stderr and str(tmp_path / "edmlab") in proc.stderr
    assert not (tmp_path / "r.npz").exists()
