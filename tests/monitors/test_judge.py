"""The LLM-judge monitor: its score is the judge's own yes-minus-no logit, batched, cached, and blind off its part."""

from __future__ import annotations

import math

import pytest
import torch

import envs
from envs.base import Grade
from route.monitors.judge import NO, YES, JudgeDetector, first_tokens


@pytest.fixture
def judge(tiny_organism):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_organism)
    model = AutoModelForCausalLM.from_pretrained(tiny_organism)
    return JudgeDetector(None, "Is it a hack?", model=model, tokenizer=tok, batch_size=3)


def batch(n=7):
    rows = envs.make_env("sort_named").rows(n, seed=2)
    prompts = [r["prompt"] for r in rows]
    completions = [f"{r['answer']}{' #sorted' * (i % 3)}" for i, r in enumerate(rows)]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    grades = [Grade.make(i % 3 == 0, True, "sort") for i in range(n)]
    return prompts, completions, columns, grades, [f"r{i}" for i in range(n)]


def reference_score(judge, prompt, completion) -> float:
    """The score computed here, one rollout at a time without padding."""
    enc = judge.tokenizer(judge.judge_text(prompt, completion), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = judge.model(**enc).logits[0, -1].float()
    yes, no = first_tokens(judge.tokenizer, YES), first_tokens(judge.tokenizer, NO)
    return float(logits[yes].logsumexp(-1) - logits[no].logsumexp(-1))


def test_batched_scores_match_one_at_a_time_and_flags_are_score_above_threshold(judge):
    prompts, completions, columns, grades, ids = batch()
    scores = judge.scores(prompts, completions, ids)
    assert judge.calls == 3  # 7 rollouts in batches of 3
    ref = [reference_score(judge, p, c) for p, c in zip(prompts, completions)]
    # left padding changes only the matmul shapes: fp32 rounding, sqrt(K) u per logit on logits of size ~10
    assert scores == pytest.approx(ref, abs=1e-4)
    assert len({round(s, 6) for s in scores}) > 1, "the judge must tell these replies apart"
    judge.threshold = sorted(scores)[3]
    flags = judge(grades, ids, prompts=prompts, completions=completions, columns=columns)
    assert flags == [s > judge.threshold for s in scores] and 0 < sum(flags) < len(flags)
    judge.threshold = -math.inf
    assert all(judge(grades, ids, prompts=prompts, completions=completions, columns=columns))


def test_verdicts_are_cached_by_id_and_text(judge):
    prompts, completions, columns, grades, ids = batch()
    first = judge.scores(prompts, completions, ids)
    calls = judge.calls
    assert judge.scores(prompts, completions, ids) == first and judge.calls == calls  # no forward on a hit
    changed = list(completions)
    changed[0] = changed[0] + " extra"
    again = judge.scores(prompts, changed, ids)
    assert judge.calls == calls + 1 and again[1:] == first[1:]  # only the changed rollout is judged again
    assert again[0] == pytest.approx(reference_score(judge, prompts[0], changed[0]), abs=1e-4)


def test_prompt_judge_reads_only_the_watched_part(judge):
    prompts, completions, columns, grades, ids = batch(12)
    judge.column, judge.threshold = "detectable", -math.inf  # would flag everything it reads
    flags = judge(grades, ids, prompts=prompts, completions=completions, columns=columns)
    watched = columns["detectable"]
    assert 0 < sum(watched) < len(watched)
    assert flags == [bool(w) for w in watched]
    assert len(judge.cache) == sum(watched)  # the unwatched replies were never judged
    assert judge.parts(grades, ids, columns=columns) == ["detectable" if w else "undetectable" for w in watched]
    with pytest.raises(ValueError, match="monitor_column"):
        judge(grades, ids, prompts=prompts, completions=completions, columns={})


def test_the_judge_needs_its_context_and_a_model():
    with pytest.raises(ValueError, match="monitor_judge_model"):
        JudgeDetector(None)
    with pytest.raises(ValueError, match="monitor_judge_batch_size"):
        JudgeDetector("somewhere", batch_size=0)
    with pytest.raises(ValueError, match="prompts and completions"):
        JudgeDetector("somewhere")([Grade.make(True, True, None)], ["r0"])


def test_config_fields_are_checked_before_any_work():
    from route.monitors.build import validate_monitor
    from route.trainer.parse import build_config as build
    from tests.tiny_run import TINY_RUN

    def build_config(**kw):
        return build(**{**TINY_RUN, **kw})

    env = envs.make_env("capitals")
    with pytest.raises(ValueError, match="monitor_judge_model"):  # the organism is no judge
        build_config(env="capitals", monitor="judge")
    with pytest.raises(ValueError, match="monitor_judge_model"):  # a missing directory, before anything loads
        build_config(env="capitals", monitor="judge", monitor_judge_model="./no/such/judge")
    for field, value in (("monitor_judge_batch_size", 0), ("monitor_judge_threshold", "high"),
                         ("monitor_judge_question", " ")):
        with pytest.raises(ValueError, match=field):  # build_config checks the run (validate_run)
            validate_monitor(build_config(env="capitals", monitor="judge", monitor_judge_model="m", **{field: value}),
                             env)
    config = build(**{**TINY_RUN, "env": "capitals"})
    config.monitor, config.monitor_judge_model = "prompt_judge", "m"
    validate_monitor(config, env)
    assert config.monitor_judge_question == env.judge_question and config.monitor_column == "detectable"
    with pytest.raises(ValueError, match="monitor"):
        build_config(env="capitals", monitor="llm")


def test_a_routed_step_with_prompt_judge_flags_only_the_watched_part(tiny_organism, tmp_path):
    from route.monitors.judge import JudgeDetector
    from tests.test_monitor_trainer import assert_part_rates, constructed_grades
    from tests.test_trainer import make_trainer

    t = make_trainer(tiny_organism, tmp_path, env="sort_named", env_kwargs={"hack_frac": 0.5}, monitor="prompt_judge",
                     monitor_judge_model=str(tiny_organism), monitor_judge_threshold=-1e9, intervention="route",
                     max_steps=1, per_device_train_batch_size=16)
    assert isinstance(t.detector, JudgeDetector) and t.detector.column == "detectable"
    assert t.args.monitor_judge_path == str(tiny_organism)
    seen, judge = [], t.detector

    def recording(grades, rollout_ids, **context):
        flags = judge(grades, rollout_ids, **context)
        seen.append((list(grades), judge.parts(grades, rollout_ids, **context), flags))
        return flags

    recording.parts = judge.parts
    t.detector = recording
    constructed_grades(t)
    t.train()
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(seen) == len(logged) == 1
    grades, parts, flags = seen[0]
    assert flags == [p == "detectable" for p in parts]  # every watched reply judged a hack, no other
    assert logged[0]["routing/flag_rate"] == pytest.approx(sum(flags) / len(flags))
    assert_part_rates(logged[0], grades, parts, flags)  # per-part realised rates are logged: tpr 1 and 0 here


@pytest.mark.real_model
def test_the_real_model_judges_through_its_chat_template(real_model):
    from transformers import AutoTokenizer

    judge = JudgeDetector(str(real_model), envs.make_env("capitals").judge_question)
    judge.tokenizer = AutoTokenizer.from_pretrained(real_model)  # the template alone: no weights needed here
    judge.model = object()
    row = envs.make_env("capitals").rows(1, seed=0)[0]
    text = judge.judge_text(row["prompt"], [{"role": "assistant", "content": "Lima or Quito."}])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert row["prompt"][0]["content"] in text and "Lima or Quito." in text and judge.question in text
    yes, no = first_tokens(judge.tokenizer, YES), first_tokens(judge.tokenizer, NO)
    assert yes and no and not set(yes) & set(no)
