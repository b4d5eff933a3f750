"""Apply and undo a permutation key in place (Tiered Alignment's keyed configuration C2 over the public C1).

    apply_key(model, key)      # public -> keyed configuration (the seed's apply_permutation)
    unapply_key(model, key)    # keyed -> public, every parameter restored bitwise
    swap_gradients(model, key) # move .grad with the weights (after a backward in the other layout)

Works on plain transformers GPT-Neo, Llama and Qwen2 models and on the SGTM model classes (see
`route.tiered.layout` for what a head or column swap moves). The key is validated against the model
first (`PermutationKey.validate`), so an overlapping key is refused instead of silently failing to
restore. A swap exchanges the two slots' slices exactly (copies, no arithmetic), so unapply restores
every bit. `apply_key` and `unapply_key` move the weights only: gradients and optimizer state stay where
they are (use `swap_gradients`; `route.tiered.train` steps in the public layout, see there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from route.tiered.key import PermutationKey
from route.tiered.layout import ModelLayout, Span, model_layout


def _pairs(layout: ModelLayout, key: PermutationKey, reverse: bool) -> list[tuple[list[Span], list[Span]]]:
    out = [(layout.slot_spans(f, *a), layout.slot_spans(f, *b)) for f, a, b in key.swaps()]
    return out[::-1] if reverse else out


@torch.no_grad()
def _swap(pairs, tensor_of) -> None:
    for spans_a, spans_b in pairs:
        for sa, sb in zip(spans_a, spans_b, strict=True):
            ta, tb = tensor_of(sa.param), tensor_of(sb.param)
            if ta is None and tb is None:
                continue
            if ta is None or tb is None:  # one side never got a gradient: it is zero there
                if ta is None:
                    sa.param.grad = ta = torch.zeros_like(sa.param)
                else:
                    sb.param.grad = tb = torch.zeros_like(sb.param)
            va, vb = sa.of(ta), sb.of(tb)
            tmp = va.clone()
            va.copy_(vb)
            vb.copy_(tmp)


def _checked(model: nn.Module, key: PermutationKey) -> ModelLayout:
    if not isinstance(key, PermutationKey):
        raise TypeError(f"key: expected a PermutationKey (route.tiered.load_key), got {type(key).__name__}")
    layout = model_layout(model)
    key.validate(layout)
    return layout


def apply_key(model: nn.Module, key: PermutationKey) -> nn.Module:
    """Permute `model`'s weights in place into the keyed configuration; returns the model."""
    _swap(_pairs(_checked(model, key), key, reverse=False), lambda p: p.data)
    return model


def unapply_key(model: nn.Module, key: PermutationKey) -> nn.Module:
    """Undo `apply_key` in place (swaps in reverse order); restores every parameter bitwise."""
    _swap(_pairs(_checked(model, key), key, reverse=True), lambda p: p.data)
    return model


def swap_gradients(model: nn.Module, key: PermutationKey) -> nn.Module:
    """Swap the key's slots in every `.grad`, so gradients follow weights moved by apply/unapply.

    A swap is its own inverse (the key's swaps are disjoint), so the same call moves gradients either way.
    """
    _swap(_pairs(_checked(model, key), key, reverse=False), lambda p: p.grad)
    return model


def keyed_masks(model: nn.Module, key: PermutationKey) -> dict[nn.Parameter, Tensor]:
    """Per parameter touched by the key, a bool mask of its keyed entries (both ends of every swap).

    The set is the same in the public and the keyed layout (a swap exchanges two keyed slots).
    Parameters the key does not touch are absent (all public).
    """
    masks: dict[nn.Parameter, Tensor] = {}
    for spans_a, spans_b in _pairs(_checked(model, key), key, reverse=False):
        for s in (*spans_a, *spans_b):
            m = masks.get(s.param)
            if m is None:
                m = masks[s.param] = torch.zeros(s.param.shape, dtype=torch.bool, device=s.param.device)
            s.of(m).fill_(True)
    return masks


apply_permutation = apply_key  # the seed's function names
unapply_permutation = unapply_key

__all__ = ["apply_key", "apply_permutation", "keyed_masks", "swap_gradients", "unapply_key", "unapply_permutation"]
