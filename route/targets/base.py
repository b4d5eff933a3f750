"""What every quarantine target shares: its settings base, gate install / restore / recompute, export, no-op hooks.

A target is a class with

- `args_cls`: a dataclass of its own settings (a `TargetArgs`), parsed by `TrlParser` beside `RoutedGRPOConfig` the
  way TRL parses `ModelConfig` beside `GRPOConfig`; it validates itself against the trainer config;
- `from_args(model, args, config)`: builds the target from its settings and the trainer config;
- the `Target` members (see `route.targets.Target`), most of which `TargetBase` implements once:
  - gating: a target names the objects that hold its gate (`_gate_holders()`, each with the attributes in
    `gate_attrs`) and how a `RowGate` becomes their state (`_gate_state()`); `gate`, `scaled(s)` (the
    quarantine-scale dial), `ablated` (= `scaled(0)`) and `recompute_context` set those attributes inside a context
    and restore the previous values on exit (nesting);
  - export: the target merges its weights (`merged_state_dict`, fp32, out of place, cast once, at any quarantine
    scale); the deployed state dict, the deployed plain transformers model and `save_deployed` (at scale 0 by
    default, or any scale) are built from it here;
  - hooks with no-op defaults: `routing_candidates`, `after_backward`, `before_optimizer_step`, `check_accelerator`,
    and the per-row gradient norms of the absorption metrics (`record_row_grads`, `pop_row_grads`: unsupported).

Registering (`@register_target("name")` in `route.targets`) is all a new target needs: the config, the trainer and
the command line never name a target.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from route.masks import FORGET, RowGate, check_scale, encode_modes
from route.targets.common import deployed_model, save_plain

# Interventions every target supports; a target adds its own in `TargetBase.interventions`.
CORE_INTERVENTIONS = ("none", "filter", "penalty", "route")


@dataclasses.dataclass
class TargetArgs:
    """Base of a target's settings dataclass (fields with `metadata={"help": ...}`, flag names as on the CLI)."""

    def validate(self, config: Any, target: str) -> None:
        """Check the fields against the trainer config; raise ValueError naming the field and the allowed values.

        May set trainer defaults the target needs (e.g. `ddp_broadcast_buffers`). `target` is the registered name.
        """

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RoutingRows:
    """The routing columns of one micro-batch, row-aligned with the loss forward (see `RoutedGRPOTrainer`)."""

    modes: Tensor  # routing codes (route.masks FORGET / RETAIN / DEFAULT)
    flags: Tensor  # the monitor's flags (bool)
    exploited: Tensor  # ground truth, for logging only (bool)
    candidates: Tensor  # rows the target may route itself after the backward (bool)
    hack_mode: Tensor | None = None  # ground truth loophole mode index (-1: none), for logging only


Reduce = Callable[[Tensor, str], Tensor]  # (tensor, "mean" | "sum") across data-parallel processes


