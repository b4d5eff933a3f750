"""Quarantine targets: the parameters a flagged rollout's gradient is routed into.

Every target implements `Target` (most of it through `route.targets.base.TargetBase`), so the trainer, evaluation,
export and the vLLM sync never branch on the target type. Targets are looked up by name in a registry:

    target = make_target("dual_lora", model, keep_rank=8, quarantine_rank=8)
    target = build_target(config, model)                 # from a RoutedGRPOConfig and the target's own settings

A target registers itself with `@register_target(name)` on a `TargetBase` subclass whose `args_cls` dataclass holds
its settings. The built-in targets are the modules of this package (found by listing it, not by a list); a target
defined elsewhere registers when its module is imported. `svd` (cached SVD factors) and `absorption` (where each
rollout's gradient lands) serve the targets. May import route.utils, route.masks, route.monitors, route.models;
not route.vllm, route.trainer or above.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from route.targets.base import CORE_INTERVENTIONS, Reduce, RoutingRows, TargetArgs, TargetBase


@runtime_checkable
class Target(Protocol):
    """The one interface every quarantine target implements (DESIGN.md section 4); callers use nothing else."""

    model: nn.Module
    name: str
    reads_output_head: bool  # its gate acts at the output head: the trainer scores through the head module

    # per-row routing for one forward; `scale` (None: 1) multiplies every row's quarantine path as well
    def gate(self, modes: Tensor, scale: float | None = None) -> AbstractContextManager: ...

    def ablated(self) -> AbstractContextManager: ...  # forward as the deployed policy: scaled(0)

    def scaled(self, s: float) -> AbstractContextManager: ...  # quarantine times s in [0, 1]; 1: training policy

    # For gradient checkpointing (`route.targets.checkpointing`): called at forward time inside whatever gate is
    # active, it returns a context that re-enters exactly that gate around the layer's recompute in the backward.
    def recompute_context(self) -> AbstractContextManager: ...

    def ablate(self, trainable: bool = False) -> None: ...  # permanent, before deployment

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...  # "keep", "quarantine", "shared"

    # Merged weights, fp32 out of place, cast once; `quarantine=False` is the deployed policy (what vLLM samples
    # from under `generation_policy: deployed`), `True` the training policy, `scale=s` the policy of `scaled(s)`.
    def merged_state_dict(self, quarantine: bool = True, dtype: Any = None,
                          scale: float | None = None) -> dict[str, Tensor]: ...

    def deployed_state_dict(self, dtype: Any = None, scale: float = 0.0) -> dict[str, Tensor]: ...

    def deployed_model(self, scale: float = 0.0) -> nn.Module: ...  # a fresh plain transformers model

    def save_deployed(self, output_dir: str, tokenizer: Any = None, scale: float = 0.0) -> None: ...  # plain

    # Hooks (no-ops in TargetBase): rows the target routes itself (None: flags route), per-micro-batch after the
    # backward, once per optimizer step before clipping (returns metrics), and a check of the distributed setup.
    def routing_candidates(self, flags: Sequence[bool], intervention: str) -> Tensor | None: ...

    def after_backward(self, rows: RoutingRows) -> None: ...

    def before_optimizer_step(self, reduce: Reduce | None = None) -> dict[str, float]: ...

    def check_accelerator(self, accelerator: Any) -> None: ...


def check_target(target: Any) -> None:
    """ValueError naming what is missing when `target` does not implement `Target` (e.g. a hand-made object)."""
    members = [m for m in (*vars(Target), *Target.__annotations__) if not m.startswith("_")]
    missing = sorted(m for m in members if not hasattr(target, m))
    if missing:
        raise ValueError(f"target: {type(target).__name__} does not implement route.targets.Target; missing "
                         f"{missing} (subclass route.targets.TargetBase)")


_REGISTRY: dict[str, type[TargetBase]] = {}
_DISCOVERED = False


def register_target(name: str):
    """Class decorator: register a `TargetBase` subclass under `name` (its settings: `cls.args_cls`)."""

    def deco(cls: type[TargetBase]) -> type[TargetBase]:
        if not (isinstance(cls, type) and issubclass(cls, TargetBase)):
            raise TypeError(f"register_target({name!r}): expected a TargetBase subclass, got {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    """Import this package's modules once, so that every built-in target has registered itself."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def available_targets() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def target_class(name: str) -> type[TargetBase]:
    """The registered class of target `name`; unknown names list the allowed values."""
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"target: invalid value {name!r}; allowed values: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def target_args_classes() -> list[type[TargetArgs]]:
    """Every registered target's settings dataclass (distinct), in name order: what the parser reads beside the
    trainer config."""
    seen: list[type[TargetArgs]] = []
    for name in available_targets():
        cls = _REGISTRY[name].args_cls
        if cls not in seen:
            seen.append(cls)
    return seen


def resolve_target_args(config: Any, args: TargetArgs | None = None) -> TargetArgs:
    """The settings of `config.target`: `args`, else `config.target_args`, else the defaults; validated."""
    cls = target_class(config.target)
    args = args if args is not None else getattr(config, "target_args", None)
    if args is None:
        args = cls.args_cls()
    if not isinstance(args, cls.args_cls):
        raise ValueError(f"target_args: target {config.target!r} takes {cls.args_cls.__name__}, got "
                         f"{type(args).__name__}")
    if config.intervention not in cls.interventions:
        supported = [n for n in available_targets() if config.intervention in _REGISTRY[n].interventions]
        raise ValueError(f"intervention: invalid value {config.intervention!r}; allowed values: "
                         f"{list(cls.interventions)} with target {config.target!r} ({config.intervention} needs "
                         f"target {' or '.join(supported) or 'none registered'})")
    args.validate(config, config.target)
    return args


def make_target(name: str, model: nn.Module, **kwargs: Any) -> Target:
    """Wrap `model` with the named target, constructed with keyword arguments."""
    return target_class(name)(model, **kwargs)


def build_target(config: Any, model: nn.Module, args: TargetArgs | None = None) -> Target:
    """The target named by `config.target`, built from its settings (`resolve_target_args`) and the config."""
    cls = target_class(config.target)
    return cls.from_args(model, resolve_target_args(config, args), config)


def configure_routing(target: Any, args: Any) -> None:
    """Hand `route_weight` / `route_clamp` to the target's gate and turn on its unrouted-gradient recording for
    `split_moments`; ValueError naming the field when the target cannot."""
    if hasattr(target, "set_soft_routing"):
        target.set_soft_routing(args.route_weight, args.route_clamp)
    elif (args.route_weight, args.route_clamp) != (1.0, None):
        raise ValueError(f"route_weight: {type(target).__name__} has no set_soft_routing; use 1 (full routing)")
    if args.split_moments and not (hasattr(target, "record_unrouted_grads") and target.record_unrouted_grads(True)):
        raise ValueError(f"split_moments: the {getattr(target, 'name', type(target).__name__)!r} target does not "
                         "record unrouted gradients; allowed values: false, or true with target dual_lora")


__all__ = ["CORE_INTERVENTIONS", "RoutingRows", "Target", "TargetArgs", "TargetBase", "available_targets",
           "build_target", "check_target", "configure_routing", "make_target", "register_target", "resolve_target_args",
           "target_args_classes", "target_class"]
