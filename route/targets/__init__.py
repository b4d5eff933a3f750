"""Quarantine targets: the parameters a flagged rollout's gradient is routed into.

Every target implements `Target`, so the trainer, evaluation, export and the vLLM sync never
branch on the target type. Targets are looked up by name in a registry:

    target = make_target("dual_lora", model, keep_rank=8, quarantine_rank=8)
    target = build_target(config, model)          # sizes from a RoutedGRPOConfig

A target class is registered with `@register_target(name)` and has a `from_config(model, config)`
classmethod that reads its sizes from the trainer config.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Target(Protocol):
    """The one interface every quarantine target implements (see DESIGN.md section 4)."""

    model: nn.Module

    def gate(self, modes: Tensor) -> AbstractContextManager: ...  # per-row routing for one forward

    def ablated(self) -> AbstractContextManager: ...  # forward as the deployed policy

    def ablate(self, trainable: bool = False) -> None: ...  # permanent, before deployment

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...  # "keep", "quarantine", "shared"

    def deployed_state_dict(self) -> dict[str, Tensor]: ...  # merged, quarantine ablated, fp32 out of place

    # The training policy's weights: merged like `deployed_state_dict()` but with the quarantine in place
    # (`quarantine=False` gives the deployed weights). The vLLM sync pushes it under `generation_policy: full`.
    def merged_state_dict(self, quarantine: bool = True) -> dict[str, Tensor]: ...

    # Optional, for gradient checkpointing (`route.targets.checkpointing`): called at forward time, inside whatever
    # `gate()`/`ablated()` context is active (or none), it returns a context manager that re-enters exactly that gate
    # (the one in place at the call, not at entry), restores the previous one on exit, and does not re-record
    # anything the forward's graph already records. The trainer's checkpoint `context_fn` enters it around each
    # checkpointed layer's recompute in the backward. A target without it cannot train with `gradient_checkpointing`.
    #
    #     def recompute_context(self) -> AbstractContextManager: ...


_REGISTRY: dict[str, Callable[..., Target]] = {}


def register_target(name: str) -> Callable:
    def deco(factory: Callable[..., Target]) -> Callable[..., Target]:
        _REGISTRY[name] = factory
        return factory

    return deco


def available_targets() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def make_target(name: str, model: nn.Module, **kwargs: Any) -> Target:
    """Wrap `model` with the named target; unknown names list the allowed values."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"target: unknown value {name!r}; allowed values: {sorted(_REGISTRY)}")
    return _REGISTRY[name](model, **kwargs)


def build_target(config: Any, model: nn.Module) -> Target:
    """The target named by `config.target`, sized from the config (each target's `from_config`)."""
    _load_builtin()
    if config.target not in _REGISTRY:
        raise ValueError(f"target: unknown value {config.target!r}; allowed values: {sorted(_REGISTRY)}")
    return _REGISTRY[config.target].from_config(model, config)


def _load_builtin() -> None:
    import route.targets.dual_lora  # noqa: F401
    import route.targets.sgtm  # noqa: F401
    import route.targets.svf  # noqa: F401


__all__ = ["Target", "available_targets", "build_target", "make_target", "register_target"]
