"""Reward-hack environments. Graders are pure Python: nothing under `envs/` imports torch.

    >>> import envs
    >>> env = envs.make_env("arith", hack_frac=0.5)
    >>> ds = env.dataset(8, seed=0, split="train")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envs.base import Environment, Grade, completion_text

_REGISTRY: dict[str, Callable[..., Environment]] = {}


def register_env(name: str) -> Callable:
    """Class decorator: make an environment available to `make_env(name)`."""

    def deco(factory: Callable[..., Environment]) -> Callable[..., Environment]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_envs() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> Environment:
    """Build a registered environment by name; unknown names list the allowed values."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"env: unknown environment {name!r}; allowed values: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def _load_builtin() -> None:
    import envs.arith  # noqa: F401  (registers "arith")
    import envs.capitals  # noqa: F401  (registers "capitals")
    import envs.qa  # noqa: F401  (registers "qa")
    import envs.repeat  # noqa: F401  (registers "repeat")
    import envs.sort  # noqa: F401  (registers "sort")

    try:
        import envs.coding  # noqa: F401  (registers "coding" when present)
    except ModuleNotFoundError as e:
        if e.name != "envs.coding":
            raise


__all__ = ["Environment", "Grade", "available_envs", "completion_text", "make_env", "register_env"]
