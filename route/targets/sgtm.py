"""`sgtm`: full-parameter GRPO whose quarantine is the model's own reserved MLP units and heads.

SGTM (selective gradient masking) reserves the last units of each masked layer for the
capability to remove and ablates them before deployment; gradient routing (Cloud et al. 2024)
is the per-example routing of gradient into such a reserved part. Here the examples are
rollouts: a flagged rollout runs in forget mode, and the model's reserved units play the role
the quarantine adapter plays in `dual_lora`. Every parameter trains (no adapter).

    target = make_target("sgtm", model, forget_mlp_frac=0.125, forget_heads=0, strategy="parameter_masking")

Departures from the SGTM seed, which pretrains with whole batches of one label:
- per-rollout modes in one forward and backward (`route.masks`);
- every masked projection is split into separate retain and forget parameters, output
  projections included, so `SkipZeroAdamW` steps the kept and quarantine groups apart;
- with `mask_shared` (default) forget rollouts train nothing outside the quarantine: the
  embeddings, norms, head and unmasked layers (the "shared" group) get no gradient from them.
  Without it they train the shared group, as SGTM's forget data does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from route.masks import SGTMMasks, apply_masks, available_strategies, detect_arch
from route.masks.arch import layer_shape, layers_of, resolve_layers
from route.masks.linear import MASKED_LINEARS
from route.targets import register_target
from route.targets.base import TargetArgs, TargetBase, export_scale
from route.utils.fields import as_int_list, choice, rate


def _shared_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with parameters of their own that are not masked projections (embeddings, norms, head, ...)."""
    return [m for m in model.modules()
            if not isinstance(m, MASKED_LINEARS) and next(m.parameters(recurse=False), None) is not None]


@dataclass
class SGTMArgs(TargetArgs):
    """Settings of the `sgtm` target (sizes that depend on the model are checked when the target is built)."""

    sgtm_forget_mlp_frac: float = field(
        default=0.125,
        metadata={"help": "sgtm: share of each masked layer's MLP units reserved as the quarantine (the last units, "
                          "rounded, at least one when > 0)."})
    sgtm_forget_heads: int = field(
        default=0, metadata={"help": "sgtm: attention heads per masked layer reserved as the quarantine (the last "
                                     "heads; whole KV groups)."})
    sgtm_masked_layers: list[int] | None = field(
        default=None, metadata={"help": "sgtm: indices of the layers that hold quarantine units (None: every layer)."})
    sgtm_strategy: str = field(
        default="parameter_masking",
        metadata={"help": "sgtm: masking strategy for forget rollouts (see route.masks.strategies).",
                  "choices": available_strategies()})
    sgtm_mask_shared: bool = field(
        default=True,
        metadata={"help": "sgtm: forget rollouts send no gradient into parameters outside the quarantine "
                          "(embeddings, norms, head, unmasked layers)."})

    def validate(self, config: Any, target: str) -> None:
        rate("sgtm_forget_mlp_frac", self.sgtm_forget_mlp_frac)
        choice("sgtm_strategy", self.sgtm_strategy, tuple(available_strategies()))
        if isinstance(self.sgtm_forget_heads, bool) or not isinstance(self.sgtm_forget_heads, int) \
                or self.sgtm_forget_heads < 0:
            raise ValueError(f"sgtm_forget_heads: must be an int >= 0, got {self.sgtm_forget_heads!r}")
        self.sgtm_masked_layers = as_int_list("sgtm_masked_layers", self.sgtm_masked_layers, "layer indices")
        if self.sgtm_forget_mlp_frac == 0 and self.sgtm_forget_heads == 0:
            raise ValueError("sgtm_forget_mlp_frac, sgtm_forget_heads: the sgtm quarantine is empty; reserve MLP "
                             "units (sgtm_forget_mlp_frac > 0) or heads (sgtm_forget_heads > 0)")


