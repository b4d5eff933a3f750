"""Preference training of an alignment head through TRL's `DPOTrainer`, with the base as its own reference.

`HeadDPOTrainer(DPOTrainer)` keeps TRL's data pipeline (tokenising prompt/chosen/rejected, the
preference collator, the training loop, logging) and replaces `_compute_loss`: one forward of the
head model gives the base logits and `a`; the policy is `z_base + alpha_train * a` and the DPO
reference is `z_base` from that same forward, so no second model is loaded or run. TRL is handed
the head model's own (frozen) base as `ref_model`, which only stops it from loading a copy; the
reference forward it would run is never called.

Loss (each term with its weight; completion tokens only, prompt tokens never count):
- `dpo_weight` * DPO (sigmoid) with `beta`, log-ratios against the base;
- `margin_weight` * the reference-free margin of the IAV/MAV public code,
  `-logsigmoid(margin_beta * (mean logp(chosen) - mean logp(rejected)) - margin_gamma)`,
  length-normalised over completion tokens (the public code also averaged prompt tokens);
- `kl_weight` * KL(policy || base) over the full vocabulary at each completion position (the public
  code used an MSE on one logit against a cache and was silently zero without one);
- `l2_weight` * mean of `a^2` over vocabulary and completion positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer


@dataclass
class LossWeights:
    dpo_weight: float = 1.0
    margin_weight: float = 0.0
    margin_beta: float = 2.0
    margin_gamma: float = 0.0
    kl_weight: float = 0.1
    l2_weight: float = 0.0
    alpha_train: float = 1.0

    def __post_init__(self):
        for name in ("dpo_weight", "margin_weight", "kl_weight", "l2_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.dpo_weight == 0 and self.margin_weight == 0:
            raise ValueError("dpo_weight, margin_weight: at least one preference loss must have a positive weight")
        if self.alpha_train <= 0:
            raise ValueError(f"alpha_train: must be > 0, got {self.alpha_train}")


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | ..t) for t < T-1: shape (batch, seq-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def kl_to_base(policy_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(softmax(policy) || softmax(base)) over the full vocabulary."""
    lp = torch.log_softmax(policy_logits.float(), dim=-1)
    lq = torch.log_softmax(base_logits.float(), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def margin_loss(logps: torch.Tensor, mask: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """Reference-free, length-normalised margin over completion tokens; batch is [chosen; rejected]."""
    mean = (logps * mask).sum(1) / mask.sum(1).clamp(min=1)
    chosen, rejected = mean.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected) - gamma).mean()


def dpo_loss(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float):
    """DPO (sigmoid) on completion-token sums; returns (loss, chosen log-ratio, rejected log-ratio)."""
    ratio = ((logps - ref_logps) * mask).sum(1)
    chosen, rejected = ratio.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean(), chosen, rejected


def head_losses(
    out, input_ids: torch.Tensor, completion_mask: torch.Tensor, w: LossWeights, beta: float
) -> dict[str, torch.Tensor]:
    """Every loss term from one head forward (`out.logits` at alpha_train, `out.base_logits`, `out.alignment`)."""
    mask = completion_mask[:, 1:].to(out.logits.dtype)
    logps = token_logps(out.logits, input_ids)
    with torch.no_grad():
        ref_logps = token_logps(out.base_logits, input_ids)
    dpo, chosen_r, rejected_r = dpo_loss(logps, ref_logps, mask, beta)
    terms = {
        "dpo": dpo,
        "chosen_logratio": chosen_r.detach().mean(),
        "rejected_logratio": rejected_r.detach().mean(),
        "accuracy": (chosen_r > rejected_r).float().mean().detach(),
    }
    terms["margin"] = margin_loss(logps, mask, w.margin_beta, w.margin_gamma)
    terms["kl"] = kl_to_base(out.logits[:, :-1], out.base_logits[:, :-1], mask)
    a = out.alignment[:, :-1].float()
    terms["l2"] = (a.pow(2).mean(-1) * mask).sum() / mask.sum().clamp(min=1)
    terms["loss"] = (
        w.dpo_weight * terms["dpo"]
        + w.margin_weight * terms["margin"]
        + w.kl_weight * terms["kl"]
        + w.l2_weight * terms["l2"]
    )
    return terms


class HeadDPOTrainer(DPOTrainer):
    """TRL's DPO trainer for an `AlignedCausalLM`: reference = the base logits of the same forward."""

    def __init__(self, model, args: DPOConfig, weights: LossWeights | None = None, **kwargs):
        if args.loss_type != ["sigmoid"] or args.ld_alpha is not None or args.precompute_ref_log_probs:
            raise ValueError(
                "HeadDPOTrainer: supports loss_type=['sigmoid'] with ld_alpha=None and "
                "precompute_ref_log_probs=False (the reference is the base of the same forward); "
                "other preference terms are set through LossWeights"
            )
        if "ref_model" in kwargs:
            raise ValueError("HeadDPOTrainer: ref_model: not accepted; the reference is the head model's own base")
        self.weights = weights or LossWeights()
        super().__init__(model=model, ref_model=model.base, args=args, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        out = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], alpha=self.weights.alpha_train
        )
        terms = head_losses(out, inputs["input_ids"], inputs["completion_mask"], self.weights, self.beta)
        for name, value in terms.items():
            if name != "loss":
                self._metrics[mode][f"heads/{name}"].append(self.accelerator.gather(value.detach()).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(terms["accuracy"].item())
        self._metrics[mode]["rewards/margins"].append(
            self.beta * (terms["chosen_logratio"] - terms["rejected_logratio"]).item()
        )
        loss = terms["loss"]
        return (loss, out) if return_outputs else loss
