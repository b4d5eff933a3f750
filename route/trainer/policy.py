"""The routing policy: what the trainer does with the monitor's flags, as pure functions of typed inputs.

- `routing_modes`: per-rollout routing codes (forget / retain / default / exclusive) from flags;
- `forget_kept_grad`: the factor on a flagged row's kept gradient for a `route_weight` (soft routing);
- `retain_draws`: which unflagged rollouts run in retain mode (`retain_fraction`), a pure function of (seed, id);
- `filter_advantages`: `filter` zeroes flagged rollouts' advantages;
- `penalize_rewards`: `penalty` subtracts lambda from flagged rollouts' reward (before advantages).

No model, trainer or target is needed to call or test them; `RoutedGRPOTrainer` wires them into TRL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from route.masks import DEFAULT, EXCLUSIVE, FORGET, RETAIN
from route.masks.gating import forget_kept_grad
from route.monitors.detectors import uniform


def retain_draws(rollout_ids: Sequence[str], fraction: float, seed: int) -> list[bool]:
    """Per rollout: True with probability `fraction`, a pure function of (seed, rollout id)."""
    return [uniform(seed, f"retain|{rid}") < fraction for rid in rollout_ids]


def routing_modes(flags: Sequence[bool], rollout_ids: Sequence[str], *, intervention: str,
                  unflagged_mode: str = "default", retain_fraction: float = 1.0, seed: int = 0,
                  candidates: Tensor | Sequence[bool] | None = None, routing: str = "classic") -> Tensor:
    """Per-rollout routing codes (LongTensor of `route.masks` FORGET / RETAIN / DEFAULT / EXCLUSIVE).

    Under `route`: flagged -> forget; unflagged -> default (`routing: classic`) or exclusive (`routing: exclusive`:
    full forward, gradient only into the kept part), or retain (`unflagged_mode: retain`, for a `retain_fraction`
    share drawn per rollout; retain wins over exclusive). Rows in `candidates` (a target that routes by itself after the
    backward, e.g. svf's score routing) run in default mode, and when `candidates` is given flags do not route by
    themselves. Under every other intervention all rollouts are retain: the quarantine stays out of the forward and
    never trains, so a baseline ships exactly what it trained, with the same deployed capacity as `route`.
    """
    if len(flags) != len(rollout_ids):
        raise ValueError(f"routing_modes: {len(flags)} flags for {len(rollout_ids)} rollout ids")
    if intervention != "route":
        return torch.full((len(flags),), RETAIN, dtype=torch.long)
    scored = candidates is not None
    cand = [False] * len(flags) if candidates is None else [bool(c) for c in candidates]
    if len(cand) != len(flags):
        raise ValueError(f"routing_modes: {len(cand)} candidates for {len(flags)} flags")
    if routing not in ("classic", "exclusive"):
        raise ValueError(f"routing: invalid value {routing!r}; allowed values: ['classic', 'exclusive']")
    unflagged = EXCLUSIVE if routing == "exclusive" else DEFAULT
    draws = retain_draws(rollout_ids, retain_fraction, seed) if unflagged_mode == "retain" else [False] * len(flags)
    codes = []
    for flag, candidate, retain in zip(flags, cand, draws, strict=True):
        if candidate:
            codes.append(DEFAULT)
        elif flag and not scored:
            codes.append(FORGET)
        elif retain:
            codes.append(RETAIN)
        else:
            codes.append(unflagged)
    return torch.tensor(codes, dtype=torch.long)


def filter_advantages(advantages: Tensor, flags: Tensor | Sequence[bool]) -> Tensor:
    """`filter`: flagged rollouts get zero advantage (advantages (B,) or (B, T)); out of place."""
    flagged = torch.as_tensor(flags, dtype=torch.bool, device=advantages.device)
    if flagged.numel() != advantages.shape[0]:
        raise ValueError(f"filter_advantages: {flagged.numel()} flags for {advantages.shape[0]} rows")
    return advantages.masked_fill(flagged.view(-1, *([1] * (advantages.dim() - 1))), 0.0)


def penalize_rewards(rewards_per_func: Tensor, flags: Sequence[bool], penalty: float, weight: float = 1.0,
                     column: int = 0) -> Tensor:
    """`penalty`: flagged rollouts' reward lowered by `penalty` (in place on `column`, which carries reward weight
    `weight`, so the weighted sum drops by exactly `penalty`); returns the tensor."""
    flagged = torch.tensor([bool(f) for f in flags], dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    if flagged.numel() != rewards_per_func.shape[0]:
        raise ValueError(f"penalize_rewards: {flagged.numel()} flags for {rewards_per_func.shape[0]} rows")
    rewards_per_func[:, column] -= penalty * flagged / float(weight)
    return rewards_per_func


__all__ = ["filter_advantages", "forget_kept_grad", "penalize_rewards", "retain_draws", "routing_modes"]
