"""The shared mask core: routing modes, per-row gates and the hook context that applies them."""

from route.masks.gating import (
    DEFAULT,
    FORGET,
    MODE_NAMES,
    RETAIN,
    HookSet,
    RowGate,
    encode_modes,
)

__all__ = ["DEFAULT", "FORGET", "MODE_NAMES", "RETAIN", "HookSet", "RowGate", "encode_modes"]
