"""Masked linear layers: SGTM's `SplitLinearOut` and the per-row parameter masks behind every strategy.

SGTM (selective gradient masking) and gradient routing (Cloud et al. 2024) restrict which
parameters an example's gradient reaches; these layers do it per batch row.

A masked layer's units are split *retain first*: an input projection (q/k/v, the MLP's input
projections) has its first `retain_dim` output rows retain and the rest forget; an output
projection (attention out, MLP down) has its first `retain_dim` input columns retain, and its
bias counts as retain. Three module types carry the split:

- `GatedLinear`: a plain `nn.Linear` (same state-dict keys) that knows its split;
- `SplitLinearOut(in, out, retain_dim)`: the seed's drop-in `nn.Linear` with `weight_retain` /
  `weight_forget` (and biases) as separate parameters, split by output rows;
- `SplitLinearIn(in, out, retain_dim)`: the same split by input columns, for output
  projections (not in the seed, whose output projections stay whole; separate parameters let
  an optimizer step the retain and forget columns independently, which the RL target needs).

While a `RowGate` is attached (`module.row_gate`, set by `SGTMMasks.gate`), an output
projection gates its input per row (forget activations zeroed on retain rows, kept activations
detached/zeroed on forget rows as the strategy says) and parameter masking runs through
`masked_linear`: the forward is exactly `F.linear`, the input gradient is unchanged, and the
weight gradient skips the kept slice for the rows that must not train it. The seed instead
zeroes whole-batch gradients after the backward (`adjust_gradients`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from route.masks.gating import RowGate


class _MaskedLinear(torch.autograd.Function):
    """F.linear whose weight/bias gradient skips some batch rows on the kept slice [:kept] and/or the rest.

    `kept_rows[b] == False`: row b sends no gradient to the kept slice; `rest_rows[b] == False`: none
    to the rest. dim 0 splits output rows (the bias with them); dim 1 splits input columns (the bias
    counts as kept). The input gradient is never masked.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, kept_rows: Tensor, rest_rows: Tensor,
                dim: int, kept: int) -> Tensor:
        ctx.save_for_backward(x, weight, kept_rows, rest_rows)
        ctx.dim, ctx.kept, ctx.has_bias = dim, kept, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, kept_rows, rest_rows = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g.matmul(weight.to(g.dtype))
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            shape = (-1, *([1] * (g.dim() - 1)))
            mk, mr = kept_rows.to(g.dtype).view(shape), rest_rows.to(g.dtype).view(shape)
            k = ctx.kept
            g_w, x_w = g, x
            if ctx.dim == 0:
                g_w = g_b = torch.cat([g[..., :k] * mk, g[..., k:] * mr], dim=-1)
            else:
                x_w = torch.cat([x[..., :k] * mk.to(x.dtype), x[..., k:] * mr.to(x.dtype)], dim=-1)
                g_b = g * mk
            gw = g_w.reshape(-1, g.shape[-1]).T.matmul(x_w.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
            if ctx.has_bias:
                gb = g_b.reshape(-1, g.shape[-1]).sum(0)
        return gx, gw, gb, None, None, None, None


def masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor | None, dim: int, kept: int,
                  rest_rows: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`; batch rows with `rows[b] == False` send no gradient to the kept slice
    (and rows with `rest_rows[b] == False` none to the rest)."""
    if rows is None and rest_rows is None:
        return F.linear(x, weight, bias)
    n = (rows if rows is not None else rest_rows).shape[0]
    if n != x.shape[0]:
        raise RuntimeError(f"gate: {n} row modes for a forward with batch size {x.shape[0]}")
    ones = torch.ones(n, dtype=torch.bool, device=x.device)
    rows = ones if rows is None else rows.to(x.device)
    rest_rows = ones if rest_rows is None else rest_rows.to(x.device)
    return _MaskedLinear.apply(x, weight, bias, rows, rest_rows, dim, kept)


def _gated_forward(module: nn.Module, x: Tensor) -> Tensor:
    gate: RowGate | None = module.row_gate
    if gate is None:
        return F.linear(x, module.weight, module.bias)
    if module.split_dim == 1:
        x = gate.split(x, module.retain_dim)
    if gate.is_ablated:
        return F.linear(x, module.weight, module.bias)
    rows = gate.kept_params if module.split_dim == 0 else gate.proj_params
    return masked_linear(x, module.weight, module.bias, rows, module.split_dim, module.retain_dim,
                         gate.quar_param_rows())


class _Split:
    """Shared bits of the masked linears: the split, the gate slot and the retain/forget slices."""

    split_dim: int  # 0: output rows (input projections), 1: input columns (output projections)
    retain_dim: int
    row_gate: RowGate | None = None

    @property
    def forget_dim(self) -> int:
        return (self.out_features if self.split_dim == 0 else self.in_features) - self.retain_dim

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"retain_dim={self.retain_dim}, split={'rows' if self.split_dim == 0 else 'columns'}")

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` holding a copy of the merged weights."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


def _check_dim(retain_dim: int, units: int, what: str) -> int:
    if not isinstance(retain_dim, int) or not 0 <= retain_dim <= units:
        raise ValueError(f"retain_dim: must be an int in [0, {units}] ({what}), got {retain_dim!r}")
    return retain_dim


class GatedLinear(_Split, nn.Linear):
    """An `nn.Linear` (same parameters and keys) split at `retain_dim` along `split_dim`.

    Gated while `row_gate` is set.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, split_dim: int, retain_dim: int,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.split_dim = split_dim
        self.retain_dim = _check_dim(retain_dim, out_features if split_dim == 0 else in_features, "units")
        self.row_gate = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, split_dim: int, retain_dim: int) -> GatedLinear:
        """Wrap `linear`'s own parameters (shared, not copied; no random draws)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj.in_features, obj.out_features = linear.in_features, linear.out_features
        obj.weight, obj.bias = linear.weight, linear.bias
        obj.split_dim = split_dim
        obj.retain_dim = _check_dim(retain_dim, linear.out_features if split_dim == 0 else linear.in_features,
                                    "units")
        obj.row_gate = None
        return obj

    def forward(self, x: Tensor) -> Tensor:
        return _gated_forward(self, x)


class _SplitLinear(_Split, nn.Module):
    """Constructors shared by the split linears: built like `nn.Linear` (same random draws), or from one."""

    def __init__(self, in_features: int, out_features: int, retain_dim: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._assign(ref.weight.detach(), None if ref.bias is None else ref.bias.detach(), retain_dim)

    def _assign(self, weight: Tensor, bias: Tensor | None, retain_dim: int) -> None:
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear, retain_dim: int):
        """Split a copy of `linear`'s weights (no random draws); trainability follows the source parameters."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._assign(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), retain_dim)
        for name, p in obj.named_parameters():
            p.requires_grad_((linear.bias if name.startswith("bias") else linear.weight).requires_grad)
        return obj


class SplitLinearOut(_SplitLinear):
    """Drop-in `nn.Linear` whose first `retain_dim` output rows (`weight_retain`, `bias_retain`) and the rest
    (`weight_forget`, `bias_forget`) are separate parameters.

    Same parameter count, same random draws at construction (an `nn.Linear` is initialised and
    split), the same forward and backward; `weight` and `bias` are the concatenations.
    """

    split_dim = 0

    def _assign(self, weight: Tensor, bias: Tensor | None, retain_dim: int) -> None:
        self.out_features, self.in_features = weight.shape
        self.retain_dim = _check_dim(retain_dim, self.out_features, "output rows")
        self.row_gate = None
        r = self.retain_dim
        self.weight_retain = nn.Parameter(weight[:r].clone())
        self.weight_forget = nn.Parameter(weight[r:].clone())
        if bias is None:
            self.register_parameter("bias_retain", None)
            self.register_parameter("bias_forget", None)
        else:
            self.bias_retain = nn.Parameter(bias[:r].clone())
            self.bias_forget = nn.Parameter(bias[r:].clone())

    @property
    def weight(self) -> Tensor:
        return torch.cat([self.weight_retain, self.weight_forget], dim=0)

    @property
    def bias(self) -> Tensor | None:
        if self.bias_retain is None:
            return None
        return torch.cat([self.bias_retain, self.bias_forget], dim=0)

    def forward(self, x: Tensor) -> Tensor:
        return _gated_forward(self, x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _split_merged_keys(state_dict, prefix, self.retain_dim, dim=0, bias_split=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SplitLinearIn(_SplitLinear):
    """`nn.Linear` with its first `retain_dim` input columns (`weight_retain`) and the rest (`weight_forget`)
    as separate parameters; the bias stays whole (it counts as retain)."""

    split_dim = 1

    def _assign(self, weight: Tensor, bias: Tensor | None, retain_dim: int) -> None:
        self.out_features, self.in_features = weight.shape
        self.retain_dim = _check_dim(retain_dim, self.in_features, "input columns")
        self.row_gate = None
        r = self.retain_dim
        self.weight_retain = nn.Parameter(weight[:, :r].clone())
        self.weight_forget = nn.Parameter(weight[:, r:].clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.clone())

    @property
    def weight(self) -> Tensor:
        return torch.cat([self.weight_retain, self.weight_forget], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return _gated_forward(self, x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _split_merged_keys(state_dict, prefix, self.retain_dim, dim=1, bias_split=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _split_merged_keys(state_dict: dict, prefix: str, retain_dim: int, dim: int, bias_split: bool) -> None:
    """Accept a vanilla `prefix.weight` / `prefix.bias` in place of the split keys."""
    w = state_dict.pop(prefix + "weight", None)
    if w is not None:
        state_dict[prefix + "weight_retain"], state_dict[prefix + "weight_forget"] = w.split(
            [retain_dim, w.shape[dim] - retain_dim], dim=dim)
    if bias_split and prefix + "bias" in state_dict:
        b = state_dict.pop(prefix + "bias")
        state_dict[prefix + "bias_retain"], state_dict[prefix + "bias_forget"] = b[:retain_dim], b[retain_dim:]


MASKED_LINEARS = (GatedLinear, SplitLinearOut, SplitLinearIn)


def convert_linear(linear: nn.Linear, split_dim: int, retain_dim: int, split: bool) -> nn.Module:
    """`linear` as a masked linear: split into separate parameters (a copy) or gated in place (shared parameters)."""
    if isinstance(linear, MASKED_LINEARS):
        raise ValueError(f"convert_linear: {type(linear).__name__} is already masked")
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"convert_linear: expected nn.Linear, got {type(linear).__name__}")
    if not split:
        return GatedLinear.from_linear(linear, split_dim, retain_dim)
    return (SplitLinearOut if split_dim == 0 else SplitLinearIn).from_linear(linear, retain_dim)


def init_normal_(module: nn.Module, std: float) -> None:
    """`normal_(0, std)` on the merged weight and zero bias, drawing exactly what an `nn.Linear` init draws."""
    with torch.no_grad():
        full = torch.empty(module.out_features, module.in_features, dtype=module.weight_retain.dtype,
                           device=module.weight_retain.device).normal_(0.0, std)
        r = module.retain_dim
        if module.split_dim == 0:
            module.weight_retain.copy_(full[:r])
            module.weight_forget.copy_(full[r:])
        else:
            module.weight_retain.copy_(full[:, :r])
            module.weight_forget.copy_(full[:, r:])
        for name in ("bias", "bias_retain", "bias_forget"):
            p = module._parameters.get(name)
            if p is not None:
                p.zero_()


__all__ = ["GatedLinear", "MASKED_LINEARS", "SplitLinearIn", "SplitLinearOut", "convert_linear", "init_normal_",
           "masked_linear"]
