"""`dual_lora`: a kept LoRA and a quarantine LoRA on the same modules.

    y = W x + s_k B_k A_k x + s_q B_q A_q x        (B_k and B_q start at zero)

Both adapters are PEFT LoRA adapters ("keep" and "quarantine") active at once, so the model
stays a `PeftModel` (saving, TRL's PEFT paths), with separate parameters so that the optimizer
steps each group on its own. The forward is fused: each adapted layer runs one rank
r_k + r_q LoRA, `[B_k s_k | B_q s_q] ([A_k; A_q] x)`, instead of PEFT's loop over adapters,
and the per-row gate acts on the small rank-space activation `h = [A_k; A_q] x`:
the shared `RowGate` of the mask core (`route.masks`, `gradient_routing` strategy) splits `h`
at r_k (forget rows: kept components detached, or their gradient scaled under soft routing; retain rows:
quarantine components zeroed; exclusive rows: quarantine components detached) and
`masked_linear` keeps forget rows' gradient out of B_k. Values are exactly the unfused
forward's (up to float summation order); the SGTM models and the `sgtm` target gate through the
same `RowGate`, so there is one gating implementation. Under `ablated()` only the kept adapter
runs. `ablate(trainable=True)` is the LoRA analogue of a trainable re-init: B_q = 0 (the deployed
forward is unchanged) and A_q is redrawn at the kept A's scale, so gradient can reach the
quarantine again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn

from route.masks import RowGate, redraw_like_
from route.targets import register_target
from route.targets.absorption import RowSqNorms, row_linear_sqnorms
from route.targets.base import TargetArgs, TargetBase, export_scale
from route.targets.common import check_target_modules, check_unmerged, plain_name, plain_state_dict

KEEP, QUARANTINE = "keep", "quarantine"
STRATEGY = "gradient_routing"  # the mask-core strategy the adapters are gated with


class _GateSlot:
    """The gate every fused layer of one target reads (None: the plain model); set inside the target's contexts."""

    route_gate: RowGate | None = None
    row_norms: RowSqNorms | None = None  # absorption metrics: per-row gradient norms of each gated backward
    unrouted: bool = False  # split_moments: accumulate each adapter weight's unrouted gradient (`unrouted_grad`)


