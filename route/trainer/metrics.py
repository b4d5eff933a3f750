"""The trainer's per-batch routing and environment metrics, appended to TRL's metric lists (averaged per log step).

- `routing/flag_rate`, `routing/realised_tpr`, `routing/realised_fpr`: the flags the batch was trained with against
  ground truth (`exploited`), and per part of a systematically blind monitor (`routing/hack_rate/<part>`,
  `routing/realised_tpr/<part>`); `routing/frac_<mode>`: the share of rollouts per routing mode.
- `env/solve_rate`, `env/hack_rate` and `env/hack_rate/<loophole mode>` (on that mode's rollouts).
- Under a flag control, `routing/monitor/*`: the real monitor's rates beside the control's flags.

A rate whose denominator is empty (no exploit, no clean rollout) is not appended, so it does not enter the mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from route.masks import DEFAULT, EXCLUSIVE, FORGET, RETAIN
from route.monitors.detectors import realised_rates
from route.monitors.systematic import realised_by_part

Metrics = Any  # name -> list of floats (TRL's `self._metrics[mode]`, a defaultdict(list))


def log_monitor(metrics: Metrics, grades: Sequence[Any], monitor_flags: Sequence[bool]) -> None:
    """Under a flag control (`flag_control`), the real monitor's rates beside the control's `routing/*`."""
    r = realised_rates(grades, monitor_flags)
    metrics["routing/monitor/flag_rate"].append(r["flag_rate"])
    for key, n in (("tpr", "n_exploited"), ("fpr", "n_clean")):
        if r[n]:
            metrics[f"routing/monitor/realised_{key}"].append(r[key])


def log_routing(metrics: Metrics, grades: Sequence[Any], flags: Sequence[bool], modes: Sequence[int],
                parts: Sequence[str] | None, env_modes: Sequence[str], exclusive: bool = False) -> None:
    """One batch's flags, routing modes and environment rates (`grades`, `flags`, `modes`: one per rollout)."""
    for part, r in realised_by_part(grades, flags, parts).items() if parts is not None else ():
        metrics[f"routing/hack_rate/{part}"].append(r["hack_rate"])
        if r["n_exploited"]:
            metrics[f"routing/realised_tpr/{part}"].append(r["tpr"])
    n = len(grades)
    r = realised_rates(grades, flags)
    metrics["routing/flag_rate"].append(r["flag_rate"])
    if r["n_exploited"]:
        metrics["routing/realised_tpr"].append(r["tpr"])
    if r["n_clean"]:
        metrics["routing/realised_fpr"].append(r["fpr"])
    counts = Counter(modes)
    names = ((FORGET, "forget"), (RETAIN, "retain"), (DEFAULT, "default"))
    for code, name in names + (((EXCLUSIVE, "exclusive"),) if exclusive else ()):
        metrics[f"routing/frac_{name}"].append(counts.get(code, 0) / n)
    metrics["env/solve_rate"].append(sum(g.solved for g in grades) / n)
    metrics["env/hack_rate"].append(sum(g.exploited for g in grades) / n)
    for mode in env_modes:
        on_mode = [g.exploited for g in grades if g.mode == mode]
        if on_mode:
            metrics[f"env/hack_rate/{mode}"].append(sum(on_mode) / len(on_mode))
