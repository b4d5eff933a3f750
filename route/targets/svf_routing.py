"""svf's own interventions on the kept gradient: flag-free score routing and `erase` (see `route.targets.svf`).

Score routing: each candidate rollout's delta gradient g_b (recorded per row in the one backward by a tensor hook on
the per-row delta) is scored by |P g_b| / |g_b| against the hack subspace over all modules; candidates above the
threshold are routed after the fact (their share removed from delta_keep's gradient before the optimizer step, which
equals running them in forget mode). `erase` removes the kept gradient's hack-subspace component (g -= V^T V g, or
only the components that move toward +v with `erase_one_sided`). Both are the svf target's hooks (`after_backward`,
`before_optimizer_step`), and their metrics (`routing/score_*`, `erase/removed_norm_frac`) are logged from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from route.masks import DEFAULT, FORGET
from route.targets.base import Reduce, RoutingRows

_SCORE_COUNTS = ("rows", "candidates", "routed", "exploited", "routed_exploited", "clean", "routed_clean",
                 "score_sum")


class RowGradientRecorder:
    """Per-row delta gradients of one backward, summed over tokens: {layer index: (B, r)}, float32."""

    def __init__(self) -> None:
        self.records: dict[int, Tensor] = {}

    def hook(self, i: int) -> Callable[[Tensor], None]:
        """The tensor hook of layer `i`'s per-row delta."""

        def record(g: Tensor) -> None:
            g = g.float()
            prev = self.records.get(i)
            self.records[i] = g if prev is None else prev + g

        return record

    def pop(self) -> dict[int, Tensor]:
        records, self.records = self.records, {}
        return records


def deepspeed_refusal() -> ValueError:
    return ValueError("intervention, route_score: erase and score routing edit the accumulated gradients, which "
                      "DeepSpeed partitions; allowed with DeepSpeed: intervention in ['none', 'filter', 'penalty', "
                      "'route'] with route_score 'none'; or use DDP or a single process")


def uses_deepspeed(config: Any) -> bool:
    """Whether the run will train under DeepSpeed: the `deepspeed` field or `accelerate launch --use_deepspeed`
    (known from the config and the launcher's environment, before any accelerator exists)."""
    env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    return bool(config.deepspeed) or env


def ignore_gradient(g: Tensor) -> None:
    """The recorder of a checkpointed recompute: the forward's graph already records the gradient."""


@torch.no_grad()
def subspace_scores(bases: Sequence[Tensor | None], grads: dict[int, Tensor]) -> Tensor:
    """|P g_b| / |g_b| per row for per-layer row gradients {layer index: (B, r)} against per-layer bases (k, r)
    (0 for a zero gradient)."""
    num = den = None
    for i, g in grads.items():
        basis = bases[i]
        sq = g.pow(2).sum(1)
        proj = (g @ basis.T.to(g)).pow(2).sum(1) if basis is not None else torch.zeros_like(sq)
        num, den = (proj, sq) if num is None else (num + proj, den + sq)
    return torch.where(den > 0, (num / den.clamp_min(1e-30)).sqrt(), torch.zeros_like(den)).clamp(max=1.0)


