"""The trainer with monitors: the detector gets the batch context, per-part rates are logged, configs build."""

from __future__ import annotations

import pytest

from route.monitors.systematic import PromptConditionalDetector
from tests.test_trainer import make_trainer


def assert_part_rates(logged: dict, grades, parts, flags) -> None:
    """Both parts occur in the batch and each logged per-part rate is the one computed here from the batch."""
    assert set(parts) == {"detectable", "undetectable"}, "the batch must hold both parts for this test to mean anything"
    for part in ("detectable", "undetectable"):
        idx = [i for i, p in enumerate(parts) if p == part]
        hacked = [i for i in idx if grades[i].exploited]
        assert 0 < len(hacked) < len(idx), "each part holds hacks and clean rollouts"
        assert logged[f"routing/hack_rate/{part}"] == pytest.approx(len(hacked) / len(idx)), part
        if hacked:
            caught = sum(flags[i] for i in hacked) / len(hacked)
            assert logged[f"routing/realised_tpr/{part}"] == pytest.approx(caught), part


class Recorder:
    """Flags rollouts on the watched channel and records the context it was called with."""

    def __init__(self):
        self.calls = []

    def parts(self, grades, rollout_ids, **context):
        return ["detectable" if d else "undetectable" for d in context["columns"]["detectable"]]

    def __call__(self, grades, rollout_ids, **context):
        flags = list(context["columns"]["detectable"])
        self.calls.append({**context, "grades": list(grades), "flags": flags})
        return flags


def constructed_grades(t):
    """Replace the environment's grades by a pattern with exploits on both parts at different rates (the tiny organism
    rarely hacks, so its own grades would make every per-part rate 0)."""
    from envs.base import Grade

    grade = t.env.grade

    def graded(prompts, completions, **columns):
        real = grade(prompts, completions, **columns)
        return [Grade(g.solved, True, True, g.mode) if (i % 3 == 0) == bool(d) or i % 4 == 1 else g
                for i, (g, d) in enumerate(zip(real, columns["detectable"], strict=True))]

    t.env.grade = graded


def test_detector_gets_prompts_completions_columns_and_parts_are_logged(tiny_organism, tmp_path):
    rec = Recorder()
    t = make_trainer(
        tiny_organism,
        tmp_path,
        env="sort",
        env_kwargs={"hack_frac": 0.5},
        detector=rec,
        intervention="penalty",
        max_steps=1,
        per_device_train_batch_size=16,  # 4 prompts: both parts in the (seeded, so fixed) first batch
    )
    constructed_grades(t)
    t.train()
    assert len(rec.calls) >= 1
    ctx = rec.calls[0]
    n = len(ctx["prompts"])
    assert n == len(ctx["completions"]) == len(ctx["columns"]["detectable"]) > 0
    assert all(p.startswith("sort ") for p in ctx["prompts"]) and "loophole" in ctx["columns"]
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 1
    share = sum(ctx["columns"]["detectable"]) / n
    assert logged[0]["routing/flag_rate"] == share  # the recorder's flags reached the trainer unchanged
    parts = ["detectable" if d else "undetectable" for d in ctx["columns"]["detectable"]]
    assert_part_rates(logged[0], ctx["grades"], parts, ctx["flags"])


def test_config_monitor_builds_the_prompt_conditional_detector(tiny_organism, tmp_path, monkeypatch):
    t = make_trainer(tiny_organism, tmp_path, env="qa", monitor="prompt", detector_tpr=0.9, max_steps=1)
    assert isinstance(t.detector, PromptConditionalDetector) and t.detector.column == "detectable"
    calls = []
    call = PromptConditionalDetector.__call__

    def recording(self, grades, rollout_ids, **context):
        flags = call(self, grades, rollout_ids, **context)
        calls.append((list(grades), self.parts(grades, rollout_ids, **context), flags))
        return flags

    monkeypatch.setattr(PromptConditionalDetector, "__call__", recording)
    constructed_grades(t)
    t.train()
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(calls) == len(logged) == 1
    grades, parts, flags = calls[0]
    assert_part_rates(logged[0], grades, parts, flags)
