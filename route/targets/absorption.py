"""Absorption metrics: where each rollout's gradient lands, kept parameters or quarantine (issue 22).

Routing can only beat a penalty if hacks the monitor did not flag still train the quarantine. For every rollout b
of an optimizer step, a target that supports it (`TargetBase.record_row_grads`) records, in the one training
backward and from the activations and output gradients it already holds, the squared Frobenius norm of b's own
gradient (the gradient of the step's loss restricted to row b) on its kept and its quarantine parameters:

    K_b = sum over kept parameters P of ||dL_b/dP||^2,     Q_b = the same over quarantine parameters.

For a linear map y = W x that is ||sum_t dy_bt x_bt^T||_F^2 (`row_linear_sqnorms`), the per-row analogue of the
per-row score of `route.targets.svf_routing`. The logged share of a set S of rollouts (`AbsorptionMeter`) is

    absorption/<set> = sum_{b in S} Q_b / sum_{b in S} (Q_b + K_b)        (squared-norm share, in [0, 1])

over the optimizer step's micro-batches (and processes). Ground truth (`exploited`, the loophole mode) chooses the
sets and is used for logging only: it never reaches routing. The sets:

- `missed_hack`: exploited and not flagged; `flagged_hack`: exploited and flagged; `clean`: not exploited;
- `missed_hack/known`, `missed_hack/held_out`: missed hacks of modes the detector knows (`detector_modes`, all modes
  when unset) or not; `hack/<mode>`: every exploit of that mode, flagged or not.

A set with no rollout, or whose rows sent no gradient at all, is not logged that step. `absorption/n_<set>` counts
its rows. Not a departure from any paper: the papers routing implements do not measure this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GROUPS = ("keep", "quarantine")


def row_linear_sqnorms(dy: Tensor, x: Tensor, per: str = "row") -> Tensor:
    """||sum_t dy_bt x_bt^T||_F^2 per row b: the squared norm of row b's gradient on the weight of y = W x.

    `dy` (B, ..., out) and `x` (B, ..., in); the middle dims (tokens) are summed over. Returns (B,) float32; with
    `per="out"` or `per="in"`, (B, out) or (B, in): each output row's (input column's) part of that norm.
    """
    rows = dy.shape[0]
    dy, x = dy.reshape(rows, -1, dy.shape[-1]).float(), x.reshape(rows, -1, x.shape[-1]).float()
    g = torch.bmm(dy.transpose(1, 2), x).pow_(2)  # (B, out, in)
    return g.sum((1, 2)) if per == "row" else g.sum(2 if per == "out" else 1)


class RowSqNorms:
    """Per-row squared gradient norms of one backward by group: {"keep": (B,), "quarantine": (B,)}, float32."""

    def __init__(self) -> None:
        self.norms: dict[str, Tensor] = {}

    def add(self, group: str, sq: Tensor) -> None:
        sq = sq.detach().float()
        prev = self.norms.get(group)
        self.norms[group] = sq if prev is None else prev + sq

    def pop(self) -> dict[str, Tensor] | None:
        norms, self.norms = self.norms, {}
        return norms or None


class AbsorptionMeter:
    """Accumulates per-set (Q, K, rows) over an optimizer step's micro-batches; `metrics()` returns the shares.

    Args:
        modes: the environment's loophole modes (the order of the `hack_mode` codes; -1 = none).
        known: the modes the detector knows (None: all of them).
    """

    def __init__(self, modes: Sequence[str], known: Sequence[str] | None = None):
        self.modes = list(modes)
        known_set = set(self.modes if known is None else known)
        self.sets = ["missed_hack", "flagged_hack", "clean", "missed_hack/known", "missed_hack/held_out"]
        self.sets += [f"hack/{m}" for m in self.modes]
        self._known = torch.tensor([m in known_set for m in self.modes] + [False], dtype=torch.bool)
        self._sums = torch.zeros(len(self.sets), 3, dtype=torch.float64)  # Q, K, rows

    def masks(self, flags: Tensor, exploited: Tensor, hack_mode: Tensor | None) -> list[Tensor]:
        """One boolean row mask per set, in `self.sets` order."""
        flags, exploited = flags.bool().cpu(), exploited.bool().cpu()
        codes = torch.full_like(flags, -1, dtype=torch.long) if hack_mode is None else hack_mode.long().cpu()
        missed = exploited & ~flags
        known = self._known[codes]  # code -1 reads the trailing False
        out = [missed, exploited & flags, ~exploited, missed & known, missed & ~known & (codes >= 0)]
        return out + [exploited & (codes == i) for i in range(len(self.modes))]

    def add(self, norms: dict[str, Tensor], flags: Tensor, exploited: Tensor, hack_mode: Tensor | None = None) -> None:
        """Add one micro-batch: `norms` from the target, row-aligned with the routing columns."""
        q = norms.get("quarantine", torch.zeros_like(flags, dtype=torch.float32)).double().cpu()
        k = norms.get("keep", torch.zeros_like(flags, dtype=torch.float32)).double().cpu()
        for i, m in enumerate(self.masks(flags, exploited, hack_mode)):
            self._sums[i] += torch.stack([q[m].sum(), k[m].sum(), m.sum().double()])

    def metrics(self, reduce: Callable[[Tensor, str], Tensor] | None = None, device=None) -> dict[str, float]:
        """The step's shares (and row counts), then reset. `reduce(t, "sum")` combines processes."""
        sums = self._sums if device is None else self._sums.to(device)
        if reduce is not None:
            sums = reduce(sums, "sum")
        sums = sums.cpu()
        self._sums = torch.zeros_like(self._sums)
        out: dict[str, float] = {}
        for name, (q, k, n) in zip(self.sets, sums.tolist()):
            if n == 0:
                continue
            out[f"absorption/n_{name}"] = n
            if q + k > 0:
                out[f"absorption/{name}"] = q / (q + k)
        return out


def hack_mode_codes(grades: Sequence, modes: Sequence[str]) -> Tensor:
    """Per rollout: the index of its loophole mode in `modes`, or -1 (no mode, or one outside the list)."""
    index = {m: i for i, m in enumerate(modes)}
    return torch.tensor([index.get(g.mode, -1) for g in grades], dtype=torch.long)


__all__ = ["GROUPS", "AbsorptionMeter", "RowSqNorms", "hack_mode_codes", "row_linear_sqnorms"]