class _RoutedLoRA(torch.autograd.Function):
    """`[B_k s_k | B_q s_q] (([A_k; A_q] x) * value)` with the rank-space gradient masked by `grad`.

    One op for both adapters (no autograd nodes for the concatenations or the gate): `value`/`grad` are
    `RowGate.unit_masks` over the r_k + r_q rank units (None: all ones). A unit whose `grad` is 0 on a row is
    detached there: its value flows on, but the row sends no gradient into its A or B, nor through it into x; a
    soft-routing factor c scales all three by c. With `unrouted` (the four weights), the backward also adds each
    weight's unrouted gradient, the same products with `value` in place of `grad`, to `weight.unrouted_grad`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, a_k: Tensor, a_q: Tensor, b_k: Tensor, b_q: Tensor, s_k: float, s_q: float,
                value: Tensor | None, grad: Tensor | None, row_norms: RowSqNorms | None = None,
                unrouted: tuple[Tensor, ...] | None = None) -> Tensor:
        a = torch.cat([a_k, a_q])
        b = torch.cat([_scaled(b_k, s_k), _scaled(b_q, s_q)], dim=1)
        h = F.linear(x, a)
        ctx.save_for_backward(x, a, b, h, value, grad)
        ctx.rank_k, ctx.scales, ctx.row_norms, ctx.unrouted = a_k.shape[0], (s_k, s_q), row_norms, unrouted
        return F.linear(h if value is None else h * value, b)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, a, b, h, value, grad = ctx.saved_tensors
        rk, (s_k, s_q) = ctx.rank_k, ctx.scales
        dh = dy.matmul(b)
        if ctx.unrouted is not None:
            _add_unrouted(ctx.unrouted, dy, dh, x, h, value, rk, (s_k, s_q))
        if grad is not None:  # grad zero wherever value is zero, so h * grad is the value the row used
            dh, h = dh * grad, h * grad
        gx = dh.matmul(a) if ctx.needs_input_grad[0] else None
        ga = dh.flatten(0, -2).T.matmul(x.flatten(0, -2))
        gb = dy.flatten(0, -2).T.matmul(h.flatten(0, -2))
        if ctx.row_norms is not None:  # each row's share of ga and gb per rank unit, summed per adapter
            per_unit = row_linear_sqnorms(dh, x, per="out") + row_linear_sqnorms(dy, h, per="in") * torch.tensor(
                [s_k**2] * rk + [s_q**2] * (h.shape[-1] - rk), device=h.device)
            ctx.row_norms.add(KEEP, per_unit[:, :rk].sum(1))
            ctx.row_norms.add(QUARANTINE, per_unit[:, rk:].sum(1))
        return (gx, ga[:rk], ga[rk:], _scaled(gb[:, :rk], s_k), _scaled(gb[:, rk:], s_q), None, None, None, None,
                None, None)


def _add_unrouted(weights: tuple[Tensor, ...], dy: Tensor, dh: Tensor, x: Tensor, h: Tensor, value: Tensor | None,
                  rk: int, scales: tuple[float, float]) -> None:
    """Add the gradient (A_k, A_q, B_k, B_q) would get with no routing to each weight's `unrouted_grad`: the fused
    backward's products with the forward's `value` mask as the gradient mask (units absent from a row's forward
    still get nothing from it)."""
    if value is not None:
        dh, h = dh * value, h * value
    ga = dh.flatten(0, -2).T.matmul(x.flatten(0, -2))
    gb = dy.flatten(0, -2).T.matmul(h.flatten(0, -2))
    for w, g in zip(weights, (ga[:rk], ga[rk:], _scaled(gb[:, :rk], scales[0]), _scaled(gb[:, rk:], scales[1])),
                    strict=True):
        g = g.to(w.dtype)
        w.unrouted_grad = g if getattr(w, "unrouted_grad", None) is None else w.unrouted_grad + g


class FusedDualLoraLinear(LoraLinear):
    """A PEFT LoRA `Linear` holding "keep" and "quarantine" that runs both as one rank r_k + r_q LoRA.

    Same parameters, state-dict keys and PEFT behaviour (merge, disable_adapters, other active adapter
    sets fall back to PEFT's forward); only the forward of the two active adapters is fused and gated.
    """

    route_slot: _GateSlot

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None
                or set(self.active_adapters) != {KEEP, QUARANTINE}):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        gate = self.route_slot.route_gate
        a_k, b_k = self.lora_A[KEEP].weight, self.lora_B[KEEP].weight
        x = self._cast_input_dtype(x, a_k.dtype)
        if gate is not None and gate.is_ablated:  # the deployed policy: the kept adapter alone
            return (result + F.linear(F.linear(x, a_k), _scaled(b_k, self.scaling[KEEP]))).to(result.dtype)
        if gate is not None and gate.kept_clamp is not None:  # clamped soft routing: the unfused gated forward
            a_q, b_q = self.lora_A[QUARANTINE].weight, self.lora_B[QUARANTINE].weight
            kept = F.linear(F.linear(x, a_k), _scaled(b_k, self.scaling[KEEP]))
            quar = F.linear(F.linear(x, a_q), _scaled(b_q, self.scaling[QUARANTINE]))
            return (result + gate.kept(kept) + gate.quarantine(quar)).to(result.dtype)
        value, grad = (None, None) if gate is None else gate.unit_masks(
            a_k.shape[0], a_k.shape[0] + self.r[QUARANTINE], like=x)
        row_norms = self.route_slot.row_norms if gate is not None and torch.is_grad_enabled() else None
        a_q, b_q = self.lora_A[QUARANTINE].weight, self.lora_B[QUARANTINE].weight
        unrouted = (a_k, a_q, b_k, b_q) if self.route_slot.unrouted and torch.is_grad_enabled() else None
        y = _RoutedLoRA.apply(x, a_k, a_q, b_k, b_q, float(self.scaling[KEEP]), float(self.scaling[QUARANTINE]),
                              value, grad, row_norms, unrouted)
        return (result + y).to(result.dtype)


def _scaled(weight: Tensor, scaling: float) -> Tensor:
    return weight if scaling == 1 else weight * scaling


def _fuse(model: nn.Module, slot: _GateSlot) -> list[tuple[str, nn.Module]]:
    """Turn every PEFT LoRA Linear that holds both adapters into a `FusedDualLoraLinear` reading `slot`."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, m in model.named_modules():
        if not (isinstance(m, LoraLayer) and QUARANTINE in m.lora_A and KEEP in m.lora_A):
            continue
        if not isinstance(m, LoraLinear):
            raise ValueError(f"dual_lora: {name} is a {type(m).__name__}; only Linear layers are supported")
        for adapter in (KEEP, QUARANTINE):
            if not isinstance(m.lora_dropout[adapter], nn.Identity) or adapter in m.lora_variant:
                raise ValueError(f"dual_lora: {name}: lora_dropout must be 0 and use_dora/variants off")
        m.__class__ = FusedDualLoraLinear
        m.route_slot = slot
        layers.append((name, m))
    return layers


@dataclass
class DualLoRAArgs(TargetArgs):
    """Settings of the `dual_lora` target."""

    keep_rank: int = field(default=8, metadata={"help": "dual_lora: rank of the kept adapter."})
    quarantine_rank: int = field(default=8, metadata={"help": "dual_lora: rank of the quarantine adapter."})
    lora_alpha: float | None = field(default=None, metadata={"help": "dual_lora: LoRA alpha (default: the rank)."})

    def validate(self, config: Any, target: str) -> None:
        for name in ("keep_rank", "quarantine_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be >= 1 (an int), got {value!r}")


@register_target("dual_lora")
class DualLoRATarget(TargetBase):
    """Kept + quarantine LoRA adapters behind the `Target` interface.

    Args:
        model: a plain causal LM (it is wrapped with PEFT) or a `PeftModel` that already has
            "keep" and "quarantine" adapters.
        keep_rank, quarantine_rank: LoRA ranks of the two adapters.
        lora_alpha: LoRA alpha for both (default: each adapter's rank, i.e. scaling 1).
        target_modules: module names to adapt (default: every attention and MLP projection).
    """

    args_cls = DualLoRAArgs
    strategy = STRATEGY

    def __init__(self, model: nn.Module, keep_rank: int = 8, quarantine_rank: int = 8,
                 lora_alpha: float | None = None, target_modules: Sequence[str] | None = None):
        from peft import LoraConfig, PeftModel, get_peft_model

        DualLoRAArgs(keep_rank, quarantine_rank, lora_alpha).validate(None, "dual_lora")
        if not isinstance(model, PeftModel):
            modules = check_target_modules(model, target_modules)

            def config(rank: int) -> LoraConfig:
                return LoraConfig(r=rank, lora_alpha=lora_alpha or rank, target_modules=modules, lora_dropout=0.0,
                                  bias="none", task_type="CAUSAL_LM")

            model = get_peft_model(model, config(keep_rank), adapter_name=KEEP)
            model.add_adapter(QUARANTINE, config(quarantine_rank))
        model.base_model.set_adapter([KEEP, QUARANTINE])
        self.model = model
        self._slot = _GateSlot()
        self.layers = _fuse(model, self._slot)
        if not self.layers:
            raise ValueError(f"target_modules: no module of the model matched {target_modules}")

    @classmethod
    def from_args(cls, model: nn.Module, args: DualLoRAArgs, config: Any) -> DualLoRATarget:
        return cls(model, keep_rank=args.keep_rank, quarantine_rank=args.quarantine_rank,
                   lora_alpha=args.lora_alpha, target_modules=config.target_modules)

    def _gate_holders(self) -> list[_GateSlot]:
        return [self._slot]  # one slot that every fused layer reads

    @torch.no_grad()
    def ablate(self, trainable: bool = False) -> None:
        """Remove the quarantine permanently: B_q = 0; A_q = 0 and frozen, or (trainable) redrawn at A_k's std."""
        for _, layer in self.layers:
            layer.lora_B[QUARANTINE].weight.zero_()
            a_q = layer.lora_A[QUARANTINE].weight
            if trainable:
                redraw_like_(a_q, layer.lora_A[KEEP].weight)
            else:
                a_q.zero_()
            for p in (a_q, layer.lora_B[QUARANTINE].weight):
                p.requires_grad_(trainable)

    # ------------------------------------------------------------------ absorption metrics
    def record_row_grads(self, on: bool) -> bool:
        """Record each row's squared gradient norm on the kept and quarantine adapters (A and B) in every gated
        backward, from the rank-space activations and gradients the fused backward already holds."""
        if on and self.forget_kept_clamp is not None:
            raise ValueError("absorption_metrics, route_clamp: the dual_lora target records per-row norms in its fused "
                             "backward, which clamped soft routing does not use; turn one of them off")
        self._slot.row_norms = RowSqNorms() if on else None
        return True

    def record_unrouted_grads(self, on: bool) -> bool:
        """split_moments: every backward through the fused layers also adds each adapter weight's unrouted gradient
        (its gradient with this layer's gate lifted) to `weight.unrouted_grad`; two extra rank-space products."""
        if on and self.forget_kept_clamp is not None:
            raise ValueError("split_moments, route_clamp: the dual_lora target records unrouted gradients in its fused "
                             "backward, which clamped soft routing does not use; turn one of them off")
        self._slot.unrouted = on
        return True

    def pop_row_grads(self) -> dict[str, Tensor] | None:
        return None if self._slot.row_norms is None else self._slot.row_norms.pop()

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: "keep", "quarantine" and "shared" (anything else trainable)."""
        groups: dict[str, list[nn.Parameter]] = {"keep": [], "quarantine": [], "shared": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if f".{QUARANTINE}." in name:
                groups["quarantine"].append(p)
            elif f".{KEEP}." in name:
                groups["keep"].append(p)
            else:
                groups["shared"].append(p)
        return groups

    def _merged_layers(self, dtype: torch.dtype | None, scale: float) -> Iterator[tuple[str, Tensor]]:
        for name, layer in self.layers:
            base = layer.get_base_layer()
            merged = base.weight.detach().float()
            for adapter, factor in ((KEEP, 1.0), (QUARANTINE, scale)):
                if factor == 0.0:
                    continue
                a, b = layer.lora_A[adapter].weight.detach().float(), layer.lora_B[adapter].weight.detach().float()
                delta = (b @ a) * (float(layer.scaling[adapter]) * factor)
                merged = merged + (delta.T if layer.fan_in_fan_out else delta)
            yield f"{plain_name(name)}.weight", merged.to(dtype or base.weight.dtype)

    @torch.no_grad()
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None,
                          scale: float | None = None) -> dict[str, Tensor]:
        """The plain model's state dict with the kept adapter and, if `quarantine`, the quarantine merged.

        `quarantine=True` is the training policy's weights (what vLLM samples from under `generation_policy: full`);
        `quarantine=False` is `deployed_state_dict()`; `scale` merges the quarantine times `scale` (the policy of
        `scaled(scale)`). Merged in fp32, out of place, cast once (to `dtype`, default each weight's own dtype); the
        training weights are untouched. Keys match the un-wrapped transformers model.
        """
        check_unmerged(self.layers, "dual_lora")
        out = plain_state_dict(self.model.get_base_model(), ".lora_", dtype)
        out.update(self._merged_layers(dtype, export_scale(quarantine, scale)))
        return out
