"""Per-token log-probs through the output head's forward, for targets whose gate acts at the output head.

TRL 1.16 patches the policy's forward (`trl.trainer.utils.add_fused_lm_head`): called with `fused_lm_head=True` it
runs the backbone and projects the last hidden state with the head's *weight* in a chunked kernel, never calling the
head module, so forward hooks on the head never fire. Gates that live inside the decoder layers are unaffected, but
a target whose routing acts at the output head (`TargetBase.reads_output_head`: the `logit_head` heads, and the
`sgtm` target's shared-parameter hooks on a head it must keep forget rows out of) would silently train ungated.
`install_unfused_log_probs` wraps that patched forward once more: with `fused_lm_head=True` it computes the same
fields (`log_probs`, `entropy`, `loss`) from the logits of an ordinary forward, which runs the head module and its
hooks. It materialises the (batch, seq, vocab) logits, which the fused kernel avoids.
"""

from __future__ import annotations

import functools

from torch import nn


def install_unfused_log_probs(model: nn.Module, temperature: float = 1.0) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` score through the head module (see the docstring)."""
    from trl.trainer.utils import FusedCausalLMOutput

    text_config = model.config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"target: unfused log-probs do not implement the model's {name}; use a model without it")
    fused = model.forward

    @functools.wraps(fused)
    def forward(*args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return fused(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                         **kwargs)
        kwargs["use_cache"] = False
        logits = fused(*args, **kwargs).logits
        if shift_labels is None:
            logits, labels = logits[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        labels = labels.to(logits.device)
        mask = labels != -100
        logp = (logits.float() / temperature).log_softmax(-1)
        log_probs = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
        entropy = -(logp.exp() * logp).sum(-1).masked_fill(~mask, 0.0)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   label_mask=mask)

    model.forward = forward


__all__ = ["install_unfused_log_probs"]
