"""Per-row routing gates (gradient routing, Cloud et al. 2024, per sample instead of per batch).

Each batch row has a mode: `forget`, `retain` or `default`. A gate splits what a layer adds
into a *kept* part and a *quarantine* part and treats them per row:

    forget : kept.detach() + quar      value unchanged, gradient only into the quarantine
    retain : kept          + 0 * quar  quarantine absent, gradient only into kept parameters
    default: kept          + quar      the ordinary model

One forward and one backward serve a batch that mixes modes. `torch.where(m, y, y.detach())`
routes the gradient without changing values, so forget and default rows compute exactly the
ungated forward. Masks are data (a `RowGate`) and are applied by hooks that a `HookSet`
context adds and removes exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FORGET, RETAIN, DEFAULT = 0, 1, 2
MODE_NAMES = ("forget", "retain", "default")


def encode_modes(modes: Sequence[str] | Sequence[int] | Tensor | str, batch_size: int | None = None) -> Tensor:
    """Modes as a LongTensor of codes (0 forget, 1 retain, 2 default); a single name applies to every row."""
    if isinstance(modes, str):
        if batch_size is None:
            raise ValueError("encode_modes: a single mode name needs batch_size")
        modes = [modes] * batch_size
    if isinstance(modes, Tensor):
        codes = modes.long()
    else:
        modes = list(modes)
        try:
            codes = torch.tensor([m if isinstance(m, int) else MODE_NAMES.index(m) for m in modes], dtype=torch.long)
        except ValueError:
            bad = sorted({m for m in modes if m not in MODE_NAMES})
            raise ValueError(f"mode: unknown values {bad}; allowed values: {list(MODE_NAMES)}") from None
    if codes.numel() and (codes.min() < 0 or codes.max() > 2):
        raise ValueError(f"mode: codes must be in 0..2 ({dict(enumerate(MODE_NAMES))}), got {codes.unique().tolist()}")
    return codes


@dataclass
class RowGate:
    """Per-row masks derived from modes.

    Attributes:
        kept_grad: rows whose kept path receives gradient (retain, default); others are detached.
        quar_on: rows whose forward includes the quarantine (forget, default).
        all_default: fast path, no row is gated.
    """

    kept_grad: Tensor
    quar_on: Tensor
    all_default: bool
    all_quar_on: bool

    @classmethod
    def from_modes(cls, modes: Sequence[str] | Tensor, batch_size: int | None = None) -> RowGate:
        codes = encode_modes(modes, batch_size)
        kept_grad = codes != FORGET
        quar_on = codes != RETAIN
        return cls(kept_grad=kept_grad, quar_on=quar_on, all_default=bool((codes == DEFAULT).all()),
                   all_quar_on=bool(quar_on.all()))

    @classmethod
    def ablated(cls) -> RowGate:
        """Every row without the quarantine and with plain gradients on the kept path (the deployed policy)."""
        empty = torch.zeros(0, dtype=torch.bool)
        return cls(kept_grad=empty, quar_on=empty, all_default=False, all_quar_on=False)

    @property
    def is_ablated(self) -> bool:
        return self.kept_grad.numel() == 0

    def _rows(self, mask: Tensor, y: Tensor) -> Tensor:
        if mask.shape[0] != y.shape[0]:
            raise RuntimeError(f"gate: {mask.shape[0]} row modes for a forward with batch size {y.shape[0]}")
        return mask.to(y.device).view(-1, *([1] * (y.dim() - 1)))

    def kept(self, y: Tensor) -> Tensor:
        """The kept path's output: detached on forget rows."""
        if self.all_default or self.is_ablated:
            return y
        return torch.where(self._rows(self.kept_grad, y), y, y.detach())

    def quarantine(self, y: Tensor) -> Tensor:
        """The quarantine path's output: zero on retain rows (and everywhere when ablated)."""
        if self.is_ablated:
            return torch.zeros_like(y)
        if self.all_quar_on:
            return y
        return y * self._rows(self.quar_on, y).to(y.dtype)


class HookSet:
    """A context manager that registers forward hooks and removes exactly the ones it added.

        with HookSet([(module, hook_fn), ...]):
            model(...)
    """

    def __init__(self, hooks: Iterable[tuple[nn.Module, Callable]]):
        self._pending = list(hooks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> HookSet:
        try:
            for module, fn in self._pending:
                self._handles.append(module.register_forward_hook(fn))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        while self._handles:
            self._handles.pop().remove()
