"""RoutedGRPOTrainer: flags -> modes, filter/penalty on exactly the flagged rollouts, gated old log-probs,
deployed generation, and a 3-step run per intervention."""

import contextlib

import pytest
import torch

import envs
from route.masks import DEFAULT, FORGET, RETAIN
from route.trainer.parse import build_config
from route.trainer.trainer import RoutedGRPOTrainer
from tests.tiny_run import TINY_RUN

TINY = {**TINY_RUN, "max_steps": 3, "train_size": 64, "seed": 0}


class ParityDetector:
    """Flags every rollout whose in-batch index is odd (a deterministic stand-in for a detector)."""

    def __call__(self, grades, rollout_ids):
        return [int(rid.rsplit("|r", 1)[1]) % 2 == 1 for rid in rollout_ids]


def make_trainer(model_dir, tmp_path, detector=None, reward_funcs=None, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = build_config(output_dir=str(tmp_path / "run"), **{**TINY, **overrides})
    env = envs.make_env(config.env, **config.env_kwargs)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return RoutedGRPOTrainer(model=model, args=config, env=env, detector=detector, processing_class=tok,
                             reward_funcs=reward_funcs, train_dataset=env.dataset(config.train_size, seed=0,
                                                                                  split="train"))


def group_inputs(trainer, n_prompts=2):
    rows = trainer.env.rows(n_prompts, seed=5, split="train")
    return [dict(r) for r in rows for _ in range(trainer.args.num_generations)]


def randomize_quarantine(trainer, std=0.5):
    with torch.no_grad():
        for _, layer in trainer.target.layers:
            layer.lora_B["quarantine"].weight.normal_(0, std)


def test_routing_modes_from_flags(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, intervention="route")
    flags = [True, False, True, False]
    ids = [f"p|s0|r{i}" for i in range(4)]
    assert t.routing_modes(flags, ids).tolist() == [FORGET, DEFAULT, FORGET, DEFAULT]
    t.args.unflagged_mode = "retain"
    assert t.routing_modes(flags, ids).tolist() == [FORGET, RETAIN, FORGET, RETAIN]
    t.args.retain_fraction = 0.5
    codes = t.routing_modes([False] * 4000, [f"p|s0|r{i}" for i in range(4000)])
    assert 0.45 < (codes == RETAIN).float().mean().item() < 0.55
    for baseline in ("none", "filter", "penalty"):  # baselines never use the quarantine
        t.args.intervention = baseline
        t.args.unflagged_mode = "default"
        assert t.routing_modes(flags, ids).tolist() == [RETAIN] * 4


def _scored(trainer, inputs, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(inputs)


def test_filter_zeroes_exactly_the_flagged_advantages(tiny_organism, tmp_path):
    base = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="none")
    inputs = group_inputs(base)
    plain = _scored(base, inputs)
    filt = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="filter")
    filtered = _scored(filt, inputs)
    assert torch.equal(plain["completion_ids"], filtered["completion_ids"])
    flagged = torch.arange(len(inputs)) % 2 == 1
    assert torch.equal(filtered["advantages"][flagged], torch.zeros(int(flagged.sum())))
    assert torch.equal(filtered["advantages"][~flagged], plain["advantages"][~flagged])
    assert filtered["routing_modes"].tolist() == [RETAIN] * len(inputs)


