"""Absorption metrics: per-row gradient norms from the one backward equal separate per-row backwards, per group and
mode; the meter's sets and shares; the metrics change no parameter; they reach the trainer's log."""

from __future__ import annotations

import pytest
import torch

from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import make_target
from route.targets.absorption import AbsorptionMeter, hack_mode_codes
from tests.targets.helpers import batch
from tests.targets.test_registry import length_reward
from tests.targets.test_svf import make as make_svf
from tests.test_trainer import make_trainer

MODES = ["forget", "default", "retain", "default"]


def target(kind: str):
    if kind == "dual_lora":
        torch.manual_seed(0)
        model = build_model(tiny_config(init_range=0.2), build_tokenizer())
        t = make_target("dual_lora", model, keep_rank=4, quarantine_rank=3, lora_alpha=8)  # scalings 2 and 8/3
        with torch.no_grad():  # non-zero B so both paths carry signal
            for _, layer in t.layers:
                for name in ("keep", "quarantine"):
                    layer.lora_B[name].weight.normal_(0, 0.2)
        return t
    if kind == "dual_mlp":
        torch.manual_seed(0)
        model = build_model(tiny_config(init_range=0.2), build_tokenizer())
        t = make_target("dual_mlp", model, keep_units=4, quarantine_units=3)
        with torch.no_grad():  # non-zero output columns so both paths carry signal
            for ps in t.param_groups().values():
                for p in ps:
                    p.normal_(0, 0.2)
        return t
    return make_svf("axes")  # reserved axes 0 and 3, random deltas


def row_losses(t, ids, modes) -> torch.Tensor:
    """Per-row summed token cross-entropy over a fixed count (so a row's loss does not depend on the batch)."""
    with t.gate(modes):
        logits = t.model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1).sum(1) / 37.0


def group_sqnorms(t) -> dict[str, float]:
    groups = t.param_groups()
    return {g: sum(float(p.grad.pow(2).sum()) for p in groups[g] if p.grad is not None) for g in ("keep", "quarantine")}


@pytest.mark.parametrize("kind", ["dual_lora", "dual_mlp", "svf"])
def test_row_norms_equal_separate_backwards(kind):
    t = target(kind)
    ids = batch(n=4)
    assert t.record_row_grads(True)
    row_losses(t, ids, MODES).sum().backward()
    got = t.pop_row_grads()
    assert t.pop_row_grads() is None  # popped
    t.record_row_grads(False)
    checked = 0
    for b, mode in enumerate(MODES):
        t.model.zero_grad(set_to_none=True)
        row_losses(t, ids[b : b + 1], [mode]).sum().backward()
        want = group_sqnorms(t)
        for group in ("keep", "quarantine"):
            assert float(got[group][b]) == pytest.approx(want[group], rel=1e-4, abs=1e-10), (kind, b, mode, group)
            checked += 1
        if mode == "forget":
            assert want["keep"] == 0.0 and want["quarantine"] > 0
        if mode == "retain":
            assert want["quarantine"] == 0.0 and want["keep"] > 0
        if mode == "default":
            assert want["quarantine"] > 0 and want["keep"] > 0
    assert checked == 8


def test_meter_sets_and_shares():
    meter = AbsorptionMeter(["a", "b", "c"], known=["a"])
    flags = torch.tensor([True, False, False, False, False])
    exploited = torch.tensor([True, True, True, False, True])
    hack_mode = torch.tensor([0, 0, 1, -1, 2])
    norms = {"quarantine": torch.tensor([4.0, 1.0, 3.0, 0.0, 1.0]), "keep": torch.tensor([0.0, 3.0, 1.0, 2.0, 1.0])}
    meter.add(norms, flags, exploited, hack_mode)
    m = meter.metrics()
    assert m["absorption/flagged_hack"] == 1.0
    assert m["absorption/missed_hack"] == pytest.approx(5 / 10)  # rows 1, 2, 4
    assert m["absorption/missed_hack/known"] == pytest.approx(1 / 4)  # row 1 (mode a)
    assert m["absorption/missed_hack/held_out"] == pytest.approx(4 / 6)  # rows 2, 4
    assert m["absorption/clean"] == 0.0 and m["absorption/n_clean"] == 1
    assert m["absorption/hack/a"] == pytest.approx(5 / 8)
    assert meter.metrics() == {}  # reset after each step


def test_hack_mode_codes():
    from envs.base import Grade

    grades = [Grade.make(solved=False, passed=True, mode="b"), Grade.make(solved=True, passed=True, mode=None)]
    assert hack_mode_codes(grades, ["a", "b"]).tolist() == [1, -1]


def _trained(tiny_organism, tmp_path, **overrides):
    t = make_trainer(tiny_organism, tmp_path, max_steps=2, reward_funcs=[length_reward], detector_fpr=0.5, **overrides)
    before = {k: v.clone() for k, v in t.target.model.state_dict().items()}
    t.train()
    return t, before


@pytest.mark.parametrize("intervention", ["route", "none"])
def test_metrics_are_logged_and_change_no_parameter(tiny_organism, tmp_path, intervention):
    on, before = _trained(tiny_organism, tmp_path / "on", intervention=intervention, absorption_metrics=True)
    off, _ = _trained(tiny_organism, tmp_path / "off", intervention=intervention, absorption_metrics=False)
    logged = [h for h in on.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 2
    assert all("absorption/n_clean" in h or "absorption/n_missed_hack" in h for h in logged)
    for h in logged:
        for key, value in h.items():
            if key.startswith("absorption/") and "/n_" not in key:
                assert 0.0 <= value <= 1.0, key
    if intervention == "none":  # every rollout is retain: the quarantine is out of the forward and gets nothing
        assert all(h.get("absorption/clean", 0.0) == 0.0 for h in logged)
    assert not any(k.startswith("absorption/") for h in off.state.log_history for k in h)
    after, other = on.target.model.state_dict(), off.target.model.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in after)  # the run trained
    assert all(torch.equal(after[k], other[k]) for k in after), "absorption metrics changed the parameters"


def test_unsupported_target_warns(tiny_organism, tmp_path):
    with pytest.warns(UserWarning, match="absorption_metrics"):
        t = make_trainer(tiny_organism, tmp_path, target="sgtm", absorption_metrics=True)
    assert t._absorption is None
