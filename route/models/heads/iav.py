"""IAV (dual-head logits, "Inherent Alignment Vectors") and the constant-bias baseline head.

`IAVForCausalLM`: a second, zero-initialised vocabulary head reads the same final hidden state
the base's own head reads; `z = z_base + alpha * W_a h_T`. Departures from the paper's public
code: the base head stays frozen unless `train_base_head=True` is asked for (then alpha = 0 is no
longer the original base, and a head tied to the input embeddings is refused rather than
silently training the embeddings too); the backbone runs without autograd.

`ConstantBiasForCausalLM`: one learned vocabulary vector added at every position, whatever the
context. It is the baseline a context-dependent preference must beat: whatever it learns, it
cannot tell two prompts apart.
"""

from __future__ import annotations

import torch
from torch import nn

from route.models.heads.base import AlignedCausalLM


class IAVForCausalLM(AlignedCausalLM):
    """Frozen backbone + zero-initialised alignment head over the last hidden state."""

    kind = "iav"

    def __init__(self, base: nn.Module, train_base_head: bool = False):
        super().__init__(base, train_base_head=bool(train_base_head))
        out_emb = base.get_output_embeddings()
        hidden = out_emb.weight.shape[1]
        self.align_head = nn.Linear(
            hidden, self.vocab_size, bias=False, dtype=out_emb.weight.dtype, device=out_emb.weight.device
        )
        nn.init.zeros_(self.align_head.weight)
        if train_base_head:
            in_emb = base.get_input_embeddings()
            if in_emb is not None and in_emb.weight is out_emb.weight:
                raise ValueError(
                    "train_base_head: the base's output head is tied to its input embeddings, so "
                    "training it would train the embeddings too; use train_base_head=False"
                )
            out_emb.weight.requires_grad_(True)

    def base_logits(self, out) -> torch.Tensor:
        if not self.settings["train_base_head"] or out.hidden_states is None:
            return out.logits
        h = out.hidden_states[-1][:, -out.logits.shape[1] :]
        return self.base.get_output_embeddings()(h)

    def alignment(self, hidden_states, base_logits):
        h = hidden_states[-1]
        return self.align_head(h.to(self.align_head.weight.dtype))


class ConstantBiasForCausalLM(AlignedCausalLM):
    """One learned vector added to every position's logits (a context-blind baseline)."""

    kind = "bias"
    needs_hidden_states = False

    def __init__(self, base: nn.Module):
        super().__init__(base)
        w = base.get_output_embeddings().weight
        self.bias = nn.Parameter(torch.zeros(self.vocab_size, dtype=w.dtype, device=w.device))

    def alignment(self, hidden_states, base_logits):
        return self.bias.expand_as(base_logits)
