"""MAV (multi-layer alignment vectors): a fusion network over hidden states of several base layers.

`a = W_out drop(gelu(W_fuse [pool(norm(h_l1)); pool(norm(h_l2)); ...]))`, `W_out` zero-initialised,
`z = z_base + alpha * a`. Layers: `auto` (first, middle, last), `uniform` (`num_layers` evenly
spaced) or a list of 0-based decoder-layer indices (negative counts from the end).

Departures from the MAV paper's public code:
- Pooling to the fusion width is parameter-free adaptive average pooling in both directions
  (down- and up-sampling), after a parameter-free RMS normalisation per layer. No projection
  depends on the base's hidden size, so nothing is created lazily (outside the optimizer) and a
  trained head moves to a base of another width with the same vocabulary as is.
- No learned position table: the base's hidden states already carry position, so decoding with a
  KV cache sees the same head input as a full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from route.models.heads.base import AlignedCausalLM

LAYER_CHOICES = ("auto", "uniform")


def num_decoder_layers(base: nn.Module) -> int:
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return int(cfg.num_hidden_layers)


def resolve_layers(layers: str | list[int], n: int, num_layers: int = 4) -> list[int]:
    """0-based decoder-layer indices read by the head, for a base of `n` layers."""
    if isinstance(layers, str):
        if layers == "auto":
            return sorted({0, n // 2, n - 1})
        if layers == "uniform":
            k = max(1, min(num_layers, n))
            return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n - 1]
        raise ValueError(f"layers: invalid value {layers!r}; allowed values: {list(LAYER_CHOICES)} or a list of ints")
    out = []
    for i in layers:
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise ValueError(f"layers: index {i} is out of range for a base with {n} decoder layers")
        out.append(j)
    if not out:
        raise ValueError("layers: the list is empty")
    return sorted(set(out))


class MAVForCausalLM(AlignedCausalLM):
    """Frozen base + multi-layer fusion MLP whose last layer starts at zero."""

    kind = "mav"

    def __init__(
        self,
        base: nn.Module,
        layers: str | list[int] = "auto",
        num_layers: int = 4,
        fusion_width: int = 256,
        mlp_width: int | None = None,
        dropout: float = 0.1,
    ):
        if isinstance(layers, str) and layers not in LAYER_CHOICES:
            raise ValueError(
                f"layers: invalid value {layers!r}; allowed values: {list(LAYER_CHOICES)} or a list of ints"
            )
        if fusion_width < 1 or (mlp_width is not None and mlp_width < 1):
            raise ValueError(f"fusion_width, mlp_width: must be >= 1, got {fusion_width}, {mlp_width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {dropout}")
        layers_setting = layers if isinstance(layers, str) else [int(i) for i in layers]
        super().__init__(
            base,
            layers=layers_setting,
            num_layers=num_layers,
            fusion_width=fusion_width,
            mlp_width=mlp_width,
            dropout=dropout,
        )
        self.layer_ids = resolve_layers(layers_setting, num_decoder_layers(base), num_layers)
        width = mlp_width or fusion_width
        w = base.get_output_embeddings().weight
        kw = {"dtype": w.dtype, "device": w.device}
        self.fuse = nn.Linear(fusion_width * len(self.layer_ids), width, **kw)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, self.vocab_size, **kw)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def pooled(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(batch, seq, k * fusion_width): each chosen layer RMS-normalised and pooled to the fusion width."""
        d = self.settings["fusion_width"]
        parts = []
        for i in self.layer_ids:
            h = hidden_states[i + 1].to(self.fuse.weight.dtype)  # hidden_states[0] is the embedding output
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            b, t, width = h.shape
            if width != d:
                h = F.adaptive_avg_pool1d(h.reshape(b * t, 1, width), d).reshape(b, t, d)
            parts.append(h)
        return torch.cat(parts, dim=-1)

    def alignment(self, hidden_states, base_logits):
        return self.out(self.drop(F.gelu(self.fuse(self.pooled(hidden_states)))))
