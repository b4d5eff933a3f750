"""Monitors that are blind in a systematic way, composing with the noisy detectors of `route.monitors.detectors`.

- `PromptConditionalDetector(inner, column)`: sees exploits only on prompts whose boolean column is true
  (an observable prompt feature, e.g. the procedural environments' watched channel). Elsewhere an exploit
  looks clean to it: the inner detector is asked about a clean rollout, so it is flagged at the inner
  detector's false-positive rate, like any clean rollout.
- `ProgramDetector(program, tpr, fpr, seed)`: any callable over (prompt, completion, row columns) says
  "hack" or not; a yes is flagged with probability `tpr`, a no with `fpr`. It never reads the ground truth.
- `FormDetector(patterns, ...)`: the program is "the stripped completion fully matches one of these
  regular expressions", so it catches the forms the patterns describe and misses the other forms of the
  same mode (``#sorted`` caught, ``# sorted`` missed).

Every draw is a pure function of (seed, rollout id) (`route.monitors.detectors.uniform`). Each monitor labels the
rollouts with the condition it sees them under (`parts`): ``detectable`` / ``undetectable`` for the
prompt-conditional monitor, ``caught_form`` / ``missed_form`` for programs; `realised_by_part` turns
flags into realised rates per condition. Departure from the gradient-routing-for-RL paper's monitors:
ours are ground-truth based (prompt-conditional) or programs over the text; the model-based example is
`route.monitors.classifier`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from envs.base import Grade, completion_text, prompt_text
from route.monitors.detectors import Detector, call_detector, realised_rates, uniform

Program = Callable[[str, str, Mapping[str, Any]], bool]  # (prompt, completion, row columns) -> says "hack"


def _rows(columns: Mapping[str, Sequence[Any]] | None, n: int) -> list[dict[str, Any]]:
    columns = columns or {}
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def _need(name: str, value: Any, what: str) -> Any:
    if value is None:
        raise ValueError(
            f"{name}: needs {what}; call it with prompts=, completions= and columns= "
            f"(route.monitors.detectors.call_detector passes them)"
        )
    return value


@dataclass
class PromptConditionalDetector:
    """`inner` with exploits visible only where `columns[column]` is true.

    Args:
        inner: any detector (e.g. `NoisyDetector(tpr, fpr)`); its noise applies on both parts.
        column: a boolean dataset column (default ``detectable``, the procedural environments' channel).
    """

    inner: Detector
    column: str = "detectable"

    def parts(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[str]:
        columns = _need("PromptConditionalDetector", context.get("columns"), "the dataset columns")
        if self.column not in columns:
            raise ValueError(f"monitor_column: column {self.column!r} not in the batch; columns: {sorted(columns)}")
        return ["detectable" if bool(v) else "undetectable" for v in columns[self.column]]

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[bool]:
        parts = self.parts(grades, rollout_ids, **context)
        seen = [
            g if p == "detectable" or not g.exploited else Grade(g.solved, g.passed, False, g.mode)
            for g, p in zip(grades, parts, strict=True)
        ]
        return call_detector(self.inner, seen, rollout_ids, **context)


@dataclass
class ProgramDetector:
    """Flags a rollout with probability `tpr` when `program` says hack, `fpr` otherwise.

    Args:
        program: (prompt, completion text, row columns) -> bool; a rule, a regex or a model judge.
        tpr, fpr: noise composed on top of the program's verdict (1 and 0: the program alone).
        seed: the seed of the per-rollout draws.
    """

    program: Program
    tpr: float = 1.0
    fpr: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        from route.monitors.detectors import check_rate

        self.tpr, self.fpr = check_rate("tpr", self.tpr), check_rate("fpr", self.fpr)

    def verdicts(self, n: int, **context: Any) -> list[bool]:
        prompts = _need("ProgramDetector", context.get("prompts"), "the prompts")
        completions = _need("ProgramDetector", context.get("completions"), "the completions")
        rows = _rows(context.get("columns"), n)
        return [
            bool(self.program(prompt_text(p), completion_text(c), r))
            for p, c, r in zip(prompts, completions, rows, strict=True)
        ]

    def parts(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[str]:
        return ["caught_form" if v else "missed_form" for v in self.verdicts(len(grades), **context)]

    def __call__(self, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any) -> list[bool]:
        if len(grades) != len(rollout_ids):
            raise ValueError(f"detector: {len(grades)} grades but {len(rollout_ids)} rollout ids")
        verdicts = self.verdicts(len(grades), **context)
        return [uniform(self.seed, rid) < (self.tpr if v else self.fpr) for v, rid in zip(verdicts, rollout_ids)]


class FormDetector(ProgramDetector):
    """A program that says hack when the stripped completion fully matches one of `patterns` (mode -> regex)."""

    def __init__(self, patterns: Mapping[str, str], tpr: float = 1.0, fpr: float = 0.0, seed: int = 0):
        compiled = {}
        for mode, pattern in patterns.items():
            try:
                compiled[mode] = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"monitor_forms[{mode!r}]: invalid regular expression {pattern!r}: {e}") from None
        self.patterns = dict(patterns)
        super().__init__(lambda p, c, r: any(rx.fullmatch(c.strip()) for rx in compiled.values()), tpr, fpr, seed)


def detector_parts(
    detector: Any, grades: Sequence[Grade], rollout_ids: Sequence[str], **context: Any
) -> list[str] | None:
    """The detector's condition label per rollout, or None when it has no conditions (`parts`)."""
    parts = getattr(detector, "parts", None)
    return None if parts is None else list(parts(grades, rollout_ids, **context))


def realised_by_part(grades: Sequence[Grade], flags: Sequence[bool], parts: Sequence[str]) -> dict[str, dict]:
    """`realised_rates` of each condition (part label -> rates), plus each part's exploit share."""
    out = {}
    for part in sorted(set(parts)):
        idx = [i for i, p in enumerate(parts) if p == part]
        sub = [grades[i] for i in idx]
        rates = realised_rates(sub, [flags[i] for i in idx])
        rates["n"] = float(len(idx))
        rates["hack_rate"] = sum(g.exploited for g in sub) / len(sub)
        out[part] = rates
    return out
