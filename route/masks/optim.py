"""An AdamW that leaves parameters with no gradient exactly where they are.

Plain AdamW moves a parameter whose gradient is zero: its first moment still carries past
gradients and decoupled weight decay shrinks it. With gradient routing that is a leak: a
step whose batch had no forget rollout would still move the quarantine, and a step of only
forget rollouts would still move the kept adapter. `SkipZeroAdamW` drops such parameters
from the step (no moment update, no weight decay, no step count), and records each named
group's gradient norm for logging.

`split_moments`: the first moment is fed the routed gradient (`p.grad`) and the second the
unrouted one (`p.unrouted_grad`, the gradient with no routing, which a target that supports it
accumulates in the same backward; docs/targets.md#split-moments). Gradient clipping is one
event for both: `note_preclip()` records the routed gradient's norm before the trainer clips, and
the unrouted gradient is multiplied by the same coefficient (clipped norm / recorded norm). A
parameter without an unrouted gradient takes the plain AdamW step; whether a parameter steps at
all is decided by its routed gradient, as above. Departure from AdamW (Decoupled Weight Decay
Regularization): only that v is an average of the unrouted gradient's squares.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from route.utils.kernels import adamw_kwargs, portable_sqrt


class SkipZeroAdamW(torch.optim.AdamW):
    """AdamW that skips every parameter whose gradient is None or exactly zero.

    Param groups may carry a "name" (e.g. "keep", "quarantine"); `last_grad_norms` maps each
    name to its gradient norm at the last step (0.0 when the group got no gradient).
    """

    def __init__(self, params: Iterable, split_moments: bool = False, **kwargs):
        super().__init__(params, **{**adamw_kwargs(), **kwargs})  # fused in portable mode (route.utils.kernels)
        if split_moments and (self.defaults["amsgrad"] or self.defaults["maximize"]):
            raise ValueError("split_moments: not available with amsgrad or maximize")
        self.split_moments = split_moments
        self.last_grad_norms: dict[str, float] = {}
        self._preclip_norm: float | None = None

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _norm(self) -> float:
        grads = self._grads()
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))) if grads else 0.0

    @torch.no_grad()
    def note_preclip(self) -> None:
        """Record the routed gradient's total norm before clipping (split_moments: the clip coefficient's base)."""
        self._preclip_norm = self._norm() if self.split_moments else None

    def _clip_coef(self) -> float:
        """The coefficient the trainer's clip applied to every gradient since `note_preclip` (1: none recorded)."""
        before, self._preclip_norm = self._preclip_norm, None
        return 1.0 if not before else self._norm() / before

    @torch.no_grad()
    def step(self, closure=None):
        stash: list[tuple[nn.Parameter, torch.Tensor]] = []
        norms: dict[str, float] = {}
        for i, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            name = group.get("name", f"group{i}")
            if not with_grad:
                norms[name] = 0.0
                continue
            per_param = torch.stack(torch._foreach_norm([p.grad for p in with_grad])).float().tolist()
            norms[name] = sum(n * n for n in per_param) ** 0.5
            for p, n in zip(with_grad, per_param):
                if n == 0.0:
                    stash.append((p, p.grad))
                    p.grad = None
        self.last_grad_norms = norms
        if self.split_moments:
            coef = self._clip_coef()
            for group in self.param_groups:
                for p in group["params"]:
                    u = getattr(p, "unrouted_grad", None)
                    p.unrouted_grad = None  # consumed by this step (the trainer zeroes only .grad)
                    if u is not None and p.grad is not None:
                        self._split_step(p, group, u * coef)
                        stash.append((p, p.grad))
                        p.grad = None
        try:
            return super().step(closure)
        finally:
            for p, g in stash:
                p.grad = g

    def _split_step(self, p: nn.Parameter, group: dict, unrouted: torch.Tensor) -> None:
        """AdamW's update of `p` with m from p.grad and v from `unrouted` (torch's state keys and bias correction)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(unrouted, unrouted, value=1 - beta2)
        denom = (portable_sqrt(state["exp_avg_sq"]) / (1 - beta2**t) ** 0.5).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


def build_optimizer(groups: dict[str, list[nn.Parameter]], lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    lr_scale: dict[str, float] | None = None, split_moments: bool = False) -> SkipZeroAdamW:
    """One named param group per target group ("keep", "quarantine", "shared"); empty groups are left out."""
    lr_scale = lr_scale or {}
    param_groups = [{"params": ps, "name": name, "lr": lr * lr_scale.get(name, 1.0)}
                    for name, ps in groups.items() if ps]
    if not param_groups:
        raise ValueError("optimizer: the target has no trainable parameter")
    return SkipZeroAdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                         split_moments=split_moments)


def unwrap_optimizer(opt: Any) -> Any:
    """The `SkipZeroAdamW` inside accelerate's / DeepSpeed's wrappers (or the outermost optimizer)."""
    for _ in range(4):
        if hasattr(opt, "last_grad_norms") or not hasattr(opt, "optimizer"):
            break
        opt = opt.optimizer
    return opt
