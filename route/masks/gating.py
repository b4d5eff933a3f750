"""Per-row routing gates (gradient routing, Cloud et al. 2024, per sample instead of per batch).

Each batch row has a mode: `forget`, `retain` or `default`. A gate splits what a layer adds
into a *kept* part and a *quarantine* part and treats them per row:

    forget   : kept.detach() + quar           value unchanged, gradient only into the quarantine
    retain   : kept          + 0 * quar       quarantine absent, gradient only into kept parameters
    default  : kept          + quar           the ordinary model
    exclusive: kept          + quar.detach()  value unchanged, gradient only into kept parameters

Soft routing (`forget_kept_grad` = 1 - route_weight): a forget row's kept path passes its gradient times
that factor instead of detaching it (0 is the detach above; negative values push the kept part against
the row). The factor is applied by `_ScaleRows` (identity forward, per-row scaled backward), so values
never change.

One forward and one backward serve a batch that mixes modes. `torch.where(m, y, y.detach())`
routes the gradient without changing values, so forget and default rows compute exactly the
ungated forward. Masks are data (a `RowGate`) and are applied by hooks that a `HookSet`
context adds and removes exactly.

The table above is the `gradient_routing` strategy; `RowGate.from_modes(..., strategy=...)`
builds the other SGTM strategies (`route.masks.strategies`) from the same masks: forget rows
may instead zero the kept path (`activation_masking`) or keep its value and gradient flow but
send no gradient into the kept *parameters* (`parameter_masking`, applied by
`route.masks.linear`). SGTM's seed applies its strategy to a whole batch after the backward;
here every rule is per row, inside the one backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FORGET, RETAIN, DEFAULT, EXCLUSIVE = 0, 1, 2, 3
MODE_NAMES = ("forget", "retain", "default", "exclusive")


def encode_modes(modes: Sequence[str] | Sequence[int] | Tensor | str, batch_size: int | None = None) -> Tensor:
    """Modes as a LongTensor of codes (0 forget, 1 retain, 2 default, 3 exclusive); one name applies to every row."""
    if isinstance(modes, str):
        if batch_size is None:
            raise ValueError("encode_modes: a single mode name needs batch_size")
        modes = [modes] * batch_size
    if isinstance(modes, Tensor):
        codes = modes.long()
    else:
        modes = list(modes)
        try:
            codes = torch.tensor([m if isinstance(m, int) else MODE_NAMES.index(m) for m in modes], dtype=torch.long)
        except ValueError:
            bad = sorted({m for m in modes if m not in MODE_NAMES})
            raise ValueError(f"mode: unknown values {bad}; allowed values: {list(MODE_NAMES)}") from None
    if codes.numel() and (codes.min() < 0 or codes.max() > len(MODE_NAMES) - 1):
        raise ValueError(f"mode: codes must be in 0..{len(MODE_NAMES) - 1} ({dict(enumerate(MODE_NAMES))}), "
                         f"got {codes.unique().tolist()}")
    return codes


def forget_kept_grad(route_weight: float) -> float:
    """The factor on the gradient a flagged (forget) row sends into the kept part: 1 - route_weight.

    route_weight 1 is full routing (factor 0, the kept path detached), 0 none (the ordinary gradient), in between
    soft routing, above 1 over-routing (a negative factor: the kept part is pushed against what the row teaches).
    """
    return 1.0 - float(route_weight)


@dataclass
class RowGate:
    """Per-row masks derived from modes.

    Attributes:
        kept_grad: rows whose kept path receives gradient (retain, default); others are detached.
        quar_on: rows whose forward includes the quarantine (forget, default).
        all_default: fast path, no row is gated.
        kept_on: rows whose kept path is present (None: all); `activation_masking` zeroes it on forget rows.
        kept_params: rows whose gradient reaches the kept slices' parameters (None: all); `parameter_masking`.
        proj_params: the same for output projections' kept columns and biases (None: all).
        shared_params: rows whose gradient reaches shared parameters (None: all); see `SGTMMasks`.
        quar_params: rows whose gradient reaches the quarantine (forget) slices' parameters (None: all); set by
            `frozen_quarantine` for rows that use the quarantine in the forward but must not train it.
    """

    kept_grad: Tensor
    quar_on: Tensor
    all_default: bool
    all_quar_on: bool
    kept_on: Tensor | None = None
    kept_params: Tensor | None = None
    proj_params: Tensor | None = None
    shared_params: Tensor | None = None
    quar_params: Tensor | None = None
    quar_scale: float | None = None  # set by `scaled(s)`: every row's quarantine path multiplied by s
    quar_grad: Tensor | None = None  # rows whose quarantine output carries gradient (None: all); exclusive rows don't
    kept_coef: Tensor | None = None  # per-row factor on the kept output's gradient (soft routing; None: 0/1 masks)
    kept_clamp: float | None = None  # soft routing: forget rows' scaled kept gradient clamped to [-c, c] per coordinate
    kept_clamp_rows: Tensor | None = None  # the rows it clamps (the forget rows)
    dial: bool = False  # made by `scaled(s)`: one policy for every row, no mode (evaluation, sampling)

    @classmethod
    def from_modes(cls, modes: Sequence[str] | Tensor | str, batch_size: int | None = None,
                   strategy: str = "gradient_routing", mask_shared: bool = False,
                   frozen_quarantine: Sequence[bool] | Tensor | None = None,
                   forget_kept_grad: float = 0.0, forget_kept_clamp: float | None = None) -> RowGate:
        """Masks for `modes` under an SGTM strategy (default: gradient routing, the dual-LoRA rule).

        `mask_shared`: forget rows send no gradient into shared parameters either.
        `frozen_quarantine`: rows (True) whose gradient must not reach the quarantine's parameters
        although their forward uses it (a default row that must not train the forget units).
        `forget_kept_grad`: factor on the gradient a forget row sends back through the kept path (soft routing,
        1 - route_weight; 0: detached, today's rule); only under the `gradient_routing` strategy.
        `forget_kept_clamp`: with a nonzero factor, each coordinate of the scaled gradient a forget row sends back
        through a kept output is clamped to [-clamp, clamp] (`route_clamp`).
        """
        from route.masks.strategies import get_strategy

        rule = get_strategy(strategy)
        codes = encode_modes(modes, batch_size)
        forget = codes == FORGET
        quar_on = codes != RETAIN

        def rows_or_none(on: Tensor) -> Tensor | None:
            return None if bool(on.all()) else on

        kept_grad = ~forget if rule.forget_kept in ("detach", "zero") else torch.ones_like(forget)
        coef = float(forget_kept_grad)
        if coef != 0.0 and rule.forget_kept != "detach":
            raise ValueError(f"route_weight: must be 1 (full routing) with the {rule.name!r} strategy; soft routing "
                             "scales the gradient of the detached kept path, which only gradient_routing has")
        kept_coef = clamp = None
        if coef != 0.0 and bool(forget.any()):
            kept_grad = torch.ones_like(forget)
            kept_coef = torch.where(forget, torch.tensor(coef), torch.tensor(1.0))
            clamp = forget_kept_clamp
        exclusive = codes == EXCLUSIVE
        return cls(kept_grad=kept_grad, quar_on=quar_on, all_default=bool((codes == DEFAULT).all()),
                   all_quar_on=bool(quar_on.all()),
                   kept_on=rows_or_none(~forget) if rule.forget_kept == "zero" else None,
                   kept_params=rows_or_none(~forget) if rule.mask_kept_params else None,
                   proj_params=rows_or_none(~forget) if rule.mask_proj_params else None,
                   shared_params=rows_or_none(~forget) if mask_shared else None,
                   quar_params=None if frozen_quarantine is None else rows_or_none(
                       ~torch.as_tensor(frozen_quarantine, dtype=torch.bool).view(-1)),
                   quar_grad=rows_or_none(~exclusive), kept_coef=kept_coef,
                   kept_clamp=None if clamp is None else float(clamp),
                   kept_clamp_rows=None if clamp is None else forget)

    @classmethod
    def ablated(cls) -> RowGate:
        """Every row without the quarantine and with plain gradients on the kept path (the deployed policy)."""
        empty = torch.zeros(0, dtype=torch.bool)
        return cls(kept_grad=empty, quar_on=empty, all_default=False, all_quar_on=False)

    @classmethod
    def scaled(cls, s: float) -> RowGate:
        """Every row with the quarantine path multiplied by `s` in [0, 1], any batch size (the quarantine-scale dial).

        `scaled(0)` is `ablated()` and `scaled(1)` an all-default gate (values of the ungated forward); in between, the
        quarantine's output is scaled, which every target's export reproduces as weights (`merged_state_dict(scale=)`).
        """
        s = check_scale(s)
        if s == 0.0:
            return cls.ablated()
        one = torch.ones(1, dtype=torch.bool)
        return cls(kept_grad=one, quar_on=one, all_default=s == 1.0, all_quar_on=True, quar_scale=s, dial=True)

    def at_scale(self, s: float | None) -> RowGate:
        """This gate with every row's quarantine path also multiplied by `s` in [0, 1] (None or 1: unchanged): the
        modes' rule, at a quarantine scale. Values are `scaled(s)`'s on forget and default rows (0 on retain rows) and
        the quarantine's gradient is scaled with its value; the kept path's rule is the modes'."""
        if s is None or check_scale(s) == 1.0 or self.is_ablated:
            return self
        if self.quar_scale is not None:
            raise ValueError("at_scale: this gate already has a quarantine scale")
        return dataclasses.replace(self, quar_scale=float(s), all_default=False)

    @property
    def is_ablated(self) -> bool:
        return self.kept_grad.numel() == 0

    def _rows(self, mask: Tensor, y: Tensor) -> Tensor:
        if mask.shape[0] != y.shape[0]:
            raise RuntimeError(f"gate: {mask.shape[0]} row modes for a forward with batch size {y.shape[0]}")
        return mask.to(y.device).view(-1, *([1] * (y.dim() - 1)))

    def kept(self, y: Tensor) -> Tensor:
        """The kept path's output: detached on forget rows (zeroed under activation masking)."""
        if self.all_default or self.is_ablated:
            return y
        if self.kept_on is not None:
            y = y * self._rows(self.kept_on, y).to(y.dtype)
        if self.kept_coef is not None:
            rows = None if self.kept_clamp is None else self._rows(self.kept_clamp_rows, y)
            return _ScaleRows.apply(y, self._rows(self.kept_coef, y).to(y.dtype), rows, self.kept_clamp)
        if bool(self.kept_grad.all()):
            return y
        return torch.where(self._rows(self.kept_grad, y), y, y.detach())

    def quarantine(self, y: Tensor) -> Tensor:
        """The quarantine path's output: zero on retain rows (and everywhere when ablated)."""
        if self.is_ablated:
            return torch.zeros_like(y)
        if self.quar_grad is not None:
            y = torch.where(self._rows(self.quar_grad, y), y, y.detach())
        if not self.all_quar_on:
            y = y * self._rows(self.quar_on, y).to(y.dtype)
        return y if self.quar_scale is None or self.quar_scale == 1.0 else y * self.quar_scale

    def quar_param_rows(self) -> Tensor | None:
        """Rows whose gradient may reach the quarantine's parameters (None: all): not `frozen_quarantine` rows, not
        exclusive rows (for parameter-level masks, e.g. an output projection's quarantine columns)."""
        if self.quar_grad is None:
            return self.quar_params
        return self.quar_grad if self.quar_params is None else self.quar_params & self.quar_grad

    def split(self, y: Tensor, kept_dim: int) -> Tensor:
        """One activation whose last dim is [kept units | quarantine units]: each part gated as its path."""
        if self.all_default:
            return y
        if kept_dim == y.shape[-1]:
            return self.kept(y)
        return torch.cat([self.kept(y[..., :kept_dim]), self.quarantine(y[..., kept_dim:])], dim=-1)


    def unit_masks(self, kept_dim: int, width: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """`split`'s rule as per-row, per-unit masks over [kept units | quarantine units], shaped to broadcast on
        activations `like` (..., width): (value, grad). `value` zeroes units absent from a row's forward; `grad`
        zeroes units whose gradient a row must not carry (their value kept but detached). None: all ones.

        For fused layers that apply the gate inside their own backward (e.g. the dual LoRA's rank space). Only the
        activation-level strategies (`gradient_routing`, `activation_masking`): parameter masks need `masked_linear`.
        """
        if self.kept_params is not None or self.proj_params is not None or self.quar_params is not None:
            raise ValueError("unit_masks: parameter-masking gates need masked_linear, not unit masks")
        if self.all_default or self.is_ablated:
            return (None, None) if self.all_default else (self._units(True, False, kept_dim, width, like), None)
        if self.dial:  # scaled(s), any batch size: kept units as they are, quarantine units times the scale
            kept = self._units(True, False, kept_dim, width, like)
            value = kept + (1 - kept) * self.quar_scale
            return value, value  # the gradient of a scaled unit is scaled too
        on = torch.ones_like(self.kept_grad) if self.kept_on is None else self.kept_on
        value = self._units(on, self.quar_on, kept_dim, width, like)
        kept = self.kept_grad & on if self.kept_coef is None else self.kept_coef * on
        quar = self.quar_on if self.quar_grad is None else self.quar_on & self.quar_grad
        grad = self._units(kept, quar, kept_dim, width, like)
        if self.quar_scale is not None:  # `at_scale`: quarantine units times the scale, in value and in gradient
            factor = self._units(True, False, kept_dim, width, like)
            factor = factor + (1 - factor) * self.quar_scale
            value, grad = value * factor, grad * factor
        return value, grad

    def _units(self, kept, quar, kept_dim: int, width: int, like: Tensor) -> Tensor:
        """(rows, 1.., width) mask: `kept` (per row, or a bool for all) on units [:kept_dim], `quar` on the rest."""
        rows = like.shape[0] if like.dim() > 1 else 1

        def per_row(m) -> Tensor:
            m = torch.as_tensor(m, device=like.device)
            if m.dim() and m.shape[0] != rows:
                raise RuntimeError(f"gate: {m.shape[0]} row modes for a forward with batch size {rows}")
            return m.expand(rows).view(-1, 1)

        cols = torch.arange(width, device=like.device) < kept_dim
        mask = torch.where(cols, per_row(kept), per_row(quar)).to(like.dtype)
        return mask.view(rows, *([1] * (like.dim() - 2)), width)


class _ScaleRows(torch.autograd.Function):
    """Identity forward; the backward multiplies each row's gradient by `coef` (rows, 1..) and, with `clamp`, clamps
    it to [-clamp, clamp] per coordinate on the rows in `clamp_rows`: soft routing's kept path."""

    @staticmethod
    def forward(ctx, y: Tensor, coef: Tensor, clamp_rows: Tensor | None, clamp: float | None) -> Tensor:
        ctx.save_for_backward(coef, clamp_rows)
        ctx.clamp = clamp
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor):
        coef, clamp_rows = ctx.saved_tensors
        g = g * coef
        if ctx.clamp is not None:
            g = torch.where(clamp_rows, g.clamp(-ctx.clamp, ctx.clamp), g)
        return g, None, None, None


def check_scale(s: float) -> float:
    """`s` as a float in [0, 1]; ValueError naming `scale` otherwise."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
        raise ValueError(f"scale: must be a number in [0, 1] (0 = deployed, 1 = training policy), got {s!r}")
    return float(s)


class HookSet:
    """A context manager that registers forward hooks and removes exactly the ones it added.

        with HookSet([(module, hook_fn), ...]):
            model(...)
    """

    def __init__(self, hooks: Iterable[tuple[nn.Module, Callable]]):
        self._pending = list(hooks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HookSet:
        try:
            for module, fn in self._pending:
                self._handles.append(module.register_forward_hook(fn))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()
