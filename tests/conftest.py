"""Shared fixtures: one tiny model organism per test session.

`tiny_organism` is the directory of a plain transformers checkpoint (model + tokenizer +
organism.json) built from `route.organism.tiny_config()` with a fixed seed; tests that need
a model load it from there and must not write into it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and on a loaded machine extra threads only contend.
torch.set_num_threads(1)

TINY_ORGANISM_SEED = 0


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    """Every test gets its own `ROUTE_CACHE` (SVD and organism caches), so no test writes to the user's cache."""
    monkeypatch.setenv("ROUTE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_organism_build(tmp_path_factory) -> tuple[Path, float]:
    """(directory, build seconds) of the session's tiny organism."""
    from route.organism import build_organism, tiny_config

    out = tmp_path_factory.mktemp("organism") / "org"
    start = time.perf_counter()
    path = build_organism(tiny_config(seed=TINY_ORGANISM_SEED), out, progress=False)
    return Path(path), time.perf_counter() - start


@pytest.fixture(scope="session")
def tiny_organism(tiny_organism_build) -> Path:
    """Directory of the session's tiny organism (built once, seed 0)."""
    return tiny_organism_build[0]
