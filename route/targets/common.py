"""Pieces every adapter-based target shares: default modules, PEFT names, and the deployed-model export.

`deployed_model(base, state_dict)` builds a fresh plain transformers model from a merged state dict (the target's
`deployed_state_dict()`), and `save_plain(model, output_dir, tokenizer)` writes it as an ordinary checkpoint that
loads without this library.
"""

from __future__ import annotations

from torch import Tensor, nn

DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_target_modules(model: nn.Module, target_modules) -> list[str]:
    """The module names to adapt (default `DEFAULT_MODULES`); ValueError naming `target_modules` and the Linear
    module names of the model when a name matches none (checked before PEFT wraps anything)."""
    modules = list(target_modules or DEFAULT_MODULES)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    linear = sorted({n.rsplit(".", 1)[-1] for n in names})
    # PEFT's rule: a name matches a module whose full name is it or ends with "." + it
    missing = [t for t in modules if not any(n == t or n.endswith("." + t) for n in names)]
    if target_modules and missing:
        raise ValueError(f"target_modules: {missing} match no Linear module of the model; allowed values: {linear}")
    if not target_modules and len(missing) == len(modules):
        raise ValueError(f"target_modules: none of the default modules {modules} is a Linear module of the model; "
                         f"set target_modules to some of {linear}")
    return modules


def plain_name(peft_name: str) -> str:
    """PEFT module or parameter name -> the plain model's name (`base_model.model.` and `.base_layer` removed)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "")


def plain_state_dict(base: nn.Module, adapter_marker: str, dtype=None) -> dict[str, Tensor]:
    """`base`'s state dict without adapter tensors (keys containing `adapter_marker`), under the plain model's keys,
    copied (or cast once to `dtype`) so that a merge written into it never touches the training weights."""
    return {plain_name(k): v.detach().clone() if dtype is None else v.detach().to(dtype)
            for k, v in base.state_dict().items() if adapter_marker not in k}


def check_unmerged(layers, target_name: str) -> None:
    """RuntimeError if an adapter was merged into its base weight in place (a merge out of place would add it twice)."""
    for name, layer in layers:
        if layer.merged:
            raise RuntimeError(f"{target_name}: module {name} has its adapter merged into the base weight; "
                               "unmerge first")


def deployed_model(base: nn.Module, state_dict: dict[str, Tensor], target_name: str) -> nn.Module:
    """A fresh plain transformers model of `base`'s config holding `state_dict` (tied weights re-tied)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(base.config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise RuntimeError(f"{target_name}: deployed state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = base.generation_config
    return model.eval()


def save_plain(model: nn.Module, output_dir: str, tokenizer=None) -> None:
    """Save a plain transformers model (and tokenizer) to `output_dir`."""
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)


__all__ = ["DEFAULT_MODULES", "check_target_modules", "check_unmerged", "deployed_model", "plain_name",
           "plain_state_dict", "save_plain"]
