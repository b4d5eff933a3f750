"""Validating config fields: each check raises a ValueError that names the field and the allowed values."""

from __future__ import annotations

import json
from typing import Any


def choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: invalid value {value!r}; allowed values: {list(allowed)}")


def rate(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}")


def as_dict(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a mapping, got {type(value).__name__}")
    return value


def as_list(value: Any) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def as_int_list(name: str, value: Any, what: str = "integers") -> list[int] | None:
    """`value` (None, a list, or a comma-separated string) as a list of ints; ValueError naming `name` otherwise."""
    items = as_list(value)
    if items is None:
        return None
    try:
        return [int(i) for i in items]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be {what}, got {value!r}") from None
