"""`dual_mlp`: kept and quarantine MLP units added beside the MLP of every (or each chosen) layer.

    y = MLP(x) + MLP_k(x) + MLP_q(x)        MLP_k, MLP_q: new units of MLP's own form, output projections at zero

Gradient routing (Cloud et al. 2024) into added units instead of reserved ones: per rollout, in one forward and one
backward, with the base model frozen (as under `dual_lora`), so a forget row needs no gate on the model's own weights.
The units have the model's own MLP form (GPT-Neo: `c_fc` rows and bias, `c_proj` columns; the Llama family:
`gate_proj`, `up_proj` rows, `down_proj` columns), input rows drawn at the std of the layer's own, output columns
zero: the wrapped model starts as the base model, and a merge is a concatenation (a plain checkpoint with
`intermediate_size` widened; nothing else baked into any weight).

Gating: a forward hook on each wrapped MLP adds `gate.kept(MLP_k(x)) + gate.quarantine(MLP_q(x))`, the shared
`RowGate` rule (soft routing, clamp, exclusive rows and `scaled(s)` included), read from one slot that
`TargetBase` sets and re-enters for a checkpointed recompute (the units and the hook: `route.targets.mlp_units`).

Export and vLLM: every state dict has the *engine layout* (each layer `base + keep + quarantine` units wide, layers
without units padded with zero units, the quarantine explicit at every scale and zero at scale 0), so one vLLM engine
built on `save_engine`'s checkpoint takes every push (colocate: `from_args` writes it). The saved deployed model
drops the quarantine units: `intermediate_size` widened by the kept units alone.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from route.masks import check_scale, detect_arch, redraw_like_
from route.masks.arch import layers_of, resolve_layers
from route.targets import register_target
from route.targets.absorption import RowSqNorms
from route.targets.base import TargetArgs, TargetBase, export_scale
from route.targets.common import deployed_model, save_plain
from route.targets.mlp_units import FORMS, KEEP, QUARANTINE, UNIT_ATTRS, GateSlot, MLPUnits, dual_hook
from route.utils.fields import as_int_list

ENGINE_DIR = "vllm_engine"  # under output_dir: the colocated engine's checkpoint (engine layout)


@dataclass
class DualMLPArgs(TargetArgs):
    """Settings of the `dual_mlp` target (layer indices are checked against the model when the target is built)."""

    dual_mlp_keep_units: int = field(
        default=64,
        metadata={
            "help": "dual_mlp: kept MLP units added to each wrapped layer (trained by every "
            "rollout except flagged ones; deployed)."
        },
    )
    dual_mlp_quarantine_units: int = field(
        default=64,
        metadata={
            "help": "dual_mlp: quarantine MLP units added to each wrapped layer (trained by "
            "flagged rollouts; removed before deployment)."
        },
    )
    dual_mlp_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "dual_mlp: indices of the layers that get new units (None: every layer; "
            "negative indices count from the end)."
        },
    )

    def validate(self, config: Any, target: str) -> None:
        for name in ("dual_mlp_keep_units", "dual_mlp_quarantine_units"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        self.dual_mlp_layers = as_int_list("dual_mlp_layers", self.dual_mlp_layers, "layer indices")
        if self.dual_mlp_layers == []:
            raise ValueError(
                "dual_mlp_layers: no layer selected; give layer indices, or leave it unset for every layer"
            )
        if config is not None and getattr(config, "target_modules", None):
            raise ValueError(
                "target_modules: not used by target dual_mlp (its units sit beside each layer's MLP); leave it unset "
                "and choose layers with dual_mlp_layers"
            )


@register_target("dual_mlp")
class DualMLPTarget(TargetBase):
    """Kept + quarantine MLP units behind the `Target` interface.

    Args:
        model: a plain causal LM of GPT-Neo or the Llama family (Llama, Qwen2, Mistral); frozen, and its chosen
            layers' MLPs get the new units and the routing hook in place.
        keep_units, quarantine_units: units added per chosen layer.
        layers: indices of the chosen layers (None: every layer).
    """

    args_cls = DualMLPArgs

    def __init__(
        self, model: nn.Module, keep_units: int = 64, quarantine_units: int = 64, layers: list[int] | None = None
    ):
        DualMLPArgs(keep_units, quarantine_units, layers).validate(None, "dual_mlp")
        self.arch, self.chosen = self.resolve(model, layers)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.units = model, {KEEP: keep_units, QUARANTINE: quarantine_units}
        self._slot = GateSlot()
        self.mlps = [layer.mlp for layer in layers_of(model)]
        for i in self.chosen:
            mlp = self.mlps[i]
            for role, attr in UNIT_ATTRS.items():
                setattr(mlp, attr, MLPUnits(mlp, self.arch, self.units[role]))
            mlp.route_slot = self._slot
            mlp.register_forward_hook(dual_hook)
        self.base_width = getattr(self.mlps[0], FORMS[self.arch][1]).in_features

    @classmethod
    def from_args(cls, model: nn.Module, args: DualMLPArgs, config: Any) -> DualMLPTarget:
        """Build the target; with `use_vllm` in colocate mode, also write the engine's checkpoint (engine layout) to
        `output_dir/vllm_engine` and point `model.name_or_path` (what TRL builds its `LLM` from) at it. The KL
        reference is loaded from `model.config` and stays the base model."""
        target = cls(
            model,
            keep_units=args.dual_mlp_keep_units,
            quarantine_units=args.dual_mlp_quarantine_units,
            layers=args.dual_mlp_layers,
        )
        if getattr(config, "use_vllm", False) and getattr(config, "vllm_mode", None) == "colocate":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)  # vLLM reads it from the model's folder
            model.name_or_path = target.save_engine(os.path.join(config.output_dir, ENGINE_DIR), tokenizer)
        return target

    @staticmethod
    def resolve(model: nn.Module, layers: list[int] | None) -> tuple[str, list[int]]:
        """(architecture, chosen layer indices); ValueError naming `target` or `dual_mlp_layers`."""
        try:
            arch = detect_arch(model)
        except ValueError as e:
            raise ValueError(str(e).replace("sgtm:", "target: dual_mlp:")) from None
        try:
            return arch, resolve_layers(layers, len(layers_of(model)))
        except ValueError as e:  # the mask core's message names its own field
            raise ValueError(str(e).replace("masked_layers", "dual_mlp_layers")) from None

    @classmethod
    def probe(cls, model: nn.Module, args: DualMLPArgs, config: Any) -> None:
        """Architecture and layer indices against the (meta-device) model; no unit is drawn, nothing written."""
        cls.resolve(model, args.dual_mlp_layers)

    def _gate_holders(self) -> list[GateSlot]:
        return [self._slot]

    def _wrapped(self) -> Iterator[nn.Module]:
        return (self.mlps[i] for i in self.chosen)

    # ------------------------------------------------------------------ absorption metrics (route.targets.absorption)
    def record_row_grads(self, on: bool) -> bool:
        """Record each row's squared gradient norm on the kept and quarantine units in every gated backward."""
        self._slot.row_norms = RowSqNorms() if on else None
        return True

    def pop_row_grads(self) -> dict[str, Tensor] | None:
        return None if self._slot.row_norms is None else self._slot.row_norms.pop()

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def ablate(self, trainable: bool = False) -> None:
        """Remove the quarantine permanently: output columns zero; input rows zero and frozen, or (trainable) redrawn
        at the kept units' std (the deployed forward is unchanged either way)."""
        ins, out, _ = FORMS[self.arch]
        for mlp in self._wrapped():
            units = mlp.route_quarantine
            getattr(units, out).weight.zero_()
            for name in ins:
                lin = getattr(units, name)
                if trainable:
                    redraw_like_(lin.weight, getattr(mlp.route_keep, name).weight)
                else:
                    lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            units.requires_grad_(trainable)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: "keep" (kept units), "quarantine" (quarantine units), "shared" (anything
        else made trainable after construction; the base model is frozen)."""
        groups: dict[str, list[nn.Parameter]] = {KEEP: [], QUARANTINE: [], "shared": []}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                role = next((r for r, attr in UNIT_ATTRS.items() if f".{attr}." in name), "shared")
                groups[role].append(p)
        return groups

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def _export(self, scale: float, with_quarantine: bool, dtype: torch.dtype | None) -> dict[str, Tensor]:
        """The plain model's state dict, each layer's MLP widened by the kept units and (`with_quarantine`) the
        quarantine units, whose input rows are zero at scale 0 and whose output columns are times `scale`."""
        ins, out, _ = FORMS[self.arch]
        names = {id(m): n for n, m in self.model.named_modules()}
        attrs = tuple(UNIT_ATTRS.values())
        sd = {
            k: v.detach().clone() if dtype is None or not v.is_floating_point() else v.detach().to(dtype)
            for k, v in self.model.state_dict().items()
            if not any(f".{a}." in k for a in attrs)
        }
        roles = (KEEP, QUARANTINE) if with_quarantine else (KEEP,)
        factor = {KEEP: 1.0, QUARANTINE: scale}
        for i, mlp in enumerate(self.mlps):
            prefix = f"{names[id(mlp)]}."
            wrapped = i in self.chosen
            for name in (*ins, out):
                base = getattr(mlp, name)
                dim = 1 if name == out else 0
                parts = [base.weight.detach().float()]
                biases = None if base.bias is None or dim == 1 else [base.bias.detach().float()]
                for role in roles:
                    n = self.units[role]
                    units = getattr(getattr(mlp, UNIT_ATTRS[role]), name) if wrapped else None
                    w = (
                        units.weight.detach().float()
                        if units is not None
                        else base.weight.new_zeros(
                            (base.out_features, n) if dim else (n, base.in_features), dtype=torch.float32
                        )
                    )
                    f = factor[role] if dim == 1 or factor[role] == 0.0 else 1.0
                    parts.append(w * f if f != 1.0 else w)
                    if biases is not None:
                        b = units.bias.detach().float() if units is not None else w.new_zeros(n)
                        biases.append(b * f if f != 1.0 else b)
                cast = dtype or base.weight.dtype
                sd[prefix + name + ".weight"] = torch.cat(parts, dim=dim).to(cast)
                if biases is not None:
                    sd[prefix + name + ".bias"] = torch.cat(biases).to(cast)
        return sd

    def merged_state_dict(
        self, quarantine: bool = True, dtype: torch.dtype | None = None, scale: float | None = None
    ) -> dict[str, Tensor]:
        """The plain model's weights in the engine layout (every layer `base + keep + quarantine` units wide): the
        kept units as they are, the quarantine's output columns times `scale` (1 with `quarantine`, 0 without) and,
        at scale 0, its input rows zero too. The same shapes at every scale, so every vLLM push fits one engine.
        Merged in fp32, out of place, cast once; keys match the widened transformers model."""
        return self._export(export_scale(quarantine, scale), True, dtype)

    def plain_config(self, with_quarantine: bool) -> Any:
        """The transformers config of an export: `intermediate_size` widened by the new units."""
        config = copy.deepcopy(self.model.config)
        config.intermediate_size = (
            self.base_width + self.units[KEEP] + (self.units[QUARANTINE] if with_quarantine else 0)
        )
        return config

    def deployed_model(self, scale: float = 0.0) -> nn.Module:
        """A fresh plain transformers model of the policy at quarantine `scale`: widened by the kept units only at
        scale 0 (the quarantine units removed, not zeroed), by both (quarantine output times s) above."""
        with_quarantine = check_scale(scale) > 0.0
        plain = SimpleNamespace(
            config=self.plain_config(with_quarantine), generation_config=self.model.generation_config
        )
        return deployed_model(plain, self._export(scale, with_quarantine, None), self.name)

    def save_engine(self, output_dir: str, tokenizer: Any = None) -> str:
        """Write a plain checkpoint in the engine layout (the training policy, `save_deployed(scale=1)`) atomically;
        a vLLM engine for this target is built on it (server mode: serve it). Returns `output_dir`."""
        from route.utils.io import atomic_dir

        with atomic_dir(output_dir) as tmp:
            save_plain(self.deployed_model(scale=1.0), str(tmp), tokenizer)
        return output_dir


__all__ = ["DualMLPArgs", "DualMLPTarget", "MLPUnits"]
