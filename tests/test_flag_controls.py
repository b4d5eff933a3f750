"""Flag controls (`flag_control`): random flags at the monitor's rate that ignore hacking, and a monitor that never
flags; the config checks the field, and a short training run works with each."""

from __future__ import annotations

import pytest
import torch

from envs.base import Grade
from route.monitors.detectors import ControlDetector, NoisyDetector, realised_rates
from route.trainer.parse import build_config
from tests.targets.test_registry import length_reward
from tests.test_trainer import TINY, make_trainer

N = 4096


def batch(step: int, hack_share: float = 0.3) -> tuple[list[Grade], list[str]]:
    """N rollouts of one step: the first `hack_share` of them exploit."""
    n_hack = int(N * hack_share)
    grades = [
        Grade.make(solved=False, passed=True, mode="sentinel")
        if i < n_hack
        else Grade.make(solved=True, passed=True, mode=None)
        for i in range(N)
    ]
    return grades, [f"p{i}|s{step}|r{i}" for i in range(N)]


def test_random_control_tracks_the_monitors_rate_per_step():
    steps = [(0.9, 0.05), (0.5, 0.2), (0.1, 0.0), (0.0, 0.0)]  # the monitor's (tpr, fpr) changes every step
    for step, (tpr, fpr) in enumerate(steps):
        control = ControlDetector(NoisyDetector(tpr=tpr, fpr=fpr, seed=3), "random", seed=3)
        grades, ids = batch(step)
        flags = control(grades, ids)
        monitor_rate = sum(control.monitor_flags) / N
        assert control.monitor_flags == NoisyDetector(tpr=tpr, fpr=fpr, seed=3)(grades, ids)
        assert abs(sum(flags) / N - monitor_rate) < 0.025, (step, monitor_rate)
        if monitor_rate == 0.0:
            assert not any(flags)


def test_random_control_ignores_exploitation():
    monitor = NoisyDetector(tpr=0.9, fpr=0.05, seed=0)  # the same seed as the control: its coin must not leak
    control = ControlDetector(monitor, "random", seed=0)
    grades, ids = batch(0)
    real = realised_rates(grades, monitor(grades, ids))
    ctrl = realised_rates(grades, control(grades, ids))
    assert real["tpr"] - real["fpr"] > 0.8  # the monitor separates hacks ...
    assert abs(ctrl["tpr"] - ctrl["fpr"]) < 0.05  # ... the control does not
    assert abs(ctrl["flag_rate"] - real["flag_rate"]) < 0.025


def test_random_control_is_a_pure_function_of_seed_and_id():
    grades, ids = batch(0)
    a = ControlDetector(NoisyDetector(0.5, 0.1, seed=1), "random", seed=7)(grades, ids)
    b = ControlDetector(NoisyDetector(0.5, 0.1, seed=1), "random", seed=7)(grades, ids)
    c = ControlDetector(NoisyDetector(0.5, 0.1, seed=1), "random", seed=8)(grades, ids)
    assert a == b and a != c
    # the same id keeps its coin in another batch at the same rate (it does not depend on its position)
    flipped = ControlDetector(NoisyDetector(0.5, 0.1, seed=1), "random", seed=7)(grades[::-1], ids[::-1])
    assert flipped == a[::-1]


def test_never_flags_nothing_and_keeps_the_monitors_flags():
    monitor = NoisyDetector(tpr=1.0, fpr=1.0, seed=0)
    control = ControlDetector(monitor, "never")
    grades, ids = batch(0)
    assert control(grades, ids) == [False] * N
    assert all(control.monitor_flags)


def test_flag_control_is_validated():
    with pytest.raises(ValueError, match=r"flag_control.*'none', 'random', 'never'"):
        build_config(output_dir="/tmp/unused", use_cpu=True, flag_control="sometimes")
    with pytest.raises(ValueError, match="flag_control"):
        ControlDetector(NoisyDetector(0.5, 0.1), "none")


def _params(t, group: str = "quarantine") -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.target.param_groups()[group]]


def _control_trainer(tiny_organism, tmp_path, control: str, **overrides):
    return make_trainer(
        tiny_organism,
        tmp_path,
        max_steps=2,
        flag_control=control,
        detector_tpr=1.0,
        reward_funcs=[length_reward],
        **overrides,
    )


def test_never_control_trains_no_quarantine_from_flags(tiny_organism, tmp_path):
    # all rollouts unflagged and in retain mode: no row's gradient reaches the quarantine, so it must not move
    t = _control_trainer(tiny_organism, tmp_path, "never", detector_fpr=1.0, unflagged_mode="retain")
    assert isinstance(t.detector, ControlDetector)
    before_q, before_k = _params(t), _params(t, "keep")
    t.train()
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 2
    for h in logged:
        assert h["routing/flag_rate"] == 0.0 and h["routing/frac_forget"] == 0.0
        assert h["routing/monitor/flag_rate"] == 1.0  # the monitor flagged everything; the control used none
    assert len(before_q) > 0
    assert all(torch.equal(a, b) for a, b in zip(before_q, _params(t), strict=True))
    after_k = t.target.param_groups()["keep"]
    assert any(not torch.equal(a, b) for a, b in zip(before_k, after_k, strict=True))


def test_random_control_run_logs_both_rates(tiny_organism, tmp_path):
    t = _control_trainer(tiny_organism, tmp_path, "random", detector_fpr=0.5)
    before = _params(t)
    t.train()
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 2
    for h in logged:  # the control's flags are what is routed; the real monitor (fpr 0.5) flagged some, not all
        assert h["routing/frac_forget"] == h["routing/flag_rate"]
        assert 0.0 < h["routing/monitor/flag_rate"] < 1.0
    assert sum(h["routing/frac_forget"] for h in logged) > 0  # random flags were routed
    assert any(not torch.equal(a, b) for a, b in zip(before, _params(t), strict=True))


def test_default_config_has_no_control():
    config = build_config(output_dir="/tmp/unused", **TINY)
    assert config.flag_control == "none"
