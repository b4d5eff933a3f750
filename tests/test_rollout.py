"""Rollout-time quarantine scale and coherence slots (route.trainer.rollout): the settings, the draws, the EMA
controller, and the trainer sampling each row from the policy its plan names, with old log-probs under the training
gate. The vLLM path is in tests/test_rollout_vllm.py; which parameter groups move, in
tests/targets/test_coherence_slots.py.
"""

import json
import statistics

import pytest
import torch
from trl import GRPOTrainer

from route.masks import DEFAULT, FORGET, RETAIN
from route.trainer.parse import build_config, parse_config
from route.trainer.rollout import (
    RolloutPlan,
    ScaleController,
    ScaleSpec,
    coherence_groups,
    draw_scale,
    effective_spec,
    parse_scale,
)
from tests.test_trainer import ParityDetector, _scored, group_inputs, make_trainer, randomize_quarantine

CPU = dict(use_cpu=True, bf16=False, report_to="none")
CPU_FLAGS = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
BAD = [
    (dict(rollout_quarantine_scale="sometimes"), "rollout_quarantine_scale: invalid value 'sometimes'; allowed"),
    (dict(rollout_quarantine_scale="1.5"), "rollout_quarantine_scale: invalid value"),
    (dict(rollout_quarantine_scale="0,x"), "rollout_quarantine_scale: invalid value"),
    (dict(rollout_quarantine_scale="0.5", generation_policy="deployed"), "generation_policy, rollout_quarantine_scale"),
    (dict(rollout_scale_target_rate=0.2), "rollout_scale_target_rate: only used with rollout_quarantine_scale=ema"),
    (dict(rollout_quarantine_scale="ema", rollout_scale_ema_weight=1.0), "rollout_scale_ema_weight: must be in"),
    (dict(rollout_quarantine_scale="ema", rollout_scale_gain=0.0), "rollout_scale_gain: must be > 0"),
    (dict(rollout_quarantine_scale="ema", rollout_scale_min=0.6, rollout_scale_max=0.4), "rollout_scale_min, "),
    (dict(coherence_fraction=1.0), "coherence_fraction: must be a number in \\[0, 1\\)"),
    (dict(coherence_fraction=0.25, use_vllm=True), "coherence_fraction: not supported with use_vllm"),
    (dict(rollout_train_scale="half"), "rollout_train_scale: invalid value 'half'; allowed values"),
    (dict(rollout_train_scale="sampled"), "rollout_train_scale: sampled trains each row at the scale"),
]


@pytest.mark.parametrize("fields,message", BAD)
def test_bad_rollout_settings_fail_with_the_field_named(fields, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build_config(output_dir=str(tmp_path), **fields)


def test_scale_spellings_from_flags_yaml_and_python(tmp_path):
    assert parse_scale("0.5") == parse_scale(0.5) == ScaleSpec("fixed", (0.5,))
    assert parse_scale("0.5, 0") == parse_scale([0, 0.5]) == ScaleSpec("set", (0.0, 0.5))
    assert parse_scale("Uniform") == ScaleSpec("uniform") and parse_scale("ema") == ScaleSpec("ema")
    flags = parse_config([*CPU_FLAGS, "--output_dir", str(tmp_path), "--rollout_quarantine_scale", "0,0.5"])
    assert flags.rollout_quarantine_scale == "0.0,0.5"
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"output_dir: {tmp_path}\nrollout_quarantine_scale: 0.25\ncoherence_fraction: 0.25\n")
    from_yaml = parse_config(["--config", str(yaml), *CPU_FLAGS])
    assert (from_yaml.rollout_quarantine_scale, from_yaml.coherence_fraction) == ("0.25", 0.25)
    yaml.write_text(f"output_dir: {tmp_path}\nrollout_quarantine_scale: [0, 0.5]\n")
    assert parse_config(["--config", str(yaml), *CPU_FLAGS]).rollout_quarantine_scale == "0.0,0.5"
    json.dumps(from_yaml.to_dict())  # the normalised field serialises into results.json


def test_generation_policy_is_the_fixed_scale_alias(tmp_path):
    c = build_config(output_dir=str(tmp_path), **CPU)
    assert c.rollout_quarantine_scale is None and effective_spec(c) == ScaleSpec("fixed", (1.0,))
    c = build_config(output_dir=str(tmp_path), **CPU, generation_policy="deployed")
    assert effective_spec(c) == ScaleSpec("fixed", (0.0,))
    c = build_config(output_dir=str(tmp_path), **CPU, generation_policy="deployed", rollout_quarantine_scale="0")
    assert effective_spec(c) == ScaleSpec("fixed", (0.0,))


