"""PEFT tuner `svf`: singular-value deltas with a reserved quarantine subspace on each adapted Linear.

    y = W x + U_r ((Vh_r x) * (delta_keep + delta_quar)),     delta_quar = c @ V

with U_r, S_r, Vh_r the frozen top-r canonical SVD of W (`route.targets.svd`), `delta_keep` (r,) trainable, and the
quarantine given by a basis V (k x r, orthonormal rows) with trainable coefficients c (k,). An axis reservation is
the basis of one-hot rows, so `c @ V` is `scatter(c, axes)`. Both deltas start at zero: the adapted model equals the
base model exactly.

Registered with PEFT (`register_peft_method`; PEFT 0.21 only accepts names of its `PeftType` enum, so the enum is
extended by one member, `SVF`), so `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained` and
`merge_and_unload` work once this module is imported. What an adapter checkpoint holds: `svf_delta` (keep),
`svf_coef` (quarantine coefficients) and `svf_basis` (V). The SVD factors are not saved (they are as large as the
model at full rank); loading recomputes them from the base weights or reads them from the cache, and the canonical
signs make the recompute reproducible.

Per-row routing: the target sets `layer.svf_gate` (a `route.masks.RowGate`) for the forwards inside its contexts;
the per-row delta `w_b = gate.kept(delta_keep) + gate.quarantine(delta_quar)` has shape (B, r), so forget rows send
gradient only into c, retain rows drop the quarantine, and one forward and backward serve a mixed batch. With
`layer.svf_recorder` set, the gradient of the loss with respect to each row's w_b (the per-rollout delta gradient,
summed over tokens) is handed to the recorder during the backward: no second backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType, register_peft_method
from torch import Tensor, nn

from route.targets.common import DEFAULT_MODULES
from route.targets.svd import svd_factors

NAME, PREFIX = "svf", "svf_"


def _peft_type() -> PeftType:
    """`PeftType.SVF`, added to PEFT's enum on first use (PEFT keys its registries by enum member)."""
    key = NAME.upper()
    if key not in PeftType.__members__:
        member = str.__new__(PeftType, key)
        member._name_, member._value_ = key, key
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        type.__setattr__(PeftType, key, member)
        PeftType._member_map_[key] = member
        PeftType._value2member_map_[key] = member
        PeftType._member_names_.append(key)
    return PeftType[key]


