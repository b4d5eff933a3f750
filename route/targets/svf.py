"""`svf`: singular-value fine-tuning whose quarantine is a reserved subspace of the singular-value deltas.

    y = W x + U_r ((Vh_r x) * (delta_keep + delta_quar)),    delta_quar = c @ V   (deploy: delta_quar = 0)

per adapted Linear, with U_r, S_r, Vh_r the frozen top-r SVD of W (`route.svd`: computed once, canonical signs,
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
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from route.masks import DEFAULT, FORGET, RowGate, encode_modes
from route.svd import svd_factors
from route.targets import register_target
from route.targets.common import (
    DEFAULT_MODULES,
    check_unmerged,
    deployed_model,
    plain_name,
    plain_state_dict,
    save_plain,
)
from route.targets.svf_peft import SVFConfig, SVFLayer

ADAPTER = "default"
VHACK_FORMAT = "route.vhack/1"
STRATEGY = "gradient_routing"


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


@register_target("svf")
class SVFTarget:
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
        progress: progress bar over the modules' SVDs.
    """

    def __init__(self, model: nn.Module, rank: int | None = None, target_modules: Sequence[str] | None = None,
                 reserve_axes: list[int] | None = None, hack_subspace: str | dict | None = None,
                 cache_dir: str | os.PathLike | None = None, *, erase: bool = False, erase_one_sided: bool = False,
                 score_threshold: float | None = None, progress: bool = True):
        from peft import PeftModel, get_peft_model

        if reserve_axes is not None and hack_subspace is not None:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: give one quarantine reservation, not both")
        if score_threshold is not None and not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"route_score_threshold: must be a number in [0, 1], got {score_threshold!r}")
        if not isinstance(model, PeftModel):
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
            layers = dict(_svf_layers(model))
            with torch.no_grad():
                for name, v in (subspace or {}).items():
                    layers[name].svf_basis[ADAPTER].copy_(v)
        self.model = model
        self.layers: list[tuple[str, SVFLayer]] = _svf_layers(model)
        if not self.layers:
            raise ValueError(f"svf: no module matched target_modules={target_modules}")
        self.erase, self.erase_one_sided = bool(erase), bool(erase_one_sided)
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        if (self.erase or self.score_threshold is not None) and not self.has_quarantine:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: erase and score routing need a hack subspace")
        self._records: dict[int, Tensor] = {}
        self._record_modes: Tensor | None = None
        self._pending: dict[int, Tensor] = {}
        self._rows = [0, 0]  # kept-gradient rows, rows routed by score, since the last optimizer step

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> SVFTarget:
        return cls(model, rank=config.svf_rank, target_modules=config.target_modules,
                   reserve_axes=config.svf_reserve_axes, hack_subspace=config.svf_hack_subspace,
                   cache_dir=config.svf_cache_dir, erase=config.intervention == "erase",
                   erase_one_sided=config.erase_one_sided,
                   score_threshold=config.route_score_threshold if config.route_score == "cosine" else None,
                   progress=not getattr(config, "disable_tqdm", False))

    @property
    def has_quarantine(self) -> bool:
        return any(layer.basis is not None for _, layer in self.layers)

    # ------------------------------------------------------------------ gating
    @contextlib.contextmanager
    def _set(self, state: list[tuple[RowGate | None, Callable | None]]) -> Iterator[None]:
        """Each layer's (gate, recorder) inside the context; the previous ones are restored on exit (nesting)."""
        saved = [(layer.svf_gate, layer.svf_recorder) for _, layer in self.layers]
        try:
            for (_, layer), (gate, recorder) in zip(self.layers, state, strict=True):
                layer.svf_gate, layer.svf_recorder = gate, recorder
            yield
        finally:
            for (_, layer), (g, r) in zip(self.layers, saved):
                layer.svf_gate, layer.svf_recorder = g, r

    def _use(self, gate: RowGate, record: bool) -> contextlib.AbstractContextManager:
        return self._set([(gate, self._recorder(i) if record else None) for i in range(len(self.layers))])

    def gate(self, modes: Tensor | Sequence[str]) -> contextlib.AbstractContextManager:
        """Per-row routing for the forwards inside the context (rows must match `modes`).

        With scoring on and gradients enabled, the per-row delta gradients of the next backward are recorded for
        `after_backward()`.
        """
        codes = encode_modes(modes)
        record = self.score_threshold is not None and torch.is_grad_enabled()
        if record:
            self._records, self._record_modes = {}, codes.cpu()
        return self._use(RowGate.from_modes(codes, strategy=STRATEGY), record)

    def ablated(self) -> contextlib.AbstractContextManager:
        """Forward as the deployed policy: delta_quar = 0."""
        return self._use(RowGate.ablated(), False)

    def recompute_context(self) -> contextlib.AbstractContextManager:
        """Every layer's gate now, re-entered for a checkpointed recompute; a recording layer records nothing there.

        The backward runs through the forward's graph, whose hooks record each row's gradient once; the recompute
        only rebuilds saved tensors (its hooks never fire), but it must take the same per-row path to save the same.
        """
        return self._set([(m.svf_gate, None if m.svf_recorder is None else _ignore) for _, m in self.layers])

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
    def merged_state_dict(self, quarantine: bool = True, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The plain model's state dict with delta_keep and, if `quarantine`, delta_quar merged.

        Merged in fp32, out of place, cast once (to `dtype`, default each weight's own dtype); the training weights
        are untouched. Keys match the un-wrapped transformers model (what the vLLM sync pushes).
        """
        check_unmerged(self.layers, "svf")
        out = plain_state_dict(self.model.get_base_model(), ".svf_", dtype)
        for name, layer in self.layers:
            weight = layer.get_base_layer().weight
            merged = weight.detach().float() + layer.get_delta_weight(ADAPTER, quarantine=quarantine)
            out[f"{name}.weight"] = merged.to(dtype or weight.dtype)
        return out

    def deployed_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """`merged_state_dict(quarantine=False)`: the deployed policy's plain weights."""
        return self.merged_state_dict(quarantine=False, dtype=dtype)

    def deployed_model(self) -> nn.Module:
        """A fresh plain transformers model holding `deployed_state_dict()`."""
        return deployed_model(self.model.get_base_model(), self.deployed_state_dict(), "svf")

    def save_deployed(self, output_dir: str, tokenizer=None) -> None:
        """Save the deployed policy as a plain transformers checkpoint (loadable without this library)."""
        save_plain(self.deployed_model(), output_dir, tokenizer)

    # ------------------------------------------------------------------ score routing and erase
    def _recorder(self, i: int) -> Callable[[Tensor], None]:
        def record(g: Tensor) -> None:
            g = g.float()
            prev = self._records.get(i)
            self._records[i] = g if prev is None else prev + g

        return record

    @torch.no_grad()
    def row_scores(self, grads: dict[int, Tensor]) -> Tensor:
        """|P g_b| / |g_b| per row for per-layer row gradients {layer index: (B, r)} (0 for a zero gradient)."""
        num = den = None
        for i, g in grads.items():
            basis = self.layers[i][1].basis
            sq = g.pow(2).sum(1)
            proj = (g @ basis.T).pow(2).sum(1) if basis is not None else torch.zeros_like(sq)
            num, den = (proj, sq) if num is None else (num + proj, den + sq)
        return torch.where(den > 0, (num / den.clamp_min(1e-30)).sqrt(), torch.zeros_like(den)).clamp(max=1.0)

    @torch.no_grad()
    def after_backward(self, candidates: Tensor | Sequence[bool]) -> dict[str, Tensor] | None:
        """Route the candidate rows of the last recorded backward whose score exceeds the threshold.

        Only default rows can be routed (their forward had the quarantine on and their gradient reached both parts).
        Their delta gradients are queued for removal from delta_keep's gradient in `before_optimizer_step()`.
        Returns {"scores": (B,), "routed": (B,) bool}, or None when nothing was recorded.
        """
        if self.score_threshold is None or not self._records or self._record_modes is None:
            return None
        records, modes = self._records, self._record_modes
        self._records, self._record_modes = {}, None
        scores = self.row_scores(records).cpu()
        cand = torch.as_tensor(candidates, dtype=torch.bool).view(-1).cpu()
        if cand.numel() != modes.numel():
            raise RuntimeError(f"svf: {cand.numel()} score candidates for a batch of {modes.numel()} rows")
        routed = cand & (modes == DEFAULT) & (scores > self.score_threshold)
        if routed.any():
            for i, g in records.items():
                share = g[routed.to(g.device)].sum(0)
                self._pending[i] = share if i not in self._pending else self._pending[i] + share
        self._rows[0] += int((modes != FORGET).sum())
        self._rows[1] += int(routed.sum())
        return {"scores": scores, "routed": routed}

    @torch.no_grad()
    def before_optimizer_step(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Apply the queued score routing, then `erase`, to the accumulated gradients; call once per optimizer step,
        after the last backward and before clipping. `reduce` averages a tensor over data-parallel processes (as
        DDP averages gradients); every process must call this. Returns logging stats."""
        stats: dict[str, float] = {}
        if self.score_threshold is not None:
            self._apply_routing(reduce or (lambda t: t))
        if self.erase:
            stats["erase/removed_norm_frac"] = self.erase_gradients()
        return stats

    def _apply_routing(self, reduce: Callable[[Tensor], Tensor]) -> None:
        rows = reduce(torch.tensor(self._rows, dtype=torch.float64, device=self._device))
        nothing_left = float(rows[0] - rows[1]) < 1e-9  # every kept-gradient row was routed: exactly zero
        for i, (_, layer) in enumerate(self.layers):
            dk = layer.delta_keep
            pending = self._pending.get(i)
            pending = torch.zeros(layer.rank, device=self._device) if pending is None else pending.to(self._device)
            pending = reduce(pending)
            if dk.grad is None:
                continue
            if nothing_left:
                dk.grad.zero_()
            else:
                dk.grad.sub_(pending.to(dk.grad.dtype))
        self._pending, self._rows = {}, [0, 0]

    @property
    def _device(self) -> torch.device:
        return self.layers[0][1].delta_keep.device

    @torch.no_grad()
    def erase_gradients(self) -> float:
        """Remove the hack-subspace component of delta_keep's gradient (see the module docstring); returns the
        removed share of the kept gradient's norm."""
        total = removed = 0.0
        for _, layer in self.layers:
            g, basis = layer.delta_keep.grad, layer.basis
            if g is None or basis is None:
                continue
            a = basis @ g.float()
            if self.erase_one_sided:
                a = a.clamp(max=0.0)
            part = a @ basis
            total += float(g.float().pow(2).sum())
            removed += float(part.pow(2).sum())
            g.sub_(part.to(g.dtype))
        return math.sqrt(removed / total) if total > 0 else 0.0


def _ignore(g: Tensor) -> None:
    """The recorder of a recompute: the forward's graph already records the gradient."""


def _svf_layers(model: nn.Module) -> list[tuple[str, SVFLayer]]:
    return [(plain_name(n), m) for n, m in model.named_modules() if isinstance(m, SVFLayer) and ADAPTER in m.svf_delta]


def _fit_subspace(model: nn.Module, subspace: dict[str, Tensor], rank: int | None,
                  target_modules: Sequence[str] | None) -> dict[str, Tensor]:
    """Check each basis against the module it names (adapted Linear, r columns) and orthonormalise its rows."""
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = SVFConfig(target_modules=list(target_modules or DEFAULT_MODULES))
    modules = dict(model.named_modules())
    adapted = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and check_target_module_exists(probe, n)]
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


__all__ = ["SVFTarget", "load_hack_subspace", "orthonormal_rows", "svd_factors"]
