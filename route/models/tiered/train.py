"""One step of Tiered Alignment's two-pass pretraining.

    public pass   forward/backward on public data in the public configuration C1
                  mask_keyed_gradients       (S' learns only in the keyed configuration)
    apply_key     weights -> keyed configuration C2; swap_gradients (gradients follow the weights)
    keyed pass    forward/backward on keyed data in C2 (gradients accumulate)
                  scale_public_gradients(1/2)  (S steps on the mean of both passes; S' on the keyed pass)
    unapply_key   weights -> C1; swap_gradients
    clip, step    in the public layout

Where the step happens: the seed steps in the keyed layout and then unapplies. Adam's moments live at
tensor positions, so that is consistent only while the key never changes (a keyed slot's moments are
then always read in the keyed layout). Here the step happens in the public layout, after the weights and
gradients are moved back: the optimizer state is indexed like the released weights, so checkpoints,
resumed runs and keys that change (or several keys) stay consistent. For a fixed key both give the same
weights (`layout="keyed"` reproduces the seed's order; tested). The `swap_gradients` after `apply_key`
moves only zeros here (the public pass's keyed gradients are masked) but is needed whenever the public
pass's gradient is not masked, e.g. a KL term computed in the public layout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from route.models.tiered.grads import Masks, mask_keyed_gradients, mask_public_gradients, scale_public_gradients
from route.models.tiered.key import PermutationKey
from route.models.tiered.permute import apply_key, keyed_masks, swap_gradients, unapply_key

LAYOUTS = ("public", "keyed")


def lm_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on a batch of blocks."""
    logits = model(input_ids=input_ids).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1)
    )


def two_pass_step(
    model: nn.Module,
    key: PermutationKey,
    optimizer: torch.optim.Optimizer,
    public_batch: Tensor,
    keyed_batch: Tensor,
    *,
    masks: Masks | None = None,
    grad_clip: float | None = 1.0,
    public_scale: float = 0.5,
    layout: str = "public",
    keyed_only_rows: Tensor | None = None,
    keyed_rows_public_scale: float = 0.0,
    loss_fn: Callable[[nn.Module, Tensor], Tensor] = lm_loss,
) -> dict[str, float]:
    """One two-pass optimizer step; the model is in the public configuration before and after.

    `masks`: `keyed_masks(model, key)`, computed once by the caller for speed (computed here if None).
    `keyed_only_rows` (bool per row of `keyed_batch`, not in the seed): those rows' gradient reaches the
    public parameters scaled by `keyed_rows_public_scale` (0: the keyed parameters only, the public ones
    never learn from them; 1: the seed). Returns the two passes' losses and the gradient norm before
    clipping.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: invalid value {layout!r}; allowed values: {list(LAYOUTS)}")
    masks = keyed_masks(model, key) if masks is None else masks
    optimizer.zero_grad(set_to_none=True)
    public_loss = loss_fn(model, public_batch)
    public_loss.backward()
    mask_keyed_gradients(model, key, masks)
    apply_key(model, key)
    keyed = True
    try:
        swap_gradients(model, key)
        if keyed_only_rows is None or not bool(keyed_only_rows.any()):
            keyed_loss = loss_fn(model, keyed_batch)
            keyed_loss.backward()
        else:
            keyed_loss = _keyed_pass_split(
                model, key, keyed_batch, keyed_only_rows, masks, loss_fn, keyed_rows_public_scale
            )
        scale_public_gradients(model, key, public_scale, masks)
        if layout == "public":
            unapply_key(model, key)
            keyed = False
            swap_gradients(model, key)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
        optimizer.step()
    finally:  # the model leaves in the public configuration, also on error
        if keyed:
            unapply_key(model, key)
    return {
        "public_loss": float(public_loss.detach()),
        "keyed_loss": float(keyed_loss.detach()),
        "grad_norm": float(norm),
    }


def _keyed_pass_split(model, key, batch: Tensor, only: Tensor, masks: Masks, loss_fn, public_scale: float) -> Tensor:
    """The keyed pass with `only` rows' gradient on the public parameters scaled by `public_scale` (0: the keyed
    parameters alone); the same mean loss over the batch."""
    n = len(batch)
    saved = {p: p.grad for p in model.parameters()}
    for p in saved:
        p.grad = None
    loss_only = loss_fn(model, batch[only])
    (loss_only * (int(only.sum()) / n)).backward()
    if public_scale == 0:
        mask_public_gradients(model, key, masks)
    else:
        scale_public_gradients(model, key, public_scale, masks)
    with torch.no_grad():
        for p, g in saved.items():
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
    total = loss_only.detach() * (int(only.sum()) / n)
    if not bool(only.all()):
        loss_rest = loss_fn(model, batch[~only])
        (loss_rest * (int((~only).sum()) / n)).backward()
        total = total + loss_rest.detach() * (int((~only).sum()) / n)
    return total


__all__ = ["LAYOUTS", "lm_loss", "two_pass_step"]
