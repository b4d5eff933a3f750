"""Logit-space alignment heads over a frozen causal LM: `z = z_base + alpha * a` (IAV, MAV, a constant bias).

    from route.models.heads import IAVForCausalLM, MAVForCausalLM
    model = MAVForCausalLM(base, layers="auto")          # base: any Hugging Face causal LM
    ids = model.generate(prompt_ids, alpha=1.0)          # alpha = 0 is the base model, bitwise
    model.save_pretrained("head/"); MAVForCausalLM.from_pretrained("head/", base=other_base)

Training: `route heads`; alpha sweep: `route heads-evaluate`; see docs/heads.md.
"""

from route.models.heads.base import HEAD_KINDS, AlignedCausalLM, HeadOutput, causal_lm_step, decode, positions_from_mask
from route.models.heads.iav import ConstantBiasForCausalLM, IAVForCausalLM
from route.models.heads.mav import MAVForCausalLM

HEAD_KINDS.update(iav=IAVForCausalLM, mav=MAVForCausalLM, bias=ConstantBiasForCausalLM)


def build_head(kind: str, base, **settings) -> AlignedCausalLM:
    """A fresh head of `kind` (iav, mav, bias) over `base`."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head: invalid value {kind!r}; allowed values: {list(HEAD_KINDS)}")
    return HEAD_KINDS[kind](base, **settings)


__all__ = [
    "AlignedCausalLM",
    "ConstantBiasForCausalLM",
    "HEAD_KINDS",
    "HeadOutput",
    "IAVForCausalLM",
    "MAVForCausalLM",
    "build_head",
    "causal_lm_step",
    "decode",
    "positions_from_mask",
]
