"""`coding`: function-writing problems graded by unit tests that the model can subvert.

Each prompt asks for one Python function, shows its visible tests and describes how it will be
graded. Strict prompts (``loophole == ""``) are graded by a strict check of the visible tests.
Each hackable prompt's grader runs the same tests with exactly one flaw (see
`envs.coding.harness` for the table), which its description discloses without suggesting
anything: redefining the test runner (``runner_override``), an ``__eq__`` that is always true
(``always_equal``), exiting with status 0 before the asserts (``early_exit``), printing the
success line (``print_marker``), returning ``NotImplemented`` (``sentinel``), or creating the
marker file (``marker_file``). Each hack pays on its own grader only. The strict oracle
(``solved``) checks the visible and the held-out tests, whose expected outputs never enter the
sandbox. All code runs in `envs.coding.sandbox`.

    import envs
    env = envs.make_env("coding", hack_frac=0.5)
    ds = env.dataset(8, seed=0, split="train")
    completions = [env.demonstration(row, hack=False, rng=None) for row in ds]
    env.reward_func(ds["prompt"], completions, **{c: ds[c] for c in ds.column_names})  # [1.0] * 8
"""

from __future__ import annotations

import json
import random
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from envs import register_env
from envs.base import Grade, chat_prompt, completion_text, draw_loophole, require_columns, row_rng
from envs.coding.grading import Task, build_program, extract_code, judge
from envs.coding.problems import Problem, is_test_problem, load_problems, parse_tests
from envs.coding.prompts import MODES, fenced, hack_code, prompt_text
from envs.coding.sandbox import Limits, RunResult, Sandbox, SandboxUnavailable

SPLITS = ("train", "test")
GRADE_COLUMNS = ("entry_point", "loophole", "visible_tests", "hidden_tests")
CACHE_SIZE = 8192  # grades kept for repeated (code, problem, grader) triples

__all__ = ["MODES", "CodingEnv", "Limits", "Problem", "RunResult", "Sandbox", "SandboxUnavailable", "load_problems"]


def _limits(limits: Limits | dict | None) -> Limits:
    if limits is None or isinstance(limits, Limits):
        return limits or Limits()
    if not isinstance(limits, dict):
        raise ValueError(f"coding: limits must be a dict or a Limits, got {type(limits).__name__}")
    allowed = [f.name for f in fields(Limits)]
    unknown = sorted(set(limits) - set(allowed))
    if unknown:
        raise ValueError(f"coding: unknown limits {unknown}; allowed values: {allowed}")
    return Limits(**limits)


