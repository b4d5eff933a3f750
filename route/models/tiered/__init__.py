"""Tiered models (Tiered Alignment): one set of weights, a public configuration and a keyed one.

A secret permutation key (`PermutationKey`, the seed's JSON format) swaps attention heads and MLP
columns between layers; `apply_key` turns the public configuration into the keyed one in place and
`unapply_key` turns it back bitwise. The gradient functions (`mask_keyed_gradients`,
`mask_public_gradients`, `scale_public_gradients`, `swap_gradients`, `masked_step`) make the seed's
two-pass pretraining (`route tiered`); `route tiered-keygen` draws keys and
`route.models.tiered.probes` measures extraction by fine-tuning and partial-key leaks. See docs/tiered.md.
"""

from route.models.tiered.grads import (
    mask_keyed_gradients,
    mask_public_gradients,
    masked_step,
    public_masks,
    scale_public_gradients,
)
from route.models.tiered.key import FIELDS, PermutationKey, load_key, random_key
from route.models.tiered.layout import model_layout
from route.models.tiered.permute import (
    apply_key,
    apply_permutation,
    keyed_masks,
    swap_gradients,
    unapply_key,
    unapply_permutation,
)

__all__ = [
    "FIELDS",
    "PermutationKey",
    "apply_key",
    "apply_permutation",
    "keyed_masks",
    "load_key",
    "mask_keyed_gradients",
    "mask_public_gradients",
    "masked_step",
    "model_layout",
    "public_masks",
    "random_key",
    "scale_public_gradients",
    "swap_gradients",
    "unapply_key",
    "unapply_permutation",
]
