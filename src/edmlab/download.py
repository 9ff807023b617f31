"""Downloads for datasets and metric weights: atomic, checksummed, fast to fail when offline."""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from edmlab.fileio import atomic_write

ENV_OFFLINE = "EDMLAB_OFFLINE"


def cache_dir() -> Path:
    """edmlab's download cache: `$XDG_CACHE_HOME/edmlab`, by default `~/.cache/edmlab`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edmlab"


def is_offline() -> bool:
    """True when EDMLAB_OFFLINE=1 asks never to touch the network."""
    return os.environ.get(ENV_OFFLINE, "").lower() in ("1", "true", "yes")


def download(url: str, dest: str | os.PathLike, *, timeout: float = 20.0, md5: str | None = None,
             sha256_prefix: str | None = None) -> Path:
    """Fetch `url` to `dest` through a temporary file in the same folder, renamed only when complete and checked.

    Raises OSError (URLError is one) on any network or checksum failure; never leaves a partial `dest`.
    """
    if is_offline():
        raise OSError(f"{ENV_OFFLINE} is set")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {url} -> {dest}", file=sys.stderr)
    h_md5, h_sha = hashlib.md5(), hashlib.sha256()
    with atomic_write(dest) as f, urllib.request.urlopen(url, timeout=timeout) as response:
        while chunk := response.read(1 << 20):
            f.write(chunk)
            h_md5.update(chunk)
            h_sha.update(chunk)
        # checked before the rename: a mismatch leaves no file under `dest`
        if md5 is not None and h_md5.hexdigest() != md5:
            raise OSError(f"{url}: md5 {h_md5.hexdigest()} does not match the expected {md5}")
        if sha256_prefix is not None and not h_sha.hexdigest().startswith(sha256_prefix):
            raise OSError(f"{url}: SHA-256 {h_sha.hexdigest()[:16]}... does not start with {sha256_prefix}")
    return dest