@dataclass
class SVFConfig(PeftConfig):
    """Configuration of the `svf` tuner (see the module docstring)."""

    rank: int | None = field(default=None, metadata={"help": "Singular pairs per module (None: full rank)."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex of the Linears to adapt (None: every "
                                        "attention and MLP projection)."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    reserve_axes: list[int] | None = field(
        default=None, metadata={"help": "Quarantine = these singular axes of every adapted module."})
    quarantine_dims: dict[str, int] | None = field(
        default=None, metadata={"help": "Quarantine = a basis of this many rows per module (plain module name); "
                                        "the basis itself is part of the adapter weights (`svf_basis`)."})
    cache_dir: str | None = field(default=None, metadata={"help": "SVD cache directory (None: $ROUTE_CACHE/svd)."})
    hack_subspace_source: str | None = field(
        default=None, metadata={"help": "Where the quarantine basis came from (informational)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over the modules' SVDs."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = _peft_type()
        if self.rank is not None and int(self.rank) < 1:
            raise ValueError(f"svf_rank: must be >= 1 or None (full rank), got {self.rank!r}")
        if self.reserve_axes is not None and self.quarantine_dims is not None:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: give one quarantine reservation, not both")
        if self.reserve_axes is not None:
            axes = [int(a) for a in self.reserve_axes]
            if not axes or min(axes) < 0 or len(set(axes)) != len(axes):
                raise ValueError(f"svf_reserve_axes: must be distinct indices >= 0, got {self.reserve_axes!r}")
            self.reserve_axes = axes
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_MODULES)
        elif isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)


class SVFLayer(nn.Module, BaseTunerLayer):
    """An adapted `nn.Linear`: the base layer plus the singular-value deltas of each adapter."""

    adapter_layer_names = ("svf_delta", "svf_coef")
    other_param_names = ("svf_U", "svf_S", "svf_Vh", "svf_basis", "svf_rank")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SVFConfig,
                 factors: tuple[Tensor, Tensor, Tensor], basis: Tensor | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.svf_delta = nn.ParameterDict({})
        self.svf_coef = nn.ParameterDict({})
        self.svf_U = BufferDict({}, persistent=False)
        self.svf_S = BufferDict({}, persistent=False)
        self.svf_Vh = BufferDict({}, persistent=False)
        self.svf_basis = BufferDict({}, persistent=True)
        self.svf_rank: dict[str, int] = {}
        self.svf_gate: Any = None  # a RowGate while a target context is active
        self.svf_recorder: Callable[[Tensor], None] | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self._primary = adapter_name  # the adapter the properties below refer to
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"svf: only nn.Linear modules can be adapted, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, factors, basis)

    def update_layer(self, adapter_name: str, config: SVFConfig, factors: tuple[Tensor, Tensor, Tensor],
                     basis: Tensor | None) -> None:
        u, s, vh = factors
        r = s.numel()
        self.svf_rank[adapter_name] = r
        self.svf_U[adapter_name], self.svf_S[adapter_name], self.svf_Vh[adapter_name] = u, s, vh
        self.svf_delta[adapter_name] = nn.Parameter(torch.zeros(r, device=s.device))
        if basis is not None:
            if basis.dim() != 2 or basis.shape[1] != r:
                raise ValueError(f"svf: quarantine basis must be (k, {r}), got {tuple(basis.shape)}")
            self.svf_basis[adapter_name] = basis.float().to(s.device)
            self.svf_coef[adapter_name] = nn.Parameter(torch.zeros(basis.shape[0], device=s.device))
        self._move_adapter_to_device_of_base_layer(adapter_name)  # U, Vh follow the base layer's dtype
        for d in (self.svf_delta, self.svf_coef):  # deltas, S and the basis stay float32 whatever the base dtype
            if adapter_name in d and d[adapter_name].dtype != torch.float32:
                d[adapter_name] = nn.Parameter(d[adapter_name].float())
        for d in (self.svf_S, self.svf_basis):
            if adapter_name in d:
                d[adapter_name] = d[adapter_name].float()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ------------------------------------------------------------------ the primary adapter's tensors
    @property
    def delta_keep(self) -> nn.Parameter:
        """The kept delta (r,)."""
        return self.svf_delta[self._primary]

    @property
    def coef(self) -> nn.Parameter | None:
        """The quarantine coefficients (k,), or None without a quarantine."""
        return self.svf_coef[self._primary] if self._primary in self.svf_coef else None

    @property
    def basis(self) -> Tensor | None:
        """The quarantine basis V (k, r), orthonormal rows, or None without a quarantine."""
        return self.svf_basis[self._primary] if self._primary in self.svf_basis else None

    @property
    def rank(self) -> int:
        return self.svf_rank[self._primary]

    @property
    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U_r, S_r, Vh_r) of the base weight."""
        a = self._primary
        return self.svf_U[a], self.svf_S[a], self.svf_Vh[a]

    # ------------------------------------------------------------------ the deltas
    def quarantine_delta(self, adapter: str) -> Tensor | None:
        """delta_quar = c @ V (r,), or None when this module has no quarantine."""
        if adapter not in self.svf_coef:
            return None
        basis = self.svf_basis[adapter]
        return self.svf_coef[adapter].to(basis.dtype) @ basis

    def _row_delta(self, adapter: str, x: Tensor) -> Tensor:
        """The delta this forward uses: (r,) shared by every row, or (B, 1.., r) per row under a gate."""
        dk, dq = self.svf_delta[adapter], self.quarantine_delta(adapter)
        gate, recorder = self.svf_gate, self.svf_recorder
        if gate is not None and gate.is_ablated:
            return dk
        record = recorder is not None and torch.is_grad_enabled() and (
            dk.requires_grad or (dq is not None and dq.requires_grad))
        if gate is None or (gate.all_default and not record):
            return dk if dq is None else dk + dq
        rows = x.shape[0]
        w = gate.kept(dk.unsqueeze(0).expand(rows, -1))
        if dq is not None:
            w = w + gate.quarantine(dq.unsqueeze(0).expand(rows, -1))
        if record:
            w.register_hook(lambda g: recorder(g.detach()))
        return w.view(rows, *([1] * (x.dim() - 2)), -1)

    def get_delta_weight(self, adapter: str, quarantine: bool | float = True) -> Tensor:
        """U_r diag(delta) Vh_r in float32 (delta = delta_keep, plus delta_quar if `quarantine`; a float in [0, 1]
        scales delta_quar: the quarantine-scale dial)."""
        w = self.svf_delta[adapter].detach().float()
        dq = self.quarantine_delta(adapter)
        if quarantine and dq is not None:
            w = w + dq.detach().float() * float(quarantine)
        return (self.svf_U[adapter].float() * w) @ self.svf_Vh[adapter].float()

    # ------------------------------------------------------------------ PEFT merge protocol
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.svf_delta:
                continue
            weight = self.get_base_layer().weight
            merged = (weight.data.float() + self.get_delta_weight(adapter)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {adapter} seems to be broken")
            weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_layer().weight
            weight.data = (weight.data.float() - self.get_delta_weight(adapter)).to(weight.dtype)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.svf_delta:
                continue
            vh, u = self.svf_Vh[adapter], self.svf_U[adapter]
            z = F.linear(x.to(vh.dtype), vh)
            w = self._row_delta(adapter, x)
            result = result + F.linear(z * w.to(z.dtype), u).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "svf." + super().__repr__()


class SVFModel(BaseTuner):
    """The `svf` tuner: replaces each targeted Linear by an `SVFLayer` (SVDs with a progress bar over the model)."""

    prefix: str = PREFIX
    tuner_layer_cls = SVFLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        config = self.peft_config[adapter_name]
        total = sum(1 for key, m in model.named_modules()
                    if key and isinstance(m, nn.Linear) and self._check_target_module_exists(config, key))
        self._svf_bar = tqdm(total=total, desc="svf: SVD", unit="module", disable=not config.progress)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._svf_bar.close()

    def _create_and_replace(self, config: SVFConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs: Any) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"svf: target module {current_key} is a {type(base).__name__}; only nn.Linear is "
                            "supported (check target_modules)")
        if base.weight.device.type == "meta":
            raise ValueError("svf: cannot compute the SVD of weights on the meta device (low_cpu_mem_usage=True)")
        factors = svd_factors(base.weight, config.rank, config.cache_dir)
        if hasattr(self, "_svf_bar"):
            self._svf_bar.update(1)
        basis = _initial_basis(config, current_key, factors[1].numel())
        if isinstance(target, SVFLayer):
            target.update_layer(adapter_name, config, factors, basis)
            return
        new_module = SVFLayer(target, adapter_name, config, factors, basis)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


def _initial_basis(config: SVFConfig, key: str, rank: int) -> Tensor | None:
    """One-hot rows for an axis reservation; zeros of the recorded shape for a basis (filled by the target or the
    loaded adapter weights); None for a module without quarantine."""
    if config.reserve_axes is not None:
        bad = [a for a in config.reserve_axes if a >= rank]
        if bad:
            raise ValueError(f"svf_reserve_axes: axes {bad} out of range for module {key} of rank {rank}; allowed "
                             f"values: 0 to {rank - 1}")
        return torch.eye(rank)[config.reserve_axes]
    k = (config.quarantine_dims or {}).get(key, 0)
    return torch.zeros(int(k), rank) if k else None


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    if _peft_type() not in PEFT_TYPE_TO_TUNER_MAPPING:  # idempotent (module reloads)
        register_peft_method(name=NAME, config_cls=SVFConfig, model_cls=SVFModel, prefix=PREFIX)


_register()

__all__ = ["SVFConfig", "SVFLayer", "SVFModel"]
