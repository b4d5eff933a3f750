"""SGTM (selective gradient masking) models and pretraining on the shared mask core.

The seed's model API for GPT-Neo (`GPTNeoForCausalLMSGTM`, `GPTNeoModelSGTM`, `GPTNeoBlockSGTM`,
`SplitLinearOut`), the same for the Llama family (`LlamaForCausalLMSGTM`, `Qwen2ForCausalLMSGTM`),
and `route sgtm --config configs/sgtm_default.yaml`.
"""

from route.masks.linear import SplitLinearIn, SplitLinearOut
from route.models.sgtm.api import SGTM_CONFIG_FIELDS, SGTMModelMixin
from route.models.sgtm.gpt_neo import GPTNeoBlockSGTM, GPTNeoForCausalLMSGTM, GPTNeoModelSGTM
from route.models.sgtm.llama import LlamaForCausalLMSGTM, Qwen2ForCausalLMSGTM

__all__ = ["SGTM_CONFIG_FIELDS", "GPTNeoBlockSGTM", "GPTNeoForCausalLMSGTM", "GPTNeoModelSGTM",
           "LlamaForCausalLMSGTM", "Qwen2ForCausalLMSGTM", "SGTMModelMixin", "SplitLinearIn", "SplitLinearOut"]
