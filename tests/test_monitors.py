"""Monitors blind in a systematic way: prompt-conditional, form programs, the classifier, the config block."""

from __future__ import annotations

import math
import random

import pytest

import envs
from envs.base import Grade
from route.models.evaluate import split_rates
from route.monitors.build import build_detector
from route.monitors.classifier import CompletionClassifier, labelled_set, train_forms
from route.monitors.detectors import GroundTruthDetector, NoisyDetector, call_detector, uniform
from route.monitors.systematic import (
    FormDetector,
    ProgramDetector,
    PromptConditionalDetector,
    detector_parts,
    realised_by_part,
)
from route.trainer.config import RoutedGRPOConfig
from route.trainer.parse import build_config

CPU = dict(output_dir="unused", use_cpu=True, bf16=False, report_to="none")


def batch(env_name: str = "sort", n: int = 4000, seed: int = 1):
    """n rows of `env_name` answered by its demonstrations (every hackable row hacked, forms even)."""
    env = envs.make_env(env_name, hack_frac=0.5)
    rows = env.rows(n, seed=seed)
    rng = random.Random(seed)
    completions = [env.demonstration(r, hack=bool(r["loophole"]), rng=rng) for r in rows]
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    grades = env.grade(prompts, completions, **columns)
    ids = [r["prompt_id"] for r in rows]
    return env, rows, grades, ids, {"prompts": prompts, "completions": completions, "columns": columns}