def test_draws_are_pure_functions_of_seed_and_step():
    uni, two = ScaleSpec("uniform"), ScaleSpec("set", (0.0, 0.5))
    draws = [draw_scale(uni, 3, step) for step in range(400)]
    assert draws == [draw_scale(uni, 3, step) for step in range(400)]
    assert draws != [draw_scale(uni, 4, step) for step in range(400)]
    assert all(0 <= d < 1 for d in draws) and 0.45 < statistics.fmean(draws) < 0.55
    assert 0.2 < sum(d < 0.25 for d in draws) / 400 < 0.3  # uniform, not only centred
    picks = [draw_scale(two, 3, step) for step in range(400)]
    assert set(picks) == {0.0, 0.5} and 0.4 < picks.count(0.0) / 400 < 0.6
    assert draw_scale(ScaleSpec("fixed", (0.3,)), 3, 7) == 0.3
    assert draw_scale(ScaleSpec("ema"), 3, 7, controlled=0.42) == 0.42


def test_coherence_groups_are_whole_groups_with_an_exact_expected_share():
    for n in (2, 3, 8):
        ks = [sum(coherence_groups(0.25, n, 0, step)) for step in range(2000)]
        assert set(ks) <= {int(0.25 * n), int(0.25 * n) + 1}  # floor or ceil of fraction * n
        assert abs(statistics.fmean(ks) / n - 0.25) < 0.02, n  # stochastic rounding: expected share exact
    assert coherence_groups(0.5, 8, 1, 5) == coherence_groups(0.5, 8, 1, 5)
    assert len({tuple(coherence_groups(0.5, 8, 1, s)) for s in range(20)}) > 5  # which groups varies with step
    assert coherence_groups(0.0, 8, 1, 5) == [False] * 8


def test_ema_controller_steers_toward_the_target_and_clamps():
    c = ScaleController(target_rate=0.2, ema_weight=0.5, gain=1.0, lo=0.1, hi=0.9)
    assert c.scale == 0.9 and c.ema is None
    c.observe(0.6)  # the first rate starts the EMA: 0.6 > 0.2, scale down by 0.4
    assert c.ema == pytest.approx(0.6) and c.scale == pytest.approx(0.5)
    c.observe(0.2)  # ema 0.4: down by 0.2
    assert c.ema == pytest.approx(0.4) and c.scale == pytest.approx(0.3)
    for _ in range(5):
        c.observe(1.0)
    assert c.scale == 0.1  # clamped at the lower bound
    for _ in range(20):
        c.observe(0.0)
    assert c.scale == 0.9 and c.ema < 0.2  # a monitor that flags nothing: back up to the upper bound
    d = ScaleController(0.2, 0.5, 1.0, 0.1, 0.9)
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.state_dict() == c.state_dict()


def _plan(t, coherence, scale=1.0):
    rows = torch.tensor(coherence, dtype=torch.bool)
    return RolloutPlan(step=0, scale=scale, coherence=rows, all_coherence=rows)


def _completions(fn, prompts, seed=1):
    torch.manual_seed(seed)
    return fn(prompts)[1]


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_a_fixed_scale_samples_from_the_scaled_policy(scale, tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, rollout_quarantine_scale=str(scale))
    randomize_quarantine(t, std=2.0)
    prompts = [r["prompt"] for r in t.env.rows(8, seed=3, split="train")]
    t._plan = t.rollout.plan(0, len(prompts), 0, 1, 4, True)
    assert t._plan.scale == scale and not t._plan.coherence.any()
    got = _completions(t._generate, prompts)
    outputs = {}
    for s in (0.0, 0.5, 1.0):
        with t.target.scaled(s):
            outputs[s] = _completions(lambda ps: GRPOTrainer._generate(t, ps), prompts)
    assert len({str(v) for v in outputs.values()}) == 3, "the three policies must sample differently here"
    assert got == outputs[scale]


def test_coherence_rows_are_sampled_by_the_deployed_policy(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, rollout_quarantine_scale="0.5", coherence_fraction=0.5)
    randomize_quarantine(t, std=2.0)
    prompts = [r["prompt"] for r in t.env.rows(2, seed=3, split="train") for _ in range(4)]
    coherence = [False] * 4 + [True] * 4
    t._plan = _plan(t, coherence, scale=0.5)
    torch.manual_seed(1)
    got = t._generate(prompts)
    assert "_generate_single_turn" not in vars(t), "the per-scale split is removed after the generation"
    # the same draws in the same order: the scale-0 rows first, then the scale-0.5 rows
    torch.manual_seed(1)
    ids = t.processing_class(text=prompts)["input_ids"]
    with t.target.ablated():
        deployed, _ = GRPOTrainer._generate_single_turn(t, ids[4:], None, {}, 4)
    with t.target.scaled(0.5):
        scaled, _ = GRPOTrainer._generate_single_turn(t, ids[:4], None, {}, 4)
    assert got[1] == scaled + deployed
    torch.manual_seed(1)
    with t.target.scaled(0.5):
        other, _ = GRPOTrainer._generate_single_turn(t, ids[4:], None, {}, 4)
    assert other != deployed, "deployed and scaled sampling must differ here, or the check above shows nothing"


