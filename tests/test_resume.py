"""Resume: a main-job run interrupted after its step-2 checkpoint and resumed from it ends with the same adapters,
the same deployed model and the same results.json as a run that was never interrupted."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import route.train_grpo as train_grpo
import route.trainer.trainer
from envs.arith import ArithEnv
from route.trainer.parse import build_config
from route.utils.logs import read_metrics

RUN = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=2e-2, beta=0.0,
           per_device_train_batch_size=8, num_generations=4, steps_per_generation=2, gradient_accumulation_steps=2,
           max_completion_length=6, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2,
           report_to="none", disable_tqdm=True, train_size=32, keep_rank=2, quarantine_rank=2, eval_n=16,
           detector_fpr=0.5, seed=3)


def varied_reward(self, prompts, completions, **columns):
    """Rewards that differ within a group, so that every step trains (the organism rarely passes in 6 tokens)."""
    return [hashlib.sha256(str(c).encode()).digest()[0] / 255 for c in completions]


class Interrupted(Exception):
    pass


class StopAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise Interrupted


def _tensors(directory):
    files = sorted(p for p in directory.rglob("*.safetensors"))
    assert files, directory
    return {str(p.relative_to(directory)): load_file(p) for p in files}


def _comparable(results):
    out = json.loads(json.dumps(results))
    for k in ("train_seconds", "total_seconds", "seconds"):
        out.pop(k)
    for k in ("output_dir", "logging_dir", "resume_from_checkpoint"):
        out["config"].pop(k, None)
    return out


def run_until_checkpoint(config, monkeypatch) -> None:
    """Run the main job with `config` until it has saved checkpoint-2, then interrupt it."""

    class Interrupting(route.trainer.trainer.RoutedGRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StopAfterCheckpoint())

    with monkeypatch.context() as m:
        m.setattr(route.trainer.trainer, "RoutedGRPOTrainer", Interrupting)
        with pytest.raises(Interrupted):
            train_grpo.run(config)


@pytest.mark.parametrize("target", [{}, dict(target="svf", svf_reserve_axes=[0, 1]), dict(target="sgtm"),
                                    dict(target="dual_mlp", dual_mlp_keep_units=4, dual_mlp_quarantine_units=4)],
                         ids=["dual_lora", "svf", "sgtm", "dual_mlp"])
def test_an_interrupted_and_resumed_run_ends_like_an_uninterrupted_one(target, tiny_organism, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(ArithEnv, "reward_func", varied_reward)
    fields = dict(RUN, model_name_or_path=str(tiny_organism), **target)
    whole = train_grpo.run(build_config(output_dir=str(tmp_path / "whole"), **fields))

    run_until_checkpoint(build_config(output_dir=str(tmp_path / "cut"), **fields), monkeypatch)
    assert (tmp_path / "cut" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "results.json").exists()
    resumed = train_grpo.run(build_config(output_dir=str(tmp_path / "cut"), **fields,
                                          resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2")))

    assert _comparable(resumed) == _comparable(whole)
    on_disk = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert _comparable(on_disk) == _comparable(whole)
    for name in ("checkpoint-4", "deployed"):
        a, b = _tensors(tmp_path / "whole" / name), _tensors(tmp_path / "cut" / name)
        assert a.keys() == b.keys()
        for f in a:
            assert a[f].keys() == b[f].keys()
            assert all(torch.equal(a[f][k], b[f][k]) for k in a[f]), (name, f)
    logged = {name: [r["step"] for r in read_metrics(tmp_path / name / "metrics.jsonl")] for name in ("whole", "cut")}
    assert logged["cut"] == logged["whole"] == [1, 2, 3, 4, 4], "resumed: no logged step lost or repeated (+ summary)"
    assert "run failed: Interrupted" in (tmp_path / "cut" / "train.log").read_text(), "the resumed run appends"
    first = _tensors(tmp_path / "whole" / "checkpoint-2")
    last = _tensors(tmp_path / "whole" / "checkpoint-4")
    moved = [k for f in first for k in first[f] if not torch.equal(first[f][k], last[f][k])]
    assert moved, "steps 3-4 trained nothing: the comparison would prove nothing"
