"""route.trainer.metrics: a batch's flags against ground truth, routing-mode shares and environment rates, as the
trainer logs them; a rate whose denominator is empty is left out of the step's mean rather than logged as 0."""

from __future__ import annotations

from collections import defaultdict

import pytest

from envs.base import Grade
from route.masks import DEFAULT, EXCLUSIVE, FORGET, RETAIN
from route.trainer.metrics import log_monitor, log_routing


def grade(solved=False, exploited=False, mode=None):
    return Grade(solved=solved, passed=solved or exploited, exploited=exploited, mode=mode)


def test_rates_of_one_batch_per_part_and_per_loophole_mode():
    grades = [grade(exploited=True, mode="hedge"), grade(exploited=True, mode="hedge"), grade(solved=True),
              grade(), grade(exploited=True, mode="echo")]
    flags = [True, False, True, False, False]
    parts = ["detectable", "undetectable", "detectable", "undetectable", "undetectable"]
    metrics = defaultdict(list)
    log_routing(metrics, grades, flags, [FORGET, DEFAULT, FORGET, DEFAULT, RETAIN], parts, ["hedge", "echo", "agree"])
    assert metrics["routing/flag_rate"] == [0.4]
    assert metrics["routing/realised_tpr"] == [pytest.approx(1 / 3)] and metrics["routing/realised_fpr"] == [0.5]
    assert metrics["routing/hack_rate/detectable"] == [0.5] and metrics["routing/realised_tpr/detectable"] == [1.0]
    assert metrics["routing/hack_rate/undetectable"] == [pytest.approx(2 / 3)]
    assert metrics["routing/realised_tpr/undetectable"] == [0.0]
    assert (metrics["routing/frac_forget"], metrics["routing/frac_default"], metrics["routing/frac_retain"]) == (
        [0.4], [0.4], [0.2])
    assert "routing/frac_exclusive" not in metrics
    assert metrics["env/solve_rate"] == [0.2] and metrics["env/hack_rate"] == [0.6]
    assert metrics["env/hack_rate/hedge"] == [1.0] and metrics["env/hack_rate/echo"] == [1.0]
    assert "env/hack_rate/agree" not in metrics  # no rollout of that mode in the batch


def test_empty_denominators_are_not_logged_and_exclusive_mode_is_counted():
    metrics = defaultdict(list)
    log_routing(metrics, [grade(solved=True), grade()], [False, False], [EXCLUSIVE, DEFAULT], None, ["hedge"],
                exclusive=True)
    assert "routing/realised_tpr" not in metrics and metrics["routing/realised_fpr"] == [0.0]
    assert metrics["routing/frac_exclusive"] == [0.5]
    assert not [k for k in metrics if k.startswith("routing/hack_rate/")]  # no parts: nothing per part
    log_monitor(metrics, [grade(exploited=True, mode="hedge")], [True])
    assert metrics["routing/monitor/flag_rate"] == [1.0] and metrics["routing/monitor/realised_tpr"] == [1.0]
    assert "routing/monitor/realised_fpr" not in metrics
