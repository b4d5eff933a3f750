"""Shared bits of the target tests: a fixed token batch and logits under an optional gate context."""

from contextlib import AbstractContextManager, nullcontext

import torch


def batch(n: int = 4, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 40, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(t, ids: torch.Tensor, ctx: AbstractContextManager | None = None) -> torch.Tensor:
    """`t.model`'s logits on `ids`, inside `ctx` (e.g. `t.gate(modes)` or `t.ablated()`) when given."""
    with ctx if ctx is not None else nullcontext():
        return t.model(input_ids=ids).logits


@torch.no_grad()
def on_grid(module: torch.nn.Module, step: float = 2.0**-6) -> None:
    """Round every parameter to a multiple of `step` (2**-6: at most 7 significant bits for |w| < 1). Products and sums
    of a few such values are exact in float32, so a LoRA merge W + B A (rank <= 16, scaling 1) exports exactly."""
    for p in module.parameters():
        p.copy_((p / step).round() * step)


def sampled_with_logits(model, prompt: torch.Tensor, ctx: AbstractContextManager | None = None, **kw):
    """(sequences, the raw logits of every generated step (B, new tokens, V)) of `model.generate` inside `ctx`."""
    with ctx if ctx is not None else nullcontext(), torch.no_grad():
        out = model.generate(input_ids=prompt, output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


def teacher_forced(model, sequences: torch.Tensor, prompt_len: int, ctx: AbstractContextManager | None = None):
    """`model`'s logits for every generated position of `sequences` from one full (no-cache) forward."""
    with ctx if ctx is not None else nullcontext(), torch.no_grad():
        return model(input_ids=sequences).logits[:, prompt_len - 1 : -1]