@register_target("sgtm")
class SGTMTarget(TargetBase):
    """Reserved MLP units and heads of the model itself behind the `Target` interface.

    Args:
        model: a plain causal LM of a supported architecture (GPT-Neo, the Llama family); its
            masked layers are converted in place.
        forget_mlp_frac: share of each masked layer's MLP units reserved (the last units, rounded, at least one).
        forget_heads: attention heads reserved per masked layer (the last heads; whole KV groups).
        masked_layers: layer indices to mask (None: every layer).
        strategy: SGTM strategy for forget rows (`route.masks.strategies`).
        mask_shared: forget rows send no gradient into parameters outside the quarantine.
    """

    args_cls = SGTMArgs

    def __init__(self, model: nn.Module, forget_mlp_frac: float = 0.125, forget_heads: int = 0,
                 masked_layers: Sequence[int] | None = None, strategy: str = "parameter_masking",
                 mask_shared: bool = True):
        rate("sgtm_forget_mlp_frac", forget_mlp_frac)
        choice("sgtm_strategy", strategy, tuple(available_strategies()))
        arch = detect_arch(model)
        layers = layers_of(model)
        chosen = resolve_layers(masked_layers, len(layers))
        shape = layer_shape(layers[chosen[0]], arch) if chosen else None
        if shape is None:
            raise ValueError("sgtm_masked_layers: no layer selected")
        forget_mlp = 0 if forget_mlp_frac == 0 else max(1, round(float(forget_mlp_frac) * shape.mlp_dim))
        if forget_mlp == 0 and forget_heads == 0:
            raise ValueError("sgtm: the quarantine is empty; set sgtm_forget_mlp_frac > 0 or sgtm_forget_heads > 0")
        allowed = list(range(0, shape.heads + 1, shape.group))
        if forget_heads not in allowed:
            raise ValueError(f"sgtm_forget_heads: with {shape.heads} heads sharing {shape.kv_heads} KV heads, "
                             f"reserved heads must be whole KV groups; allowed values: {allowed}, got {forget_heads!r}")
        self.masked_layers = apply_masks(model, forget_mlp_dim=forget_mlp, forget_attn_heads=forget_heads,
                                         masked_layers=chosen, split=True, split_out=True)
        self.model = model
        self.forget_mlp_dim, self.forget_heads = forget_mlp, forget_heads
        self.masks = SGTMMasks(model, strategy, _shared_modules(model) if mask_shared else ())
        self.strategy = strategy  # what `set_soft_routing` checks soft routing against
        # the shared-parameter hooks include the output head's: TRL's fused log-prob kernel would bypass them
        self.reads_output_head = model.get_output_embeddings() in self.masks.shared_modules

    @classmethod
    def from_args(cls, model: nn.Module, args: SGTMArgs, config: Any) -> SGTMTarget:
        return cls(model, forget_mlp_frac=args.sgtm_forget_mlp_frac, forget_heads=args.sgtm_forget_heads,
                   masked_layers=args.sgtm_masked_layers, strategy=args.sgtm_strategy,
                   mask_shared=args.sgtm_mask_shared)

    # ------------------------------------------------------------------ gating (the mask core installs its own hooks)
    def gate(self, modes: Tensor | Sequence[str], scale: float | None = None) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context (rows must match `modes`), the reserved units' output
        also multiplied by `scale` (None: 1)."""
        return self.masks.gate(modes, scale=scale, **self._soft_routing())

    def scaled(self, s: float) -> contextlib.AbstractContextManager:
        """Forward with the reserved units' output multiplied by `s` in [0, 1] (0: deployed, `ablated()`)."""
        return self.masks.scaled(s)

    def recompute_context(self) -> contextlib.AbstractContextManager:
        """The gate active now (row gates and shared-parameter hooks), re-entered for a checkpointed recompute."""
        return self.masks.recompute_context()

    def ablate(self, trainable: bool = False) -> None:
        """Remove the quarantine permanently (zero, or input rows redrawn at the kept rows' std; see route.masks)."""
        self.masks.ablate(trainable)

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: "keep" (retain slices), "quarantine" (reserved units), "shared" (the rest)."""
        return self.masks.param_groups()

    @torch.no_grad()
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None,
                          scale: float | None = None) -> dict[str, Tensor]:
        """The plain model's state dict (split parameters merged); `quarantine=False` zeroes the reserved units,
        `scale` multiplies their output (the output projections' reserved columns) by it: the policy of `scaled`.

        Merged in fp32, out of place, cast once; keys match the plain transformers model.
        """
        return self.masks.merged_state_dict(dtype=dtype, scale=export_scale(quarantine, scale))


__all__ = ["SGTMArgs", "SGTMTarget"]
