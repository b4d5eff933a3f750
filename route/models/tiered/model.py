"""The seed's tiered model methods (Tiered Alignment), mixed into the SGTM model classes.

    model.apply_key(key); model.unapply_key(key)
    model.mask_keyed_gradients(key); model.mask_public_gradients(key); model.scale_public_gradients(key, 0.5)
    model.swap_gradients(key)

Each method calls the function of the same name in `route.models.tiered` on the model itself.
"""

from __future__ import annotations


class TieredKeyMixin:
    """`apply_key`, `unapply_key` and the gradient functions as methods (the seed's `GPTNeoForCausalLMSGTM`)."""

    def apply_key(self, key):
        """Permute the weights into the keyed configuration (in place)."""
        from route.models.tiered.permute import apply_key

        return apply_key(self, key)

    def unapply_key(self, key):
        """Back to the public configuration, bitwise."""
        from route.models.tiered.permute import unapply_key

        return unapply_key(self, key)

    def swap_gradients(self, key):
        """Swap the key's slots in every `.grad` (gradients follow the weights)."""
        from route.models.tiered.permute import swap_gradients

        return swap_gradients(self, key)

    def mask_keyed_gradients(self, key) -> None:
        """Zero the keyed parameters' gradients."""
        from route.models.tiered.grads import mask_keyed_gradients

        mask_keyed_gradients(self, key)

    def mask_public_gradients(self, key) -> None:
        """Zero the public parameters' gradients."""
        from route.models.tiered.grads import mask_public_gradients

        mask_public_gradients(self, key)

    def scale_public_gradients(self, key, scale: float = 0.5) -> None:
        """Scale the public parameters' gradients by `scale`."""
        from route.models.tiered.grads import scale_public_gradients

        scale_public_gradients(self, key, scale)


__all__ = ["TieredKeyMixin"]
