"""Where a permutation key's slots live in a model: heads and MLP columns as spans of parameters.

Tiered Alignment swaps heads and MLP columns between layers. This module maps a slot (field, layer,
index) to the parameter slices it covers, on top of the shared architecture core
(`route.masks.arch`: GPT-Neo and the Llama family, Qwen2 included), for plain transformers models and
for SGTM models whose projections are split (`SplitLinearOut` / `SplitLinearIn`) or gated.

- a head (KV head `h`, query group of `g` heads of `head_dim` each, `head_dim` read from the attention
  module, i.e. from `config.head_dim` when the config sets it): q rows `[h*g*hd, (h+1)*g*hd)`, k and v
  rows `[h*hd, (h+1)*hd)`, their biases when present, and the same query columns of the output
  projection (its bias stays: it belongs to no head);
- an MLP column `c`: row `c` of `c_fc` (GPT-Neo) or of `gate_proj` and `up_proj`, their biases, and
  column `c` of the output projection (`c_proj`, `down_proj`; its bias stays).

Departure from the seed's code: models whose attention normalises queries or keys per layer (Qwen3's
`q_norm` / `k_norm`, one weight shared by every head of the layer) are refused, since a head moved to
another layer cannot take its layer's norm with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from route.masks.arch import detect_arch, layer_shape, layers_of
from route.masks.linear import SplitLinearIn, SplitLinearOut


@dataclass(frozen=True)
class Span:
    """`length` entries of `param` along `dim` from `start`: `of(t)` is that view of a tensor shaped like it."""

    param: nn.Parameter
    dim: int
    start: int
    length: int

    def of(self, t: Tensor) -> Tensor:
        return t.narrow(self.dim, self.start, self.length)


def linear_spans(module: nn.Module, dim: int, start: int, length: int) -> list[Span]:
    """The weight (and, for rows, bias) slices of `module`'s units `[start, start+length)` along `dim`
    (0: output rows, 1: input columns), whichever parameters hold them."""
    split_here = (isinstance(module, SplitLinearOut) and dim == 0) or (isinstance(module, SplitLinearIn) and dim == 1)
    if isinstance(module, (SplitLinearOut, SplitLinearIn)) and not split_here:
        raise ValueError(
            f"tiered: {type(module).__name__} is split along the other dimension; cannot move "
            f"{'rows' if dim == 0 else 'columns'} of it"
        )
    if split_here:
        r = module.retain_dim
        if start + length <= r:
            weight, bias, offset = module.weight_retain, getattr(module, "bias_retain", None), 0
        elif start >= r:
            weight, bias, offset = module.weight_forget, getattr(module, "bias_forget", None), r
        else:
            raise ValueError(f"tiered: units [{start}, {start + length}) straddle the retain/forget split at {r}")
    else:
        weight, bias, offset = module.weight, module.bias, 0
    spans = [Span(weight, dim, start - offset, length)]
    if dim == 0 and bias is not None:
        spans.append(Span(bias, 0, start - offset, length))
    return spans


@dataclass(frozen=True)
class ModelLayout:
    """The sizes a key is checked against and the modules its slots live in."""

    arch: str
    layers: tuple
    kv_heads: int
    group: int
    head_dim: int
    mlp_dim: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _modules(self, layer: int) -> dict[str, list[nn.Module]]:
        block = self.layers[layer]
        if self.arch == "gpt_neo":
            att, mlp = block.attn.attention, block.mlp
            return {
                "qkv": [att.q_proj, att.k_proj, att.v_proj],
                "out": [att.out_proj],
                "up": [mlp.c_fc],
                "down": [mlp.c_proj],
            }
        att, mlp = block.self_attn, block.mlp
        return {
            "qkv": [att.q_proj, att.k_proj, att.v_proj],
            "out": [att.o_proj],
            "up": [mlp.gate_proj, mlp.up_proj],
            "down": [mlp.down_proj],
        }

    def slot_spans(self, field: str, layer: int, idx: int) -> list[Span]:
        """The parameter slices one slot of `field` covers (same order for every slot of a field)."""
        m = self._modules(layer)
        hd, g = self.head_dim, self.group
        spans: list[Span] = []
        if field in ("attn_heads", "attn_out_heads"):
            q_start, q_len = idx * g * hd, g * hd
            if field == "attn_heads":
                q, k, v = m["qkv"]
                spans += linear_spans(q, 0, q_start, q_len)
                spans += linear_spans(k, 0, idx * hd, hd) + linear_spans(v, 0, idx * hd, hd)
            spans += linear_spans(m["out"][0], 1, q_start, q_len)
        elif field in ("mlp_cols", "mlp_up_cols", "mlp_down_cols"):
            if field != "mlp_down_cols":
                for up in m["up"]:
                    spans += linear_spans(up, 0, idx, 1)
            if field != "mlp_up_cols":
                spans += linear_spans(m["down"][0], 1, idx, 1)
        else:
            raise ValueError(f"field: invalid value {field!r}")
        return spans


def model_layout(model: nn.Module) -> ModelLayout:
    """The layout of a GPT-Neo or Llama-family model (Qwen2 included); every layer must have the same sizes."""
    arch = detect_arch(model)
    layers = tuple(layers_of(model))
    shapes = {layer_shape(b, arch) for b in layers}
    if len(shapes) != 1:
        raise ValueError(
            f"tiered: layers differ in size ({sorted(map(str, shapes))}); a key swaps between equal layers"
        )
    shape = shapes.pop()
    for i, b in enumerate(layers):
        att = getattr(b, "self_attn", None)
        if att is not None and (getattr(att, "q_norm", None) is not None or getattr(att, "k_norm", None) is not None):
            raise ValueError(
                f"tiered: layer {i} normalises queries/keys with one weight per layer (q_norm/k_norm); a "
                "head moved across layers cannot carry it, so such models are not supported"
            )
    return ModelLayout(arch, layers, shape.kv_heads, shape.group, shape.head_dim, shape.mlp_dim)


__all__ = ["ModelLayout", "Span", "linear_spans", "model_layout"]
