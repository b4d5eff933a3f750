"""Shared bits of the target tests: a fixed token batch and logits under an optional gate context."""

from contextlib import AbstractContextManager, nullcontext

import torch


def batch(n: int = 4, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 40, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(t, ids: torch.Tensor, ctx: AbstractContextManager | None = None) -> torch.Tensor:
    """`t.model`'s logits on `ids`, inside `ctx` (e.g. `t.gate(modes)` or `t.ablated()`) when given."""
    with ctx if ctx is not None else nullcontext():
        return t.model(input_ids=ids).logits
