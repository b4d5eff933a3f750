"""`rollout_train_scale: sampled` on every registered target: `target.gate(modes, scale=s)` is the modes' rule with the
quarantine times s. Values are `scaled(s)`'s (retain rows: the deployed policy's), an all-default batch at s gets
exactly `scaled(s)`'s gradients, and after `optimizer.step()` only the groups the rule names have moved (at s = 0 a
forget row trains nothing: its kept path is detached and its quarantine contributes 0 * output).

The step is the trainer's optimizer (`SkipZeroAdamW`, with weight decay, so a group that got no gradient would still
move if it were stepped).
"""

import pytest
import torch

from route.masks import DEFAULT, FORGET, RETAIN
from route.masks.optim import build_optimizer
from route.targets import available_targets
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits
from tests.targets.test_coherence_slots import moved, snapshot
from tests.targets.test_scaled import BUILD

# (mode, scale) -> which groups move after the step: (keep, quarantine)
CASES = {
    ("forget", 0.5): (False, True),
    ("forget", 0.0): (False, False),
    ("default", 0.5): (True, True),
    ("default", 0.0): (True, False),
    ("retain", 0.5): (True, False),
}
CODES = {"forget": FORGET, "default": DEFAULT, "retain": RETAIN}


def test_the_matrix_covers_every_target_and_mode():
    """The cases are built from the registry and the modes, so a new target or mode cannot be left out unseen."""
    assert sorted(BUILD) == available_targets()
    assert {mode for mode, _ in CASES} == set(CODES) and {scale for _, scale in CASES} == {0.0, 0.5}


@pytest.mark.parametrize("name", sorted(BUILD))
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_values_are_the_scaled_policy_and_retain_rows_the_deployed_one(name, scale):
    t = BUILD[name]()
    t.model.double()  # a mixed gate and a whole-batch dial may run different operations: float64 (tests/fp.py)
    modes = torch.tensor([FORGET, DEFAULT, RETAIN, DEFAULT])
    ids = batch(4)
    with torch.no_grad():
        gated = logits(t, ids, t.gate(modes, scale=scale))
        at_scale, deployed, full = logits(t, ids, t.scaled(scale)), logits(t, ids, t.ablated()), logits(t, ids)
    assert_close_net64(gated[[0, 1, 3]], at_scale[[0, 1, 3]])
    assert_close_net64(gated[2], deployed[2])
    assert not torch.allclose(at_scale, full, atol=1e-4), "the quarantine must matter for this test to mean anything"


@pytest.mark.parametrize("name", sorted(BUILD))
def test_an_all_default_batch_gets_the_scaled_policys_gradients(name):
    t = BUILD[name]()
    t.model.double()
    ids = batch(4)
    params = [p for g in ("keep", "quarantine") for p in t.param_groups()[g]]
    grads = []
    for ctx in (t.gate(torch.full((4,), DEFAULT), scale=0.5), t.scaled(0.5)):
        for p in params:
            p.grad = None
        with ctx:
            t.model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad.clone() for p in params])
    assert len(grads[0]) == len(params) > 0
    for a, b in zip(*grads, strict=True):
        assert_close_net64(a, b)
    assert any(float(g.abs().sum()) > 0 for g in grads[0][-len(t.param_groups()["quarantine"]) :])


@pytest.mark.parametrize("name", sorted(BUILD))
@pytest.mark.parametrize("case", sorted(CASES))
def test_which_groups_move_after_the_step(name, case):
    (mode, scale), expected = case, CASES[case]
    t = BUILD[name]()
    opt = build_optimizer(t.param_groups(), lr=1e-2, weight_decay=0.1)
    before = snapshot(t)
    ids = batch(4)
    with t.gate(torch.full((4,), CODES[mode]), scale=scale):
        t.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert moved(t, before) == expected, (name, case)


def test_scale_one_and_none_leave_the_gate_unchanged():
    from route.masks import RowGate

    gate = RowGate.from_modes(torch.tensor([FORGET, DEFAULT]))
    assert gate.at_scale(None) is gate and gate.at_scale(1.0) is gate
    with pytest.raises(ValueError, match="scale"):
        gate.at_scale(1.5)
