"""Rollout-time quarantine scale through vLLM (the recording fake of tests/fake_vllm.py): the engine receives the
weights of `scaled(s)` for each batch's s, TRL's importance-sampling forward runs as that policy (ratio 1 although the
quarantine matters), and the PPO ratio's old log-probs are the training gate's."""

import pytest
import torch
from transformers import TrainerCallback

from route.masks import FORGET, RETAIN
from route.trainer.config import check_vllm_config
from route.trainer.parse import build_config
from route.trainer.rollout import ScaleSpec, draw_scale
from route.vllm.sync import TargetWeightSync
from tests.test_trainer import TINY, ParityDetector, group_inputs
from tests.test_vllm import IDS, _completion_logps, _scored, assert_same_tensors, engine, perturb, vllm_trainer


@pytest.fixture
def fake_vllm(monkeypatch, tiny_organism):
    from tests.fake_vllm import install_fake_vllm

    return install_fake_vllm(monkeypatch, server_model=tiny_organism)


def scaled_logits(t, s):
    with torch.no_grad(), t.target.scaled(s):
        return t.model(input_ids=IDS).logits


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_samples_scale_s_with_importance_sampling_against_scale_s(fake_vllm, tiny_organism, tmp_path, mode):
    t = vllm_trainer(
        tiny_organism,
        tmp_path,
        mode,
        "full",
        detector=ParityDetector(),
        intervention="route",
        unflagged_mode="retain",
        retain_fraction=0.5,
        rollout_quarantine_scale="0.5",
    )
    perturb(t, ("quarantine",), std=2.0)
    out = _scored(t, group_inputs(t, n_prompts=2))
    eng = engine(t)
    # the engine holds the policy at scale 0.5: the weights pushed and what it computes
    assert len(eng.syncs) == 1
    assert_same_tensors(eng.syncs[0].tensors, TargetWeightSync(t.target, "full", scale=0.5).state_dict())
    with torch.no_grad():
        served = eng.model(input_ids=IDS).logits
    torch.testing.assert_close(served, scaled_logits(t, 0.5), rtol=1e-5, atol=1e-5)
    for other in (0.0, 1.0):
        assert not torch.allclose(served, scaled_logits(t, other), atol=1e-3), other
    # vLLM's IS ratio: the engine's sampling log-probs against the trainer's forward at scale 0.5
    ratio = out["importance_sampling_ratio"].view(-1)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    # the PPO ratio's old log-probs: the per-row training gate (retain rows at scale 0, others at 1)
    modes, cm = out["routing_modes"], out["completion_mask"].bool()
    assert (modes == FORGET).any() and (modes == RETAIN).any()
    with torch.no_grad(), t.target.scaled(0.5):
        sampling = _completion_logps(t, out)
    with torch.no_grad():
        gated = _completion_logps(t, out, modes)
    torch.testing.assert_close(out["old_per_token_logps"][cm], gated[cm])
    assert not torch.allclose(gated[cm], sampling[cm], atol=1e-3), "the gate and the sampling policy differ here"


class PushedScales(TrainerCallback):
    """At every step start: the policy that step's batch must be sampled from, as the sync would push it."""

    def __init__(self, trainer, spec):
        self.trainer, self.spec, self.expected, self.scales = trainer, spec, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        s = draw_scale(self.spec, args.seed, state.global_step)
        self.scales.append(s)
        sync = TargetWeightSync(self.trainer.target, "deployed" if s == 0 else "full", scale=s if 0 < s < 1 else None)
        self.expected.append(sync.state_dict())


def test_vllm_pushes_each_batch_drawn_scale(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(
        tiny_organism,
        tmp_path,
        "colocate",
        "full",
        detector=ParityDetector(),
        max_steps=6,
        rollout_quarantine_scale="0,0.5",
        seed=2,
    )
    perturb(t)
    steps = PushedScales(t, ScaleSpec("set", (0.0, 0.5)))
    t.add_callback(steps)
    t.train()
    assert set(steps.scales) == {0.0, 0.5}, "both scales drawn in 6 steps (seed 2)"
    syncs = engine(t).syncs
    assert len(syncs) == len(steps.expected) == 6
    for k, (sync, expected) in enumerate(zip(syncs, steps.expected, strict=True)):
        assert_same_tensors(sync.tensors, expected), k
    logged = [h["rollout/quarantine_scale"] for h in t.state.log_history if "rollout/quarantine_scale" in h]
    assert logged == steps.scales


def test_vllm_off_policy_mask_refused_below_scale_one(tmp_path):
    base = dict(TINY, output_dir=str(tmp_path / "cfg"), use_vllm=True, off_policy_mask_threshold=0.5)
    for scale in ("0.5", "uniform", "ema", "0,1"):
        with pytest.raises(ValueError, match="off_policy_mask_threshold"):
            check_vllm_config(build_config(**base, rollout_quarantine_scale=scale))
    check_vllm_config(build_config(**base, rollout_quarantine_scale="1"))
