"""The embedded preference task: answer a sum in the format the prompt names.

A prompt `"12+7 fmt star>"` asks for the sum in one of four formats, each a marker before the
digits: hash `#19`, star `*19`, eq `=19`, dash `-19` (then end of sequence). The preferred property (a program checks
it) is that the answer uses the format the prompt names; task accuracy is that the digits are the
sum, in whatever format. The base model is warm-started on demonstrations that follow the named
format with probability `follow_share` and otherwise use one of the other formats, so it solves the
sum but ignores the format request most of the time. Preference pairs: chosen = the sum in the
named format, rejected = the sum in another format. Because the right marker depends on the
prompt, a constant logit bias can at best push every answer to one format (a rate of 1/4 over
uniformly drawn formats), below a base that follows the request at `follow_share` > 1/4.

All draws are pure functions of (seed, split, index).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FORMATS = {"hash": "#", "star": "*", "eq": "=", "dash": "-"}
_ANSWER = re.compile(r"^([#*=\-])(\d+)$")
VERSION = 2  # bump when prompts or answers change: it keys the cached base


@dataclass(frozen=True)
class Problem:
    prompt: str
    a: int
    b: int
    fmt: str


def render(value: int, fmt: str) -> str:
    m = FORMATS[fmt]
    return f"{m}{value}"


def problem(seed: int, split: str, index: int, max_operand: int = 29) -> Problem:
    """Problem `index` of `split` (train, eval): a pure function of (seed, split, index)."""
    rng = random.Random(f"heads-task:{seed}:{split}:{index}")
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    fmt = rng.choice(sorted(FORMATS))
    return Problem(f"{a}+{b} fmt {fmt}>", a, b, fmt)


def problems(n: int, seed: int, split: str, max_operand: int = 29) -> list[Problem]:
    return [problem(seed, split, i, max_operand) for i in range(n)]


def other_format(p: Problem, rng: random.Random) -> str:
    return rng.choice([f for f in sorted(FORMATS) if f != p.fmt])


def demonstrations(probs: list[Problem], follow_share: float, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs for the base: the named format with probability `follow_share`."""
    if not 0.0 <= follow_share <= 1.0:
        raise ValueError(f"follow_share: must be in [0, 1], got {follow_share}")
    rng = random.Random(f"heads-demos:{seed}")
    out = []
    for p in probs:
        fmt = p.fmt if rng.random() < follow_share else other_format(p, rng)
        out.append((p.prompt, render(p.a + p.b, fmt)))
    return out


def preference_rows(probs: list[Problem], seed: int) -> dict[str, list[str]]:
    """Columns prompt / chosen / rejected for TRL's DPO trainer (chosen follows the named format)."""
    rng = random.Random(f"heads-pairs:{seed}")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for p in probs:
        rows["prompt"].append(p.prompt)
        rows["chosen"].append(render(p.a + p.b, p.fmt))
        rows["rejected"].append(render(p.a + p.b, other_format(p, rng)))
    return rows


def grade(p: Problem, completion: str) -> dict[str, bool]:
    """follows: the answer is well formed in the named format; correct: its digits are the sum (any format)."""
    m = _ANSWER.match(completion.strip())
    if m is None:
        digits = re.search(r"\d+", completion)
        return {"follows": False, "correct": bool(digits) and int(digits.group()) == p.a + p.b}
    return {"follows": m.group(1) == FORMATS[p.fmt], "correct": int(m.group(2)) == p.a + p.b}
