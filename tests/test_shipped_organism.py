"""The default organism ships with the package: its bytes, its config, its use by load_or_build, its rebuild."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import route.organism as organism
from route.organism import MANIFEST, SHIP_COMMAND, SHIPPED_ROOT, file_hashes, organism_config, read_manifest

REPO = Path(__file__).resolve().parent.parent
FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "organism.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def shipped_dirs() -> list[Path]:
    return sorted(p for p in SHIPPED_ROOT.iterdir() if p.is_dir())


@pytest.fixture
def shipped() -> Path:
    dirs = shipped_dirs()
    assert len(dirs) == 1, f"exactly one organism ships, found {dirs}"
    return dirs[0]


def test_shipped_files_match_their_manifest(shipped):
    manifest = read_manifest(shipped)
    assert set(manifest) == FILES, "the manifest must list the model, the tokenizer and organism.json"
    assert file_hashes(shipped) == manifest, f"{shipped} differs from its {MANIFEST}; re-ship: {SHIP_COMMAND}"
    assert (shipped / "model.safetensors").stat().st_size > 1_000_000


def test_shipped_config_is_the_default_organism(shipped):
    cfg = organism_config()
    meta = json.loads((shipped / "organism.json").read_text())
    hint = (
        f"the default organism's config (route/organism.py) no longer matches the shipped one ({shipped.name}); "
        f"re-ship it with `{SHIP_COMMAND}` (builds it, about 3 minutes on one core) and commit the new directory"
    )
    assert meta["organism_config"] == json.loads(json.dumps(dataclasses.asdict(cfg))), hint
    assert meta["key"] == cfg.key() and shipped.name == f"arith-{cfg.key()}", hint
    assert organism_config("arith").key() == organism.OrganismConfig().key() == cfg.key()


def test_shipped_model_has_the_shape_and_tokenizer_the_code_builds(shipped):
    """Code-defined parts of the organism that are not config fields: the Llama config and the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    built = organism.build_tokenizer()
    assert tokenizer.get_vocab() == built.get_vocab(), f"build_tokenizer() changed; re-ship: {SHIP_COMMAND}"
    want = organism.build_model(organism_config(), built).config.to_dict()
    have = AutoModelForCausalLM.from_pretrained(shipped).config.to_dict()
    skip = {"transformers_version", "_name_or_path", "architectures", "dtype"}
    diff = {k for k in set(want) | set(have) if k not in skip and want.get(k) != have.get(k)}
    assert not diff, f"build_model() now differs in {sorted(diff)}; re-ship: {SHIP_COMMAND}"


def test_load_or_build_uses_the_shipped_copy_without_building(shipped, tmp_path, monkeypatch):
    cache = tmp_path / "empty_cache"
    monkeypatch.setenv("ROUTE_CACHE", str(cache))

    def must_not_build(*args, **kwargs):
        raise AssertionError("load_or_build built the default organism although it ships")

    monkeypatch.setattr(organism, "build_organism", must_not_build)
    assert organism.load_or_build(progress=False) == shipped
    assert organism.load_or_build(organism_config("arith"), progress=False) == shipped
    assert not cache.exists(), "load_or_build wrote to the cache"
    model = AutoModelForCausalLM.from_pretrained(shipped)
    tokenizer = AutoTokenizer.from_pretrained(shipped)
    ids = tokenizer(["add 2+3 g=exact>"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


def test_a_tampered_shipped_copy_is_refused(shipped, tmp_path, monkeypatch):
    root = tmp_path / "organisms"
    shutil.copytree(shipped, root / shipped.name)
    monkeypatch.setattr(organism, "SHIPPED_ROOT", root)
    assert organism.load_or_build(progress=False) == root / shipped.name
    weights = root / shipped.name / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"model\.safetensors.*route\.organism --ship"):
        organism.load_or_build(progress=False)


def test_ship_from_a_built_directory_copies_it_with_a_manifest(shipped, tmp_path):
    root = tmp_path / "organisms"
    (root / "arith-000000000000").mkdir(parents=True)  # a stale shipped organism of the same env
    (root / "sort-111111111111").mkdir()  # another env's: kept
    dest = organism.ship(shipped, root=root, progress=False)
    assert dest == root / shipped.name
    assert sorted(p.name for p in root.iterdir()) == sorted([shipped.name, "sort-111111111111"])
    assert (dest / MANIFEST).read_text() == (shipped / MANIFEST).read_text()
    assert file_hashes(dest) == read_manifest(dest)


def test_ship_refuses_a_directory_built_from_another_config(tiny_organism, tmp_path):
    with pytest.raises(ValueError, match="--from"):
        organism.ship(tiny_organism, root=tmp_path / "organisms", progress=False)
    assert not (tmp_path / "organisms").exists()


def test_package_data_includes_every_shipped_file(shipped):
    """A non-editable install carries the organism only if pyproject's package data names its files."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["route"]
    files = [f.relative_to(REPO / "route").as_posix() for f in shipped.iterdir()]
    assert len(files) == len(FILES) + 1
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"pyproject's package data leaves out {missing}"


@pytest.mark.slow
def test_rebuilding_the_default_organism_reproduces_the_shipped_bytes(shipped, tmp_path):
    """The project's build on this machine gives the shipped bytes (about 3 minutes on one idle core)."""
    torch.set_num_threads(1)
    out = organism.build_organism(organism_config(), tmp_path / "rebuilt", progress=False)
    assert file_hashes(out) == read_manifest(shipped)
