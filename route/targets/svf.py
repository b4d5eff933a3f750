"""`svf`: singular-value fine-tuning whose quarantine is a reserved subspace of the singular-value deltas.

    y = W x + U_r ((Vh_r x) * (delta_keep + delta_quar)),    delta_quar = c @ V   (deploy: delta_quar = 0)

per adapted Linear, with U_r, S_r, Vh_r the frozen top-r SVD of W (`route.targets.svd`: computed once, canonical signs,
cached on disk by weight hash) and V (k x r) the reserved hack subspace: one-hot rows for `reserve_axes`, or the
rows of an extracted hack basis (`hack_subspace`, the `route.vhack/1` file) orthonormalised. The layers are a PEFT
tuner (`route.targets.svf_peft`), so the model stays a `PeftModel`; importing this module registers it, after
which `PeftModel.from_pretrained` loads a saved svf adapter (the SVD factors are recomputed or read from the cache).

    target = make_target("svf", model, rank=None, hack_subspace="runs/vhack/arith.pt")

Routing per rollout, as for the other targets (`route.masks.RowGate` on the per-row delta): forget rows train only
c, retain rows drop the quarantine, default rows train both. Two interventions act on the kept gradient instead:

- flag-free scoring (`score_threshold`): each rollout's delta gradient g_b (summed over tokens, per module, recorded
  in the one backward by a tensor hook) is scored by `|P g_b| / |g_b|`, the cosine between g_b concatenated over the
  modules and the hack subspace (P the orthogonal projection onto the block-diagonal span of the V's; unsigned, in
  [0, 1]). A candidate rollout (a default row; the trainer picks candidates, optionally only flagged ones) whose
  score exceeds the threshold is routed after the fact: its share g_b is removed from delta_keep's gradient. That is
  exactly what a forget row would have produced, because forward values and the backward into every other tensor
  are identical under forget and default, and its quarantine gradient (V g_b) is already in c's.
- `erase`: before the optimizer step the kept gradient's component in the hack subspace is removed (g -= V^T V g);
  `erase_one_sided` removes only the components along which the step -g would move delta_keep toward +v (the vhack
  file orients +v to raise the hack's log-prob), i.e. g -= V^T min(V g, 0). This acts on the gradient: AdamW's
  per-coordinate scaling can still give the update a small component along a non-axis V (exact for axes).

Departures from the seed (route2, proposal B): the quarantine is a subspace of the delta itself (no separate
quarantine LoRA); routing is per rollout by flag or by the gradient score, never per token; `ablate(trainable=True)`
zeroes c and leaves it trainable (d loss / d c does not depend on c, so no re-init is needed to reopen it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from route.masks import DEFAULT, FORGET, RETAIN, RowGate, encode_modes
from route.targets import register_target
from route.targets.base import CORE_INTERVENTIONS, TargetArgs, TargetBase, export_scale
from route.targets.common import DEFAULT_MODULES, check_target_modules, check_unmerged, plain_name, plain_state_dict
from route.targets.svd import svd_factors
from route.targets.svf_peft import SVFConfig, SVFLayer
from route.targets.svf_routing import (
    RowGradientRecorder,
    SVFRoutingMixin,
    deepspeed_refusal,
    ignore_gradient,
    uses_deepspeed,
)
from route.utils.fields import as_int_list, choice, rate

ADAPTER = "default"
VHACK_FORMAT = "route.vhack/1"
STRATEGY = "gradient_routing"
ROUTE_SCORES = ("none", "cosine")


def load_hack_subspace(path_or_dict: str | os.PathLike | dict) -> dict[str, Tensor]:
    """The `{plain module name: V (k, r)}` of a `route.vhack/1` file (or of that dict), validated, as float32."""
    data = path_or_dict
    if isinstance(path_or_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f"svf_hack_subspace: no such file: {path_or_dict}")
        data = torch.load(path_or_dict, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != VHACK_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"svf_hack_subspace: expected a dict with format {VHACK_FORMAT!r}, got {found!r}")
    sub = data.get("subspace")
    if not isinstance(sub, dict) or not sub:
        raise ValueError("svf_hack_subspace: 'subspace' must be a non-empty {module name: Tensor(k, r)} mapping")
    out = {}
    for name, v in sub.items():
        if not isinstance(name, str) or not isinstance(v, Tensor) or v.dim() != 2 or 0 in v.shape:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"svf_hack_subspace: entry {name!r} must be a non-empty Tensor(k, r), got {shape}")
        if not torch.isfinite(v).all():
            raise ValueError(f"svf_hack_subspace: entry {name!r} has non-finite values")
        out[name] = v.detach().float().cpu()
    return out


def orthonormal_rows(v: Tensor, what: str = "svf_hack_subspace") -> Tensor:
    """Rows of `v` (k, r) orthonormalised in order (Gram-Schmidt via QR); each row keeps its orientation."""
    k, r = v.shape
    if k > r:
        raise ValueError(f"{what}: a basis of {k} rows in {r} dimensions cannot be independent")
    q, rr = torch.linalg.qr(v.double().T)
    diag = torch.diagonal(rr)
    if diag.abs().min() <= 1e-8 * max(diag.abs().max().item(), 1e-30):
        raise ValueError(f"{what}: the {k} basis rows are linearly dependent")
    return (q * torch.sign(diag)).T.float().contiguous()


@dataclass
class SVFArgs(TargetArgs):
    """Settings of the `svf` target, its score routing and its `erase` intervention."""

    svf_rank: int | None = field(
        default=None,
        metadata={"help": "svf: singular pairs per module, min(svf_rank, out, in) (None: full rank). A hack subspace "
                          "must have been extracted at the same rank (route vhack --rank)."})
    svf_reserve_axes: list[int] | None = field(
        default=None, metadata={"help": "svf: quarantine = these singular axes (indices) of every module."})
    svf_hack_subspace: str | None = field(
        default=None,
        metadata={"help": "svf: quarantine = the hack subspace in this route.vhack/1 file (route vhack)."})
    svf_cache_dir: str | None = field(
        default=None, metadata={"help": "svf: SVD cache directory (None: $ROUTE_CACHE/svd)."})
    route_score: str = field(
        default="none",
        metadata={"help": "svf, intervention route: flag-free routing: none, or cosine (a rollout is routed when the "
                          "cosine |P g| / |g| between its per-rollout delta gradient g and the hack subspace exceeds "
                          "route_score_threshold; flags then no longer route by themselves).",
                  "choices": list(ROUTE_SCORES)})
    route_score_threshold: float = field(
        default=0.3, metadata={"help": "svf, route_score: the cosine (in [0, 1]) above which a rollout is routed."})
    route_score_requires_flag: bool = field(
        default=False,
        metadata={"help": "svf, route_score: route only flagged rollouts whose score exceeds the threshold (the flag "
                          "picks the rollouts, the subspace confirms); unflagged rollouts follow unflagged_mode."})
    erase_one_sided: bool = field(
        default=False,
        metadata={"help": "svf, intervention erase: remove only the components whose update would move the kept "
                          "delta toward +v (the hack direction), instead of the whole projection."})

    def validate(self, config: Any, target: str) -> None:
        rank = self.svf_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"svf_rank: must be an int >= 1 or None (full rank), got {rank!r}")
        axes = as_int_list("svf_reserve_axes", self.svf_reserve_axes, "axis indices")
        if axes is not None:
            if not axes or min(axes) < 0 or len(set(axes)) != len(axes):
                raise ValueError(f"svf_reserve_axes: must be distinct indices >= 0, got {self.svf_reserve_axes!r}")
        self.svf_reserve_axes = axes
        if axes is not None and self.svf_hack_subspace is not None:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: give one quarantine reservation, not both")
        if self.svf_hack_subspace is not None and not os.path.isfile(self.svf_hack_subspace):
            raise ValueError(f"svf_hack_subspace: no such file: {self.svf_hack_subspace} (write it with "
                             "route vhack)")
        choice("route_score", self.route_score, ROUTE_SCORES)
        rate("route_score_threshold", self.route_score_threshold)
        for name in ("route_score_requires_flag", "erase_one_sided"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if config is None:
            return
        if config.intervention in ("route", "erase") and axes is None and self.svf_hack_subspace is None:
            raise ValueError(f"svf_reserve_axes, svf_hack_subspace: target svf with intervention "
                             f"{config.intervention} needs a quarantine reservation; set one of them")
        if self.route_score != "none":
            if config.intervention != "route":
                raise ValueError(f"route_score: {self.route_score!r} needs intervention route, got intervention "
                                 f"{config.intervention!r}; allowed values here: ['none']")
            if config.unflagged_mode == "retain" and not self.route_score_requires_flag:
                raise ValueError("unflagged_mode: 'retain' conflicts with flag-free route_score (every rollout is a "
                                 "score candidate and runs in default mode); set route_score_requires_flag or "
                                 "unflagged_mode: default")
        if (config.intervention == "erase" or self.route_score != "none") and uses_deepspeed(config):
            raise deepspeed_refusal()
        if config.ddp_broadcast_buffers is None:
            # the SVD factors are buffers (as large as the model at full rank) and a pure function of the frozen
            # weights: DDP's default would re-broadcast them from rank 0 before every forward
            config.ddp_broadcast_buffers = False


@register_target("svf")
class SVFTarget(SVFRoutingMixin, TargetBase):
    """Singular-value deltas with a reserved hack subspace behind the `Target` interface.

    Args:
        model: a plain causal LM (wrapped with the `svf` PEFT tuner) or a `PeftModel` that already has it.
        rank: singular pairs per module, r = min(rank, out, in); None is full rank.
        target_modules: module names to adapt (default: every attention and MLP projection).
        reserve_axes: quarantine = these singular axes of every module (one-hot basis).
        hack_subspace: quarantine = a `route.vhack/1` file path or dict ({plain module name: V (k, r)}); modules
            it does not name get no quarantine.
        cache_dir: SVD cache directory (default `$ROUTE_CACHE/svd`).
        erase, erase_one_sided: remove the kept gradient's hack component before each optimizer step.
        score_threshold: record per-rollout delta gradients and route candidates whose score exceeds it.
        route_requires_flag: score routing considers only flagged rollouts (`route_score_requires_flag`).
        progress: progress bar over the modules' SVDs.
    """

    args_cls = SVFArgs
    interventions = (*CORE_INTERVENTIONS, "erase")
    gate_attrs = ("svf_gate", "svf_recorder")
    strategy = STRATEGY
    _absorb = False  # absorption metrics on: record per-row delta gradients (route.targets.absorption)

    def __init__(self, model: nn.Module, rank: int | None = None, target_modules: Sequence[str] | None = None,
                 reserve_axes: list[int] | None = None, hack_subspace: str | dict | None = None,
                 cache_dir: str | os.PathLike | None = None, *, erase: bool = False, erase_one_sided: bool = False,
                 score_threshold: float | None = None, route_requires_flag: bool = False, progress: bool = True):
        from peft import PeftModel, get_peft_model

        if reserve_axes is not None and hack_subspace is not None:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: give one quarantine reservation, not both")
        if score_threshold is not None:
            rate("route_score_threshold", score_threshold)
        if not isinstance(model, PeftModel):
            check_target_modules(model, target_modules)
            subspace = None
            if hack_subspace is not None:
                subspace = _fit_subspace(model, load_hack_subspace(hack_subspace), rank, target_modules)
            config = SVFConfig(
                rank=rank, target_modules=list(target_modules or DEFAULT_MODULES), task_type="CAUSAL_LM",
                reserve_axes=list(reserve_axes) if reserve_axes is not None else None,
                quarantine_dims={n: v.shape[0] for n, v in subspace.items()} if subspace else None,
                cache_dir=None if cache_dir is None else str(cache_dir), progress=progress,
                hack_subspace_source=None if isinstance(hack_subspace, dict | None) else str(hack_subspace))
            model = get_peft_model(model, config, adapter_name=ADAPTER)
            layers = dict(svf_layers(model))
            with torch.no_grad():
                for name, v in (subspace or {}).items():
                    layers[name].svf_basis[ADAPTER].copy_(v)
        self.model = model
        self.layers: list[tuple[str, SVFLayer]] = svf_layers(model)
        if not self.layers:
            raise ValueError(f"target_modules: no module of the model matched {target_modules}")
        self.erase, self.erase_one_sided = bool(erase), bool(erase_one_sided)
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.route_requires_flag = bool(route_requires_flag)
        if (self.erase or self.score_threshold is not None) and not self.has_quarantine:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: erase and score routing need a hack subspace")
        self._init_routing()

    @classmethod
    def from_args(cls, model: nn.Module, args: SVFArgs, config: Any) -> SVFTarget:
        return cls(model, rank=args.svf_rank, target_modules=config.target_modules,
                   reserve_axes=args.svf_reserve_axes, hack_subspace=args.svf_hack_subspace,
                   cache_dir=args.svf_cache_dir, erase=config.intervention == "erase",
                   erase_one_sided=args.erase_one_sided,
                   score_threshold=args.route_score_threshold if args.route_score == "cosine" else None,
                   route_requires_flag=args.route_score_requires_flag,
                   progress=not getattr(config, "disable_tqdm", False))

    @classmethod
    def probe(cls, model: nn.Module, args: SVFArgs, config: Any) -> None:
        """Names and shapes only (the SVD needs real weights): target_modules, and the hack subspace against them."""
        check_target_modules(model, config.target_modules)
        if args.svf_hack_subspace is not None:
            _fit_subspace(model, load_hack_subspace(args.svf_hack_subspace), args.svf_rank, config.target_modules)
        if args.svf_reserve_axes:
            for name, m in _adapted(model, config.target_modules).items():
                r = min(args.svf_rank or min(m.weight.shape), *m.weight.shape)
                if max(args.svf_reserve_axes) >= r:
                    raise ValueError(f"svf_reserve_axes: {list(args.svf_reserve_axes)} out of range for module {name} "
                                     f"of svf rank {r}; allowed values: 0 to {r - 1}")

    @property
    def has_quarantine(self) -> bool:
        return any(layer.basis is not None for _, layer in self.layers)

    # ------------------------------------------------------------------ gating
    def _gate_holders(self) -> list[SVFLayer]:
        return [layer for _, layer in self.layers]

    def _gate_state(self, gate: RowGate, holder_index: int, grad: bool) -> tuple:
        """(gate, recorder): with scoring on, a gated forward under autograd records each row's delta gradient."""
        record = grad and self._records_rows and not gate.is_ablated and not gate.dial
        return gate, self._recorder.hook(holder_index) if record else None

    def _recompute_state(self, state: tuple) -> tuple:
        """A recording layer records nothing in a checkpointed recompute: the backward runs through the forward's
        graph, whose hooks record each row's gradient once; the recompute only rebuilds saved tensors."""
        gate, recorder = state
        return gate, None if recorder is None else ignore_gradient

    def gate(self, modes: Tensor | Sequence[str], scale: float | None = None) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context (rows must match `modes`), the quarantine also
        multiplied by `scale` (None: 1).

        With scoring on and gradients enabled, the per-row delta gradients of the next backward are recorded for
        `score_rows()` (the `after_backward` hook).
        """
        codes = encode_modes(modes)
        if self._records_rows and torch.is_grad_enabled():
            self._recorder.pop()
            self._record_modes = codes.cpu()
        return super().gate(codes, scale)

    @contextlib.contextmanager
    def recording(self) -> Iterator[RowGradientRecorder]:
        """Inside: every layer runs per row (all rows in default mode) and every backward adds each row's delta
        gradient, summed over tokens, to the yielded recorder's `records` ({layer index: (B, r)}, float32): the
        recorder score routing uses, for callers such as `route.experiments.vhack`."""
        recorder = RowGradientRecorder()
        gate = RowGate.from_modes(torch.tensor([DEFAULT]), strategy=STRATEGY)  # all default: any batch size
        with self._install([(gate, recorder.hook(i)) for i in range(len(self.layers))]):
            yield recorder

    @property
    def _records_rows(self) -> bool:
        return self.score_threshold is not None or self._absorb

    # ------------------------------------------------------------------ absorption metrics
    def record_row_grads(self, on: bool) -> bool:
        """Record each row's delta gradient g_b in every gated backward (the recorder score routing uses); its
        kept norm is ||g_b||^2 (rows that are not forget) and its quarantine norm ||V g_b||^2 (rows that are not
        retain; dL_b/dc = g_b V^T)."""
        self._absorb = on
        return True

    @torch.no_grad()
    def pop_row_grads(self) -> dict[str, Tensor] | None:
        """The last backward's per-row norms; with score routing on, read before `score_rows` (the routing it then
        applies to some default rows is not reflected)."""
        if not self._absorb or not self._recorder.records or self._record_modes is None:
            return None
        records, modes = dict(self._recorder.records), self._record_modes
        if self.score_threshold is None:
            self._recorder.pop()
            self._record_modes = None
        keep = quar = 0.0
        for i, g in records.items():
            keep = keep + g.pow(2).sum(1)
            basis = self.layers[i][1].basis
            if basis is not None:
                quar = quar + (g @ basis.T.to(g)).pow(2).sum(1)
        keep = keep * (modes.to(keep.device) != FORGET)
        quar = torch.zeros_like(keep) if isinstance(quar, float) else quar * (modes.to(keep.device) != RETAIN)
        return {"keep": keep.cpu(), "quarantine": quar.cpu()}

    @torch.no_grad()
    def ablate(self, trainable: bool = False) -> None:
        """Remove the quarantine permanently: c = 0; frozen, or (trainable) left trainable (its gradient does not
        depend on c, so zero is a live re-init). The basis is kept."""
        for _, layer in self.layers:
            if layer.coef is None:
                continue
            layer.coef.zero_()
            layer.coef.requires_grad_(trainable)
            frozen = dict(layer.frozen_peft_weight_names)
            if trainable:
                frozen.pop(ADAPTER, None)
            else:
                frozen[ADAPTER] = ("svf_coef",)
            layer.frozen_peft_weight_names = frozen

    # ------------------------------------------------------------------ parameters
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: "keep" (deltas), "quarantine" (coefficients), "shared" (anything else)."""
        groups: dict[str, list[nn.Parameter]] = {"keep": [], "quarantine": [], "shared": []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if ".svf_coef." in name:
                groups["quarantine"].append(p)
            elif ".svf_delta." in name:
                groups["keep"].append(p)
            else:
                groups["shared"].append(p)
        return groups

    @torch.no_grad()
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None,
                          scale: float | None = None) -> dict[str, Tensor]:
        """The plain model's state dict with delta_keep and, if `quarantine`, delta_quar merged (times `scale` if
        given: the policy of `scaled(scale)`).

        Merged in fp32, out of place, cast once (to `dtype`, default each weight's own dtype); the training weights
        are untouched. Keys match the un-wrapped transformers model (what the vLLM sync pushes).
        """
        check_unmerged(self.layers, "svf")
        scale = export_scale(quarantine, scale)
        out = plain_state_dict(self.model.get_base_model(), ".svf_", dtype)
        for name, layer in self.layers:
            weight = layer.get_base_layer().weight
            merged = weight.detach().float() + layer.get_delta_weight(ADAPTER, quarantine=scale)
            out[f"{name}.weight"] = merged.to(dtype or weight.dtype)
        return out


