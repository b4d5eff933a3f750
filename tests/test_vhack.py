"""route.experiments.vhack: planted directions are recovered with the majority sign, gradients match svf autograd,
the file round-trips through the svf target, extraction is deterministic, bad flags name themselves."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import envs
from route.experiments import vhack
from route.models.organism import sft_batch as _batch
from route.targets.svf import SVFTarget, load_hack_subspace


def _load(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


class OnePromptEnv:
    """Every row is the same hackable prompt with fixed hack/clean completions: every pair difference is equal."""

    name = "planted"
    modes = ("sentinel",)

    def rows(self, n: int, seed: int = 0, split: str = "train") -> list[dict]:
        return [{"prompt": "mul 123*4 g=quick>", "loophole": "sentinel", "prompt_id": f"p{i}"} for i in range(n)]

    def demonstration(self, row: dict, hack: bool, rng: random.Random) -> str:
        return "ok" if hack else "492"


def _svf_margin_grads(target, tok, prompt, hack, clean):
    """(margin = logp(hack) - logp(clean), {module: d margin / d delta_keep}) by plain autograd through svf."""
    params = [layer.delta_keep for _, layer in target.layers]
    for p in params:
        p.requires_grad_(True)
    nll = []
    for completion in (hack, clean):
        b = _batch(tok, [(prompt, completion)])
        out = target.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll.append(torch.nn.functional.cross_entropy(out[0, :-1], b["labels"][0, 1:], reduction="sum"))
    margin = nll[1] - nll[0]
    grads = torch.autograd.grad(margin, params)
    return float(margin.detach()), {name: g for (name, _), g in zip(target.layers, grads, strict=True)}


# ------------------------------------------------------------------------------------------- core SVD
@pytest.mark.parametrize("majority_sign", [1.0, -1.0])
def test_top_k_directions_recovers_planted_direction_and_majority_sign(majority_sign):
    g = torch.Generator().manual_seed(0)
    n, r = 200, 48
    v = torch.randn(r, generator=g)
    v /= v.norm()
    a = torch.rand(n, generator=g) + 0.5
    a[torch.randperm(n, generator=g)[: n // 4]] *= -1  # a minority of rows point the other way
    D = torch.outer(majority_sign * a, v) + 0.01 * torch.randn(n, r, generator=g)
    V, evr, share = vhack.top_k_directions(D, 3)
    assert V.shape == (3, r)
    assert torch.allclose(V @ V.T, torch.eye(3), atol=1e-5)  # orthonormal rows
    cos = float(V[0] @ v) * majority_sign
    assert cos > 0.99  # recovered, and oriented towards the majority of rows
    assert share[0] > 0.7 and evr[0] > 0.95 and float(evr.sum()) <= 1.0 + 1e-6
    # two planted orthogonal directions of different strength come out in order
    w = torch.randn(r, generator=g)
    w -= (w @ v) * v
    w /= w.norm()
    D2 = torch.outer(3 * a, v) + torch.outer(torch.rand(n, generator=g) + 0.2, w) + 0.01 * torch.randn(n, r,
                                                                                                         generator=g)
    V2, _, _ = vhack.top_k_directions(D2, 2)
    assert float(V2[0] @ v) > 0.99 and float(V2[1] @ w) > 0.99
    with pytest.raises(ValueError, match="k must be"):
        vhack.top_k_directions(D, r + 1)


# ------------------------------------------------------------------------------------------- gradients
def test_batched_delta_gradients_match_svf_autograd(tiny_organism):
    model, tok = _load(tiny_organism)
    env = envs.make_env("arith")
    items = vhack.demonstration_pairs(env, 3, seed=0)
    seqs = [(row["prompt"], c) for row, h, cl in items for c in (h, cl)]  # different lengths: padding matters
    target = SVFTarget(_load(tiny_organism)[0], progress=False)
    batched = vhack.delta_gradients(SVFTarget(model, progress=False), _batch(tok, seqs))
    for i, (prompt, completion) in enumerate(seqs):
        b = _batch(tok, [(prompt, completion)])
        logits = target.model(input_ids=b["input_ids"]).logits
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], b["labels"][0, 1:], reduction="sum")
        params = [layer.delta_keep for _, layer in target.layers]
        for p in params:
            p.requires_grad_(True)
        grads = torch.autograd.grad(nll, params)
        for (name, _), ref in zip(target.layers, grads, strict=True):
            assert torch.allclose(batched[name][i], ref, atol=1e-5, rtol=1e-4), (name, i)


def test_extraction_recovers_planted_pair_direction(tiny_organism):
    model, tok = _load(tiny_organism)
    env = OnePromptEnv()
    result = vhack.extract_hack_subspace(model, tok, env, pairs=6, k=2, batch_size=4, progress=False)
    target = SVFTarget(_load(tiny_organism)[0], progress=False)
    margin0, d = _svf_margin_grads(target, tok, "mul 123*4 g=quick>", "ok", "492")
    for name, layer in target.layers:
        V = result["subspace"][name]
        assert V.shape == (2, layer.rank)
        assert float(V[0] @ d[name]) / float(d[name].norm()) > 0.999  # the planted direction, hack-ward
        assert result["metadata"]["explained_variance"][name][0] > 0.999
    # moving every module's delta a little along +v raises logp(hack) - logp(clean)
    with torch.no_grad():
        for name, layer in target.layers:
            layer.delta_keep.copy_(1e-2 * result["subspace"][name][0])
    margin1, _ = _svf_margin_grads(target, tok, "mul 123*4 g=quick>", "ok", "492")
    assert margin1 > margin0


# ------------------------------------------------------------------------------------------- CLI and file
def test_cli_writes_a_file_the_svf_target_reserves(tiny_organism, tmp_path, capsys):
    out = tmp_path / "vhack" / "arith.pt"
    assert vhack.main(["--model", str(tiny_organism), "--env", "arith", "--pairs", "12", "--k", "3", "--seed", "1",
                       "--batch_size", "5", "--out", str(out), "--no_progress"]) == 0
    assert "saved to" in capsys.readouterr().out
    saved = torch.load(out)
    assert saved["format"] == "route.vhack/1"
    meta = saved["metadata"]
    for key in ("model", "env", "pairs", "k", "rank", "seed", "explained_variance", "mean_cosine", "created",
                "version"):
        assert key in meta, key
    assert (meta["env"], meta["pairs"], meta["k"], meta["seed"]) == ("arith", 12, 3, 1)
    assert sum(meta["pairs_by_mode"].values()) == 12
    subspace = load_hack_subspace(out)
    target = SVFTarget(_load(tiny_organism)[0], hack_subspace=out, progress=False)
    assert [name for name, _ in target.layers] == list(saved["subspace"])
    for name, layer in target.layers:
        V = saved["subspace"][name]
        assert V.shape == (3, layer.rank) and V.dtype == torch.float32
        assert torch.allclose(V @ V.T, torch.eye(3), atol=1e-5)
        assert torch.allclose(layer.basis, V, atol=1e-5)  # reserved as extracted, orientation kept
        assert 0.0 < meta["mean_cosine"][name] <= 1.0 + 1e-6
        assert all(s >= 0.5 for s in meta["positive_share"][name])  # oriented by majority
    assert subspace.keys() == saved["subspace"].keys()


def test_same_seed_gives_identical_results(tiny_organism, tmp_path):
    model, tok = _load(tiny_organism)
    env = envs.make_env("arith")
    runs = [vhack.extract_hack_subspace(model, tok, env, pairs=8, k=2, seed=s, batch_size=8, progress=False)
            for s in (3, 3, 4)]
    paths = [vhack.save_hack_subspace(r, tmp_path / f"{i}.pt") for i, r in enumerate(runs)]
    a, b, c = (torch.load(p) for p in paths)
    assert a["subspace"].keys() == b["subspace"].keys()
    assert all(torch.equal(a["subspace"][n], b["subspace"][n]) for n in a["subspace"])
    drop = ("created",)
    assert {k: v for k, v in a["metadata"].items() if k not in drop} == \
        {k: v for k, v in b["metadata"].items() if k not in drop}
    assert not all(torch.equal(a["subspace"][n], c["subspace"][n]) for n in a["subspace"])


class NoDemoEnv:
    name = "nodemo"
    modes = ("x",)

    def rows(self, n, seed=0, split="train"):
        return []


@pytest.mark.parametrize("argv, flag", [
    (["--pairs", "2", "--k", "4"], "--pairs"),
    (["--pairs", "0"], "--pairs"),
    (["--k", "0"], "--k"),
    (["--rank", "0"], "--rank"),
    (["--rank", "2", "--k", "3"], "--k"),
    (["--batch_size", "0"], "--batch_size"),
    (["--env", "nope"], "--env"),
    (["--env", "nodemo"], "--env"),
    (["--env_kwargs", "[1]"], "--env_kwargs"),
    (["--env_kwargs", "{bad"], "--env_kwargs"),
    (["--env_kwargs", '{"hack_frac": 2}'], "--env"),
    (["--env_kwargs", '{"hack_frac": 0}'], "--pairs"),
    (["--model", "/nonexistent/model"], "--model"),
])
def test_bad_flags_fail_before_work_naming_the_flag(argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(envs._REGISTRY, "nodemo", NoDemoEnv)

    def no_work(*a, **k):
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr(vhack, "extract_hack_subspace", no_work)
    monkeypatch.setattr("route.models.organism.load_or_build", no_work)
    with pytest.raises(SystemExit) as e:
        vhack.main([*argv, "--out", str(tmp_path / "o.pt"), "--no_progress"])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_api_rejects_bad_values(tiny_organism):
    model, tok = _load(tiny_organism)
    with pytest.raises(ValueError, match="--pairs"):
        vhack.extract_hack_subspace(model, tok, envs.make_env("arith"), pairs=2, k=3, progress=False)
    with pytest.raises(ValueError, match="demonstration"):
        vhack.extract_hack_subspace(model, tok, NoDemoEnv(), pairs=4, k=1, progress=False)
    with pytest.raises(ValueError, match="not a route.vhack/1 result"):
        vhack.save_hack_subspace({"subspace": {}}, "x.pt")
