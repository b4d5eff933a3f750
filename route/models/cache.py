"""Where built models live and how their files are checked: the cache directory (`$ROUTE_CACHE`, default
`~/.cache/route`) and `SHA256SUMS` manifests (the shipped organisms, converted pretrained models)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MANIFEST = "SHA256SUMS"  # `sha256sum` format: `sha256sum -c SHA256SUMS` checks a shipped directory


def cache_root() -> Path:
    return Path(os.environ.get("ROUTE_CACHE", Path.home() / ".cache" / "route"))


def file_hashes(path: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file in directory `path` (the manifest excluded), by file name."""
    path = Path(path)
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.iterdir()) if f.is_file() and f.name != MANIFEST}


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """The `SHA256SUMS` of a shipped organism directory: {file name: hex digest}."""
    rows = (line.split(maxsplit=1) for line in (Path(path) / MANIFEST).read_text().splitlines() if line.strip())
    return {name.strip().lstrip("*"): digest for digest, name in rows}
