"""Apply and undo a permutation key in place (Tiered Alignment's keyed configuration C2 over the public C1).

    apply_key(model, key)      # public -> keyed configuration (the seed's apply_permutation)
    unapply_key(model, key)    # keyed -> public, every parameter restored bitwise
    swap_gradients(model, key) # move .grad with the weights (after a backward in the other layout)

Works on plain transformers GPT-Neo, Llama and Qwen2 models and on the SGTM model classes (see
`route.models.tiered.layout` for what a head or column swap moves). The key is validated against the model
first (`PermutationKey.validate`), so an overlapping key is refused instead of silently failing to
restore. A swap exchanges the two slots' slices exactly (copies, no arithmetic), so unapply restores
every bit. The swaps are grouped per pair of parameters into index vectors and cached per model and
key (one `index_select`/`index_copy_` pair per group), so a two-pass step permutes cheaply.
`apply_key` and `unapply_key` move the weights only: gradients and optimizer state stay where they
are (use `swap_gradients`; `route.models.tiered.train` steps in the public layout, see there).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from route.models.tiered.key import PermutationKey
from route.models.tiered.layout import model_layout


@dataclass
class _Group:
    """Every swap between two parameters along one dimension, as index vectors (one vectorised swap)."""

    a: nn.Parameter
    b: nn.Parameter
    dim: int
    ia: Tensor
    ib: Tensor


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, key: PermutationKey) -> list[_Group]:
    """The key's swaps grouped per parameter pair; validated and cached per (model parameters, key)."""
    if not isinstance(key, PermutationKey):
        raise TypeError(f"key: expected a PermutationKey (route.models.tiered.load_key), got {type(key).__name__}")
    stamp = (json.dumps(key.to_dict(), sort_keys=True), tuple((id(p), p.device) for p in model.parameters()))
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    layout = model_layout(model)
    key.validate(layout)
    groups: dict[tuple[int, int, int], list] = {}
    for f, a, b in key.swaps():
        for sa, sb in zip(layout.slot_spans(f, *a), layout.slot_spans(f, *b), strict=True):
            g = groups.setdefault((id(sa.param), id(sb.param), sa.dim), [sa.param, sb.param, sa.dim, [], []])
            g[3].extend(range(sa.start, sa.start + sa.length))
            g[4].extend(range(sb.start, sb.start + sb.length))
    plan = [
        _Group(pa, pb, dim, torch.tensor(ia, device=pa.device), torch.tensor(ib, device=pb.device))
        for pa, pb, dim, ia, ib in groups.values()
    ]
    _PLANS[model] = (stamp, plan)
    return plan


@torch.no_grad()
def _swap(plan: list[_Group], grads: bool) -> None:
    """Exchange the planned entries of the weights (or of the gradients). Slots are disjoint, so order is free."""
    for g in plan:
        ta, tb = (g.a.grad, g.b.grad) if grads else (g.a.data, g.b.data)
        if ta is None and tb is None:
            continue
        if ta is None:  # one side never got a gradient: it is zero there
            g.a.grad = ta = torch.zeros_like(g.a)
        if tb is None:
            g.b.grad = tb = torch.zeros_like(g.b)
        va, vb = ta.index_select(g.dim, g.ia), tb.index_select(g.dim, g.ib)
        ta.index_copy_(g.dim, g.ia, vb)
        tb.index_copy_(g.dim, g.ib, va)


def apply_key(model: nn.Module, key: PermutationKey) -> nn.Module:
    """Permute `model`'s weights in place into the keyed configuration; returns the model."""
    _swap(_plan(model, key), grads=False)
    return model


def unapply_key(model: nn.Module, key: PermutationKey) -> nn.Module:
    """Undo `apply_key` in place; restores every parameter bitwise (the swaps are disjoint involutions)."""
    _swap(_plan(model, key), grads=False)
    return model


def swap_gradients(model: nn.Module, key: PermutationKey) -> nn.Module:
    """Swap the key's slots in every `.grad`, so gradients follow weights moved by apply/unapply.

    A swap is its own inverse (the key's swaps are disjoint), so the same call moves gradients either way.
    """
    _swap(_plan(model, key), grads=True)
    return model


def keyed_masks(model: nn.Module, key: PermutationKey) -> dict[nn.Parameter, Tensor]:
    """Per parameter touched by the key, a bool mask of its keyed entries (both ends of every swap).

    The set is the same in the public and the keyed layout (a swap exchanges two keyed slots).
    Parameters the key does not touch are absent (all public).
    """
    masks: dict[nn.Parameter, Tensor] = {}
    for g in _plan(model, key):
        for p, idx in ((g.a, g.ia), (g.b, g.ib)):
            m = masks.get(p)
            if m is None:
                m = masks[p] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            m.index_fill_(g.dim, idx, True)
    return masks


apply_permutation = apply_key  # the seed's function names
unapply_permutation = unapply_key

__all__ = ["apply_key", "apply_permutation", "keyed_masks", "swap_gradients", "unapply_key", "unapply_permutation"]