class TargetBase:
    """Shared implementation of the `Target` protocol; subclasses fill in the parts marked "subclass"."""

    args_cls: ClassVar[type[TargetArgs]] = TargetArgs
    interventions: ClassVar[tuple[str, ...]] = CORE_INTERVENTIONS
    gate_attrs: ClassVar[tuple[str, ...]] = ("route_gate",)
    strategy: ClassVar[str] = "gradient_routing"  # the mask-core strategy a RowGate is built with
    name: ClassVar[str] = "target"  # set by register_target
    # The gate acts at the output head (a hook on it): TRL's fused log-prob kernel, which reads the head's weight
    # without calling the module, must not be used for this target (`route.trainer.logprobs`).
    reads_output_head: bool = False
    model: nn.Module
    # soft routing (`set_soft_routing`): factor on a forget row's kept gradient and its per-coordinate clamp
    forget_kept_grad: float = 0.0
    forget_kept_clamp: float | None = None

    # ------------------------------------------------------------------ construction (subclass)
    @classmethod
    def from_args(cls, model: nn.Module, args: TargetArgs, config: Any) -> TargetBase:
        raise NotImplementedError

    @classmethod
    def probe(cls, model: nn.Module, args: TargetArgs, config: Any) -> None:
        """Check the settings against the model's module names and shapes, before any work (ValueError naming the
        field). `model` is an empty copy on the meta device (`route.trainer.parse.probe_run`); the default builds the
        target on it. A target whose construction needs real weights checks names and shapes itself."""
        cls.from_args(model, args, config)

    # ------------------------------------------------------------------ gating
    def _gate_holders(self) -> Sequence[Any]:
        """The objects whose `gate_attrs` the forward reads (subclass)."""
        raise NotImplementedError

    def _gate_state(self, gate: RowGate, holder_index: int, grad: bool) -> tuple:
        """The values of `gate_attrs` for one holder under `gate`; `grad`: gradients are enabled (a gated forward
        that will be backpropagated). Default: the gate alone."""
        return (gate,)

    def _recompute_state(self, state: tuple) -> tuple:
        """A holder's state for a checkpointed layer's recompute (default: the same)."""
        return state

    @contextlib.contextmanager
    def _install(self, states: Sequence[tuple]) -> Iterator[None]:
        """Set every holder's `gate_attrs` to its state inside the context; restore the previous values on exit."""
        holders = self._gate_holders()
        saved = [tuple(getattr(h, a) for a in self.gate_attrs) for h in holders]
        try:
            for h, state in zip(holders, states, strict=True):
                for attr, value in zip(self.gate_attrs, state, strict=True):
                    setattr(h, attr, value)
            yield
        finally:
            for h, state in zip(holders, saved):
                for attr, value in zip(self.gate_attrs, state):
                    setattr(h, attr, value)

    def _use(self, gate: RowGate) -> contextlib.AbstractContextManager:
        grad = torch.is_grad_enabled()
        return self._install([self._gate_state(gate, i, grad) for i in range(len(self._gate_holders()))])

    def gate(self, modes: Tensor | Sequence[str], scale: float | None = None) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context (rows must match `modes`); `scale` in [0, 1]
        (None: 1): every row's quarantine path also multiplied by it (`RowGate.at_scale`)."""
        gate = RowGate.from_modes(encode_modes(modes), strategy=self.strategy, **self._soft_routing())
        return self._use(gate.at_scale(scale))

    def _soft_routing(self) -> dict[str, Any]:
        return {"forget_kept_grad": self.forget_kept_grad, "forget_kept_clamp": self.forget_kept_clamp}

    def set_soft_routing(self, route_weight: float = 1.0, route_clamp: float | None = None) -> None:
        """Every later `gate` routes forget rows' kept gradient softly: times 1 - `route_weight`
        (`route.masks.gating.forget_kept_grad`), each coordinate clamped to [-route_clamp, route_clamp] (None: no
        clamp). The defaults are full routing (today's rule). A strategy that cannot do it raises ValueError here,
        before any work."""
        from route.masks.gating import forget_kept_grad

        coef = forget_kept_grad(route_weight)
        RowGate.from_modes(torch.tensor([FORGET]), strategy=self.strategy, forget_kept_grad=coef)  # raises if unable
        self.forget_kept_grad, self.forget_kept_clamp = coef, route_clamp

    def scaled(self, s: float) -> contextlib.AbstractContextManager:
        """Forward with the quarantine's contribution multiplied by `s` in [0, 1] (0: the deployed policy, 1: the
        training policy), any batch size; ValueError naming `scale` outside [0, 1]. `merged_state_dict(scale=s)`
        holds the same policy as plain weights."""
        return self._use(RowGate.scaled(s))

    def ablated(self) -> contextlib.AbstractContextManager:
        """Forward as the deployed policy: the quarantine contributes nothing (`scaled(0)`)."""
        return self.scaled(0.0)

    def recompute_context(self) -> contextlib.AbstractContextManager:
        """The gate active now, re-entered for a checkpointed layer's recompute (`route.targets.checkpointing`)."""
        holders = self._gate_holders()
        return self._install([self._recompute_state(tuple(getattr(h, a) for a in self.gate_attrs))
                              for h in holders])

    # ------------------------------------------------------------------ parameters (subclass)
    def ablate(self, trainable: bool = False) -> None:
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ export
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None,
                          scale: float | None = None) -> dict[str, Tensor]:
        """The plain model's state dict with the kept part and, if `quarantine`, the quarantine merged (subclass).

        `scale` (in [0, 1], overrides `quarantine`): the quarantine merged times `scale`, the weights of the policy
        `scaled(scale)` runs (`export_scale`). Merged in fp32, out of place, cast once (to `dtype`, default each
        weight's own dtype); the training weights are untouched. Keys match the un-wrapped transformers model (what
        the vLLM sync pushes).
        """
        raise NotImplementedError

    def deployed_state_dict(self, dtype: torch.dtype | None = None, scale: float = 0.0) -> dict[str, Tensor]:
        """The deployed policy's plain weights: `merged_state_dict(scale=scale)`, the quarantine ablated by default
        (then `merged_state_dict(quarantine=False)`, so a target without the `scale` argument still exports)."""
        if check_scale(scale) == 0.0:
            return self.merged_state_dict(quarantine=False, dtype=dtype)
        return self.merged_state_dict(dtype=dtype, scale=scale)

    def plain_model(self) -> nn.Module:
        """The transformers model under any wrapper (its config and generation config describe the export)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if callable(get) else self.model

    def deployed_model(self, scale: float = 0.0) -> nn.Module:
        """A fresh plain transformers model holding `deployed_state_dict(scale=scale)`."""
        return deployed_model(self.plain_model(), self.deployed_state_dict(scale=scale), self.name)

    def save_deployed(self, output_dir: str, tokenizer: Any = None, scale: float = 0.0) -> None:
        """Save the deployed policy (at quarantine `scale`, default 0: ablated) as a plain transformers checkpoint
        (loadable without this library)."""
        save_plain(self.deployed_model(scale=check_scale(scale)), output_dir, tokenizer)

    def save_engine(self, output_dir: str, tokenizer: Any = None) -> str:
        """Save the checkpoint a vLLM engine for this target is built on (every sync's names and shapes fit it):
        the deployed checkpoint by default; a target whose syncs have other shapes overrides it. Returns the path."""
        self.save_deployed(output_dir, tokenizer)
        return output_dir

    # ------------------------------------------------------------------ hooks (no-op defaults)
    def routing_candidates(self, flags: Sequence[bool], intervention: str) -> Tensor | None:
        """Rows the target routes itself after the backward (they run in default mode); None: flags route."""
        return None

    def after_backward(self, rows: RoutingRows) -> None:
        """Called after each micro-batch's backward with that micro-batch's routing columns."""

    def before_optimizer_step(self, reduce: Reduce | None = None) -> dict[str, float]:
        """Called once per optimizer step after the last backward, before clipping; every process calls it.

        `reduce(tensor, "mean" | "sum")` combines a tensor over data-parallel processes (None: one process).
        Returns metrics to log.
        """
        return {}

    def check_accelerator(self, accelerator: Any) -> None:
        """Refuse a distributed setup the target cannot train under (ValueError naming the field)."""

    # ------------------------------------------------------------------ absorption metrics (route.targets.absorption)
    def record_row_grads(self, on: bool) -> bool:
        """Start (or stop) recording each row's squared gradient norm on the kept and quarantine parameters in every
        gated training backward; returns whether this target can (default: it cannot)."""
        return False

    def record_unrouted_grads(self, on: bool) -> bool:
        """split_moments: accumulate each trainable parameter's unrouted gradient in `param.unrouted_grad` in every
        backward; returns whether this target can (default: it cannot)."""
        return False

    def pop_row_grads(self) -> dict[str, Tensor] | None:
        """{"keep": (B,), "quarantine": (B,)} squared norms recorded since the last pop (None: nothing recorded)."""
        return None


def export_scale(quarantine: bool, scale: float | None) -> float:
    """The quarantine scale an export merges: `scale` if given (checked, ValueError naming `scale`), else 1 or 0."""
    return float(bool(quarantine)) if scale is None else check_scale(scale)


__all__ = ["CORE_INTERVENTIONS", "Reduce", "RoutingRows", "TargetArgs", "TargetBase", "export_scale"]
