"""Scoring through the output head: equals TRL's fused kernel on a plain model, and keeps head-level gates exact in
real trainer steps (logit_head's heads, sgtm's shared-parameter hooks on a tied head)."""

import pytest
import torch

from route.models.organism import build_model, build_tokenizer, tiny_config
from route.trainer.logprobs import install_unfused_log_probs
from tests.test_trainer import TINY, make_trainer


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


class FlagAll:
    def __call__(self, grades, rollout_ids, **context):
        return [True] * len(grades)


def test_unfused_log_probs_equal_trls_fused_kernel():
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2), build_tokenizer())
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    install_unfused_log_probs(model, temperature=0.7)
    unfused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(unfused.log_probs, fused.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfused.entropy, fused.entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unfused.loss, fused.loss, rtol=1e-5, atol=1e-6)
    assert model(input_ids=ids).logits.shape == (3, 9, model.config.vocab_size)  # the plain forward is untouched


def _snapshot(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("target,overrides", [
    ("logit_head", {}),
    ("sgtm", {"sgtm_forget_mlp_frac": 0.25}),
])
def test_a_fully_flagged_step_trains_only_the_quarantine(tiny_organism, tmp_path, target, overrides):
    base = {k: v for k, v in TINY.items() if k not in ("keep_rank", "quarantine_rank")}
    t = make_trainer(tiny_organism, tmp_path, detector=FlagAll(), reward_funcs=[length_reward],
                     **{**base, "target": target, "max_steps": 1, **overrides})
    assert t.target.reads_output_head
    groups = t.target.param_groups()
    kept = groups["keep"] + groups["shared"]
    assert groups["quarantine"] and kept
    before_k, before_q = _snapshot(kept), _snapshot(groups["quarantine"])
    t.train()
    assert all(torch.equal(a, b) for a, b in zip(kept, before_k)), "forget rows moved a kept or shared parameter"
    assert any(not torch.equal(a, b) for a, b in zip(groups["quarantine"], before_q)), "the quarantine must train"