class SVFRoutingMixin:
    """Score routing and erase for `SVFTarget` (needs `self.layers`, `score_threshold`, `erase`, `erase_one_sided`,
    `route_requires_flag`)."""

    layers: list
    score_threshold: float | None
    erase: bool
    erase_one_sided: bool
    route_requires_flag: bool

    def _init_routing(self) -> None:
        self._recorder = RowGradientRecorder()
        self._record_modes: Tensor | None = None
        self._pending: dict[int, Tensor] = {}
        self._rows = [0, 0]  # kept-gradient rows, rows routed by score, since the last optimizer step
        self._score_counts = torch.zeros(len(_SCORE_COUNTS), dtype=torch.float64)

    # ------------------------------------------------------------------ hooks
    def routing_candidates(self, flags: Sequence[bool], intervention: str) -> Tensor | None:
        """Under score routing: every rollout (or only the flagged ones with `route_score_requires_flag`)."""
        if intervention != "route" or self.score_threshold is None:
            return None
        return torch.tensor([bool(f) or not self.route_requires_flag for f in flags], dtype=torch.bool)

    def after_backward(self, rows: RoutingRows) -> None:
        out = self.score_rows(rows.candidates)
        if out is not None:
            self._count_scores(out["routed"], out["scores"], rows.candidates.cpu(), rows.exploited.cpu())

    @torch.no_grad()
    def before_optimizer_step(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Apply the queued score routing, then `erase`, to the accumulated gradients; call once per optimizer step,
        after the last backward and before clipping. `reduce` combines tensors over data-parallel processes (as DDP
        averages gradients); every process must call this. Returns logging stats."""
        stats: dict[str, float] = {}
        if self.score_threshold is not None:
            self._apply_routing(reduce)
            stats.update(self._score_stats(reduce))
        if self.erase:
            stats["erase/removed_norm_frac"] = self.erase_gradients()
        return stats

    def check_accelerator(self, accelerator) -> None:
        from accelerate.utils import DistributedType

        if (self.erase or self.score_threshold is not None) and \
                accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise deepspeed_refusal()

    # ------------------------------------------------------------------ score routing
    def row_scores(self, grads: dict[int, Tensor]) -> Tensor:
        """|P g_b| / |g_b| per row for per-layer row gradients {layer index: (B, r)} (0 for a zero gradient)."""
        return subspace_scores([layer.basis for _, layer in self.layers], grads)

    @torch.no_grad()
    def score_rows(self, candidates: Tensor | Sequence[bool]) -> dict[str, Tensor] | None:
        """Route the candidate rows of the last recorded backward whose score exceeds the threshold.

        Only default rows can be routed (their forward had the quarantine on and their gradient reached both parts).
        Their delta gradients are queued for removal from delta_keep's gradient in `before_optimizer_step()`.
        Returns {"scores": (B,), "routed": (B,) bool}, or None when nothing was recorded.
        """
        if self.score_threshold is None or not self._recorder.records or self._record_modes is None:
            return None
        records, modes = self._recorder.pop(), self._record_modes
        self._record_modes = None
        scores = self.row_scores(records).cpu()
        cand = torch.as_tensor(candidates, dtype=torch.bool).view(-1).cpu()
        if cand.numel() != modes.numel():
            raise RuntimeError(f"svf: {cand.numel()} score candidates for a batch of {modes.numel()} rows")
        routed = cand & (modes == DEFAULT) & (scores > self.score_threshold)
        if routed.any():
            for i, g in records.items():
                share = g[routed.to(g.device)].sum(0)
                self._pending[i] = share if i not in self._pending else self._pending[i] + share
        self._rows[0] += int((modes != FORGET).sum())
        self._rows[1] += int(routed.sum())
        return {"scores": scores, "routed": routed}

    def _apply_routing(self, reduce: Reduce | None) -> None:
        mean = (lambda t: t) if reduce is None else (lambda t: reduce(t, "mean"))
        rows = mean(torch.tensor(self._rows, dtype=torch.float64, device=self._device))
        nothing_left = float(rows[0] - rows[1]) < 1e-9  # every kept-gradient row was routed: exactly zero
        for i, (_, layer) in enumerate(self.layers):
            dk = layer.delta_keep
            pending = self._pending.get(i)
            pending = torch.zeros(layer.rank, device=self._device) if pending is None else pending.to(self._device)
            pending = mean(pending)
            if dk.grad is None:
                continue
            if nothing_left:
                dk.grad.zero_()
            else:
                dk.grad.sub_(pending.to(dk.grad.dtype))
        self._pending, self._rows = {}, [0, 0]

    @property
    def _device(self) -> torch.device:
        return self.layers[0][1].delta_keep.device

    def _count_scores(self, routed: Tensor, scores: Tensor, candidates: Tensor, exploited: Tensor) -> None:
        routed, candidates, exploited = routed.bool(), candidates.bool(), exploited.bool()
        self._score_counts += torch.tensor([
            routed.numel(), candidates.sum(), routed.sum(), exploited.sum(), (routed & exploited).sum(),
            (~exploited).sum(), (routed & ~exploited).sum(), scores[candidates].sum()], dtype=torch.float64)

    def _score_stats(self, reduce: Reduce | None) -> dict[str, float]:
        """Per optimizer step: share of rollouts routed by score and its realised TPR/FPR against ground truth."""
        counts = self._score_counts.to(self._device)
        if reduce is not None:
            counts = reduce(counts, "sum")
        c = dict(zip(_SCORE_COUNTS, counts.cpu().tolist()))
        self._score_counts.zero_()
        stats = {}
        if c["rows"]:
            stats["routing/score_frac"] = c["routed"] / c["rows"]
        if c["candidates"]:
            stats["routing/score_mean"] = c["score_sum"] / c["candidates"]
        if c["exploited"]:
            stats["routing/score_tpr"] = c["routed_exploited"] / c["exploited"]
        if c["clean"]:
            stats["routing/score_fpr"] = c["routed_clean"] / c["clean"]
        return stats

    # ------------------------------------------------------------------ erase
    @torch.no_grad()
    def erase_gradients(self) -> float:
        """Remove the hack-subspace component of delta_keep's gradient (see the module docstring); returns the
        removed share of the kept gradient's norm."""
        total = removed = 0.0
        for _, layer in self.layers:
            g, basis = layer.delta_keep.grad, layer.basis
            if g is None or basis is None:
                continue
            a = basis @ g.float()
            if self.erase_one_sided:
                a = a.clamp(max=0.0)
            part = a @ basis
            total += float(g.float().pow(2).sum())
            removed += float(part.pow(2).sum())
            g.sub_(part.to(g.dtype))
        return math.sqrt(removed / total) if total > 0 else 0.0


__all__ = ["RowGradientRecorder", "SVFRoutingMixin", "ignore_gradient", "subspace_scores"]