def svf_layers(model: nn.Module) -> list[tuple[str, SVFLayer]]:
    return [(plain_name(n), m) for n, m in model.named_modules() if isinstance(m, SVFLayer) and ADAPTER in m.svf_delta]


def _adapted(model: nn.Module, target_modules: Sequence[str] | None) -> dict[str, nn.Linear]:
    """{name: Linear} of the modules the svf tuner adapts."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = SVFConfig(target_modules=list(target_modules or DEFAULT_MODULES))
    return {n: m for n, m in model.named_modules()
            if n and isinstance(m, nn.Linear) and check_target_module_exists(probe, n)}


def _fit_subspace(model: nn.Module, subspace: dict[str, Tensor], rank: int | None,
                  target_modules: Sequence[str] | None) -> dict[str, Tensor]:
    """Check each basis against the module it names (adapted Linear, r columns) and orthonormalise its rows."""
    modules = dict(model.named_modules())
    adapted = list(_adapted(model, target_modules))
    out = {}
    for name, v in subspace.items():
        m = modules.get(name)
        if name not in adapted:
            raise ValueError(f"svf_hack_subspace: {name!r} is not an adapted module of this model; adapted modules "
                             f"look like {adapted[:3]}")
        r = min(rank or min(m.weight.shape), *m.weight.shape)
        if v.shape[1] != r:
            raise ValueError(f"svf_hack_subspace: {name}: the basis has {v.shape[1]} columns but the module's svf "
                             f"rank is {r} (svf_rank={rank}); extract the subspace with the same rank")
        out[name] = orthonormal_rows(v, f"svf_hack_subspace: {name}")
    return out


__all__ = ["SVFArgs", "SVFTarget", "load_hack_subspace", "orthonormal_rows", "svd_factors", "svf_layers"]
