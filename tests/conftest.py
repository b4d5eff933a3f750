"""Shared fixtures: one tiny model organism per test session, and the real pretrained model.

`tiny_organism` is the directory of a plain transformers checkpoint (model + tokenizer +
organism.json) built from `route.models.organism.tiny_config()` with a fixed seed; tests that need
a model load it from there and must not write into it.

`real_model` is SmolLM2-135M-Instruct (`route.models.pretrained`, short name `smollm2-135m-instruct`), converted once
per session into a session cache; its tests skip, naming the install line, when its packages are not installed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and on a loaded machine extra threads only contend.
torch.set_num_threads(1)

TINY_ORGANISM_SEED = 0
REAL_MODEL = "smollm2-135m-instruct"


@pytest.fixture(autouse=True)
def _cache_root(tmp_path, monkeypatch):
    """Every test gets its own `ROUTE_CACHE` (SVD and organism caches), so no test writes to the user's cache."""
    monkeypatch.setenv("ROUTE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_organism_build(tmp_path_factory) -> tuple[Path, float]:
    """(directory, build seconds) of the session's tiny organism."""
    from route.models.organism import build_organism, tiny_config

    out = tmp_path_factory.mktemp("organism") / "org"
    start = time.perf_counter()
    path = build_organism(tiny_config(seed=TINY_ORGANISM_SEED), out, progress=False)
    return Path(path), time.perf_counter() - start


@pytest.fixture(scope="session")
def tiny_organism(tiny_organism_build) -> Path:
    """Directory of the session's tiny organism (built once, seed 0)."""
    return tiny_organism_build[0]


@pytest.fixture(scope="session")
def real_model_build(tmp_path_factory) -> tuple[Path, Path, float]:
    """(checkpoint directory, cache root, conversion seconds) of the real model, converted once per session."""
    from route.models.pretrained import MODELS, packaged_file, resolve_model

    try:
        packaged_file("model_name_or_path", MODELS[REAL_MODEL])
    except ValueError as e:
        pytest.skip(f"the real pretrained model is not installed ({e})")
    cache = tmp_path_factory.mktemp("real_model_cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("ROUTE_CACHE", str(cache))
        start = time.perf_counter()
        path = resolve_model(REAL_MODEL, progress=False)
    return Path(path), cache, time.perf_counter() - start


@pytest.fixture
def real_model(real_model_build, monkeypatch) -> Path:
    """The session's converted SmolLM2-135M-Instruct; `ROUTE_CACHE` points at the session cache for the test, so the
    short name resolves to this conversion (and svf's SVDs are cached there). Tests must not write into it."""
    path, cache, _ = real_model_build
    monkeypatch.setenv("ROUTE_CACHE", str(cache))
    return path
