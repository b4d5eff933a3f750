"""Every target on a real pretrained chat model: SmolLM2-135M-Instruct (134.5M parameters, 30 layers, vocabulary
49152, tied embeddings), converted once per session (`real_model`, tests/conftest.py).

One `RoutedGRPOTrainer` per target runs two optimizer steps on chat-template prompts (left-padded: the two prompts of
a batch differ in token length) with the model's real end-of-sequence token: step 1 with every rollout flagged (forget
mode), step 2 with none (`unflagged_mode: retain`). After each `optimizer.step()` (a callback at the step's end):
step 1 leaves every kept and shared parameter bit-identical and moves the quarantine; step 2 leaves the quarantine
bit-identical (AdamW's momentum from step 1 and weight decay would move it if the optimizer stepped it) and moves the
kept part. Then the deployed export reloads in plain transformers and matches `ablated()`'s logits.

Tolerance of that last check (`merge_tolerance`): the two paths compute the same function in a different order (the
export merges each adapted weight, W + B A, and multiplies once; the target computes W x + B (A x)), so they agree to
fp32 rounding, not bit for bit. Reordering one fp32 dot product of length K moves it by about sqrt(K) u |w||x|
(u = 2^-24; rounding errors of random sign add in quadrature), and such relative changes from the n linear layers
between the input and the logits add in quadrature too, so the logits agree within sqrt(n K) u max|z| (n = 211 linear
layers, K = 1536: 3.4e-5 of the largest logit; measured: 1-2% of that). The check is only meaningful if a wrong
export would fail it: the kept part and the quarantine are perturbed first, so that the export differs from the base
model and from the training policy by more than 10x the tolerance.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import envs
from route.masks import FORGET, RETAIN
from route.trainer.parse import build_config
from route.trainer.trainer import RoutedGRPOTrainer

pytestmark = pytest.mark.real_model

RUN = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=1e-3, beta=0.0, weight_decay=0.1,
           per_device_train_batch_size=4, num_generations=2, max_completion_length=3, max_steps=2, logging_steps=1,
           save_strategy="no", report_to="none", disable_tqdm=True, train_size=4, env="arith",
           env_kwargs={"chat": True}, intervention="route", unflagged_mode="retain", seed=0)
TARGETS = {
    "dual_lora": dict(keep_rank=2, quarantine_rank=2),
    "dual_mlp": dict(target="dual_mlp", dual_mlp_keep_units=4, dual_mlp_quarantine_units=4),
    # two projections per layer keep the SVD setup to about 2 s (all seven: bench/svf_overhead.py --model)
    "svf": dict(target="svf", svf_reserve_axes=[0, 1], target_modules=["q_proj", "v_proj"]),
    "sgtm": dict(target="sgtm"),
    "logit_head": dict(target="logit_head"),
}
EOS = "<|im_end|>"


def first_step_flagged(grades, rollout_ids):
    """Every rollout of the first step flagged, none after (the rollout id carries the step: `...|s0|r3`)."""
    return ["|s0|" in rid for rid in rollout_ids]


def varied_reward(prompts, completions, **columns):
    """Rewards that differ within a group (3 sampled tokens rarely solve anything), so every step has a gradient."""
    return [hashlib.sha256(str(c).encode()).digest()[0] / 255 for c in completions]


def prompt_rows(env, tok, n: int = 2) -> list[dict]:
    """`n` training rows whose chat-template prompts differ in token length, so a batch needs padding."""
    rows, lengths = [], set()
    for row in env.rows(64, seed=0, split="train"):
        length = len(tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
        if length not in lengths:
            rows.append(row)
            lengths.add(length)
        if len(rows) == n:
            return rows
    raise AssertionError(f"no {n} prompts of different token lengths among 64")


def snapshot(target, group: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in target.param_groups()[group]]


def same(target, group: str, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(target.param_groups()[group], before, strict=True))


class StepChecks(TrainerCallback):
    """After each optimizer step: which parameter groups moved since the previous step (bit for bit)."""

    def __init__(self, target):
        self.target, self.moved = target, []
        self.groups = [g for g in ("keep", "quarantine", "shared") if target.param_groups()[g]]
        self.before = {g: snapshot(target, g) for g in self.groups}

    def on_step_end(self, args, state, control, **kwargs):
        self.moved.append({g: not same(self.target, g, self.before[g]) for g in self.groups})
        self.before = {g: snapshot(self.target, g) for g in self.groups}


def merge_tolerance(model: torch.nn.Module, logits: torch.Tensor) -> float:
    """sqrt(n K) u max|z| (module docstring) over the linear layers of the plain exported `model`."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    k = max(m.in_features for m in linears)
    return math.sqrt(len(linears) * k) * 2.0 ** -24 * float(logits.abs().max())


