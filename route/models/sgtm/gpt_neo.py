"""SGTM for GPT-Neo with the seed's class names: `GPTNeoForCausalLMSGTM`, `GPTNeoModelSGTM`, `GPTNeoBlockSGTM`.

SGTM (selective gradient masking) builds on gradient routing (Cloud et al. 2024).

    config = GPTNeoConfig(..., retain_mlp_dim=1984, retain_attn_heads=31, masking_strategy="parameter_masking",
                          split_masked_weights=True, sgtm_mask_embeddings=False)
    model = GPTNeoForCausalLMSGTM(config)
    out = model(input_ids=ids, labels=ids, sgtm_mode="forget")

Masked layers (`masked_layers`, default every layer; `model.transformer.masked_layers` holds
the list) are `GPTNeoBlockSGTM`s, the others stay plain `GPTNeoBlock`s. In a masked block the
first `retain_mlp_dim` MLP units and the first `retain_attn_heads` heads are retain, the rest
forget. With `split_masked_weights`, q/k/v and `c_fc` are `SplitLinearOut`s; the output
projections are not split (as in the seed). Construction draws exactly the random numbers of
`GPTNeoForCausalLM(config)`, so the same seed gives the same weights; with retain units
covering everything the model is vanilla GPT-Neo. `to_vanilla()` / `from_vanilla()` convert.

As in the public SGTM model, `lm_head` carries a bias (`lm_head_bias`, default true): it starts at zero
(drawing no random number) and trains with everything else; `named_parameters_split` lists it under
"joint". Vanilla GPT-Neo has no head bias, so `to_vanilla()` refuses a non-zero one (build with
`lm_head_bias=False` for a model that must export to the vanilla class).

Departures from the seed are those of `route.models.sgtm.api` (per-row modes, masking inside the
backward, ablation also zeroing the output projections' forget columns); the gating itself is
the shared core's (`route.masks`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTNeoConfig, GPTNeoForCausalLM, GPTNeoModel
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoBlock, GPTNeoPreTrainedModel

from route.masks.arch import convert_layer
from route.models.sgtm.api import SGTMModelMixin, sgtm_settings, with_sgtm_mode


def _inner_dim(config: GPTNeoConfig) -> int:
    return config.intermediate_size if config.intermediate_size is not None else 4 * config.hidden_size


class GPTNeoBlockSGTM(GPTNeoBlock):
    """A `GPTNeoBlock` whose MLP units and heads are split retain-first (masked linears of `route.masks`)."""

    def __init__(self, config: GPTNeoConfig, layer_id: int | None = None, retain_mlp_dim: int | None = None,
                 retain_attn_heads: int | None = None, split: bool | None = None):
        super().__init__(config, layer_id)
        self.retain_mlp_dim = config.retain_mlp_dim if retain_mlp_dim is None else retain_mlp_dim
        self.retain_attn_heads = config.retain_attn_heads if retain_attn_heads is None else retain_attn_heads
        split = bool(config.split_masked_weights) if split is None else split
        convert_layer(self, "gpt_neo", self.retain_mlp_dim, self.retain_attn_heads, split=split, split_out=False)


class GPTNeoModelSGTM(SGTMModelMixin, GPTNeoModel):
    """`GPTNeoModel` with `GPTNeoBlockSGTM`s in `masked_layers`; `forward(..., sgtm_mode=...)`."""

    _no_split_modules = ["GPTNeoBlock", "GPTNeoBlockSGTM"]
    _vanilla = GPTNeoModel

    def __init__(self, config: GPTNeoConfig):
        s = sgtm_settings(config, _inner_dim(config), config.num_heads, config.num_layers)
        GPTNeoPreTrainedModel.__init__(self, config)
        # the body of GPTNeoModel.__init__, with SGTM blocks in the masked layers (same modules, same draws)
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(float(config.embed_dropout))
        self.h = nn.ModuleList([GPTNeoBlockSGTM(config, layer_id=i) if i in s.masked_layers
                                else GPTNeoBlock(config, layer_id=i) for i in range(config.num_layers)])
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.masked_layers = list(s.masked_layers)
        self.post_init()

    forward = with_sgtm_mode(GPTNeoModel.forward)


class GPTNeoForCausalLMSGTM(SGTMModelMixin, GPTNeoForCausalLM):
    """`GPTNeoForCausalLM` on a `GPTNeoModelSGTM`: the seed's main class."""

    _no_split_modules = ["GPTNeoBlock", "GPTNeoBlockSGTM"]
    _vanilla = GPTNeoForCausalLM

    def __init__(self, config: GPTNeoConfig):
        GPTNeoPreTrainedModel.__init__(self, config)
        self.transformer = GPTNeoModelSGTM(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "lm_head_bias", True):  # the public model's head bias: zero, and no random draw
            self.lm_head.bias = nn.Parameter(torch.zeros(config.vocab_size))
        config.lm_head_bias = self.lm_head.bias is not None
        self.post_init()

    forward = with_sgtm_mode(GPTNeoForCausalLM.forward)

    @property
    def masked_layers(self) -> list[int]:
        return self.transformer.masked_layers


__all__ = ["GPTNeoBlockSGTM", "GPTNeoForCausalLMSGTM", "GPTNeoModelSGTM"]
