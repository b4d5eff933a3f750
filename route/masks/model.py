"""`SGTMMasks`: one model's masked layers behind one object (gate, ablate, parameter groups, export).

SGTM (selective gradient masking) and gradient routing (Cloud et al. 2024) at the model level.

The object scans a model for masked linears (`route.masks.linear`) and offers what both SGTM
pretraining and the `sgtm` RL target need:

- `gate(modes)`: per-row routing for the forwards inside the context, under the configured
  strategy (`route.masks.strategies`); `ablated()`: the forward of the deployed model;
- `adjust_gradients(mode)`: the seed's whole-batch gradient masking after the backward
  (idempotent here, since `gate` already masks per row inside the backward);
- `ablate(trainable=False)`: forget slices set to zero, or input-projection forget rows redrawn
  from a normal with the retain rows' std. By default (`redraw="inputs"`, what the RL target
  uses) the output projections' forget columns and forget biases are zeroed, so a trainable
  re-init leaves the deployed function unchanged (the LoRA analogue: B = 0, A redrawn);
  `redraw="all"` (the SGTM model API, as the public model) redraws every forget slice;
- `param_groups()`: "keep" (retain slices), "quarantine" (forget slices) and "shared", for
  `route.masks.optim.build_optimizer` / `SkipZeroAdamW`, which skips parameters without gradient;
- `merged_state_dict(ablate=...)`: vanilla keys (split parameters merged), fp32, out of place.

Shared parameters (embeddings, norms, the head) are trained by every row unless they are
listed in `shared_modules`: then forget rows send them no gradient either (SGTM's
`sgtm_mask_embeddings`, and the RL target's `sgtm_mask_shared`). That uses a forward hook
that recomputes the module with detached parameters for the forget rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from route.masks.gating import FORGET, RETAIN, HookSet, RowGate, check_scale, encode_modes
from route.masks.linear import MASKED_LINEARS, GatedLinear, SplitLinearIn, SplitLinearOut
from route.masks.strategies import get_strategy

ROLES = ("retain", "forget")
REDRAWS = ("inputs", "all")


@dataclass(frozen=True)
class Slice:
    """One retain or forget slice of a masked layer's parameter.

    part: "in_weight"/"in_bias" (input projection rows) or "out_weight"/"out_bias" (output
    projection columns; the output bias is a retain slice). `of(t)` indexes a tensor shaped like
    the parameter (its data or its grad).
    """

    module: str
    role: str
    part: str
    param_name: str
    param: nn.Parameter
    index: tuple

    def of(self, t: Tensor) -> Tensor:
        return t[self.index] if self.index else t


def module_slices(name: str, m: nn.Module) -> list[Slice]:
    """The retain/forget slices of one masked linear."""
    r, p = m.retain_dim, f"{name}." if name else ""
    rows, cols = (slice(0, r),), (slice(None), slice(0, r))
    rest_rows, rest_cols = (slice(r, None),), (slice(None), slice(r, None))
    if isinstance(m, SplitLinearOut):
        out = [Slice(name, "retain", "in_weight", p + "weight_retain", m.weight_retain, ()),
               Slice(name, "forget", "in_weight", p + "weight_forget", m.weight_forget, ())]
        if m.bias_retain is not None:
            out += [Slice(name, "retain", "in_bias", p + "bias_retain", m.bias_retain, ()),
                    Slice(name, "forget", "in_bias", p + "bias_forget", m.bias_forget, ())]
        return out
    if isinstance(m, SplitLinearIn):
        out = [Slice(name, "retain", "out_weight", p + "weight_retain", m.weight_retain, ()),
               Slice(name, "forget", "out_weight", p + "weight_forget", m.weight_forget, ())]
        return out + ([Slice(name, "retain", "out_bias", p + "bias", m.bias, ())] if m.bias is not None else [])
    if not isinstance(m, GatedLinear):
        raise TypeError(f"module_slices: {name} is not a masked linear")
    if m.split_dim == 0:
        out = [Slice(name, "retain", "in_weight", p + "weight", m.weight, rows),
               Slice(name, "forget", "in_weight", p + "weight", m.weight, rest_rows)]
        if m.bias is not None:
            out += [Slice(name, "retain", "in_bias", p + "bias", m.bias, rows),
                    Slice(name, "forget", "in_bias", p + "bias", m.bias, rest_rows)]
        return out
    out = [Slice(name, "retain", "out_weight", p + "weight", m.weight, cols),
           Slice(name, "forget", "out_weight", p + "weight", m.weight, rest_cols)]
    return out + ([Slice(name, "retain", "out_bias", p + "bias", m.bias, ())] if m.bias is not None else [])


def _shared_hook(rows: Tensor, busy: list[bool]):
    """Forward hook: rows with `rows == False` see the module's output computed with detached parameters."""

    def hook(module: nn.Module, args: tuple, out):
        if busy[0] or not isinstance(out, Tensor):
            return None
        busy[0] = True
        try:
            detached = {k: v.detach() for k, v in module.named_parameters(recurse=False)}
            alt = torch.func.functional_call(module, detached, args)
        finally:
            busy[0] = False
        n = rows.shape[0]
        if out.shape[0] != n:
            if out.shape[0] != 1:
                raise RuntimeError(f"gate: {n} row modes for a forward with batch size {out.shape[0]}")
            out, alt = out.expand(n, *out.shape[1:]), alt.expand(n, *alt.shape[1:])
        return torch.where(rows.to(out.device).view(-1, *([1] * (out.dim() - 1))), out, alt)

    return hook


