"""Function-writing problems: the packaged set, and a loader for datasets of the same shape.

A problem is one row with these fields (all strings, so any Hub dataset stores them as-is):

| field           | meaning                                                                 |
|-----------------|-------------------------------------------------------------------------|
| `problem_id`    | unique name                                                             |
| `entry_point`   | the function the tests call                                             |
| `signature`     | its ``def`` line, shown in the prompt                                   |
| `description`   | what the function must do                                               |
| `solution`      | a reference solution (passes every test)                                |
| `visible_tests` | JSON list of ``[args, expected]``: shown in the prompt, run by its grader |
| `hidden_tests`  | JSON list of ``[args, expected]``: held out, for the strict oracle only   |

``args`` is the list of positional arguments; expected values are JSON values (compared with
exact types: ``1`` is not ``1.0`` or ``True``). Test lists may also be given as lists instead of
JSON strings. The packaged set (``envs/data/coding_problems.jsonl``, written for this project)
has 74 problems with 3 visible and at least 3 held-out tests each.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "coding_problems.jsonl")
FIELDS = ("problem_id", "entry_point", "signature", "description", "solution", "visible_tests", "hidden_tests")


@dataclass(frozen=True)
class Problem:
    """One function-writing problem; tests are tuples of ``(args, expected)``."""

    problem_id: str
    entry_point: str
    signature: str
    description: str
    solution: str
    visible_tests: tuple[tuple[list, Any], ...]
    hidden_tests: tuple[tuple[list, Any], ...]

    @property
    def all_tests(self) -> tuple[tuple[list, Any], ...]:
        return self.visible_tests + self.hidden_tests


def parse_tests(value: Any, field: str, where: str) -> tuple[tuple[list, Any], ...]:
    """Tests from a JSON string or a list of ``[args, expected]`` pairs; a clear error otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"coding: {where}: field {field!r} is not valid JSON ({e})") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"coding: {where}: field {field!r} must be a non-empty list of [args, expected] pairs")
    out = []
    for i, test in enumerate(value):
        if not isinstance(test, (list, tuple)) or len(test) != 2 or not isinstance(test[0], (list, tuple)):
            raise ValueError(f"coding: {where}: {field}[{i}] must be [args (a list), expected], got {test!r:.80}")
        out.append((list(test[0]), test[1]))
    return tuple(out)


def problem_from_row(row: dict[str, Any], where: str = "row") -> Problem:
    """Validate one dataset row and build a `Problem`."""
    missing = [f for f in FIELDS if f not in row]
    if missing:
        raise ValueError(f"coding: {where}: missing field(s) {missing}; a problem needs {list(FIELDS)}")
    for f in FIELDS[:5]:
        if not isinstance(row[f], str) or not row[f].strip():
            raise ValueError(f"coding: {where}: field {f!r} must be a non-empty string")
    if not row["entry_point"].isidentifier():
        raise ValueError(f"coding: {where}: field 'entry_point' must be an identifier, got {row['entry_point']!r}")
    return Problem(
        problem_id=row["problem_id"], entry_point=row["entry_point"], signature=row["signature"],
        description=row["description"], solution=row["solution"],
        visible_tests=parse_tests(row["visible_tests"], "visible_tests", where),
        hidden_tests=parse_tests(row["hidden_tests"], "hidden_tests", where),
    )


def problems_from_rows(rows: Iterable[dict[str, Any]], source: str) -> list[Problem]:
    problems = [problem_from_row(dict(r), f"{source} row {i}") for i, r in enumerate(rows)]
    seen: set[str] = set()
    for p in problems:
        if p.problem_id in seen:
            raise ValueError(f"coding: {source}: duplicate problem_id {p.problem_id!r}")
        seen.add(p.problem_id)
    if not problems:
        raise ValueError(f"coding: {source} holds no problems")
    return problems


def load_problems(source: str | None = None, split: str = "train") -> list[Problem]:
    """Problems from the packaged set (``source=None``), a local ``.jsonl``/``.json`` file, a local
    dataset directory, or a Hub dataset name (read with ``datasets.load_dataset(source, split=split)``)."""
    if source is None:
        with open(DATA, encoding="utf-8") as f:
            return problems_from_rows((json.loads(line) for line in f if line.strip()), "packaged problems")
    from datasets import load_dataset

    if os.path.isfile(source) and source.endswith((".json", ".jsonl")):
        ds = load_dataset("json", data_files=source, split="train")
    else:
        ds = load_dataset(source, split=split)
    return problems_from_rows(ds, repr(source))


def is_test_problem(problem_id: str, test_frac: float) -> bool:
    """A fixed share of problems is held out for the test split, independent of any seed."""
    h = int.from_bytes(hashlib.blake2b(problem_id.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < test_frac