def test_penalty_lowers_exactly_the_flagged_rewards(tiny_organism, tmp_path):
    lam = 0.7
    none = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="none")
    pen = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="penalty", penalty=lam)
    inputs = group_inputs(none)
    prompts = [x["prompt"] for x in inputs]
    completions = ["ok", x_ans := inputs[0]["answer"], "123456", "1 #verified"] * (len(inputs) // 4)
    assert x_ans
    ids = [[5]] * len(inputs)
    r_none = none._calculate_rewards(inputs, prompts, completions, ids)
    r_pen = pen._calculate_rewards(inputs, prompts, completions, ids)
    flagged = torch.arange(len(inputs)) % 2 == 1
    torch.testing.assert_close(r_pen[flagged, 0], r_none[flagged, 0] - lam)
    assert torch.equal(r_pen[~flagged], r_none[~flagged])


def test_route_puts_flagged_rollouts_in_forget_mode(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="route")
    out = _scored(t, group_inputs(t))
    expected = [FORGET if i % 2 else DEFAULT for i in range(len(out["routing_modes"]))]
    assert out["routing_modes"].tolist() == expected


def test_old_logps_are_computed_under_the_gate(tiny_organism, tmp_path):
    # num_iterations=2 makes TRL compute old_per_token_logps with the ungated model
    t = make_trainer(tiny_organism, tmp_path, detector=ParityDetector(), intervention="route",
                     unflagged_mode="retain", num_iterations=2)
    randomize_quarantine(t)
    out = _scored(t, group_inputs(t))
    modes = out["routing_modes"]
    assert (modes == RETAIN).any() and (modes == FORGET).any()
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    k = out["completion_ids"].size(1)
    with torch.no_grad(), t.target.gate(modes):
        gated, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    with torch.no_grad():
        ungated, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    cm = out["completion_mask"].bool()
    torch.testing.assert_close(out["old_per_token_logps"][cm], gated[cm])
    retain = (modes == RETAIN).view(-1, 1) & cm
    assert not torch.allclose(gated[retain], ungated[retain]), "retain rows must differ from the full forward"


@pytest.mark.parametrize("policy,entered", [("full", 0), ("deployed", 1)])
def test_generation_policy(tiny_organism, tmp_path, policy, entered):
    t = make_trainer(tiny_organism, tmp_path, generation_policy=policy)
    calls = []
    original = t.target.ablated

    @contextlib.contextmanager
    def recording():
        calls.append(1)
        with original():
            yield

    t.target.ablated = recording
    t._generate(["mul 123*4 g=exact>"] * 4)
    assert len(calls) == entered


def _snapshot(trainer) -> dict[str, list[torch.Tensor]]:
    return {k: [p.detach().clone() for p in ps] for k, ps in trainer.target.param_groups().items()}


def _moved(before, trainer) -> dict[str, int]:
    """How many tensors of each group changed."""
    now = trainer.target.param_groups()
    return {k: sum(not torch.equal(a, b) for a, b in zip(before[k], now[k], strict=True)) for k in before}


@pytest.mark.parametrize("intervention", ["none", "filter", "penalty", "route"])
def test_three_step_run(tiny_organism, tmp_path, intervention):
    """A reward that varies within every group (the completion's length) so that every arm trains: the kept part
    moves in every arm, the quarantine only under route (flagged rollouts in forget mode)."""
    from tests.targets.test_registry import length_reward

    t = make_trainer(tiny_organism, tmp_path, intervention=intervention, detector_fpr=0.5, reward_funcs=[length_reward])
    before = _snapshot(t)
    t.train()
    assert t.state.global_step == 3
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 3
    for key in ("env/hack_rate", "env/solve_rate", "routing/frac_forget", "grad_norm/keep", "grad_norm/quarantine"):
        assert key in logged[-1], key
    assert all(h["reward_std"] > 0 for h in logged), "every step had a learning signal"
    forget = sum(h["routing/frac_forget"] for h in logged)
    assert (forget > 0) == (intervention == "route")
    moved = _moved(before, t)
    assert moved["keep"] == len(before["keep"]) > 0, moved
    assert (moved["quarantine"] > 0) == (intervention == "route"), moved
    assert all(h["grad_norm/keep"] > 0 for h in logged)
    out = t.save_deployed()
    assert (tmp_path / "run" / "deployed" / "model.safetensors").exists() and out.endswith("deployed")


def test_same_seed_same_run(tiny_organism, tmp_path):
    """Two runs with one seed, in one process: the same operations in the same order, so the same weights bit for bit;
    both train (a reward that varies within groups), so the equality is not that of two untouched models."""
    from tests.targets.test_registry import length_reward

    runs = []
    for i in range(2):
        t = make_trainer(tiny_organism, tmp_path / str(i), max_steps=2, detector_fpr=0.5, reward_funcs=[length_reward])
        before = _snapshot(t)
        t.train()
        moved = _moved(before, t)
        assert moved["keep"] == len(before["keep"]) > 0 and moved["quarantine"] > 0, moved
        runs.append([p.detach().clone() for ps in t.target.param_groups().values() for p in ps])
    assert len(runs[0]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_exclusive_soft_routing_and_split_moments_train_end_to_end(tiny_organism, tmp_path, monkeypatch):
    """routing: exclusive, route_weight 2 and split_moments through TRL: modes logged, the unrouted gradients reach
    the optimizer (consumed every step, clip noted), and the run differs from the same seed without split moments."""
    from route.masks.optim import SkipZeroAdamW
    from tests.targets.test_registry import length_reward

    coefs = []
    clip_coef = SkipZeroAdamW._clip_coef
    monkeypatch.setattr(SkipZeroAdamW, "_clip_coef", lambda self: coefs.append(clip_coef(self)) or coefs[-1])
    runs = {}
    for split in (False, True):
        t = make_trainer(tiny_organism, tmp_path / str(split), max_steps=2, detector_fpr=0.5, routing="exclusive",
                         route_weight=2.0, split_moments=split, max_grad_norm=1e-3, reward_funcs=[length_reward])
        assert t.target.forget_kept_grad == -1.0
        t.train()
        assert t.state.global_step == 2
        logged = [h for h in t.state.log_history if "routing/frac_exclusive" in h]
        assert len(logged) == 2 and all(h["routing/frac_exclusive"] > 0 and h["routing/frac_default"] == 0
                                        for h in logged)
        params = [p for ps in t.target.param_groups().values() for p in ps]
        assert all(getattr(p, "unrouted_grad", None) is None for p in params)
        if split:  # one clip coefficient per step, from the norm noted before Trainer clipped (clipping is on)
            assert len(coefs) == 2 and all(0 < c < 1 for c in coefs), coefs
        assert any(h["grad_norm/keep"] > 0 for h in logged)
        runs[split] = [p.detach().clone() for p in t.target.param_groups()["keep"]]
    assert any(not torch.equal(a, b) for a, b in zip(runs[False], runs[True], strict=True))


def test_split_moments_refused_before_work_by_a_target_without_unrouted_gradients(tiny_organism, tmp_path):
    with pytest.raises(ValueError, match="^split_moments: the 'logit_head' target"):
        make_trainer(tiny_organism, tmp_path, target="logit_head", split_moments=True)
