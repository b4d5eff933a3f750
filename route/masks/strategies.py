"""The SGTM masking strategies as a registry (SGTM seed; gradient routing, Cloud et al. 2024).

A strategy says what a *forget* row does to the kept (retain) units of a masked layer:

| strategy | kept activations on forget rows | kept parameters get gradient from forget rows |
|---|---|---|
| `parameter_masking` | unchanged | no (input projections' retain rows; output projections' retain columns and biases) |
| `parameter_masking_no_proj` | unchanged | no for input projections; yes for output projections |
| `gradient_routing` | detached (value unchanged) | only through the unchanged output projection |
| `activation_masking` | zeroed | no (nothing flows through a zero) |

In every strategy a *retain* row runs with the forget activations zeroed (so forget parameters
get no gradient from it) and a *default* row is the plain model.

Departure from the seed: the seed masks parameter gradients after the backward for a whole
batch (`adjust_gradients`). Here `parameter_masking` is applied per row inside the backward
(`route.masks.linear.masked_linear`), so one batch can mix modes; `adjust_gradients` is kept
for the seed's API and is then idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass

KEPT_OPS = ("keep", "detach", "zero")


@dataclass(frozen=True)
class Strategy:
    """What forget rows do to the kept units.

    Attributes:
        name: registry key.
        forget_kept: "keep" (value and gradient flow unchanged), "detach" (value unchanged, no
            gradient through the kept activations) or "zero" (kept activations zeroed).
        mask_kept_params: forget rows send no gradient into the input projections' kept rows.
        mask_proj_params: forget rows send no gradient into the output projections' kept columns and biases.
        description: one line for help texts.
    """

    name: str
    forget_kept: str
    mask_kept_params: bool
    mask_proj_params: bool
    description: str = ""

    def __post_init__(self):
        if self.forget_kept not in KEPT_OPS:
            raise ValueError(f"strategy {self.name}: forget_kept: invalid value {self.forget_kept!r}; "
                             f"allowed values: {list(KEPT_OPS)}")


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry (a later registration under the same name replaces it)."""
    _STRATEGIES[strategy.name] = strategy
    return strategy


def available_strategies() -> list[str]:
    return list(_STRATEGIES)


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy `name`; unknown names list the allowed values."""
    if isinstance(name, Strategy):
        return name
    if name not in _STRATEGIES:
        raise ValueError(f"masking_strategy: unknown value {name!r}; allowed values: {available_strategies()}")
    return _STRATEGIES[name]


register_strategy(Strategy(
    "parameter_masking", forget_kept="keep", mask_kept_params=True, mask_proj_params=True,
    description="forget rows: ordinary forward; no gradient into retain slices (output projections included)"))
register_strategy(Strategy(
    "parameter_masking_no_proj", forget_kept="keep", mask_kept_params=True, mask_proj_params=False,
    description="as parameter_masking, but output projections are trained by forget rows"))
register_strategy(Strategy(
    "gradient_routing", forget_kept="detach", mask_kept_params=False, mask_proj_params=False,
    description="forget rows: retain activations detached (value unchanged, gradient only into forget units)"))
register_strategy(Strategy(
    "activation_masking", forget_kept="zero", mask_kept_params=False, mask_proj_params=False,
    description="forget rows: retain activations zeroed"))

__all__ = ["Strategy", "available_strategies", "get_strategy", "register_strategy"]