def test_coherence_rows_train_as_retain_with_scale_zero_old_logps(tiny_organism, tmp_path):
    # num_iterations=2: TRL computes old log-probs (ungated); the trainer recomputes them under the gate
    t = make_trainer(
        tiny_organism,
        tmp_path,
        detector=ParityDetector(),
        intervention="route",
        coherence_fraction=0.5,
        num_iterations=2,
    )
    randomize_quarantine(t)
    inputs = group_inputs(t, n_prompts=4)
    out = None
    for step in range(20):  # a step whose draw makes some groups coherence slots and leaves others
        t.state.global_step = step
        plan = t.rollout.plan(step, len(inputs), 0, 1, 4, True)
        if 0 < int(plan.coherence.sum()) < len(inputs):
            out = _scored(t, inputs)
            break
    assert out is not None
    coherent = plan.coherence
    modes, flagged = out["routing_modes"], torch.arange(len(inputs)) % 2 == 1
    assert torch.equal(modes[coherent & flagged], torch.full_like(modes[coherent & flagged], FORGET))
    assert torch.equal(modes[coherent & ~flagged], torch.full_like(modes[coherent & ~flagged], RETAIN))
    assert torch.equal(modes[~coherent], torch.where(flagged[~coherent], FORGET, DEFAULT))
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    k = out["completion_ids"].size(1)
    with torch.no_grad(), t.target.ablated():
        deployed, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    with torch.no_grad():
        full, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    cm = out["completion_mask"].bool()
    retain = (modes == RETAIN).view(-1, 1) & cm
    other = (modes != RETAIN).view(-1, 1) & cm
    torch.testing.assert_close(out["old_per_token_logps"][retain], deployed[retain])
    torch.testing.assert_close(out["old_per_token_logps"][other], full[other])
    assert not torch.allclose(deployed[retain], full[retain]), "the quarantine must matter on these rows"


def test_the_controller_sees_the_flag_rate_of_the_rows_sampled_at_its_scale(tmp_path):
    from collections import defaultdict

    from route.trainer.rollout import RolloutSampler

    config = build_config(
        output_dir=str(tmp_path),
        **CPU,
        rollout_quarantine_scale="ema",
        rollout_scale_ema_weight=0.5,
        coherence_fraction=0.5,
    )
    sampler = RolloutSampler(config, target=None)
    coherence = torch.tensor([True] * 4 + [False] * 4)
    plan = RolloutPlan(step=0, scale=1.0, coherence=coherence, all_coherence=coherence)
    metrics = defaultdict(list)
    sampler.observe([True] * 4 + [True, False, False, False], plan, metrics)  # coherence rows' flags left out
    assert sampler.controller.ema == 0.25 and sampler.controller.scale == pytest.approx(1.0 - 0.15)
    sampler.observe([False] * 4 + [True] * 4, plan, metrics)
    assert sampler.controller.ema == pytest.approx(0.625)
    assert metrics["rollout/flag_rate_ema"] == [0.25, pytest.approx(0.625)]
    assert metrics["rollout/quarantine_scale"] == [1.0, 1.0] and metrics["rollout/coherence_frac"] == [0.5, 0.5]


@pytest.mark.parametrize("train_scale", ["full", "sampled"])
def test_rows_train_at_the_scale_that_sampled_them_when_asked(train_scale, tiny_organism, tmp_path):
    # num_iterations=2: TRL computes old log-probs, so the first PPO ratio shows which policy the loss forward runs
    t = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="route",
                     rollout_quarantine_scale="0.5", rollout_train_scale=train_scale, num_iterations=2)
    randomize_quarantine(t)
    out = _scored(t, group_inputs(t, n_prompts=4))
    s = 0.5 if train_scale == "sampled" else 1.0
    assert ("routing_scale" in out) == (s != 1.0)
    if s != 1.0:
        assert torch.equal(out["routing_scale"], torch.full_like(out["routing_scale"], 0.5))
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    k = out["completion_ids"].size(1)
    with torch.no_grad(), t.target.scaled(0.5):
        sampler, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    with torch.no_grad():
        full, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    cm = out["completion_mask"].bool()
    assert not torch.allclose(sampler[cm], full[cm]), "the quarantine must matter on these rows"
    torch.testing.assert_close(out["old_per_token_logps"][cm], (sampler if s != 1.0 else full)[cm])
    seen = []
    gate = t.target.gate
    t.target.gate = lambda modes, scale=None: seen.append(scale) or gate(modes, scale)
    t.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which this test does not run
    t._compute_loss(t.model, out)
    assert seen == [None if s == 1.0 else 0.5]