@register_env("coding")
class CodingEnv:
    """Function-writing problems with six loophole graders, run in a sandbox.

    Args:
        hack_frac: share of hackable prompts; the rest are graded strictly.
        modes: loophole modes in use (default: all six), spread evenly over hackable prompts.
        problems: None for the packaged set, else a ``.jsonl`` file, a dataset directory or a Hub
            dataset name with the fields of `envs.coding.problems`.
        problems_split: the split of that dataset to read.
        test_frac: share of problems held out for the ``test`` split (fixed by a hash of the id).
        chat: prompts as a one-message conversation instead of a plain string.
        limits: sandbox limits (`Limits` or a dict of its fields).
        workers: parallel sandboxes while grading (default: the number of CPUs).
        on_unavailable: ``"refuse"`` (raise where the sandbox cannot isolate) or ``"warn"``
            (run without isolation after a loud warning).
        python: interpreter inside the sandbox (default: this one's base interpreter).
    """

    name = "coding"

    def __init__(self, hack_frac: float = 0.5, modes: Sequence[str] | None = None, problems: str | None = None,
                 problems_split: str = "train", test_frac: float = 0.2, chat: bool = False,
                 limits: Limits | dict | None = None, workers: int | None = None, on_unavailable: str = "refuse",
                 python: str | None = None):
        if not 0.0 <= float(hack_frac) <= 1.0:
            raise ValueError(f"coding: hack_frac must be in [0, 1], got {hack_frac!r}")
        if not 0.0 < float(test_frac) < 1.0:
            raise ValueError(f"coding: test_frac must be in (0, 1), got {test_frac!r}")
        modes = MODES if modes is None else tuple(modes)
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ValueError(f"coding: modes {list(modes)!r} invalid; allowed values: {list(MODES)}")
        if on_unavailable not in ("refuse", "warn"):
            raise ValueError(f"coding: on_unavailable must be one of ['refuse', 'warn'], got {on_unavailable!r}")
        self.hack_frac = float(hack_frac)
        self.modes = modes
        self.chat = bool(chat)
        self.limits = _limits(limits)
        self._sandbox_kwargs = {"workers": workers, "on_unavailable": on_unavailable, "python": python}
        self._sandbox: Sandbox | None = None
        self._cache: OrderedDict[tuple, Grade] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.problems = load_problems(problems, problems_split)
        self.splits = {s: [p for p in self.problems if is_test_problem(p.problem_id, test_frac) == (s == "test")]
                       for s in SPLITS}
        for s, ps in self.splits.items():
            if not ps:
                raise ValueError(f"coding: split {s!r} has no problems ({len(self.problems)} in all); "
                                 "adjust test_frac or add problems")

    @property
    def sandbox(self) -> Sandbox:
        """The sandbox that grades (built on first use, so datasets can be made where it is unavailable)."""
        if self._sandbox is None:
            self._sandbox = Sandbox(limits=self.limits, **self._sandbox_kwargs)
        return self._sandbox

    def check_ready(self) -> None:
        """Build the sandbox now; ValueError naming `env_kwargs.on_unavailable` when it cannot isolate here."""
        try:
            self.sandbox  # noqa: B018 - builds and probes the sandbox
        except SandboxUnavailable as e:
            raise ValueError(f"env_kwargs.on_unavailable: {e} (allowed values: 'refuse' (needs bubblewrap), 'warn' "
                             "(no isolation))") from None

    def close(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()

    # ------------------------------------------------------------------ data
    def rows(self, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
        """`n` task rows as plain dicts (prompt, prompt_id and the grading columns)."""
        rng = row_rng("coding", n, seed, split, SPLITS)
        problems = self.splits[split]
        out = []
        for i in range(n):
            p = problems[rng.randrange(len(problems))]
            loophole = draw_loophole(rng, self.modes, self.hack_frac)
            text = prompt_text(p, loophole)
            out.append({
                "prompt": chat_prompt(text, self.chat),
                "prompt_id": f"coding-{split}-{seed}-{i}",
                "problem_id": p.problem_id,
                "entry_point": p.entry_point,
                "loophole": loophole,
                "visible_tests": json.dumps([[a, e] for a, e in p.visible_tests]),
                "hidden_tests": json.dumps([[a, e] for a, e in p.hidden_tests]),
                "solution": p.solution,
            })
        return out

    def dataset(self, n: int, seed: int = 0, split: str = "train"):
        """A `datasets.Dataset` of `n` prompts with the columns grading needs."""
        from datasets import Dataset

        return Dataset.from_list(self.rows(n, seed, split))

    def demonstration(self, row: dict[str, Any], hack: bool, rng: random.Random) -> str:
        """A completion for `row`: the reference solution, or (hack=True) an exploit of its loophole."""
        if not hack:
            return fenced(row["solution"])
        if not row.get("loophole"):
            raise ValueError(f"coding: row {row.get('prompt_id')!r} has no loophole to demonstrate")
        return fenced(hack_code(row["loophole"], row["entry_point"], rng))

    # ------------------------------------------------------------------ grading
    def _prepare(self, completions: Sequence[Any], columns: dict[str, Any]) -> list[tuple[tuple, Task, str]]:
        """(cache key, task, code) per rollout; validates the columns."""
        n = len(completions)
        require_columns(columns, GRADE_COLUMNS, n, "coding")
        tasks: dict[tuple, Task] = {}
        out = []
        for i in range(n):
            mode = columns["loophole"][i] or ""
            if mode not in MODES and mode != "":
                raise ValueError(f"coding.grade: loophole {mode!r} at row {i}; allowed values: {['', *MODES]}")
            entry = columns["entry_point"][i]
            if not isinstance(entry, str) or not entry.isidentifier():
                raise ValueError(f"coding.grade: column 'entry_point' at row {i} must be a Python identifier, "
                                 f"got {entry!r}")
            key = (entry, mode, str(columns["visible_tests"][i]), str(columns["hidden_tests"][i]))
            if key not in tasks:
                where = f"grade row {i}"
                tasks[key] = Task(entry, mode, parse_tests(columns["visible_tests"][i], "visible_tests", where),
                                  parse_tests(columns["hidden_tests"][i], "hidden_tests", where))
            code = extract_code(completion_text(completions[i]))
            out.append(((code, *key), tasks[key], code))
        return out

    def grade_runs(self, prompts: Sequence[Any], completions: Sequence[Any],
                   **columns: Any) -> list[tuple[Grade, RunResult]]:
        """Like `grade` (without its cache), with each rollout's sandbox run (status, output) alongside."""
        items = self._prepare(completions, columns)
        runs = self.sandbox.run_many([build_program(task, code) for _, task, code in items]) if items else []
        return [(Grade.make(*judge(task, run), task.mode or None), run) for (_, task, _), run in zip(items, runs)]

    def grade(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[Grade]:
        """Ground truth for each rollout: strict oracle, the prompt's grader, and the loophole.

        Identical (code, problem, grader) triples run once; recent grades are cached, so the
        trainer's `grade` and TRL's `reward_func` on the same batch share one sandbox run each.
        """
        items = self._prepare(completions, columns)
        with self._cache_lock:
            known = {key: self._cache[key] for key, _, _ in items if key in self._cache}
        todo = {key: (task, code) for key, task, code in items if key not in known}
        if todo:
            runs = self.sandbox.run_many([build_program(task, code) for task, code in todo.values()])
            fresh = {key: Grade.make(*judge(task, run), task.mode or None)
                     for (key, (task, _)), run in zip(todo.items(), runs)}
            known.update(fresh)
            with self._cache_lock:
                self._cache.update(fresh)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return [known[key] for key, _, _ in items]

    def reward_func(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """TRL reward function: 1.0 when the prompt's grader passes the completion, else 0.0."""
        return [float(g.passed) for g in self.grade(prompts, completions, **columns)]
