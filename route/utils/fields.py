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


def reentrant_error(what: str) -> ValueError:
    return ValueError(f"gradient_checkpointing_kwargs: use_reentrant=True ({what}) re-runs checkpointed layers in the "
                      "backward without the per-rollout routing gate, so the gradients would be silently wrong; "
                      "leave use_reentrant unset or false (non-reentrant checkpointing re-applies the gate), or set "
                      "gradient_checkpointing: false")


def fsdp_error() -> ValueError:
    return ValueError("gradient_checkpointing, fsdp_config.activation_checkpointing: FSDP's activation checkpointing "
                      "recomputes layers without the per-rollout routing gate; use gradient_checkpointing: true with "
                      "activation_checkpointing off")


def check_checkpointing(args: Any) -> None:
    """Refuse checkpointing setups whose recompute cannot run under the routing gate (ValueError naming the field):
    reentrant checkpointing, FSDP's activation checkpointing, torch.compile (see `route.targets.checkpointing`)."""
    if not getattr(args, "gradient_checkpointing", False):
        return
    kwargs = args.gradient_checkpointing_kwargs or {}
    if isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
        raise reentrant_error("gradient_checkpointing_kwargs")
    fsdp = getattr(args, "fsdp_config", None) or {}
    if isinstance(fsdp, dict) and str(fsdp.get("activation_checkpointing", "false")).lower() == "true":
        raise fsdp_error()
    if getattr(args, "torch_compile", False):
        raise ValueError("gradient_checkpointing, torch_compile: the routing gate's recompute context is not a "
                         "TorchDispatchMode, which compiled checkpointing requires; turn one of them off")
