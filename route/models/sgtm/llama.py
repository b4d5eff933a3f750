"""SGTM for the Llama family: `LlamaForCausalLMSGTM`, `Qwen2ForCausalLMSGTM` (same API as the GPT-Neo classes).

SGTM (selective gradient masking) builds on gradient routing (Cloud et al. 2024).

The seed covers GPT-Neo only; this carries its split to SwiGLU MLPs (retain units are the
first `retain_mlp_dim` rows of `gate_proj` and `up_proj` and columns of `down_proj`) and to
grouped-query attention (the first `retain_attn_heads` query heads, which must be whole KV
groups, and the KV heads only they read). The model is built as the vanilla class (same random
draws, same weights for a seed), then its masked layers are converted in place.

    config = LlamaConfig(..., retain_mlp_dim=192, retain_attn_heads=2, masking_strategy="parameter_masking")
    model = LlamaForCausalLMSGTM(config)
    model(input_ids=ids, labels=ids, sgtm_mode=["forget", "default"])
"""

from __future__ import annotations

from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from route.masks.arch import apply_masks
from route.models.sgtm.api import SGTMModelMixin, sgtm_settings, with_sgtm_mode


class _LlamaFamilySGTM(SGTMModelMixin):
    _vanilla: type

    def _sgtm_convert(self) -> None:
        c = self.config
        s = sgtm_settings(c, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers)
        self.model.masked_layers = apply_masks(
            self, retain_mlp_dim=s.retain_mlp_dim, retain_attn_heads=s.retain_attn_heads,
            masked_layers=s.masked_layers, split=s.split_masked_weights, split_out=False)

    @property
    def masked_layers(self) -> list[int]:
        return self.model.masked_layers


class LlamaForCausalLMSGTM(_LlamaFamilySGTM, LlamaForCausalLM):
    """`LlamaForCausalLM` with SGTM masks."""

    _vanilla = LlamaForCausalLM

    def __init__(self, config):
        LlamaForCausalLM.__init__(self, config)
        self._sgtm_convert()

    forward = with_sgtm_mode(LlamaForCausalLM.forward)


class Qwen2ForCausalLMSGTM(_LlamaFamilySGTM, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with SGTM masks (q/k/v biases split with their rows)."""

    _vanilla = Qwen2ForCausalLM

    def __init__(self, config):
        Qwen2ForCausalLM.__init__(self, config)
        self._sgtm_convert()

    forward = with_sgtm_mode(Qwen2ForCausalLM.forward)


__all__ = ["LlamaForCausalLMSGTM", "Qwen2ForCausalLMSGTM"]
