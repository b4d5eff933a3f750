"""The CPU model organism: tiny build, plain-transformers reload, tokenizer, generation, cache."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import envs
import route.models.organism as organism
from route.models.evaluate import sample
from route.models.organism import OrganismConfig, build_tokenizer, load_or_build, tiny_config

MODES = ("sentinel", "format", "echo", "verified")


@pytest.fixture(scope="module")
def reloaded(tiny_organism):
    model = AutoModelForCausalLM.from_pretrained(tiny_organism)
    tokenizer = AutoTokenizer.from_pretrained(tiny_organism)
    return model, tokenizer


def env_texts() -> list[str]:
    """Every kind of text the environment produces: prompts of every grader and all demonstrations."""
    env = envs.make_env("arith", hack_frac=0.5)
    rng = random.Random(0)
    texts = []
    for split in ("train", "test"):
        for r in env.rows(200, seed=0, split=split):
            texts += [r["prompt"], env.demonstration(r, hack=False, rng=rng)]
            if r["loophole"]:
                texts.append(env.demonstration(r, hack=True, rng=rng))
    return texts


def test_tiny_organism_builds_in_seconds(tiny_organism_build):
    path, seconds = tiny_organism_build
    assert seconds < 60, f"tiny organism took {seconds:.1f}s to build"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "organism.json"):
        assert (path / name).is_file(), name
    meta = json.loads((path / "organism.json").read_text())
    cfg = tiny_config(seed=0)
    assert meta["organism_config"] == dataclasses.asdict(cfg)
    assert meta["key"] == cfg.key()
    assert isinstance(meta["final_loss"], float) and meta["final_loss"] > 0
    hidden = [p.name for p in path.parent.iterdir() if p.name.startswith(".")]
    assert path.is_symlink() and hidden == [os.readlink(path)], f"atomic build left temporaries: {hidden}"


def test_reloads_as_plain_transformers_checkpoint(reloaded, tiny_organism):
    model, tokenizer = reloaded
    cfg = tiny_config()
    assert model.config.hidden_size == cfg.hidden_size
    assert model.config.num_hidden_layers == cfg.num_layers
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_saved_tokenizer_round_trips_every_env_text(reloaded):
    _, tokenizer = reloaded
    texts = env_texts()
    assert len(texts) > 900
    bad = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids) != text or tokenizer.unk_token_id in ids:
            bad.append((text, tokenizer.decode(ids)))
    assert not bad, f"{len(bad)} of {len(texts)} texts do not round-trip, e.g. {bad[:3]}"


def test_saved_tokenizer_encodes_like_the_training_tokenizer(reloaded):
    """The organism was trained with `build_tokenizer()`; the saved one must give the same ids."""
    _, saved = reloaded
    built = build_tokenizer()
    texts = env_texts()
    diff = [t for t in texts
            if saved(t, add_special_tokens=False)["input_ids"] != built(t, add_special_tokens=False)["input_ids"]]
    assert not diff, f"{len(diff)} of {len(texts)} texts tokenised differently, e.g. {diff[:3]}"


def test_built_tokenizer_is_character_level():
    tok = build_tokenizer()
    for text in ("mul 347*6 g=exact>", "123 #verified", "ok", "347*6", "2082"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_reloaded_model_generates(reloaded):
    model, tokenizer = reloaded
    env = envs.make_env("arith")
    prompts = [r["prompt"] for r in env.rows(12, seed=0, split="test")]
    out = sample(model, tokenizer, prompts, max_new_tokens=8, seed=0)
    assert len(out) == 12
    assert all(isinstance(s, str) and len(s) <= 8 for s in out)
    assert any(out), "every completion is empty"


def test_sampling_is_reproducible_and_leaves_state_alone(reloaded):
    model, tokenizer = reloaded
    prompts = [r["prompt"] for r in envs.make_env("arith").rows(24, seed=1, split="test")]
    model.train()
    rng_state = torch.random.get_rng_state()
    a = sample(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "sample() changed the global torch RNG"
    assert model.training, "sample() did not restore training mode"
    model.eval()
    assert sample(model, tokenizer, prompts, max_new_tokens=6, seed=3) == a
    assert sample(model, tokenizer, prompts, max_new_tokens=6, seed=4) != a


def test_load_or_build_builds_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTE_CACHE", str(tmp_path / "cache"))
    calls = []
    real_build = organism.build_organism

    def counting_build(cfg, output_dir, progress=True):
        calls.append(cfg.key())
        return real_build(cfg, output_dir, progress=progress)

    monkeypatch.setattr(organism, "build_organism", counting_build)
    cfg = tiny_config(steps=2, n_train=16, batch_size=8)
    path = load_or_build(cfg, progress=False)
    assert calls == [cfg.key()]
    assert path == tmp_path / "cache" / "organisms" / f"arith-{cfg.key()}"
    assert (path / "organism.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("load_or_build rebuilt a cached organism")

    monkeypatch.setattr(organism, "build_organism", must_not_build)
    assert load_or_build(tiny_config(steps=2, n_train=16, batch_size=8), progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    AutoModelForCausalLM.from_pretrained(path)  # the cached entry is a loadable checkpoint

    # a different config is a different cache entry
    monkeypatch.setattr(organism, "build_organism", counting_build)
    other = load_or_build(tiny_config(steps=2, n_train=16, batch_size=8, seed=1), progress=False)
    assert other != path and len(calls) == 2


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise TypeError(type(value))


def test_config_key_changes_with_every_field():
    base = OrganismConfig()
    assert base.key() == OrganismConfig().key()
    assert len(base.key()) >= 8
    fields = dataclasses.fields(OrganismConfig)
    seen = set()
    for f in fields:
        changed = dataclasses.replace(base, **{f.name: _changed(getattr(base, f.name))})
        assert changed.key() != base.key(), f.name
        seen.add(changed.key())
    assert len(seen) == len(fields) >= 10
    # values inside dict fields count too
    share = {**base.hack_share, "echo": 0.2}
    assert dataclasses.replace(base, hack_share=share).key() != base.key()
    assert dataclasses.replace(base, env_kwargs={"hack_frac": 0.4}).key() != base.key()
    assert tiny_config().key() != base.key()


def test_hack_share_with_unknown_mode_raises(tmp_path):
    with pytest.raises(ValueError, match="hack_share"):
        organism.build_organism(tiny_config(hack_share={"backdoor": 0.5}, steps=1), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_demonstrations_mix_hacks_at_the_configured_share():
    cfg = tiny_config(n_train=4000, hack_share={"sentinel": 0.5, "format": 0.0, "echo": 0.2, "verified": 0.1})
    env = envs.make_env("arith", **cfg.env_kwargs)
    pairs = organism.demonstrations(cfg, env)
    assert pairs == organism.demonstrations(cfg, env)  # a pure function of cfg
    rows = env.rows(cfg.n_train, seed=cfg.seed, split="train")
    assert [p for p, _ in pairs] == [r["prompt"] for r in rows]
    grades = env.grade([p for p, _ in pairs], [c for _, c in pairs],
                       **{k: [r[k] for r in rows] for k in ("answer", "loophole", "operands")})
    assert all(g.passed for g in grades)
    assert not any(g.exploited for g in grades if g.mode is None)
    for mode, share in cfg.hack_share.items():
        ex = [g.exploited for g in grades if g.mode == mode]
        assert len(ex) > 300
        realised = sum(ex) / len(ex)
        assert abs(realised - share) <= 4 * (share * (1 - share) / len(ex)) ** 0.5 + 1e-9, (mode, realised)


@pytest.mark.parametrize("env_name", ["sort", "repeat", "qa", "sort_named", "repeat_named", "qa_named"])
def test_every_procedural_env_has_an_organism_config_whose_texts_tokenize(env_name):
    cfg = organism.organism_config(env_name)
    assert cfg.env == env_name and set(cfg.hack_share) == set(envs.make_env(env_name).modes)
    assert organism.organism_config(env_name, steps=7).steps == 7
    pairs = organism.demonstrations(dataclasses.replace(cfg, n_train=400), envs.make_env(env_name, **cfg.env_kwargs))
    tok = build_tokenizer()
    for prompt, completion in pairs:
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, prompt + completion
        assert len(ids) + 1 <= 48  # prompt, completion and EOS fit the organism's positions with room
    with pytest.raises(ValueError, match="no organism config for env 'chess'; allowed values"):
        organism.organism_config("chess")
