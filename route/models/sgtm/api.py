"""The SGTM model API shared by the GPT-Neo and Llama-family classes (SGTM seed names and semantics).

SGTM (selective gradient masking) is gradient routing (Cloud et al. 2024) onto reserved units.

A model class that mixes in `SGTMModelMixin` gains, on top of its transformers forward:

    out = model(input_ids=..., labels=..., sgtm_mode="forget")     # or "retain", "default", or one mode per row
    out.loss.backward()
    model.adjust_gradients(sgtm_mode="forget")
    model.ablate(trainable=False)
    model.named_parameters_split(sgtm_split="forget")                # "forget", "retain" or "joint"

The SGTM fields live on the transformers config (as in the seed): `retain_mlp_dim`,
`retain_attn_heads`, `masked_layers`, `masking_strategy`, `split_masked_weights`,
`sgtm_mask_embeddings`. Departures from the seed: `sgtm_mode` may be a per-row list or tensor
(one forward and backward serve a batch that mixes modes), parameter masking happens inside the
backward (so `adjust_gradients` is idempotent), and `ablate` also zeroes the output projections'
forget columns (see `route.masks.model`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from route.masks.linear import SplitLinearIn, SplitLinearOut, init_normal_
from route.masks.model import SGTMMasks
from route.masks.strategies import available_strategies, get_strategy
from route.models.tiered.model import TieredKeyMixin

SPLITS = ("forget", "retain", "joint")
SGTM_CONFIG_FIELDS = ("retain_mlp_dim", "retain_attn_heads", "masked_layers", "masking_strategy",
                      "split_masked_weights", "sgtm_mask_embeddings", "lm_head_bias")


@dataclass(frozen=True)
class SGTMSettings:
    """The SGTM fields of a config, validated and resolved (None -> the layer's full size / every layer)."""

    retain_mlp_dim: int
    retain_attn_heads: int
    masked_layers: list[int]
    masking_strategy: str
    split_masked_weights: bool
    sgtm_mask_embeddings: bool


def sgtm_settings(config, mlp_dim: int, heads: int, num_layers: int) -> SGTMSettings:
    """Read, check and write back (resolved) the SGTM fields of a transformers config."""
    from route.masks.arch import resolve_layers

    strategy = getattr(config, "masking_strategy", None) or "parameter_masking"
    if strategy not in available_strategies():
        raise ValueError(f"masking_strategy: invalid value {strategy!r}; allowed values: {available_strategies()}")
    retain_mlp = getattr(config, "retain_mlp_dim", None)
    retain_mlp = mlp_dim if retain_mlp is None else retain_mlp
    if not isinstance(retain_mlp, int) or not 0 <= retain_mlp <= mlp_dim:
        raise ValueError(f"retain_mlp_dim: must be an int in [0, {mlp_dim}] (the MLP width), got {retain_mlp!r}")
    retain_heads = getattr(config, "retain_attn_heads", None)
    retain_heads = heads if retain_heads is None else retain_heads
    if not isinstance(retain_heads, int) or not 0 <= retain_heads <= heads:
        raise ValueError(f"retain_attn_heads: must be an int in [0, {heads}] (the head count), got {retain_heads!r}")
    layers = resolve_layers(getattr(config, "masked_layers", None), num_layers)
    settings = SGTMSettings(retain_mlp, retain_heads, layers, strategy,
                            bool(getattr(config, "split_masked_weights", False)),
                            bool(getattr(config, "sgtm_mask_embeddings", False)))
    for k, v in settings.__dict__.items():
        setattr(config, k, v)
    return settings


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(x, Tensor):
            return x.shape[0]
    return None


def with_sgtm_mode(base_forward):
    """Wrap a transformers `forward` so it accepts `sgtm_mode=` (keyword) and keeps its introspectable signature."""

    def forward(self, *args, sgtm_mode=None, **kwargs):
        with self.sgtm_gate(sgtm_mode, _batch_size(args, kwargs)):
            return base_forward(self, *args, **kwargs)

    sig = inspect.signature(base_forward)
    params = list(sig.parameters.values())
    extra = inspect.Parameter("sgtm_mode", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    forward.__signature__ = sig.replace(parameters=[*params[:at], extra, *params[at:]])
    forward.__doc__ = (base_forward.__doc__ or "") + "\n    sgtm_mode: forget, retain, default, or one per batch row."
    return forward


class SGTMModelMixin(TieredKeyMixin):
    """SGTM's model methods on top of a transformers model whose masked layers are converted.

    Also the tiered model methods (`apply_key`, `unapply_key`, `mask_*_gradients`; `route.models.tiered`).
    """

    def _sgtm_shared_modules(self) -> list[nn.Module]:
        """Modules that forget rows must not train: the embeddings (and a head tied to them) if masked."""
        if not getattr(self.config, "sgtm_mask_embeddings", False):
            return []
        base = getattr(self, self.base_model_prefix, self) if hasattr(self, self.base_model_prefix) else self
        mods = [m for m in (getattr(base, "wte", None), getattr(base, "wpe", None),
                            getattr(base, "embed_tokens", None)) if m is not None]
        head = getattr(self, "lm_head", None)
        if head is not None and any(head.weight is m.weight for m in mods):
            mods.append(head)
        return mods

    @property
    def sgtm_masks(self) -> SGTMMasks:
        """The `SGTMMasks` over this model's masked layers (built once)."""
        masks = self.__dict__.get("_sgtm_masks_cache")
        if masks is None or masks.strategy != self.config.masking_strategy:
            masks = SGTMMasks(self, self.config.masking_strategy, self._sgtm_shared_modules())
            self.__dict__["_sgtm_masks_cache"] = masks
        return masks

    def sgtm_gate(self, sgtm_mode, batch_size: int | None = None) -> contextlib.AbstractContextManager:
        """The gate context for one forward (`None` or "default" on every row: the vanilla model)."""
        if sgtm_mode is None or (isinstance(sgtm_mode, str) and sgtm_mode == "default"):
            return contextlib.nullcontext()
        if isinstance(sgtm_mode, str) and batch_size is None:
            raise ValueError("sgtm_mode: a single mode name needs input_ids or inputs_embeds to size the batch")
        try:
            return self.sgtm_masks.gate(sgtm_mode, batch_size)
        except ValueError as e:  # "mode: ..." -> "sgtm_mode: ..."
            raise ValueError(f"sgtm_{e}" if str(e).startswith("mode:") else str(e)) from None

    def adjust_gradients(self, sgtm_mode="default") -> None:
        """After `backward()`: zero the gradients `sgtm_mode` must not produce (the seed's whole-batch step)."""
        self.sgtm_masks.adjust_gradients(sgtm_mode)

    def ablate(self, trainable: bool = False) -> None:
        """Remove the forget units: zero them, or (trainable) redraw every forget slice at its retain slice's std.

        As the public model: with `trainable=True` the input rows, their biases and the output
        projections' forget columns are all redrawn, whatever the strategy and weight layout.
        """
        self.sgtm_masks.ablate(trainable, redraw="all")

    def named_parameters_split(self, sgtm_split: str = "forget") -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of one split: "forget" (`*_forget`), "retain" (`*_retain`) or "joint" (the rest).

        Needs `split_masked_weights=True`: with unsplit weights a parameter holds both kinds of units.
        """
        if sgtm_split not in SPLITS:
            raise ValueError(f"sgtm_split: invalid value {sgtm_split!r}; allowed values: {list(SPLITS)}")
        if not getattr(self.config, "split_masked_weights", False):
            raise ValueError("named_parameters_split: needs split_masked_weights=True (unsplit weights hold retain "
                             "and forget units in one parameter)")
        for name, p in self.named_parameters():
            leaf = name.rpartition(".")[2]
            role = "forget" if leaf.endswith("_forget") else "retain" if leaf.endswith("_retain") else "joint"
            if role == sgtm_split:
                yield name, p

    def to_vanilla_state_dict(self, ablate: bool = False) -> dict[str, Tensor]:
        """This model's state dict under the vanilla transformers keys (forget units zeroed if `ablate`).

        A head bias (GPT-Neo's public layout) has no vanilla key: dropped while zero, an error otherwise.
        """
        state = self.sgtm_masks.merged_state_dict(ablate=ablate)
        bias = state.pop("lm_head.bias", None)
        if bias is not None and bool(bias.any()):
            raise ValueError("to_vanilla: lm_head.bias is non-zero and the vanilla class has no head bias; build the "
                             "model with lm_head_bias=False to export it, or keep this class (save_pretrained)")
        return state

    def to_vanilla(self, ablate: bool = False) -> nn.Module:
        """The vanilla transformers model (`self._vanilla`) with these weights (forget units zeroed if `ablate`)."""
        config = copy.deepcopy(self.config)
        for k in SGTM_CONFIG_FIELDS:
            config.__dict__.pop(k, None)
        vanilla = self._vanilla(config)
        load_vanilla(vanilla, self.to_vanilla_state_dict(ablate=ablate))
        vanilla.generation_config = copy.deepcopy(self.generation_config)
        return vanilla.to(self.device)

    @classmethod
    def from_vanilla(cls, model: nn.Module, **sgtm_fields):
        """An SGTM model holding a vanilla model's weights; `sgtm_fields` set the SGTM config fields."""
        unknown = sorted(set(sgtm_fields) - set(SGTM_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"from_vanilla: unknown fields {unknown}; allowed values: {list(SGTM_CONFIG_FIELDS)}")
        config = copy.deepcopy(model.config)
        for k, v in sgtm_fields.items():
            setattr(config, k, v)
        out = cls(config)
        load_vanilla(out, model.state_dict())
        return out.to(model.device)

    def _init_weights(self, module: nn.Module) -> None:
        if not self._init_split_linear(module):
            super()._init_weights(module)

    def _init_split_linear(self, module: nn.Module) -> bool:
        """`_init_weights` for split linears: the same draws as the vanilla `nn.Linear` init; True if handled."""
        if not isinstance(module, (SplitLinearOut, SplitLinearIn)):
            return False
        if not getattr(module.weight_retain, "_is_hf_initialized", False):
            init_normal_(module, getattr(self.config, "initializer_range", 0.02))
        return True

    @property
    def sgtm_strategy(self):
        return get_strategy(self.config.masking_strategy)


def load_vanilla(model: nn.Module, vanilla_state: dict[str, Tensor]) -> None:
    """Load a vanilla transformers state dict into an SGTM model (split modules take the merged keys)."""
    missing, unexpected = model.load_state_dict(dict(vanilla_state), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"sgtm: state dict mismatch: missing={missing} unexpected={unexpected}")
    with torch.no_grad():
        if hasattr(model, "tie_weights"):
            model.tie_weights()


__all__ = ["SGTM_CONFIG_FIELDS", "SPLITS", "SGTMModelMixin", "SGTMSettings", "load_vanilla", "sgtm_settings",
           "with_sgtm_mode"]
