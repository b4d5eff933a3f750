"""`logit_head`: a logit-space quarantine: kept and quarantine alignment heads over a frozen backbone.

    z = z_base + a_keep + a_quar,    a_keep = W_k h,  a_quar = W_q h      (deploy: a_quar = 0)

where h is the final hidden state the model's own vocabulary head reads and W_k, W_q are zero-initialised
vocabulary heads (IAV's alignment head, `route.models.heads.IAVForCausalLM`, twice: alpha = 1 for the kept head and 0 or
1 for the quarantine). The backbone and its head are frozen: only the two heads train. Per row, the shared
`RowGate` routes as for every target (forget rows train W_q only, retain rows drop a_quar).

Departures from IAV (Inherent Alignment Vectors): the heads are trained by routed GRPO rather than by preference
optimisation; the deployed policy is exported as a plain transformers checkpoint whose output head is the base head
plus W_k (merged in fp32, so the export is untied from the input embeddings even when the base ties them), instead
of a base plus a head file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from route.targets import register_target
from route.targets.base import TargetArgs, TargetBase, export_scale
from route.targets.common import deployed_model

HEADS = "route_logit_heads"  # the submodule holding the heads (so they follow the model's device and dtype)


@dataclass
class LogitHeadArgs(TargetArgs):
    """Settings of the `logit_head` target (none yet: both heads are full vocabulary heads)."""


class _Heads(nn.Module):
    def __init__(self, hidden: int, vocab: int, like: Tensor):
        super().__init__()
        self.keep = nn.Linear(hidden, vocab, bias=False, dtype=like.dtype, device=like.device)
        self.quarantine = nn.Linear(hidden, vocab, bias=False, dtype=like.dtype, device=like.device)
        nn.init.zeros_(self.keep.weight)
        nn.init.zeros_(self.quarantine.weight)
        self.route_gate = None


def _tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


@register_target("logit_head")
class LogitHeadTarget(TargetBase):
    """Kept and quarantine vocabulary heads added to a frozen causal LM's logits, behind the `Target` interface."""

    args_cls = LogitHeadArgs
    reads_output_head = True  # the heads are a hook on the output head

    def __init__(self, model: nn.Module):
        out = model.get_output_embeddings()
        if out is None or not isinstance(out, nn.Linear):
            raise ValueError("target: logit_head needs a causal LM whose output head is an nn.Linear")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.output = out
        self.heads = _Heads(out.in_features, out.out_features, out.weight)
        model.add_module(HEADS, self.heads)
        self._hook = out.register_forward_hook(self._add_heads)

    @classmethod
    def from_args(cls, model: nn.Module, args: LogitHeadArgs, config: Any) -> LogitHeadTarget:
        if getattr(config, "use_vllm", False) and _tied(model):
            raise ValueError("use_vllm: target logit_head pushes an untied output head (base head + W_k), which a vLLM "
                             "engine serving a model with tied word embeddings never reads; set use_vllm: false or "
                             "use a model with tie_word_embeddings: false")
        return cls(model)

    def _add_heads(self, module: nn.Module, args: tuple, z: Tensor) -> Tensor:
        h, gate = args[0], self.heads.route_gate
        keep = F.linear(h.to(self.heads.keep.weight.dtype), self.heads.keep.weight)
        if gate is not None and gate.is_ablated:
            return z + keep.to(z.dtype)
        quar = F.linear(h.to(self.heads.quarantine.weight.dtype), self.heads.quarantine.weight)
        if gate is not None:
            keep, quar = gate.kept(keep), gate.quarantine(quar)
        return z + (keep + quar).to(z.dtype)

    def _gate_holders(self) -> list[_Heads]:
        return [self.heads]

    @torch.no_grad()
    def ablate(self, trainable: bool = False) -> None:
        """W_q = 0; frozen, or left trainable (its gradient does not depend on W_q: zero is a live re-init)."""
        self.heads.quarantine.weight.zero_()
        self.heads.quarantine.weight.requires_grad_(trainable)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"keep": [], "quarantine": [], "shared": []}
        for p in (self.heads.keep.weight, self.heads.quarantine.weight):
            if p.requires_grad:
                groups["keep" if p is self.heads.keep.weight else "quarantine"].append(p)
        return groups

    @torch.no_grad()
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None,
                          scale: float | None = None) -> dict[str, Tensor]:
        """The plain model's state dict whose output head is base + W_k (+ W_q, times `scale` if given), merged in
        fp32, out of place."""
        scale = export_scale(quarantine, scale)
        out = {k: v.detach().clone() if dtype is None else v.detach().to(dtype)
               for k, v in self.model.state_dict().items() if not k.startswith(f"{HEADS}.")}
        key = next(n for n, m in self.model.named_modules() if m is self.output) + ".weight"
        merged = self.output.weight.detach().float() + self.heads.keep.weight.detach().float()
        if scale:
            merged = merged + self.heads.quarantine.weight.detach().float() * scale
        out[key] = merged.to(dtype or self.output.weight.dtype)
        return out

    def deployed_model(self, scale: float = 0.0) -> nn.Module:
        """A fresh plain transformers model with an untied output head holding `deployed_state_dict(scale=scale)`."""
        config = copy.deepcopy(self.model.config)
        config.tie_word_embeddings = False
        base = SimpleNamespace(config=config, generation_config=self.model.generation_config)
        return deployed_model(base, self.deployed_state_dict(scale=scale), self.name)


__all__ = ["LogitHeadArgs", "LogitHeadTarget"]
