"""Gradient surgery for tiered training: the seed's masking and scaling functions, and a masked optimizer step.

Tiered Alignment splits the parameters into keyed ones S' (the slots a key swaps) and public ones S
(everything else, embeddings and norms included):

- `mask_keyed_gradients(model, key)`: zero the keyed gradients (after the public pass: S' learns only
  in the keyed configuration);
- `mask_public_gradients(model, key)`: zero the public gradients (train S' alone);
- `scale_public_gradients(model, key, scale=0.5)`: scale the public gradients (after both passes the
  public parameters step on the mean of the two passes' gradients);
- `masked_step(optimizer, frozen)`: `optimizer.step()` that leaves the frozen entries exactly as they were.

Departures from the seed's code: masks are boolean tensors applied with `masked_fill_` / `mul_` on the
whole gradient (an in-place op on an advanced-index copy, `g[idx].mul_()`, changes nothing), built once
as a union, so a slot reached twice is scaled once; a parameter whose gradient is masked entirely gets
`grad = None` (torch optimizers skip it, while a zero gradient still moves it through momentum and
weight decay); and `masked_step` restores frozen entries and their optimizer state after the step, so
AdamW momentum and weight decay cannot move a slice of a parameter that a pass must not touch (Adam's
per-tensor step counter, used for bias correction, still advances).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from route.models.tiered.key import PermutationKey
from route.models.tiered.permute import keyed_masks

Masks = dict[nn.Parameter, Tensor]


def _masks(model: nn.Module, key: PermutationKey, masks: Masks | None) -> Masks:
    return keyed_masks(model, key) if masks is None else masks


@torch.no_grad()
def mask_keyed_gradients(model: nn.Module, key: PermutationKey, masks: Masks | None = None) -> None:
    """Zero the gradients of the keyed entries (`masks`: `keyed_masks(model, key)`, computed if not given)."""
    for p, m in _masks(model, key, masks).items():
        if p.grad is None:
            continue
        if bool(m.all()):
            p.grad = None
        else:
            p.grad.masked_fill_(m, 0.0)


@torch.no_grad()
def mask_public_gradients(model: nn.Module, key: PermutationKey, masks: Masks | None = None) -> None:
    """Zero the gradients of every public entry; parameters the key does not touch lose their gradient."""
    masks = _masks(model, key, masks)
    for p in model.parameters():
        if p.grad is None:
            continue
        m = masks.get(p)
        if m is None or not bool(m.any()):
            p.grad = None
        else:
            p.grad.masked_fill_(~m, 0.0)


@torch.no_grad()
def scale_public_gradients(
    model: nn.Module, key: PermutationKey, scale: float = 0.5, masks: Masks | None = None
) -> None:
    """Multiply the public entries' gradients by `scale` (the keyed ones are left alone)."""
    masks = _masks(model, key, masks)
    for p in model.parameters():
        if p.grad is None:
            continue
        m = masks.get(p)
        if m is None:
            p.grad.mul_(scale)
        else:
            p.grad.mul_(torch.where(m, 1.0, scale).to(p.grad.dtype))


def public_masks(model: nn.Module, masks: Masks) -> Masks:
    """The complement of `keyed_masks`: per parameter, True where the entry is public."""
    out = {}
    for p in model.parameters():
        m = masks.get(p)
        out[p] = torch.ones(p.shape, dtype=torch.bool, device=p.device) if m is None else ~m
    return out


def masked_step(optimizer: torch.optim.Optimizer, frozen: Masks) -> None:
    """`optimizer.step()` after which every entry with `frozen[p] == True`, and its optimizer state, is unchanged.

    A fully frozen parameter has its gradient dropped before the step (the optimizer skips it); a
    partly frozen one has its frozen entries (and same-shaped state such as Adam's moments) restored.
    """
    saved = []
    for p, m in frozen.items():
        if not bool(m.any()):
            continue
        if bool(m.all()):
            p.grad = None
            continue
        if p.grad is not None:
            p.grad.masked_fill_(m, 0.0)
        state = optimizer.state.get(p, {})
        moments = {k: v[m].clone() for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape}
        saved.append((p, m, p.detach()[m].clone(), moments))
    optimizer.step()
    with torch.no_grad():
        for p, m, values, moments in saved:
            p[m] = values
            state = optimizer.state.get(p, {})
            for k, v in moments.items():
                if k in state:
                    state[k][m] = v


__all__ = ["mask_keyed_gradients", "mask_public_gradients", "masked_step", "public_masks", "scale_public_gradients"]
