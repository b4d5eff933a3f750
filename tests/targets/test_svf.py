"""svf: reservations, forward equivalences, routing invariants after optimizer.step(), score routing, erase, PEFT
round trip, merge exactness and a 3-step GRPO run per svf intervention."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from route.masks import DEFAULT, FORGET
from route.masks.optim import build_optimizer
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import make_target
from route.targets.svf import SVFTarget, load_hack_subspace, orthonormal_rows
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits

RANK = 8
KINDS = ("axes", "subspace")


def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_config(init_range=0.2), build_tokenizer())


def module_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("_proj")]


def vhack_dict(model, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"format": "route.vhack/1", "metadata": {"rank": RANK},
            "subspace": {n: torch.randn(k, RANK, generator=g) for n in module_names(model)}}


def make(kind, randomize=True, **kw):
    model = tiny_model()
    reserve = dict(reserve_axes=[0, 3]) if kind == "axes" else dict(hack_subspace=vhack_dict(model))
    t = make_target("svf", model, rank=RANK, progress=False, **reserve, **kw)
    if randomize:  # non-zero deltas so every path carries signal
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in t.layers:
                layer.delta_keep.copy_(torch.randn(layer.rank, generator=g) * 0.3)
                layer.coef.copy_(torch.randn(layer.coef.numel(), generator=g) * 0.3)
    return t


def loss_backward(t, ids, modes):
    with t.gate(modes):
        t.model(input_ids=ids, labels=ids).loss.backward()


def grads(t):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in t.model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- structure
def test_starts_equal_to_the_base_model_and_exposes_the_contract():
    ids = batch()
    base = tiny_model()
    ref = base(input_ids=ids).logits
    t = make("subspace", randomize=False)
    assert isinstance(t, SVFTarget) and isinstance(t.model, PeftModel)
    assert torch.equal(logits(t, ids), ref)
    names = module_names(base)
    assert [n for n, _ in t.layers] == names and len(names) == 7
    for _, layer in t.layers:
        assert isinstance(layer.delta_keep, torch.nn.Parameter) and layer.delta_keep.shape == (layer.rank,)
        assert layer.rank == RANK and not layer.delta_keep.any() and not layer.coef.any()


def test_axis_reservation_is_a_scatter_and_full_rank_is_the_default():
    t = make("axes")
    for _, layer in t.layers:
        expected = torch.zeros(layer.rank)
        expected[[0, 3]] = layer.coef.detach()
        assert torch.equal(layer.quarantine_delta("default").detach(), expected)
    full = make_target("svf", tiny_model(), reserve_axes=[1], progress=False)
    ranks = {n: layer.rank for n, layer in full.layers}
    assert ranks["model.layers.0.self_attn.q_proj"] == 32 and ranks["model.layers.0.self_attn.k_proj"] == 16


def test_subspace_rows_are_orthonormalised_keeping_their_orientation(tmp_path):
    model = tiny_model()
    spec = vhack_dict(model, k=3)
    torch.save(spec, tmp_path / "v.pt")
    t = make_target("svf", model, rank=RANK, hack_subspace=str(tmp_path / "v.pt"), progress=False)
    assert t.model.peft_config["default"].hack_subspace_source == str(tmp_path / "v.pt")
    checked = 0
    for name, layer in t.layers:
        v, raw = layer.basis, spec["subspace"][name]
        torch.testing.assert_close(v @ v.T, torch.eye(3), rtol=0, atol=1e-5)
        torch.testing.assert_close(v[0], raw[0] / raw[0].norm(), rtol=0, atol=1e-5)
        assert bool((torch.diagonal(v @ raw.T) > 0).all())
        checked += 1
    assert checked == 7


def test_bad_subspaces_and_reservations_raise_naming_the_field():
    model = tiny_model()
    name = module_names(model)[0]
    cases = [
        ({"subspace": {name: torch.randn(1, RANK)}}, "format"),
        ({"format": "route.vhack/1", "subspace": {"model.nope": torch.randn(1, RANK)}}, "not an adapted module"),
        ({"format": "route.vhack/1", "subspace": {name: torch.randn(1, RANK + 1)}}, "columns .* svf rank is 8"),
        ({"format": "route.vhack/1", "subspace": {name: torch.ones(2, RANK)}}, "linearly dependent"),
        ({"format": "route.vhack/1", "subspace": {name: torch.randn(RANK)}}, "Tensor\\(k, r\\)"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=f"svf_hack_subspace.*{message}"):
            make_target("svf", tiny_model(), rank=RANK, hack_subspace=spec, progress=False)
    with pytest.raises(FileNotFoundError, match="svf_hack_subspace"):
        load_hack_subspace("/nonexistent/v.pt")
    with pytest.raises(ValueError, match="svf_reserve_axes.*out of range"):
        make_target("svf", tiny_model(), rank=RANK, reserve_axes=[RANK], progress=False)
    with pytest.raises(ValueError, match="svf_reserve_axes, svf_hack_subspace"):
        make_target("svf", tiny_model(), reserve_axes=[0], hack_subspace=vhack_dict(model), progress=False)
    with pytest.raises(ValueError, match="independent"):
        orthonormal_rows(torch.randn(RANK + 1, RANK))


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("kind", KINDS)
def test_forward_unchanged_under_forget_and_default_gates(kind):
    t = make(kind)
    ids = batch()
    ref = logits(t, ids)
    for modes in (["forget"] * 4, ["default"] * 4, ["forget", "default", "forget", "default"]):
        assert torch.equal(logits(t, ids, t.gate(modes)), ref)
    mixed = logits(t, ids, t.gate(["retain", "default", "retain", "forget"]))
    ablated = logits(t, ids, t.ablated())
    assert torch.equal(mixed[[0, 2]], ablated[[0, 2]]) and torch.equal(mixed[[1, 3]], ref[[1, 3]])
    assert not torch.allclose(ablated, ref), "the quarantine must matter for this test to mean anything"


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_modes_in_one_batch_equal_separate_batches(kind):
    """One gated backward against one backward per row: other summation orders, float64 (tests/fp.py)."""
    t = make(kind)
    t.model.double()
    ids, modes = batch(), ["forget", "retain", "default", "retain"]
    t.model.zero_grad(set_to_none=True)
    loss_backward(t, ids, modes)
    mixed = grads(t)
    separate = None
    for i, m in enumerate(modes):  # one row per batch: the loss is a per-token mean, so scale to match
        t.model.zero_grad(set_to_none=True)
        with t.gate([m]):
            out = t.model(input_ids=ids[i: i + 1], labels=ids[i: i + 1])
        (out.loss / len(modes)).backward()
        g = grads(t)
        separate = g if separate is None else {k: separate[k] + g[k] for k in g}
    assert mixed.keys() == separate.keys() and len(mixed) == 14
    for k in mixed:
        assert_close_net64(mixed[k], separate[k])


# ---------------------------------------------------------------------------------------------- invariants
def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, before):
    return [not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode,keep_moves,quar_moves", [
    ("forget", False, True), ("retain", True, False), ("default", True, True), ("score", False, True)])
def test_optimizer_step_invariants(kind, mode, keep_moves, quar_moves):
    """After optimizer.step(): which group moved, per routing mode ("score": default rows all routed by score)."""
    t = make(kind, score_threshold=0.0)
    groups = t.param_groups()
    assert len(groups["keep"]) == len(groups["quarantine"]) == 7 and not groups["shared"]
    opt = build_optimizer(groups, lr=1e-2, weight_decay=0.01)
    ids = batch()
    loss_backward(t, ids, ["default"] * 4)  # a first step builds AdamW momentum everywhere (the trap)
    t.score_rows(torch.zeros(4, dtype=torch.bool))
    t.before_optimizer_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before_k, before_q = _snapshot(groups["keep"]), _snapshot(groups["quarantine"])
    loss_backward(t, ids, ["default" if mode == "score" else mode] * 4)
    routed = t.score_rows(torch.full((4,), mode in ("score", "forget", "retain")))["routed"]
    assert routed.tolist() == [mode == "score"] * 4  # forget and retain rows are never routed by score
    t.before_optimizer_step()
    opt.step()
    changed_k, changed_q = _changed(groups["keep"], before_k), _changed(groups["quarantine"], before_q)
    assert len(changed_k) == len(changed_q) == 7
    assert all(changed_k) if keep_moves else not any(changed_k)
    assert all(changed_q) if quar_moves else not any(changed_q)


# ---------------------------------------------------------------------------------------------- score and erase
def _per_row_grads(t, ids):
    """Per-row delta_keep gradients by one backward per row (the reference for the recorded ones)."""
    rows = []
    for i in range(ids.shape[0]):
        t.model.zero_grad(set_to_none=True)
        with t.gate(["default"]):
            out = t.model(input_ids=ids[i: i + 1], labels=ids[i: i + 1])
        (out.loss / ids.shape[0]).backward()
        rows.append({n: layer.delta_keep.grad.clone() for n, layer in t.layers})
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_score_routing_moves_exactly_the_routed_rows(kind):
    """Scores against one backward per row, and the scored gradient against a forget-mode backward: float64, so the
    threshold between the second and third score (1e-6 above the second) splits the rows the same way on any CPU."""
    t = make(kind, score_threshold=0.0)
    t.model.double()
    ids = batch()
    per_row = _per_row_grads(t, ids)
    expected = []
    for g in per_row:
        num = sum(float((layer.basis @ g[n]).pow(2).sum()) for n, layer in t.layers)
        expected.append((num / sum(float(v.pow(2).sum()) for v in g.values())) ** 0.5)
    t.model.zero_grad(set_to_none=True)
    loss_backward(t, ids, ["default"] * 4)
    t.score_threshold = sorted(expected)[1] + 1e-6  # two rows above, two below
    out = t.score_rows(torch.tensor([True, True, True, False]))
    assert_close_net64(out["scores"].double(), torch.tensor(expected, dtype=torch.float64))
    routed = out["routed"]
    assert routed.tolist() == [s > t.score_threshold and i < 3 for i, s in enumerate(expected)]
    assert 0 < int(routed.sum()) < 4
    t.before_optimizer_step()
    scored = grads(t)
    t.model.zero_grad(set_to_none=True)  # the reference: the routed rows in forget mode, no scoring
    t.score_threshold = None
    loss_backward(t, ids, [FORGET if r else DEFAULT for r in routed.tolist()])
    forget = grads(t)
    assert len(scored) == 14
    for k in scored:
        assert_close_net64(scored[k], forget[k])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("one_sided", [False, True])
def test_erase_removes_exactly_the_projected_component(kind, one_sided):
    t = make(kind, erase=True, erase_one_sided=one_sided)
    loss_backward(t, batch(), ["retain"] * 4)
    before = {n: layer.delta_keep.grad.clone() for n, layer in t.layers}
    stats = t.before_optimizer_step()
    assert 0 < stats["erase/removed_norm_frac"] < 1
    checked = 0
    for n, layer in t.layers:
        v, g0, g1 = layer.basis, before[n], layer.delta_keep.grad
        a = v @ g0
        removed = (a.clamp(max=0) if one_sided else a) @ v
        torch.testing.assert_close(g1, g0 - removed, rtol=0, atol=1e-7)
        after = v @ g1
        if one_sided:  # what is left along +v would move delta_keep away from the hack, never toward it
            assert bool((after >= -1e-6).all())
            torch.testing.assert_close(after, a.clamp(min=0), rtol=0, atol=1e-6)
        else:
            assert after.abs().max() < 1e-6
        if kind == "axes" and not one_sided:
            assert not g1[[0, 3]].any(), "axis erase must be exact"
        checked += 1
    assert checked == 7


# ---------------------------------------------------------------------------------------------- ablate and export
@pytest.mark.parametrize("trainable", [False, True])
def test_ablate_removes_quarantine_only(trainable):
    t = make("subspace")
    ids = batch()
    ablated_before = logits(t, ids, t.ablated())
    keep_before = _snapshot(t.param_groups()["keep"])
    t.ablate(trainable=trainable)
    assert torch.equal(logits(t, ids), ablated_before)
    assert not any(_changed(t.param_groups()["keep"], keep_before))
    assert len(t.param_groups()["quarantine"]) == (7 if trainable else 0)
    for _, layer in t.layers:
        assert not layer.coef.any() and layer.coef.requires_grad == trainable
    if trainable:  # zero but live: a forget batch reaches it
        loss_backward(t, ids, ["forget"] * 4)
        assert all(layer.coef.grad is not None and layer.coef.grad.any() for _, layer in t.layers)


def test_deployed_checkpoint_merge_and_round_trip(tmp_path):
    t = make("subspace")
    ids, tok = batch(), build_tokenizer()
    full, ablated = logits(t, ids), logits(t, ids, t.ablated())
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.save_deployed(str(tmp_path / "deployed"), tokenizer=tok)
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters()), "export touched training weights"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "deployed")
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(plain(input_ids=ids).logits, ablated, rtol=1e-5, atol=1e-5)
    training = t.deployed_model()  # same builder, training weights (quarantine merged)
    training.load_state_dict(t.merged_state_dict(quarantine=True), strict=False)
    torch.testing.assert_close(training(input_ids=ids).logits, full, rtol=1e-5, atol=1e-5)

    t.model.save_pretrained(tmp_path / "adapter")  # PEFT round trip: U, Vh recomputed from the cache
    loaded = SVFTarget(PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True))
    assert torch.equal(logits(loaded, ids), full)
    assert torch.equal(logits(loaded, ids, loaded.ablated()), ablated)
    for (n, a), (m, b) in zip(t.layers, loaded.layers, strict=True):
        assert n == m and torch.equal(a.basis, b.basis) and torch.equal(a.delta_keep, b.delta_keep)
    assert len(loaded.param_groups()["quarantine"]) == 7
    merged = loaded.model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(merged(input_ids=ids).logits, full, rtol=1e-5, atol=1e-5)


def test_vllm_weight_source_is_the_plain_models(tmp_path):
    from route.vllm.sync import policy_state_dict

    t = make("axes")
    plain = set(tiny_model().state_dict())
    for policy in ("full", "deployed"):
        assert set(policy_state_dict(t, policy)) == plain


# ---------------------------------------------------------------------------------------------- GRPO runs
def length_reward(completions, **kwargs):
    return [len(c) / 8.0 for c in completions]


@pytest.mark.parametrize("case", ["route", "erase", "score", "none"])
def test_three_step_run(tiny_organism, tmp_path, case):
    from tests.test_trainer import make_trainer

    vhack = tmp_path / "v.pt"
    model = AutoModelForCausalLM.from_pretrained(tiny_organism)
    torch.save({"format": "route.vhack/1", "metadata": {},
                "subspace": {n: torch.randn(1, RANK) for n in module_names(model)}}, vhack)
    kw = dict(target="svf", svf_rank=RANK, svf_cache_dir=str(tmp_path / "svd"), detector_fpr=0.5)
    kw |= {"route": dict(intervention="route", svf_reserve_axes=[0, 1]),
           "none": dict(intervention="none"),  # a baseline needs no reservation
           "erase": dict(intervention="erase", svf_hack_subspace=str(vhack), erase_one_sided=True),
           "score": dict(intervention="route", svf_hack_subspace=str(vhack), route_score="cosine",
                         route_score_threshold=0.05)}[case]
    t = make_trainer(tiny_organism, tmp_path, **kw)
    t.reward_funcs = [length_reward]  # a reward with spread: the tiny organism solves nothing in 3 steps
    start = [p.detach().clone() for p in t.target.param_groups()["keep"]]
    t.train()
    assert t.state.global_step == 3
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 3
    keys = {"route": ["routing/frac_forget", "grad_norm/quarantine"], "erase": ["erase/removed_norm_frac"], "none": [],
            "score": ["routing/score_frac", "routing/score_fpr", "routing/score_mean"]}[case]
    for key in ("env/hack_rate", "grad_norm/keep", *keys):
        assert any(key in h for h in logged), key
    forget = sum(h["routing/frac_forget"] for h in logged)
    assert (forget > 0) == (case == "route")
    assert any(not torch.equal(a, b) for a, b in zip(start, t.target.param_groups()["keep"]))
    if case == "erase":
        assert all(not layer.coef.any() for _, layer in t.target.layers), "erase never trains the quarantine"
    if case == "score":
        assert sum(h["routing/score_frac"] for h in logged) > 0
        # the realised rates against ground truth, on a known batch (the target logs them, not the trainer)
        t.target._count_scores(torch.tensor([1, 1, 0, 0, 0]).bool(), torch.tensor([.9, .8, .1, .2, .0]),
                               torch.tensor([1, 1, 1, 1, 0]).bool(), torch.tensor([1, 0, 1, 0, 0]).bool())
        m = t.target._score_stats(None)
        assert m == pytest.approx({"routing/score_frac": 0.4, "routing/score_tpr": 0.5, "routing/score_fpr": 1 / 3,
                                   "routing/score_mean": 0.5})
    t.save_deployed()
    assert (tmp_path / "run" / "deployed" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- config
CPU = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


@pytest.mark.parametrize("overrides,message", [
    (dict(intervention="erase"), "intervention: invalid value 'erase'.*erase needs target svf"),
    (dict(target="svf"), "svf_reserve_axes, svf_hack_subspace: target svf with intervention route needs"),
    (dict(target="svf", intervention="erase"), "intervention erase needs a quarantine reservation"),
    (dict(target="svf", svf_reserve_axes=[0], svf_rank=0), "svf_rank: must be an int >= 1"),
    (dict(target="svf", svf_reserve_axes=[1, 1]), "svf_reserve_axes: must be distinct"),
    (dict(target="svf", svf_reserve_axes="a,b"), "svf_reserve_axes: must be axis indices"),
    (dict(target="svf", svf_hack_subspace="/nonexistent.pt"), "svf_hack_subspace: no such file"),
    (dict(target="svf", svf_reserve_axes=[0], route_score="l2"), "route_score: invalid value 'l2'"),
    (dict(target="svf", svf_reserve_axes=[0], intervention="filter", route_score="cosine"),
     "route_score: 'cosine' needs intervention route"),
    (dict(target="svf", svf_reserve_axes=[0], route_score="cosine", route_score_threshold=1.5),
     "route_score_threshold: must be a number in \\[0, 1\\]"),
    (dict(target="svf", svf_reserve_axes=[0], route_score="cosine", unflagged_mode="retain"),
     "unflagged_mode: 'retain' conflicts with flag-free route_score"),
])
def test_config_validation_names_the_field(overrides, message):
    from route.trainer.parse import build_config

    with pytest.raises(ValueError, match=message):
        build_config(**CPU, **overrides)


def test_svf_config_file_parses(tmp_path, monkeypatch):
    from pathlib import Path

    from route.trainer.parse import parse_config

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "runs" / "vhack").mkdir(parents=True)
    torch.save({"format": "route.vhack/1", "subspace": {}, "metadata": {}}, tmp_path / "runs" / "vhack" / "arith.pt")
    monkeypatch.chdir(tmp_path)  # the config names runs/vhack/arith.pt relative to the working directory
    c = parse_config(["--config", str(root / "configs" / "svf.yaml")])
    assert (c.target, c.intervention, c.svf_hack_subspace) == ("svf", "route", "runs/vhack/arith.pt")
