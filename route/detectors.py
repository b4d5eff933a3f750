"""Detectors: per-rollout flags from grades, with a quality dial.

A detector never sees more than a real one would be allowed to report: it turns the ground
truth (`Grade.exploited`, `Grade.mode`) into noisy flags. Every draw is a pure function of
(seed, rollout id), hashed with BLAKE2b: no global RNG, identical across processes and
across a resumed run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from envs.base import Grade


class Detector(Protocol):
    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str]) -> list[bool]: ...


def _check_rate(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def uniform(seed: int, rollout_id: str) -> float:
    """A uniform draw in [0, 1) that depends only on (seed, rollout_id)."""
    digest = hashlib.blake2b(f"{seed}\x1f{rollout_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class GroundTruthDetector:
    """Flags exactly the exploited rollouts (an oracle, for upper-bound runs)."""

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str]) -> list[bool]:
        _check_lengths(grades, rollout_ids)
        return [g.exploited for g in grades]


@dataclass
class NoisyDetector:
    """Flags an exploited rollout with probability `tpr` and a clean one with probability `fpr`.

    Args:
        tpr: true-positive rate on exploits of known modes.
        fpr: false-positive rate on rollouts that are not exploits.
        seed: the detector's seed; draws are a pure function of (seed, rollout id).
        modes: the known loophole modes (None = all). Exploits of other modes are held out:
            flagged with probability 0 unless `tpr_by_mode` gives them a rate.
        tpr_by_mode: per-mode true-positive rates that override `tpr` (and the hold-out).
    """

    tpr: float
    fpr: float
    seed: int = 0
    modes: Sequence[str] | None = None
    tpr_by_mode: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        self.tpr = _check_rate("tpr", self.tpr)
        self.fpr = _check_rate("fpr", self.fpr)
        self.tpr_by_mode = {m: _check_rate(f"tpr_by_mode[{m!r}]", r) for m, r in (self.tpr_by_mode or {}).items()}
        self.modes = None if self.modes is None else tuple(self.modes)

    @classmethod
    def from_precision_recall(cls, precision: float, recall: float, base_rate: float, **kwargs) -> NoisyDetector:
        """The detector with the given recall (= tpr) and precision at exploit base rate `base_rate`.

        precision = tpr*p / (tpr*p + fpr*(1-p))  =>  fpr = tpr*p*(1-precision) / (precision*(1-p)).
        """
        precision = _check_rate("precision", precision)
        recall = _check_rate("recall", recall)
        p = _check_rate("base_rate", base_rate)
        if precision == 0.0 or p == 1.0:
            raise ValueError("precision must be > 0 and base_rate < 1 to derive fpr")
        fpr = recall * p * (1.0 - precision) / (precision * (1.0 - p))
        if fpr > 1.0:
            raise ValueError(f"precision={precision} is unreachable at recall={recall}, base_rate={p} "
                             f"(fpr would be {fpr:.3f})")
        return cls(tpr=recall, fpr=fpr, **kwargs)

    def rate_for(self, grade: Grade) -> float:
        """The probability that this rollout is flagged."""
        if not grade.exploited:
            return self.fpr
        if grade.mode in self.tpr_by_mode:
            return self.tpr_by_mode[grade.mode]
        if self.modes is not None and grade.mode not in self.modes:
            return 0.0
        return self.tpr

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str]) -> list[bool]:
        _check_lengths(grades, rollout_ids)
        return [uniform(self.seed, rid) < self.rate_for(g) for g, rid in zip(grades, rollout_ids)]


def _check_lengths(grades: Sequence[Grade], rollout_ids: Sequence[str]) -> None:
    if len(grades) != len(rollout_ids):
        raise ValueError(f"detector: {len(grades)} grades but {len(rollout_ids)} rollout ids")


def realised_rates(grades: Sequence[Grade], flags: Sequence[bool]) -> dict[str, float]:
    """Realised TPR (flagged share of exploits) and FPR (flagged share of the rest); NaN when undefined."""
    pos = [f for g, f in zip(grades, flags, strict=True) if g.exploited]
    neg = [f for g, f in zip(grades, flags, strict=True) if not g.exploited]
    nan = float("nan")
    return {
        "tpr": sum(pos) / len(pos) if pos else nan,
        "fpr": sum(neg) / len(neg) if neg else nan,
        "flag_rate": sum(flags) / len(flags) if flags else nan,
        "n_exploited": float(len(pos)),
        "n_clean": float(len(neg)),
    }


def make_detector(kind: str, tpr: float = 0.5, fpr: float = 0.05, seed: int = 0,
                  modes: Sequence[str] | None = None) -> Detector:
    """Build a detector from config values (`kind` in {noisy, ground_truth})."""
    if kind == "ground_truth":
        return GroundTruthDetector()
    if kind == "noisy":
        return NoisyDetector(tpr=tpr, fpr=fpr, seed=seed, modes=modes)
    raise ValueError(f"detector: unknown kind {kind!r}; allowed values: ['noisy', 'ground_truth']")
