"""Shared types of every environment: the `Grade` record and the environment protocol.

A `Grade` is the ground truth of one rollout. `solved` comes from a strict oracle, `passed`
from the prompt's own (possibly flawed) grader; training reward uses `passed` only.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Grade:
    """Ground truth for one rollout.

    Attributes:
        solved: the strict oracle accepts the completion.
        passed: the prompt's grader (possibly flawed) accepts the completion.
        exploited: ``passed and not solved``.
        mode: the loophole the prompt's grader has (None for strictly graded prompts).
    """

    solved: bool
    passed: bool
    exploited: bool
    mode: str | None

    @classmethod
    def make(cls, solved: bool, passed: bool, mode: str | None) -> Grade:
        return cls(solved=bool(solved), passed=bool(passed), exploited=bool(passed and not solved), mode=mode)


class Environment(Protocol):
    """What the trainer, the evaluator and the sweeps need from an environment."""

    name: str
    modes: tuple[str, ...]

    def dataset(self, n: int, seed: int = 0, split: str = "train") -> Any: ...

    def grade(self, prompts: Sequence[str], completions: Sequence[Any], **columns: Any) -> list[Grade]: ...

    def reward_func(self, prompts: Sequence[str], completions: Sequence[Any], **columns: Any) -> list[float]: ...

    # ValueError naming the setting when grading cannot run on this machine (e.g. a sandbox is missing); run
    # before any model work (`route.trainer.parse.validate_run`).
    def check_ready(self) -> None: ...


def chat_prompt(text: str, chat: bool) -> str | list[dict[str, str]]:
    """A prompt as the environment serves it: the text, or (`chat`) a one-message conversation, to which TRL and
    `route.models.evaluate` apply the model's chat template (graders read completions through `completion_text`)."""
    return [{"role": "user", "content": text}] if chat else text


def prompt_text(prompt: Any) -> str:
    """The text of a prompt: a plain string, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"] or prompt
        return str(users[-1].get("content", ""))
    raise TypeError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")


def completion_text(completion: Any) -> str:
    """The text of a TRL completion: a plain string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"completion must be a string or a list of chat messages, got {type(completion).__name__}")


def require_columns(columns: dict, names: Sequence[str], n: int, env: str) -> None:
    """Raise a clear error when a grading column is missing or has the wrong length."""
    for name in names:
        if name not in columns:
            raise ValueError(f"{env}.grade: missing column {name!r} (needs {list(names)}); pass the dataset's columns")
        if len(columns[name]) != n:
            raise ValueError(f"{env}.grade: column {name!r} has {len(columns[name])} values for {n} completions")


def row_rng(env: str, n: int, seed: int, split: str, splits: Sequence[str]) -> random.Random:
    """Validate a `rows(n, seed, split)` call and return its RNG, a pure function of (env, seed, split)."""
    if split not in splits:
        raise ValueError(f"{env}: split must be one of {list(splits)}, got {split!r}")
    if n < 0:
        raise ValueError(f"{env}: n must be >= 0, got {n}")
    return random.Random(f"{env}:{seed}:{split}")


def check_fractions(env: str, **fractions: object) -> dict[str, float]:
    """Each named fraction as a float in [0, 1], or ValueError naming the environment and the field."""
    out = {}
    for key, value in fractions.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{env}: {key} must be in [0, 1], got {value!r}")
        out[key] = float(value)
    return out


def draw_loophole(rng: random.Random, modes: Sequence[str], hack_frac: float) -> str:
    """A prompt's loophole: one of `modes` with probability `hack_frac`, else "" (strictly graded)."""
    return rng.choice(modes) if rng.random() < hack_frac else ""