def logits_of(model, ids, ctx=None) -> torch.Tensor:
    import contextlib

    model.eval()
    with torch.no_grad(), ctx or contextlib.nullcontext():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_trains_routes_and_exports_on_the_real_model(name, real_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(real_model)
    assert tok.eos_token == EOS and tok.padding_side == "left"
    env = envs.make_env("arith", chat=True)
    rows = prompt_rows(env, tok)
    from datasets import Dataset

    config = build_config(output_dir=str(tmp_path / "run"), **RUN, **TARGETS[name])
    t = RoutedGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(real_model), args=config, env=env,
                          detector=first_step_flagged, processing_class=tok, reward_funcs=[varied_reward],
                          train_dataset=Dataset.from_list(rows * 2))
    assert t.eos_token_ids == [tok.convert_tokens_to_ids(EOS)]  # completions end at the chat turn's end, only
    batches = []
    score = t._generate_and_score_completions

    def recorded(inputs):
        out = score(inputs)
        batches.append({k: out[k].clone() for k in ("prompt_ids", "prompt_mask", "routing_modes")})
        return out

    t._generate_and_score_completions = recorded
    ids = torch.tensor([tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                                return_dict=False) + tok("2082")["input_ids"]])
    base = logits_of(t.model, ids)  # ungated at construction: the base model (every target starts there)
    checks = StepChecks(t.target)
    t.add_callback(checks)
    t.train()

    assert t.state.global_step == 2 and len(checks.moved) == 2 and len(batches) == 2
    for batch, mode in zip(batches, (FORGET, RETAIN), strict=True):
        assert (batch["routing_modes"] == mode).all()
        mask = batch["prompt_mask"]
        assert mask[:, -1].all() and not mask[:, 0].all(), "prompts are left-padded"
        text = tok.decode(batch["prompt_ids"][0][mask[0].bool()])
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")  # chat template
    forget, retain = checks.moved
    assert forget["quarantine"], "the fully flagged step did not train the quarantine (the test would prove nothing)"
    assert not forget["keep"] and not forget.get("shared", False), f"a fully flagged step moved {forget}"
    assert retain["keep"], "the unflagged step did not train the kept part (the test would prove nothing)"
    assert not retain["quarantine"], "an unflagged step moved the quarantine"

    # the deployed export against ablated(): both parts perturbed so a wrong export could not pass
    torch.manual_seed(0)
    with torch.no_grad():
        for group, std in (("keep", 0.02), ("quarantine", 0.05)):
            for p in t.target.param_groups()[group]:
                p.add_(torch.randn_like(p) * std)
    deployed = logits_of(t.model, ids, t.target.ablated())
    full = logits_of(t.model, ids)
    path = t.save_deployed()
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert type(plain).__name__ == "LlamaForCausalLM"
    exported = logits_of(plain, ids)
    tol = merge_tolerance(plain, deployed)
    del plain
    gap = float((exported - deployed).abs().max())
    assert gap <= tol, f"{name}: export vs ablated() {gap:.2e} > tolerance {tol:.2e}"
    assert float((full - deployed).abs().max()) > 10 * tol, "the quarantine must matter for this test"
    assert float((base - deployed).abs().max()) > 10 * tol, "the kept part must matter for this test"
