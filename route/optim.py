"""An AdamW that leaves parameters with no gradient exactly where they are.

Plain AdamW moves a parameter whose gradient is zero: its first moment still carries past
gradients and decoupled weight decay shrinks it. With gradient routing that is a leak: a
step whose batch had no forget rollout would still move the quarantine, and a step of only
forget rollouts would still move the kept adapter. `SkipZeroAdamW` drops such parameters
from the step (no moment update, no weight decay, no step count), and records each named
group's gradient norm for logging.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class SkipZeroAdamW(torch.optim.AdamW):
    """AdamW that skips every parameter whose gradient is None or exactly zero.

    Param groups may carry a "name" (e.g. "keep", "quarantine"); `last_grad_norms` maps each
    name to its gradient norm at the last step (0.0 when the group got no gradient).
    """

    def __init__(self, params: Iterable, **kwargs):
        super().__init__(params, **kwargs)
        self.last_grad_norms: dict[str, float] = {}

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
        try:
            return super().step(closure)
        finally:
            for p, g in stash:
                p.grad = g


def build_optimizer(groups: dict[str, list[nn.Parameter]], lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                    lr_scale: dict[str, float] | None = None) -> SkipZeroAdamW:
    """One named param group per target group ("keep", "quarantine", "shared"); empty groups are left out."""
    lr_scale = lr_scale or {}
    param_groups = [{"params": ps, "name": name, "lr": lr * lr_scale.get(name, 1.0)}
                    for name, ps in groups.items() if ps]
    if not param_groups:
        raise ValueError("optimizer: the target has no trainable parameter")
    return SkipZeroAdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
