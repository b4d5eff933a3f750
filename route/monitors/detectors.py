"""Detectors: per-rollout flags from grades, with a quality dial.

A detector never sees more than a real one would be allowed to report: it turns the ground
truth (`Grade.exploited`, `Grade.mode`) into noisy flags. Every draw is a pure function of
(seed, rollout id), hashed with BLAKE2b: no global RNG, identical across processes and
across a resumed run.

A detector is any callable `(grades, rollout_ids, **context) -> flags`; the trainer passes the context
`prompts=`, `completions=` and `columns=` (the batch's dataset columns) through `call_detector`, which
leaves it out for a detector whose signature takes only (grades, rollout_ids), so those keep working.
Monitors that are blind in a systematic way live in `route.monitors.systematic` and `route.monitors.classifier`;
`build_detector` builds the one a `RoutedGRPOConfig` selects and `validate_monitor` checks its fields.

Flag controls (`flag_control`, `ControlDetector`) wrap that monitor to separate a routing effect from shrinkage:
`random` flags each rollout with the monitor's realised flag share on the same detector call, by a coin that
depends only on (detector_seed, rollout id) and is drawn from its own salted stream (independent of the monitor's
coin and of exploitation); `never` flags nothing. The monitor still runs, and its flags are kept for logging.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from envs.base import Grade


class Detector(Protocol):
    """Flags per rollout; `context` holds `prompts`, `completions` and `columns` (name -> list per rollout)."""

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[bool]: ...


CONTEXT_KEYS = ("prompts", "completions", "columns")


def call_detector(detector: Detector, grades: Sequence[Grade], rollout_ids: Sequence[str],
                  **context: Any) -> list[bool]:
    """Run `detector`, passing the keyword context it accepts (none for a two-argument detector)."""
    unknown = [k for k in context if k not in CONTEXT_KEYS]
    if unknown:
        raise ValueError(f"detector context: unknown keys {unknown}; allowed keys: {list(CONTEXT_KEYS)}")
    try:
        params = inspect.signature(detector).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables: assume the two-argument form
        params = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = context
    else:
        names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        accepted = {k: v for k, v in context.items() if k in names}
    return list(detector(grades, rollout_ids, **accepted))


def check_rate(name: str, value: float) -> float:
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

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[bool]:
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
        self.tpr = check_rate("tpr", self.tpr)
        self.fpr = check_rate("fpr", self.fpr)
        self.tpr_by_mode = {m: check_rate(f"tpr_by_mode[{m!r}]", r) for m, r in (self.tpr_by_mode or {}).items()}
        self.modes = None if self.modes is None else tuple(self.modes)

    @classmethod
    def from_precision_recall(cls, precision: float, recall: float, base_rate: float, **kwargs) -> NoisyDetector:
        """The detector with the given recall (= tpr) and precision at exploit base rate `base_rate`.

        precision = tpr*p / (tpr*p + fpr*(1-p))  =>  fpr = tpr*p*(1-precision) / (precision*(1-p)).
        """
        precision = check_rate("precision", precision)
        recall = check_rate("recall", recall)
        p = check_rate("base_rate", base_rate)
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

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[bool]:
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


# ------------------------------------------------------------------ monitors selected by the config (issue 13)
MONITORS = ("plain", "prompt", "form", "prompt_form", "classifier", "judge", "prompt_judge")


def parse_json(name: str, value: Any) -> Any:
    """`value`, or the JSON it holds when it is a string (a mapping given on the command line)."""
    import json

    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON ({e}): {value!r}") from None


# ------------------------------------------------------------------ flag controls (issue 22)
FLAG_CONTROLS = ("none", "random", "never")


class ControlDetector:
    """A control arm's flags in place of `monitor`'s, with the monitor's own flags kept for logging.

    `random`: on each call, r = the monitor's flagged share of these rollouts, and rollout i is flagged iff
    `uniform(seed, "flag_control|" + id) < r`: the same flag rate per call (per generation batch and process), with
    flags that carry no information about exploitation. `never`: nothing is flagged.

    Args:
        monitor: the real detector (any `Detector`).
        control: "random" or "never".
        seed: the coin's seed (the run's `detector_seed`; the salt keeps it apart from the monitor's draws).
    """

    def __init__(self, monitor: Detector, control: str, seed: int = 0):
        if control not in FLAG_CONTROLS[1:]:
            raise ValueError(f"flag_control: invalid value {control!r}; allowed values: {list(FLAG_CONTROLS[1:])}")
        self.monitor, self.control, self.seed = monitor, control, seed
        self.monitor_flags: list[bool] | None = None  # the monitor's flags on the last call

    @property
    def parts(self):
        """The monitor's condition labels (`route.monitors.systematic.detector_parts`), if it has any."""
        return getattr(self.monitor, "parts", None)

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[bool]:
        _check_lengths(grades, rollout_ids)
        self.monitor_flags = [bool(f) for f in call_detector(self.monitor, grades, rollout_ids, **context)]
        if self.control == "never" or not rollout_ids:
            return [False] * len(rollout_ids)
        share = sum(self.monitor_flags) / len(rollout_ids)
        return [uniform(self.seed, f"flag_control|{rid}") < share for rid in rollout_ids]
