"""route.trainer.policy: flags -> routing modes, filter's advantage mask, penalty's reward edit; no model, no
trainer."""

import pytest
import torch

from route.masks import DEFAULT, FORGET, RETAIN
from route.trainer.policy import filter_advantages, penalize_rewards, retain_draws, routing_modes

IDS = [f"p|s0|r{i}" for i in range(4)]
FLAGS = [True, False, True, False]


def test_route_sends_flagged_rows_to_forget_and_unflagged_to_default_or_retain():
    assert routing_modes(FLAGS, IDS, intervention="route").tolist() == [FORGET, DEFAULT, FORGET, DEFAULT]
    retain = routing_modes(FLAGS, IDS, intervention="route", unflagged_mode="retain")
    assert retain.tolist() == [FORGET, RETAIN, FORGET, RETAIN]
    ids = [f"p|s0|r{i}" for i in range(4000)]
    half = routing_modes([False] * 4000, ids, intervention="route", unflagged_mode="retain", retain_fraction=0.5)
    assert 0.45 < (half == RETAIN).float().mean().item() < 0.55
    again = routing_modes([False] * 4000, ids, intervention="route", unflagged_mode="retain", retain_fraction=0.5)
    assert torch.equal(half, again)  # a pure function of (seed, rollout id)
    other = routing_modes([False] * 4000, ids, intervention="route", unflagged_mode="retain", retain_fraction=0.5,
                          seed=1)
    assert not torch.equal(half, other)


@pytest.mark.parametrize("intervention", ["none", "filter", "penalty", "erase"])
def test_every_other_intervention_runs_every_row_in_retain(intervention):
    codes = routing_modes(FLAGS, IDS, intervention=intervention, unflagged_mode="retain")
    assert codes.tolist() == [RETAIN] * 4


def test_candidates_run_in_default_and_flags_no_longer_route():
    codes = routing_modes(FLAGS, IDS, intervention="route", candidates=[True, True, False, False])
    assert codes.tolist() == [DEFAULT, DEFAULT, DEFAULT, DEFAULT]  # flagged row 2 is not a candidate: not routed
    codes = routing_modes(FLAGS, IDS, intervention="route", unflagged_mode="retain", candidates=[True, False, True,
                                                                                                    False])
    assert codes.tolist() == [DEFAULT, RETAIN, DEFAULT, RETAIN]


def test_retain_draws_are_seeded_and_rate_matched():
    ids = [f"x{i}" for i in range(2000)]
    assert retain_draws(ids, 0.0, 3) == [False] * 2000 and retain_draws(ids, 1.0, 3) == [True] * 2000
    assert retain_draws(ids, 0.3, 3) == retain_draws(ids, 0.3, 3)
    assert 0.25 < sum(retain_draws(ids, 0.3, 3)) / 2000 < 0.35


def test_filter_zeroes_exactly_the_flagged_advantages():
    adv = torch.tensor([1.0, -2.0, 3.0, 4.0])
    out = filter_advantages(adv, FLAGS)
    assert out.tolist() == [0.0, -2.0, 0.0, 4.0] and adv.tolist() == [1.0, -2.0, 3.0, 4.0]  # out of place
    per_token = torch.ones(4, 3)
    assert filter_advantages(per_token, FLAGS).sum(1).tolist() == [0.0, 3.0, 0.0, 3.0]
    with pytest.raises(ValueError, match="3 flags for 4 rows"):
        filter_advantages(adv, FLAGS[:3])


def test_penalty_lowers_the_weighted_reward_of_flagged_rows_by_lambda():
    rewards = torch.tensor([[1.0, 0.5], [1.0, 0.5], [0.0, 0.5], [0.0, 0.5]])
    weights = torch.tensor([2.0, 1.0])
    before = (rewards * weights).sum(1)
    penalize_rewards(rewards, FLAGS, penalty=0.7, weight=2.0)
    after = (rewards * weights).sum(1)
    torch.testing.assert_close(before - after, torch.tensor([0.7, 0.0, 0.7, 0.0]))
    with pytest.raises(ValueError, match="2 flags for 4 rows"):
        penalize_rewards(rewards, FLAGS[:2], penalty=1.0)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 flags for 4 rollout ids"):
        routing_modes(FLAGS[:3], IDS, intervention="route")
    with pytest.raises(ValueError, match="2 candidates for 4 flags"):
        routing_modes(FLAGS, IDS, intervention="route", candidates=[True, False])


def test_exclusive_routing_modes():
    from route.masks import EXCLUSIVE

    flags, ids = [True, False, False, True], ["a", "b", "c", "d"]
    codes = routing_modes(flags, ids, intervention="route", routing="exclusive")
    assert codes.tolist() == [FORGET, EXCLUSIVE, EXCLUSIVE, FORGET]
    assert routing_modes(flags, ids, intervention="route").tolist() == [FORGET, DEFAULT, DEFAULT, FORGET]
    retain = routing_modes(flags, ids, intervention="route", routing="exclusive", unflagged_mode="retain")
    assert retain.tolist() == [FORGET, RETAIN, RETAIN, FORGET]  # retain draws win over exclusive
    scored = routing_modes(flags, ids, intervention="route", routing="exclusive",
                           candidates=[False, True, False, False])
    assert scored.tolist() == [EXCLUSIVE, DEFAULT, EXCLUSIVE, EXCLUSIVE]  # candidates route themselves later
    assert routing_modes(flags, ids, intervention="none", routing="exclusive").tolist() == [RETAIN] * 4
    with pytest.raises(ValueError, match="^routing: invalid value 'soft'"):
        routing_modes(flags, ids, intervention="route", routing="soft")


@pytest.mark.parametrize(("weight", "factor"), [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (2.0, -1.0)])
def test_route_weight_is_one_minus_the_kept_factor(weight, factor):
    from route.trainer.policy import forget_kept_grad

    assert forget_kept_grad(weight) == factor