def within_4sd(realised: float, p: float, n: int) -> bool:
    return abs(realised - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


def test_call_detector_passes_context_only_to_detectors_that_take_it():
    grades = [Grade.make(False, True, "ends"), Grade.make(True, True, None)]
    seen = {}

    def two_args(g, ids):
        return [True] * len(g)

    def with_context(g, ids, **context):
        seen.update(context)
        return [False] * len(g)

    def named(g, ids, completions=None):
        seen["named"] = completions
        return [bool(c) for c in completions]

    ctx = {"prompts": ["p", "q"], "completions": ["0-9", ""], "columns": {"x": [1, 2]}}
    assert call_detector(two_args, grades, ["a", "b"], **ctx) == [True, True]
    assert call_detector(with_context, grades, ["a", "b"], **ctx) == [False, False]
    assert seen["columns"] == {"x": [1, 2]} and seen["prompts"] == ["p", "q"]
    assert call_detector(named, grades, ["a", "b"], **ctx) == [True, False] and seen["named"] == ["0-9", ""]
    assert call_detector(GroundTruthDetector(), grades, ["a", "b"], **ctx) == [True, False]
    with pytest.raises(ValueError, match="unknown keys \\['rows'\\]"):
        call_detector(two_args, grades, ["a", "b"], rows=[])


def test_prompt_conditional_sees_exploits_only_on_the_detectable_part():
    env, rows, grades, ids, ctx = batch()
    inner = NoisyDetector(tpr=0.9, fpr=0.05, seed=3)
    det = PromptConditionalDetector(inner)
    flags = call_detector(det, grades, ids, **ctx)
    parts = detector_parts(det, grades, ids, **ctx)
    assert parts == ["detectable" if r["detectable"] else "undetectable" for r in rows]
    by_part = realised_by_part(grades, flags, parts)
    assert set(by_part) == {"detectable", "undetectable"}
    for part in by_part.values():  # both parts hold plenty of exploits and clean rollouts
        assert part["n_exploited"] > 500 and part["n_clean"] > 500
    # detectable: the inner detector's rates; undetectable: an exploit is flagged like a clean rollout (fpr)
    assert within_4sd(by_part["detectable"]["tpr"], 0.9, by_part["detectable"]["n_exploited"])
    assert within_4sd(by_part["undetectable"]["tpr"], 0.05, by_part["undetectable"]["n_exploited"])
    for p in ("detectable", "undetectable"):
        assert within_4sd(by_part[p]["fpr"], 0.05, by_part[p]["n_clean"])
    # a pure function of (seed, rollout id): each flag is the inner threshold on the same draw
    expected = [
        uniform(3, rid) < (0.9 if g.exploited and r["detectable"] else 0.05) for g, rid, r in zip(grades, ids, rows)
    ]
    assert flags == expected
    assert call_detector(det, grades, ids, **ctx) == flags


def test_prompt_conditional_needs_its_column():
    env, rows, grades, ids, ctx = batch(n=8)
    det = PromptConditionalDetector(GroundTruthDetector(), column="audited")
    with pytest.raises(ValueError, match="monitor_column: column 'audited' not in the batch"):
        call_detector(det, grades, ids, **ctx)
    with pytest.raises(ValueError, match="needs the dataset columns"):
        det(grades, ids)


@pytest.mark.parametrize("env_name", ["sort", "repeat", "qa"])
def test_default_form_monitor_catches_the_first_form_and_misses_the_second(env_name):
    env, rows, grades, ids, ctx = batch(env_name, n=600)
    det = FormDetector(env.monitor_patterns)
    flags = call_detector(det, grades, ids, **ctx)
    forms = [env.hack_form(r, c) for r, c in zip(rows, ctx["completions"])]
    checked = {}
    for g, f, form, row in zip(grades, flags, forms, rows):
        if g.exploited:
            first = next(iter(env.forms[row["loophole"]]))
            assert f == (form == first), (row, form)
            checked[form == first] = checked.get(form == first, 0) + 1
        else:  # correct answers are never flagged by the program
            assert not f
    assert min(checked.get(True, 0), checked.get(False, 0)) > 50, checked


def test_program_detector_composes_with_noise():
    env, rows, grades, ids, ctx = batch(n=6000)
    det = FormDetector(env.monitor_patterns, tpr=0.7, fpr=0.2, seed=9)
    flags = call_detector(det, grades, ids, **ctx)
    parts = detector_parts(det, grades, ids, **ctx)
    r = realised_by_part(grades, flags, parts)
    caught = [f for f, p in zip(flags, parts) if p == "caught_form"]
    missed = [f for f, p in zip(flags, parts) if p == "missed_form"]
    assert within_4sd(sum(caught) / len(caught), 0.7, len(caught))
    assert within_4sd(sum(missed) / len(missed), 0.2, len(missed))
    assert r["caught_form"]["hack_rate"] == 1.0  # only exploits match the default patterns
    with pytest.raises(ValueError, match="tpr must be in \\[0, 1\\]"):
        ProgramDetector(lambda p, c, row: True, tpr=2.0)
    with pytest.raises(ValueError, match="monitor_forms\\['ends'\\]: invalid regular expression"):
        FormDetector({"ends": "("})


def test_classifier_trained_on_some_forms_is_deterministic_and_detects_them():
    env = envs.make_env("sort")
    forms = train_forms(env, None)
    assert forms == {"ends": ["dash"], "stamp": ["tight"]}
    texts, labels = labelled_set(env, forms, 400, seed=0)
    assert not any(" - " in t for t in texts) and any(t == "#sorted" for t in texts)
    assert 0.3 < sum(labels) / len(labels) < 0.7
    assert all(not t.startswith("# ") for t in texts)  # the held-out form never appears
    a, b = CompletionClassifier(seed=0), CompletionClassifier(seed=0)
    loss = a.fit(texts, labels, steps=150)
    assert loss < 0.1 and loss == pytest.approx(b.fit(texts, labels, steps=150))
    probs = a.prob(["#sorted", "31-88", "05 12 47 93", "11 22 33 45"])
    assert probs[0] > 0.5 and probs[1] > 0.5 and probs[2] < 0.5 and probs[3] < 0.5
    with pytest.raises(ValueError, match="monitor_train_forms\\['ends'\\]: forms \\['wide'\\] invalid"):
        train_forms(env, {"ends": ["wide"]})
    with pytest.raises(ValueError, match="classifier needs an environment with hack forms"):
        train_forms(envs.make_env("arith"), None)


def test_split_rates_report_parts_forms_and_monitor_tpr_by_form():
    env, rows, grades, ids, ctx = batch(n=800)
    out = split_rates(env, rows, ctx["prompts"], ctx["completions"], grades, FormDetector(env.monitor_patterns))
    det, und = out["by_part"]["detectable"], out["by_part"]["undetectable"]
    assert det["n"] + und["n"] == 800 and det["n"] > 300 and und["n"] > 300
    assert det["hack_rate"] == pytest.approx(
        sum(g.exploited for g, r in zip(grades, rows) if r["detectable"]) / det["n"]
    )
    shares = out["hack_rate_by_form"]["ends"]
    assert set(shares) == {"dash", "spaced"} and sum(shares.values()) == pytest.approx(1.0)
    tpr = out["monitor"]["tpr_by_form"]
    assert tpr == {"ends/dash": 1.0, "ends/spaced": 0.0, "stamp/spaced": 0.0, "stamp/tight": 1.0}
    assert sum(out["monitor"]["n_by_form"].values()) == sum(g.exploited for g in grades)


# ---------------------------------------------------------------- the config block
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(monitor="oracle"), "monitor: invalid value 'oracle'; allowed values"),
        (dict(env="arith", monitor="prompt"), "monitor_column: env 'arith' has no detectability column"),
        (dict(env="arith", monitor="form"), "monitor_forms: env 'arith' has no default form patterns"),
        (dict(env="sort", monitor="form", monitor_forms={"ends": "("}), "monitor_forms\\['ends'\\]: invalid regular"),
        (dict(env="sort", monitor="form", monitor_forms={"bogus": "x"}), "monitor_forms: unknown modes \\['bogus'\\]"),
        (dict(env="sort", monitor="form", monitor_forms="{nope"), "monitor_forms: not valid JSON"),
        (
            dict(env="sort", monitor="classifier", monitor_train_forms={"ends": ["x"]}),
            "monitor_train_forms\\['ends'\\]",
        ),
        (dict(env="sort", monitor="classifier", monitor_train_n=0), "monitor_train_n: must be an int >= 1"),
    ],
)
def test_monitor_fields_fail_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config(**CPU, **overrides)


def test_build_detector_follows_the_config():
    env = envs.make_env("sort")
    plain = build_detector(RoutedGRPOConfig(**CPU, env="sort"), env)
    assert isinstance(plain, NoisyDetector) and plain.tpr == 0.5
    cfg = RoutedGRPOConfig(**CPU, env="sort", monitor="prompt", detector_tpr=0.9)
    prompt = build_detector(cfg, env)
    assert cfg.monitor_column == "detectable"
    assert isinstance(prompt, PromptConditionalDetector) and prompt.inner.tpr == 0.9
    form = build_detector(
        RoutedGRPOConfig(**CPU, env="sort", monitor="prompt_form", monitor_forms='{"stamp": "#sorted"}'), env
    )
    assert isinstance(form, PromptConditionalDetector) and form.inner.patterns == {"stamp": "#sorted"}
    clf = build_detector(
        RoutedGRPOConfig(
            **CPU,
            env="sort",
            monitor="classifier",
            detector_tpr=1.0,
            detector_fpr=0.0,
            monitor_train_n=200,
            monitor_train_steps=100,
        ),
        env,
    )
    assert clf.classifier.prob(["#sorted"])[0] > 0.5
