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

import torch
from torch import Tensor, nn

from route.masks import SGTMMasks, apply_masks, available_strategies, detect_arch
from route.masks.arch import layer_shape, layers_of, resolve_layers
from route.masks.linear import MASKED_LINEARS
from route.targets import register_target


def _shared_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with parameters of their own that are not masked projections (embeddings, norms, head, ...)."""
    return [m for m in model.modules()
            if not isinstance(m, MASKED_LINEARS) and next(m.parameters(recurse=False), None) is not None]


@register_target("sgtm")
class SGTMTarget:
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

    def __init__(self, model: nn.Module, forget_mlp_frac: float = 0.125, forget_heads: int = 0,
                 masked_layers: Sequence[int] | None = None, strategy: str = "parameter_masking",
                 mask_shared: bool = True):
        if not 0.0 <= float(forget_mlp_frac) <= 1.0:
            raise ValueError(f"sgtm_forget_mlp_frac: must be a number in [0, 1], got {forget_mlp_frac!r}")
        if strategy not in available_strategies():
            raise ValueError(f"sgtm_strategy: invalid value {strategy!r}; allowed values: {available_strategies()}")
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

    @classmethod
    def from_config(cls, model: nn.Module, config) -> SGTMTarget:
        return cls(model, forget_mlp_frac=config.sgtm_forget_mlp_frac, forget_heads=config.sgtm_forget_heads,
                   masked_layers=config.sgtm_masked_layers, strategy=config.sgtm_strategy,
                   mask_shared=config.sgtm_mask_shared)

    # ------------------------------------------------------------------ gating
    def gate(self, modes: Tensor | Sequence[str]) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context (rows must match `modes`)."""
        return self.masks.gate(modes)

    def ablated(self) -> contextlib.AbstractContextManager:
        """Forward as the deployed policy: the reserved units contribute nothing."""
        return self.masks.ablated()

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
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The plain model's state dict (split parameters merged); `quarantine=False` zeroes the reserved units.

        Merged in fp32, out of place, cast once; keys match the plain transformers model.
        """
        return self.masks.merged_state_dict(ablate=not quarantine, dtype=dtype)

    def deployed_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The deployed policy's weights: the reserved units zeroed (same shapes as the plain model)."""
        return self.merged_state_dict(quarantine=False, dtype=dtype)

    def deployed_model(self) -> nn.Module:
        """A fresh plain transformers model holding `deployed_state_dict()`."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(self.model.config)
        missing, unexpected = model.load_state_dict(self.deployed_state_dict(), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
            raise RuntimeError(f"sgtm: deployed state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config = self.model.generation_config
        return model.eval()

    def save_deployed(self, output_dir: str, tokenizer=None) -> None:
        """Save the deployed policy as a plain transformers checkpoint (loadable without this library)."""
        self.deployed_model().save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)


__all__ = ["SGTMTarget"]
