"""The EMA scale controller survives checkpoint and resume: a run interrupted after its step-2 checkpoint and resumed
ends with the same weights, scales and results as an uninterrupted one (the controller's state is in the checkpoint's
trainer_state.json); and a coherence run logs its slots and trains them in retain mode."""

import json

import torch

import route.train_grpo as train_grpo
from envs.arith import ArithEnv
from route.trainer.parse import build_config
from route.trainer.rollout import STATE_KEY
from route.utils.logs import read_metrics
from tests.test_resume import RUN, _comparable, _tensors, run_until_checkpoint, varied_reward

EMA = dict(
    rollout_quarantine_scale="ema", rollout_scale_target_rate=0.1, rollout_scale_gain=0.5, rollout_scale_ema_weight=0.5
)


def scales(run_dir) -> list[float]:
    return [
        r["rollout/quarantine_scale"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "rollout/quarantine_scale" in r
    ]


def test_ema_controller_state_survives_resume(tiny_organism, tmp_path, monkeypatch):
    monkeypatch.setattr(ArithEnv, "reward_func", varied_reward)
    fields = dict(RUN, model_name_or_path=str(tiny_organism), **EMA)
    whole = train_grpo.run(build_config(output_dir=str(tmp_path / "whole"), **fields))
    steered = scales(tmp_path / "whole")
    assert len(steered) == 4 and steered[0] == 1.0 and len(set(steered)) == 4, "the controller must move the scale"
    run_until_checkpoint(build_config(output_dir=str(tmp_path / "cut"), **fields), monkeypatch)
    saved = json.loads((tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"][STATE_KEY]["updates"] == 2
    resumed = train_grpo.run(
        build_config(
            output_dir=str(tmp_path / "cut"), **fields, resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")
        )
    )
    assert _comparable(resumed) == _comparable(whole)
    assert scales(tmp_path / "cut") == steered
    for name in ("checkpoint-4", "deployed"):
        a, b = _tensors(tmp_path / "whole" / name), _tensors(tmp_path / "cut" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f]), name
    state = {
        n: json.loads((tmp_path / n / "checkpoint-4" / "trainer_state.json").read_text())["stateful_callbacks"]
        for n in ("whole", "cut")
    }
    assert state["whole"][STATE_KEY] == state["cut"][STATE_KEY]


def test_a_coherence_run_logs_its_slots_and_trains_them_in_retain_mode(tiny_organism, tmp_path, monkeypatch):
    monkeypatch.setattr(ArithEnv, "reward_func", varied_reward)
    fields = dict(
        RUN, model_name_or_path=str(tiny_organism), save_strategy="no", coherence_fraction=0.5, detector_fpr=0.0
    )  # nothing flagged: every coherence row is retain, every other row default
    train_grpo.run(build_config(output_dir=str(tmp_path / "run"), **fields))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "rollout/coherence_frac" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["rollout/quarantine_scale"] == 1.0
        assert r["routing/frac_retain"] == r["rollout/coherence_frac"]
    assert {r["rollout/coherence_frac"] for r in rows} <= {0.0, 0.5, 1.0}  # whole groups of 4 out of 8 rows
    assert sum(r["rollout/coherence_frac"] for r in rows) > 0
