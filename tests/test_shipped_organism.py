"""The organisms ship with the package: the default (arith) one and every one a published figure starts from;
their bytes, their configs, their use by load_or_build, their rebuild."""

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

import route.models.organism as organism
from route.models.organism import MANIFEST, SHIP_COMMAND, SHIPPED_ROOT, file_hashes, organism_config, read_manifest
from route.utils.kernels import chosen_kernels

REPO = Path(__file__).resolve().parent.parent
FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "organism.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


# The organisms docs/protocol5.md starts from (env, build seed); the default arith organism is `shipped` below.
RESULT_ORGANISMS = [(env, seed) for env in ("qa_named", "sort_named") for seed in (0, 1, 2)]
SHIPPED = organism.shipped_organisms()


def organism_meta(path: Path) -> dict:
    return json.loads((path / "organism.json").read_text())


@pytest.fixture
def shipped() -> Path:
    """The default organism's directory."""
    return SHIPPED_ROOT / f"arith-{organism_config().key()}"


def test_every_published_organism_ships_and_nothing_else():
    want = {("arith", 0), *RESULT_ORGANISMS}
    have = [(organism_meta(p)["organism_config"]["env"], organism_meta(p)["organism_config"]["seed"]) for p in SHIPPED]
    assert sorted(have) == sorted(want), f"shipped {sorted(have)}; expected one directory per organism {sorted(want)}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_match_their_manifest(path):
    manifest = read_manifest(path)
    assert set(manifest) == FILES, "the manifest must list the model, the tokenizer and organism.json"
    assert file_hashes(path) == manifest, f"{path} differs from its {MANIFEST}; re-ship: {SHIP_COMMAND}"
    assert (path / "model.safetensors").stat().st_size > 1_000_000


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_each_shipped_organism_is_its_envs_config_at_its_seed(path):
    """A shipped directory is found only when its config is what `organism_config(env, seed=...)` gives today."""
    meta = organism_meta(path)
    cfg = organism_config(meta["organism_config"]["env"], seed=meta["organism_config"]["seed"])
    hint = (f"{path.name} no longer matches organism_config({cfg.env!r}, seed={cfg.seed}) (route/models/organism.py); "
            f"re-ship it with `{SHIP_COMMAND}` and commit the new directory")
    assert meta["organism_config"] == json.loads(json.dumps(dataclasses.asdict(cfg))), hint
    assert meta["key"] == cfg.key() and path.name == f"{cfg.env}-{cfg.key()}", hint


def test_load_or_build_finds_every_shipped_organism_by_env_and_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTE_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(organism, "build_organism", lambda *a, **k: pytest.fail("built a shipped organism"))
    for env, seed in RESULT_ORGANISMS:
        assert organism.load_or_build(organism_config(env, seed=seed), progress=False).parent == SHIPPED_ROOT
    assert not (tmp_path / "empty_cache").exists()


def test_shipped_config_is_the_default_organism(shipped):
    cfg = organism_config()
    meta = json.loads((shipped / "organism.json").read_text())
    hint = (
        f"the default organism's config (route/models/organism.py) no longer matches the shipped one ({shipped.name}); "
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
    with pytest.raises(RuntimeError, match=r"model\.safetensors.*route organism --ship"):
        organism.load_or_build(progress=False)


def test_ship_from_a_built_directory_copies_it_with_a_manifest(shipped, tmp_path):
    root = tmp_path / "organisms"
    (root / "arith-000000000000").mkdir(parents=True)  # a stale shipped organism of the same env (unreadable)
    (root / "sort-111111111111").mkdir()  # another env's: kept
    other_seed = root / "arith-222222222222"  # the same env at another seed: kept
    other_seed.mkdir()
    (other_seed / "organism.json").write_text(json.dumps({"organism_config": {"env": "arith", "seed": 1}}))
    dest = organism.ship(shipped, root=root, progress=False)
    assert dest == root / shipped.name
    assert sorted(p.name for p in root.iterdir()) == sorted([shipped.name, "sort-111111111111", other_seed.name])
    assert (dest / MANIFEST).read_text() == (shipped / MANIFEST).read_text()
    assert file_hashes(dest) == read_manifest(dest)


def test_ship_refuses_a_directory_built_from_another_config(tiny_organism, tmp_path):
    with pytest.raises(ValueError, match="--from"):
        organism.ship(tiny_organism, root=tmp_path / "organisms", progress=False)
    assert not (tmp_path / "organisms").exists()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_package_data_includes_every_shipped_file(path):
    """A non-editable install carries an organism only if pyproject's package data names its files."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["route"]
    files = [f.relative_to(REPO / "route").as_posix() for f in path.iterdir()]
    assert len(files) == len(FILES) + 1
    missing = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not missing, f"pyproject's package data leaves out {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_rebuilding_a_shipped_organism_reproduces_its_bytes(path, tmp_path):
    """A rebuild gives the shipped model and tokenizer bytes (minutes per organism on one idle core). Organisms built
    with portable kernels (`route.utils.kernels`) rebuild the same on any x86-64 CPU with AVX2; the default arith
    organism predates them (native kernels on an Intel Xeon) and is rebuilt only under ROUTE_KERNELS=native."""
    meta = organism_meta(path)
    kernels = meta.get("built_with", {}).get("kernels", "native")
    if kernels != chosen_kernels():
        pytest.skip(f"{path.name} was built with {kernels} kernels: rebuild it under ROUTE_KERNELS={kernels}")
    torch.set_num_threads(1)
    cfg = organism_config(meta["organism_config"]["env"], seed=meta["organism_config"]["seed"])
    out = organism.build_organism(cfg, tmp_path / "rebuilt", progress=False)
    rebuilt, shipped_hashes = file_hashes(out), read_manifest(path)
    assert {n: h for n, h in rebuilt.items() if n != "organism.json"} == {
        n: h for n, h in shipped_hashes.items() if n != "organism.json"}
    mine = organism_meta(out)
    assert {k: v for k, v in mine.items() if k != "built_with"} == {k: v for k, v in meta.items() if k != "built_with"}
