"""Coherence slots on every registered target: a coherence row's forward is the deployed policy's (scale 0) and, after
`optimizer.step()`, only the kept part has moved; other rows train as their routing mode says.

The rows' modes come from the trainer's own rule (`route.trainer.policy.routing_modes`, then
`route.trainer.rollout.coherence_modes`), and the step is the trainer's optimizer (`SkipZeroAdamW`, with weight decay,
so a group that got no gradient would still move if it were stepped).
"""

import pytest
import torch

from route.masks.optim import build_optimizer
from route.trainer.policy import routing_modes
from route.trainer.rollout import coherence_modes
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits
from tests.targets.test_scaled import BUILD

IDS = [f"r{i}" for i in range(4)]
# rows' (flagged, coherence slot) -> which groups move: (keep, quarantine)
CASES = {
    "coherence": ((False, True), (True, False)),  # retain: kept part only
    "coherence, flagged": ((True, True), (False, True)),  # routed as everywhere: quarantine only
    "other": ((False, False), (True, True)),  # default: both
    "other, flagged": ((True, False), (False, True)),  # forget
}


def test_the_cases_cover_every_combination():
    """Built by hand, so checked here: every (flagged, coherence slot) pair once."""
    assert sorted(flags for flags, _ in CASES.values()) == [(a, b) for a in (False, True) for b in (False, True)]


def modes_of(flagged: list[bool], coherence: list[bool]) -> torch.Tensor:
    return coherence_modes(routing_modes(flagged, IDS, intervention="route"), torch.tensor(coherence))


def snapshot(t) -> dict[str, list[torch.Tensor]]:
    return {g: [p.detach().clone() for p in t.param_groups()[g]] for g in ("keep", "quarantine")}


def moved(t, before) -> tuple[bool, bool]:
    now = snapshot(t)
    return tuple(any(not torch.equal(a, b) for a, b in zip(before[g], now[g], strict=True)) for g in before)


@pytest.mark.parametrize("name", sorted(BUILD))
@pytest.mark.parametrize("case", sorted(CASES))
def test_which_groups_move_after_the_step(name, case):
    (flag, coherent), expected = CASES[case]
    t = BUILD[name]()
    modes = modes_of([flag] * 4, [coherent] * 4)
    opt = build_optimizer(t.param_groups(), lr=1e-2, weight_decay=0.1)
    before = snapshot(t)
    ids = batch(4)
    with t.gate(modes):
        t.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert moved(t, before) == expected, (name, case, modes.tolist())


@pytest.mark.parametrize("name", sorted(BUILD))
def test_coherence_rows_forward_at_scale_zero_in_a_mixed_batch(name):
    t = BUILD[name]()
    t.model.double()  # a mixed gate and the whole-batch paths may run different operations: float64 (tests/fp.py)
    modes = modes_of([False, True, False, True], [True, True, False, False])
    ids = batch(4)
    with torch.no_grad():
        gated, deployed, full = logits(t, ids, t.gate(modes)), logits(t, ids, t.ablated()), logits(t, ids)
    assert_close_net64(gated[0], deployed[0])  # coherence, unflagged: the deployed policy
    assert_close_net64(gated[1:], full[1:])  # flagged coherence row (forget), and the other rows: the training policy
    assert not torch.allclose(deployed[0], full[0], atol=1e-4), "the quarantine must matter here"
