"""MLP units of a model's own form beside its MLP, gated per row: the parts of the `dual_mlp` target.

`MLPUnits(mlp, arch, n)` holds `n` units of the form of `mlp` (GPT-Neo: `c_fc` rows and bias, the activation,
`c_proj` columns; the Llama family: `gate_proj`, `up_proj` rows, `down_proj` columns). `dual_hook`, a forward hook on
a wrapped MLP, adds its kept and quarantine units under the gate in the MLP's `route_slot` (the shared `RowGate` rule
of `route.masks.gating`) and, when the slot asks, records each row's squared gradient norm on the units (absorption
metrics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from route.masks import RowGate, redraw_like_
from route.targets.absorption import RowSqNorms, row_linear_sqnorms

KEEP, QUARANTINE = "keep", "quarantine"
UNIT_ATTRS = {KEEP: "route_keep", QUARANTINE: "route_quarantine"}
# per architecture: the MLP's input projections (split by rows), its output projection (by columns), its activation
FORMS = {"gpt_neo": (("c_fc",), "c_proj", "act"), "llama": (("gate_proj", "up_proj"), "down_proj", "act_fn")}


class GateSlot:
    """The gate every wrapped MLP of one target reads (None: the plain sum)."""

    route_gate: RowGate | None = None
    row_norms: RowSqNorms | None = None  # absorption metrics: per-row gradient norms of each gated backward


class MLPUnits(nn.Module):
    """`n` MLP units of the form of `mlp` (an architecture in `FORMS`): input rows drawn at the std of the MLP's own
    (bias zero), output columns zero and without bias (the model's own output bias is counted once)."""

    def __init__(self, mlp: nn.Module, arch: str, n: int):
        super().__init__()
        ins, out, _ = FORMS[arch]
        self.arch = arch
        for name in ins:
            src = getattr(mlp, name)
            lin = nn.Linear(
                src.in_features, n, bias=src.bias is not None, device=src.weight.device, dtype=src.weight.dtype
            )
            redraw_like_(lin.weight, src.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
            setattr(self, name, lin)
        src = getattr(mlp, out)
        setattr(self, out, nn.Linear(n, src.out_features, bias=False, device=src.weight.device, dtype=src.weight.dtype))
        nn.init.zeros_(getattr(self, out).weight)

    def forward(self, x: Tensor, act, record: Callable[[Tensor], None] | None = None) -> Tensor:
        """The units' output; with `record`, each row's squared gradient norm on their weights is passed to it in
        the backward (what the row actually sends into them, after the gate)."""

        def lin(name: str, h: Tensor) -> Tensor:
            return _recorded(getattr(self, name), h, record)

        if self.arch == "gpt_neo":
            return lin("c_proj", act(lin("c_fc", x)))
        return lin("down_proj", act(lin("gate_proj", x)) * lin("up_proj", x))


def _recorded(linear: nn.Linear, x: Tensor, record: Callable[[Tensor], None] | None) -> Tensor:
    """`linear(x)`; with `record`, a hook on the output passes each row's ||dW_b||^2 + ||db_b||^2 to it."""
    y = linear(x)
    if record is not None and y.requires_grad and linear.weight.requires_grad:

        def hook(dy: Tensor) -> None:
            sq = row_linear_sqnorms(dy, x)
            if linear.bias is not None:
                sq = sq + dy.reshape(dy.shape[0], -1, dy.shape[-1]).float().sum(1).pow(2).sum(1)
            record(sq)

        y.register_hook(hook)
    return y


def dual_hook(mlp: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """Forward hook of a wrapped MLP: its output plus the gated kept and quarantine units on the same input."""
    x, act = args[0], getattr(mlp, FORMS[mlp.route_keep.arch][2])
    gate, norms = mlp.route_slot.route_gate, mlp.route_slot.row_norms
    if gate is None or not torch.is_grad_enabled():
        norms = None
    kept = mlp.route_keep(x, act, None if norms is None else functools.partial(norms.add, KEEP))
    if gate is not None and gate.is_ablated:  # the deployed policy: the quarantine is not computed
        return out + kept
    quar = mlp.route_quarantine(x, act, None if norms is None else functools.partial(norms.add, QUARANTINE))
    if gate is None:
        return out + kept + quar
    return out + gate.kept(kept) + gate.quarantine(quar)


__all__ = ["FORMS", "KEEP", "QUARANTINE", "UNIT_ATTRS", "GateSlot", "MLPUnits", "dual_hook"]
