"""`dual_lora`: a kept LoRA and a quarantine LoRA on the same modules.

    y = W x + s_k B_k A_k x + s_q B_q A_q x        (B_k and B_q start at zero)

Both adapters are PEFT LoRA adapters ("keep" and "quarantine") active at once, so the model
stays a `PeftModel` (saving, TRL's PEFT paths). Gating hooks sit on the outputs of each
layer's `lora_B` modules and apply the shared `RowGate` of the mask core (`route.masks`) under
the `gradient_routing` strategy: forget rows detach the kept output, retain rows zero the
quarantine output. The SGTM models and the `sgtm` target gate the model's own units with the
same `RowGate`, so there is one gating implementation. `ablate(trainable=True)` is the LoRA analogue of a
trainable re-init: B_q = 0 (the deployed forward is unchanged) and A_q is redrawn at the
kept A's scale, so gradient can reach the quarantine again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from route.masks import HookSet, RowGate, redraw_like_
from route.targets import register_target

KEEP, QUARANTINE = "keep", "quarantine"
STRATEGY = "gradient_routing"  # the mask-core strategy the adapters are gated with
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and QUARANTINE in m.lora_A]


def _base_name(peft_name: str) -> str:
    """PEFT module name -> the plain model's module name."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer", "")


@register_target("dual_lora")
class DualLoRATarget:
    """Kept + quarantine LoRA adapters behind the `Target` interface.

    Args:
        model: a plain causal LM (it is wrapped with PEFT) or a `PeftModel` that already has
            "keep" and "quarantine" adapters.
        keep_rank, quarantine_rank: LoRA ranks of the two adapters.
        lora_alpha: LoRA alpha for both (default: each adapter's rank, i.e. scaling 1).
        target_modules: module names to adapt (default: every attention and MLP projection).
    """

    def __init__(self, model: nn.Module, keep_rank: int = 8, quarantine_rank: int = 8,
                 lora_alpha: float | None = None, target_modules: Sequence[str] | None = None):
        from peft import LoraConfig, PeftModel, get_peft_model

        for name, value in (("keep_rank", keep_rank), ("quarantine_rank", quarantine_rank)):
            if int(value) < 1:
                raise ValueError(f"dual_lora: {name} must be >= 1, got {value}")
        if not isinstance(model, PeftModel):
            modules = list(target_modules or DEFAULT_MODULES)

            def config(rank: int) -> LoraConfig:
                return LoraConfig(r=rank, lora_alpha=lora_alpha or rank, target_modules=modules, lora_dropout=0.0,
                                  bias="none", task_type="CAUSAL_LM")

            model = get_peft_model(model, config(keep_rank), adapter_name=KEEP)
            model.add_adapter(QUARANTINE, config(quarantine_rank))
        model.base_model.set_adapter([KEEP, QUARANTINE])
        self.model = model
        self.layers = _lora_layers(model)
        if not self.layers:
            raise ValueError(f"dual_lora: no module matched target_modules={target_modules}")

    @classmethod
    def from_config(cls, model: nn.Module, config) -> DualLoRATarget:
        return cls(model, keep_rank=config.keep_rank, quarantine_rank=config.quarantine_rank,
                   lora_alpha=config.lora_alpha, target_modules=config.target_modules)

    # ------------------------------------------------------------------ gating
    def _hooks(self, gate: RowGate) -> HookSet:
        def on(path):
            return lambda module, args, out: path(out)

        hooks = []
        for _, layer in self.layers:
            hooks.append((layer.lora_B[KEEP], on(gate.kept)))
            hooks.append((layer.lora_B[QUARANTINE], on(gate.quarantine)))
        return HookSet(hooks)

    def gate(self, modes: Tensor | Sequence[str]) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context (rows must match `modes`)."""
        return self._hooks(RowGate.from_modes(modes, strategy=STRATEGY))

    def ablated(self) -> contextlib.AbstractContextManager:
        """Forward as the deployed policy: the quarantine contributes nothing."""
        return self._hooks(RowGate.ablated())

    @torch.no_grad()
    def ablate(self, trainable: bool = False) -> None:
        """Remove the quarantine permanently: B_q = 0; A_q = 0 and frozen, or (trainable) redrawn at A_k's std."""
        for _, layer in self.layers:
            layer.lora_B[QUARANTINE].weight.zero_()
            a_q = layer.lora_A[QUARANTINE].weight
            if trainable:
                redraw_like_(a_q, layer.lora_A[KEEP].weight)
            else:
                a_q.zero_()
            for p in (a_q, layer.lora_B[QUARANTINE].weight):
                p.requires_grad_(trainable)

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: "keep", "quarantine" and "shared" (anything else trainable)."""
        groups: dict[str, list[nn.Parameter]] = {"keep": [], "quarantine": [], "shared": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if f".{QUARANTINE}." in name:
                groups["quarantine"].append(p)
            elif f".{KEEP}." in name:
                groups["keep"].append(p)
            else:
                groups["shared"].append(p)
        return groups

    def _merged_layers(self, dtype: torch.dtype | None, adapters: Sequence[str] = (KEEP,)
                       ) -> Iterator[tuple[str, Tensor]]:
        for name, layer in self.layers:
            base = layer.get_base_layer()
            merged = base.weight.detach().float()
            for adapter in adapters:
                a, b = layer.lora_A[adapter].weight.detach().float(), layer.lora_B[adapter].weight.detach().float()
                delta = (b @ a) * float(layer.scaling[adapter])
                merged = merged + (delta.T if layer.fan_in_fan_out else delta)
            yield f"{_base_name(name)}.weight", merged.to(dtype or base.weight.dtype)

    @torch.no_grad()
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The plain model's state dict with the kept adapter and, if `quarantine`, the quarantine merged.

        `quarantine=True` is the training policy's weights (what vLLM samples from under `generation_policy: full`);
        `quarantine=False` is `deployed_state_dict()`. Merged in fp32, out of place, cast once (to `dtype`, default
        each weight's own dtype); the training weights are untouched. Keys match the un-wrapped transformers model.
        """
        base = self.model.get_base_model()
        out = {k: v.detach().clone() if dtype is None else v.detach().to(dtype)
               for k, v in base.state_dict().items() if ".lora_" not in k}
        out = {k.replace(".base_layer", ""): v for k, v in out.items()}
        out.update(self._merged_layers(dtype, (KEEP, QUARANTINE) if quarantine else (KEEP,)))
        return out

    @torch.no_grad()
    def deployed_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The plain model's state dict with the kept adapter merged and the quarantine dropped.

        Merged in fp32, out of place, cast once (to `dtype`, default each weight's own dtype);
        the training weights are untouched. Keys match the un-wrapped transformers model.
        """
        return self.merged_state_dict(quarantine=False, dtype=dtype)

    def deployed_model(self) -> nn.Module:
        """A fresh plain transformers model holding `deployed_state_dict()`."""
        from transformers import AutoModelForCausalLM

        config = self.model.get_base_model().config
        model = AutoModelForCausalLM.from_config(config)
        missing, unexpected = model.load_state_dict(self.deployed_state_dict(), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
            raise RuntimeError(f"dual_lora: deployed state dict mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.generation_config = self.model.get_base_model().generation_config
        return model.eval()

    def save_deployed(self, output_dir: str, tokenizer=None) -> None:
        """Save the deployed policy as a plain transformers checkpoint (loadable without this library)."""
        self.deployed_model().save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