@torch.no_grad()
def redraw_like_(target: Tensor, reference: Tensor) -> Tensor:
    """Trainable re-init: `target` redrawn in place from N(0, std(reference)) (SGTM's `ablate(trainable=True)`)."""
    return target.normal_(0.0, float(reference.detach().float().std()))


class SGTMMasks:
    """The masked layers of `model`, gated under one strategy.

    Args:
        model: a model whose masked layers were converted (`route.masks.arch.apply_masks`, or
            the SGTM model classes in `route.models.sgtm`).
        strategy: a registered strategy name (`route.masks.strategies`).
        shared_modules: modules whose parameters forget rows must not train (see the module docstring).
    """

    def __init__(self, model: nn.Module, strategy: str = "parameter_masking",
                 shared_modules: Sequence[nn.Module] = ()):
        self.model = model
        self.strategy = get_strategy(strategy).name
        self.shared_modules = list(shared_modules)
        self.modules = [(n, m) for n, m in model.named_modules() if isinstance(m, MASKED_LINEARS)]
        if not self.modules:
            raise ValueError("sgtm: the model has no masked layer (convert it with route.masks.apply_masks)")

    # ------------------------------------------------------------------ slices
    def slices(self, role: str | None = None) -> list[Slice]:
        """Every retain/forget slice (of one `role` if given), in module order."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role: invalid value {role!r}; allowed values: {list(ROLES)}")
        out = [s for n, m in self.modules for s in module_slices(n, m)]
        return [s for s in out if role is None or s.role == role]

    # ------------------------------------------------------------------ gating
    @contextlib.contextmanager
    def _attached(self, gate: RowGate | None) -> Iterator[None]:
        previous = [(m, m.row_gate) for _, m in self.modules]
        hooks = []
        if gate is not None and gate.shared_params is not None and self.shared_modules:
            busy = [False]
            hooks = [(m, _shared_hook(gate.shared_params, busy)) for m in self.shared_modules]
        try:
            for _, m in self.modules:
                m.row_gate = gate
            with HookSet(hooks):
                yield
        finally:
            for m, g in previous:
                m.row_gate = g

    def gate(self, modes: Sequence[str] | Tensor | str, batch_size: int | None = None,
             frozen_forget: Sequence[bool] | Tensor | None = None, forget_kept_grad: float = 0.0,
             forget_kept_clamp: float | None = None, scale: float | None = None) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context; a single mode name needs `batch_size`; `scale`
        (None: 1) multiplies the forget units' output on every row as well (`RowGate.at_scale`).

        `frozen_forget`: rows whose gradient must not reach the forget slices although their forward
        uses them (for default rows; retain rows never train them). `forget_kept_grad`, `forget_kept_clamp`: soft
        routing (`RowGate.from_modes`).
        """
        return self._attached(RowGate.from_modes(modes, batch_size, strategy=self.strategy,
                                                 mask_shared=bool(self.shared_modules),
                                                 frozen_quarantine=frozen_forget, forget_kept_grad=forget_kept_grad,
                                                 forget_kept_clamp=forget_kept_clamp).at_scale(scale))

    def ablated(self) -> contextlib.AbstractContextManager:
        """Forward as the deployed model (forget units contribute nothing), for any batch size: `scaled(0)`."""
        return self.scaled(0.0)

    def scaled(self, s: float) -> contextlib.AbstractContextManager:
        """Forward with the forget units' output (what the output projections read) multiplied by `s` in [0, 1]."""
        return self._attached(RowGate.scaled(s))

    def recompute_context(self) -> contextlib.AbstractContextManager:
        """The gate attached now (None: ungated), re-attached with its shared-parameter hooks inside the context.

        For gradient checkpointing: called at forward time, entered around the layer's recompute in the backward.
        """
        return self._attached(self.modules[0][1].row_gate)

    # ------------------------------------------------------------------ the seed's whole-batch API
    @torch.no_grad()
    def adjust_gradients(self, modes: Sequence[str] | Tensor | str) -> None:
        """After a backward on one mode: zero the gradients that mode must not produce (the seed's rule).

        A per-row list that mixes modes is left alone: the gated forward already masked each row.
        """
        codes = encode_modes(modes, batch_size=1 if isinstance(modes, str) else None)
        if codes.numel() == 0 or not bool((codes == codes[0]).all()):
            return
        mode, rule = int(codes[0]), get_strategy(self.strategy)
        for s in self.slices():
            if s.param.grad is None:
                continue
            if mode == RETAIN and s.role == "forget":
                s.of(s.param.grad).zero_()
            elif mode == FORGET and s.role == "retain":
                if (s.part.startswith("in") and rule.mask_kept_params) or (
                        s.part.startswith("out") and rule.mask_proj_params):
                    s.of(s.param.grad).zero_()
        if mode == FORGET:
            for m in self.shared_modules:
                for p in m.parameters(recurse=False):
                    if p.grad is not None:
                        p.grad.zero_()

    # ------------------------------------------------------------------ ablation
    @torch.no_grad()
    def ablate(self, trainable: bool = False, redraw: str = "inputs") -> None:
        """Remove the forget units: zero, or (trainable) redraw forget slices at their retain slice's std.

        `redraw` (with `trainable`): "inputs" redraws the input projections' forget rows and zeroes
        the rest (the deployed function is unchanged); "all" redraws every forget slice (input rows,
        their biases and the output projections' forget columns), as the SGTM model API does.
        """
        if redraw not in REDRAWS:
            raise ValueError(f"redraw: invalid value {redraw!r}; allowed values: {list(REDRAWS)}")
        parts = ("in_weight",) if redraw == "inputs" else ("in_weight", "in_bias", "out_weight")
        retain = {(s.module, s.part): s for s in self.slices("retain")}
        for s in self.slices("forget"):
            target = s.of(s.param.data)
            if trainable and s.part in parts and target.numel():
                kept = retain[(s.module, s.part)]
                ref = kept.of(kept.param.data)
                redraw_like_(target, ref if ref.numel() > 1 else s.param.data)
            else:
                target.zero_()
            if not s.index:
                s.param.requires_grad_(trainable)

    # ------------------------------------------------------------------ parameters
    def param_groups(self, mixed: str = "error") -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: "keep" (retain slices), "quarantine" (forget slices), "shared" (the rest).

        A parameter holding both retain and forget units (unsplit weights) cannot be stepped
        apart: `mixed="error"` raises, `mixed="shared"` files it under "shared".
        """
        if mixed not in ("error", "shared"):
            raise ValueError(f"mixed: invalid value {mixed!r}; allowed values: ['error', 'shared']")
        roles: dict[int, set[str]] = {}
        for s in self.slices():
            roles.setdefault(id(s.param), set()).add(s.role)
        groups: dict[str, list[nn.Parameter]] = {"keep": [], "quarantine": [], "shared": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            r = roles.get(id(p))
            if r is None:
                groups["shared"].append(p)
            elif r == {"retain"}:
                groups["keep"].append(p)
            elif r == {"forget"}:
                groups["quarantine"].append(p)
            elif mixed == "shared":
                groups["shared"].append(p)
            else:
                raise ValueError(f"param_groups: {name} holds both retain and forget units; split the weights "
                                 "(split=True / split_masked_weights=True) so an optimizer can step them apart")
        return groups

    @torch.no_grad()
    def merged_state_dict(self, ablate: bool = False, dtype: torch.dtype | None = None,
                          scale: float | None = None) -> dict[str, Tensor]:
        """The model's state dict with vanilla keys (split parameters merged), forget slices zeroed if `ablate`.

        `scale` (in [0, 1], overrides `ablate`): the forget units' output scaled, i.e. the output projections' forget
        columns times `scale` (the forward of `scaled(scale)`); 0 is `ablate=True`, 1 `ablate=False`.

        Merged in fp32 out of place and cast once (to `dtype`, default each weight's own dtype);
        the model's weights are untouched.
        """
        if scale is not None:
            scale = check_scale(scale)
            ablate = scale == 0.0
        split = {n for n, m in self.modules if isinstance(m, (SplitLinearOut, SplitLinearIn))}
        split_keys = ("weight_retain", "weight_forget", "bias_retain", "bias_forget")
        out: dict[str, Tensor] = {}
        for k, v in self.model.state_dict().items():
            owner, _, leaf = k.rpartition(".")
            if owner in split and leaf in split_keys:
                continue
            out[k] = v.detach().clone() if dtype is None or not v.is_floating_point() else v.detach().to(dtype)
        for name, m in self.modules:
            p = f"{name}." if name else ""
            w = m.weight.detach().float().clone()
            b = None if m.bias is None else m.bias.detach().float().clone()
            cast = dtype or (m.weight_retain.dtype if hasattr(m, "weight_retain") else m.weight.dtype)
            if ablate:
                r = m.retain_dim
                if m.split_dim == 0:
                    w[r:] = 0
                    if b is not None:
                        b[r:] = 0
                else:
                    w[:, r:] = 0
            elif scale is not None and scale != 1.0 and m.split_dim == 1:
                w[:, m.retain_dim:] *= scale
            out[p + "weight"] = w.to(cast)
            if b is not None:
                out[p + "bias"] = b.to(cast)
        return out


__all__ = ["ROLES", "SGTMMasks", "Slice", "module_slices", "redraw_like_"]
