"""The trainer with monitors: the detector gets the batch context, per-part rates are logged, configs build."""

from __future__ import annotations

from route.monitors import PromptConditionalDetector
from tests.test_trainer import make_trainer


class Recorder:
    """Flags rollouts on the watched channel and records the context it was called with."""

    def __init__(self):
        self.calls = []

    def parts(self, grades, rollout_ids, **context):
        return ["detectable" if d else "undetectable" for d in context["columns"]["detectable"]]

    def __call__(self, grades, rollout_ids, **context):
        self.calls.append(context)
        return list(context["columns"]["detectable"])


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
    )
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
    assert {"routing/hack_rate/detectable", "routing/hack_rate/undetectable"} & set(logged[0])


def test_config_monitor_builds_the_prompt_conditional_detector(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, env="qa", monitor="prompt", detector_tpr=0.9, max_steps=1)
    assert isinstance(t.detector, PromptConditionalDetector) and t.detector.column == "detectable"
    t.train()
    assert any(
        "routing/hack_rate/detectable" in h or "routing/hack_rate/undetectable" in h for h in t.state.log_history
    )
