"""Per-row gates under gradient checkpointing: the recompute in the backward runs under the forward's gate.

A target's gate lives in Python state (a slot, `row_gate`, `svf_gate`) that is set only inside `target.gate(modes)`.
With gradient checkpointing, a checkpointed layer's forward is re-run during the backward, after that context has
exited; run ungated, it saves other tensors than the gated forward did, so the gradients are wrong (reentrant
checkpointing) or the backward fails (non-reentrant). The fix uses torch's non-reentrant checkpoint `context_fn`:

- `GateRecompute(target)` is the `context_fn`; torch calls it at forward time, once per checkpointed call, and it
  asks the target for `recompute_context()`: a context manager that re-enters the gate active *now*. Torch enters it
  around that call's recompute. The forward itself runs unchanged (no forward context).
- `install(model, target)` wraps the model's `gradient_checkpointing_enable` (as TRL does for selective
  checkpointing) so that every enable (`Trainer.train`, TRL's re-enables after generation and scoring) checkpoints
  non-reentrantly with a `GateRecompute` (composed with any `context_fn` already given). The callable stays out of
  `TrainingArguments`, which are pickled with every checkpoint.
- `check_config(args, target)` (before the trainer's setup) and `check_trainer(args, accelerator)` (after it)
  refuse, with a ValueError naming `gradient_checkpointing`, what cannot be made exact: reentrant checkpointing (no
  `context_fn`; TRL forces it for PEFT under DeepSpeed ZeRO-3), FSDP's own activation checkpointing, torch.compile
  (every target has `recompute_context`, see `route.targets.Target`). `verify(layers, target)` refuses a
  checkpointed layer whose checkpoint function does not carry the gate (checkpointing enabled around the wrapper).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from route.utils.fields import check_checkpointing, fsdp_error, reentrant_error

_WRAPPED = "_route_gate_recompute"


class GateRecompute:
    """A `context_fn` for `torch.utils.checkpoint.checkpoint(use_reentrant=False)` that re-applies `target`'s gate.

    `inner`: another `context_fn` to compose with (its forward context, and its recompute context inside the gate).
    """

    def __init__(self, target: Any, inner: Callable[[], tuple] | None = None):
        self.target, self.inner = target, inner

    def __call__(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        gate = self.target.recompute_context()  # captures the gate active at forward time
        if self.inner is None:
            return contextlib.nullcontext(), gate
        forward, recompute = self.inner()
        return forward, _nested(gate, recompute)


@contextlib.contextmanager
def _nested(*contexts: contextlib.AbstractContextManager) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        yield


def check_config(args: Any, target: Any = None) -> None:
    """Refuse checkpointing setups whose recompute cannot run under the gate (ValueError naming the field).

    The config-only checks are `check_checkpointing`; with `target`, also PEFT under DeepSpeed ZeRO-3
    (for which TRL forces reentrant checkpointing).
    """
    check_checkpointing(args)
    if target is None or not getattr(args, "gradient_checkpointing", False):
        return
    from peft import PeftModel

    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3 and isinstance(target.model, PeftModel):
        raise reentrant_error("TRL forces it for PEFT models under DeepSpeed ZeRO-3; use ZeRO-2")


def check_trainer(args: Any, accelerator: Any) -> None:
    """After the trainer's setup: refuse reentrant checkpointing set by TRL, or FSDP activation checkpointing."""
    if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        raise reentrant_error("set during the trainer's setup")
    if getattr(getattr(accelerator.state, "fsdp_plugin", None), "activation_checkpointing", False):
        raise fsdp_error()


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model whose `gradient_checkpointing_enable` every caller reaches (PEFT forwards to it)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def install(model: nn.Module, target: Any) -> None:
    """Make every `gradient_checkpointing_enable` on `model` checkpoint non-reentrantly under `target`'s gate.

    Raises ValueError (naming `gradient_checkpointing`) when the model already checkpoints without the gate, or when
    an enable asks for `use_reentrant=True`.
    """
    base = _base_model(model)
    current = base.gradient_checkpointing_enable
    original = getattr(current, "__wrapped__", current) if getattr(current, _WRAPPED, None) is not None else current

    @functools.wraps(original)
    def gradient_checkpointing_enable(gradient_checkpointing_kwargs: dict | None = None, *args, **kwargs):
        kw = dict(gradient_checkpointing_kwargs or {})
        if kw.get("use_reentrant"):
            raise reentrant_error("passed to gradient_checkpointing_enable")
        kw["use_reentrant"] = False
        inner = kw.get("context_fn")
        if isinstance(inner, GateRecompute):
            inner = inner.inner
        kw["context_fn"] = GateRecompute(target, inner)
        return original(kw, *args, **kwargs)

    setattr(gradient_checkpointing_enable, _WRAPPED, target)
    base.gradient_checkpointing_enable = gradient_checkpointing_enable
    layers = checkpoint_layers(model)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in layers):
        try:
            verify(layers, target)
        except RuntimeError as e:
            raise ValueError(f"gradient_checkpointing: {e}") from None


def checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that checkpoint themselves when their `gradient_checkpointing` flag is on."""
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def verify(layers: list[nn.Module], target: Any) -> None:
    """RuntimeError if a checkpointed layer's checkpoint function would recompute without `target`'s gate."""
    for m in layers:
        if getattr(m, "gradient_checkpointing", False) is not True:
            continue
        kw = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None) or {}
        fn = kw.get("context_fn")
        if kw.get("use_reentrant") is not False or not isinstance(fn, GateRecompute) or fn.target is not target:
            raise RuntimeError(
                f"{type(m).__name__} checkpoints without the routing gate's recompute context (checkpointing was "
                "enabled around RoutedGRPOTrainer); enable it with gradient_checkpointing: true in the config, or "
                "through model.gradient_checkpointing_enable() after the trainer is built")


__all__ = ["GateRecompute", "check_config", "check_trainer", "checkpoint_layers", "install", "verify"]
