"""Architecture adapters: where a transformer layer's MLP units and attention heads live.

Implements the unit split of SGTM (selective gradient masking) and of gradient routing
(Cloud et al. 2024), whose reserved units are whole MLP units and heads.

SGTM's seed masks GPT-Neo only. The same split is defined here for the Llama family (Llama,
Qwen2, Mistral and any decoder whose layers have `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj`):

- MLP units: the first `retain_mlp_dim` rows of every MLP input projection (GPT-Neo `c_fc`;
  Llama `gate_proj` and `up_proj`) and the same columns of the output projection (`c_proj`,
  `down_proj`) are retain; the rest are forget.
- Heads: the first `retain_attn_heads` heads (rows of q, columns of the attention output
  projection) are retain. With grouped KV heads, a KV head is forget only if every query head
  that reads it is forget, so retain heads must be whole KV groups (a clear error otherwise).

`apply_masks(model, ...)` converts the chosen layers in place: input projections become
`SplitLinearOut` (split weights) or `GatedLinear`; output projections become `SplitLinearIn`
when `split_out` (separate parameters, needed for optimizer groups) or `GatedLinear` (the
seed's layout). Conversion copies or shares weights and draws no random numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from route.masks.linear import convert_linear

ARCHS = ("gpt_neo", "llama")


@dataclass(frozen=True)
class LayerShape:
    """Sizes of one layer's maskable units."""

    mlp_dim: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def detect_arch(model: nn.Module) -> str:
    """"gpt_neo" or "llama" (the Llama family), from the module layout."""
    layers = _layer_list(model, quiet=True)
    if layers is not None and len(layers):
        first = layers[0]
        if hasattr(first, "attn") and hasattr(first.attn, "attention") and hasattr(first.mlp, "c_fc"):
            return "gpt_neo"
        if hasattr(first, "self_attn") and hasattr(first.mlp, "gate_proj") and hasattr(first.self_attn, "o_proj"):
            return "llama"
    raise ValueError(f"sgtm: unsupported architecture {type(model).__name__}; supported: GPT-Neo and the Llama "
                     "family (layers with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj)")


def _layer_list(model: nn.Module, quiet: bool = False):
    for path in ("transformer.h", "model.layers", "h", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    if quiet:
        return None
    raise ValueError(f"sgtm: no decoder layers found in {type(model).__name__}")


def layers_of(model: nn.Module) -> nn.ModuleList:
    return _layer_list(model)


def layer_shape(layer: nn.Module, arch: str) -> LayerShape:
    if arch == "gpt_neo":
        att = layer.attn.attention
        return LayerShape(mlp_dim=layer.mlp.c_fc.out_features, heads=att.num_heads, kv_heads=att.num_heads,
                          head_dim=att.head_dim)
    if arch == "llama":
        att = layer.self_attn
        cfg = att.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return LayerShape(mlp_dim=layer.mlp.gate_proj.out_features, heads=heads, kv_heads=kv, head_dim=att.head_dim)
    raise ValueError(f"arch: invalid value {arch!r}; allowed values: {list(ARCHS)}")


def check_sizes(shape: LayerShape, retain_mlp_dim: int, retain_heads: int) -> None:
    """Raise a ValueError naming the field when a retain size does not fit the layer."""
    if not isinstance(retain_mlp_dim, int) or not 0 <= retain_mlp_dim <= shape.mlp_dim:
        raise ValueError(f"retain_mlp_dim: must be an int in [0, {shape.mlp_dim}] (the MLP width), "
                         f"got {retain_mlp_dim!r}")
    allowed = list(range(0, shape.heads + 1, shape.group))
    if retain_heads not in allowed:
        raise ValueError(f"retain_attn_heads: with {shape.heads} heads sharing {shape.kv_heads} KV heads, retain "
                         f"heads must be whole KV groups; allowed values: {allowed}, got {retain_heads!r}")


def convert_layer(layer: nn.Module, arch: str, retain_mlp_dim: int, retain_heads: int, split: bool,
                  split_out: bool) -> LayerShape:
    """Convert one layer's projections to masked linears in place; returns its shape."""
    shape = layer_shape(layer, arch)
    check_sizes(shape, retain_mlp_dim, retain_heads)
    q_rows = retain_heads * shape.head_dim
    kv_rows = (retain_heads // shape.group) * shape.head_dim
    if arch == "gpt_neo":
        att, mlp = layer.attn.attention, layer.mlp
        ins = [(att, "q_proj", q_rows), (att, "k_proj", kv_rows), (att, "v_proj", kv_rows),
               (mlp, "c_fc", retain_mlp_dim)]
        outs = [(att, "out_proj", q_rows), (mlp, "c_proj", retain_mlp_dim)]
    else:
        att, mlp = layer.self_attn, layer.mlp
        ins = [(att, "q_proj", q_rows), (att, "k_proj", kv_rows), (att, "v_proj", kv_rows),
               (mlp, "gate_proj", retain_mlp_dim), (mlp, "up_proj", retain_mlp_dim)]
        outs = [(att, "o_proj", q_rows), (mlp, "down_proj", retain_mlp_dim)]
    for parent, attr, kept in ins:
        setattr(parent, attr, convert_linear(getattr(parent, attr), 0, kept, split))
    for parent, attr, kept in outs:
        setattr(parent, attr, convert_linear(getattr(parent, attr), 1, kept, split and split_out))
    return shape


def resolve_layers(masked_layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """`masked_layers` checked against the model (None: every layer); negative indices count from the end."""
    if masked_layers is None:
        return list(range(num_layers))
    out = []
    for i in masked_layers:
        if not isinstance(i, int) or not -num_layers <= i < num_layers:
            raise ValueError(f"masked_layers: {i!r} is not a layer index; allowed values: "
                             f"{list(range(num_layers))}")
        out.append(i % num_layers)
    return sorted(set(out))


def apply_masks(model: nn.Module, *, retain_mlp_dim: int | None = None, retain_attn_heads: int | None = None,
                forget_mlp_dim: int | None = None, forget_attn_heads: int | None = None,
                masked_layers: Sequence[int] | None = None, split: bool = True, split_out: bool = True) -> list[int]:
    """Convert `model`'s masked layers in place; returns their indices.

    Give each size either as retain (`retain_mlp_dim`, `retain_attn_heads`) or as forget
    (`forget_mlp_dim`, `forget_attn_heads`); unset means no forget units of that kind.
    """
    arch = detect_arch(model)
    layers = layers_of(model)
    chosen = resolve_layers(masked_layers, len(layers))
    for i in chosen:
        shape = layer_shape(layers[i], arch)
        mlp = _resolve(retain_mlp_dim, forget_mlp_dim, shape.mlp_dim, "mlp_dim")
        heads = _resolve(retain_attn_heads, forget_attn_heads, shape.heads, "attn_heads")
        convert_layer(layers[i], arch, mlp, heads, split, split_out)
    return chosen


def _resolve(retain: int | None, forget: int | None, total: int, what: str) -> int:
    if retain is not None and forget is not None:
        raise ValueError(f"give retain_{what} or forget_{what}, not both")
    if forget is not None:
        if not isinstance(forget, int) or not 0 <= forget <= total:
            raise ValueError(f"forget_{what}: must be an int in [0, {total}], got {forget!r}")
        return total - forget
    return total if retain is None else retain


__all__ = ["ARCHS", "LayerShape", "apply_masks", "check_sizes", "convert_layer", "detect_arch", "layer_shape",
           "layers_of", "resolve_layers"]
