"""The shared mask core: routing modes, per-row gates, SGTM strategies, masked linears and model masks.

- `gating`: modes (`forget`/`retain`/`default` per batch row), `RowGate`, `HookSet`;
- `strategies`: the SGTM strategies as a registry;
- `linear`: `SplitLinearOut`, `SplitLinearIn`, `GatedLinear` and the per-row parameter masks;
- `arch`: where MLP units and heads live (GPT-Neo, the Llama family), `apply_masks`;
- `model`: `SGTMMasks` (gate, ablate, parameter groups, merged state dicts).

The dual-LoRA target gates its two adapters with the same `RowGate`; SGTM models and the
`sgtm` target gate the model's own units with it. `optim` is the optimizer that keeps parameters
without gradient still (the trainer and SGTM pretraining share it). May import route.utils; nothing above.
"""

from route.masks.arch import apply_masks, detect_arch
from route.masks.gating import (
    DEFAULT,
    EXCLUSIVE,
    FORGET,
    MODE_NAMES,
    RETAIN,
    HookSet,
    RowGate,
    check_scale,
    encode_modes,
)
from route.masks.linear import GatedLinear, SplitLinearIn, SplitLinearOut, masked_linear
from route.masks.model import SGTMMasks, Slice, redraw_like_
from route.masks.strategies import Strategy, available_strategies, get_strategy, register_strategy

__all__ = ["DEFAULT", "EXCLUSIVE", "FORGET", "MODE_NAMES", "RETAIN", "GatedLinear", "HookSet", "RowGate", "SGTMMasks",
           "Slice",
           "SplitLinearIn", "SplitLinearOut", "Strategy", "apply_masks", "available_strategies", "check_scale",
           "detect_arch",
           "encode_modes", "get_strategy", "masked_linear", "redraw_like_", "register_strategy"]
