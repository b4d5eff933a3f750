"""Who samples each rollout: the rollout-time quarantine scale and coherence slots (docs/targets.md#rollout-scale).

- `rollout_quarantine_scale`: rollouts are sampled by the policy `target.scaled(s)`, s a fixed number in [0, 1]
  (1 is `generation_policy: full`, 0 is `deployed`), a draw from U(0, 1) (`uniform`), a draw from a set (`0,0.5`),
  or `ema`: a controller that moves s so that an exponential moving average of the monitor's flag rate (the flags
  the trainer routes on, never ground truth) approaches a target rate. One s per generation batch; draws are pure
  functions of (seed, global step), and the controller's state is stored in the checkpoint's trainer state.
- `coherence_fraction`: that share of each generation batch's GRPO groups (whole groups) is sampled by the deployed
  policy (scale 0); their unflagged rollouts run in `retain` mode (forward without the quarantine, gradient only into
  the kept part), flagged ones are routed as everywhere (forget). Which groups, a pure function of (seed, step).

By default only sampling changes: the training forward is the per-row gate, as under `generation_policy`; with
`rollout_train_scale: sampled` it is the per-row gate at the batch's scale (`train_scale`, `RowGate.at_scale`). TRL's
scoring forward that feeds vLLM's importance-sampling ratio runs as the sampling policy (`scoring_scale`), and
`old_per_token_logps` are recomputed under the gate for every row not scored as its gate (`scored_as_gate`), so the
first PPO ratio is 1.
The vLLM sync pushes the weights of `scaled(s)` (`route.vllm.sync.TargetWeightSync.use_scale`).

Choices where the issue describing these settings (a published routing recipe for RL) is silent: one scale per
generation batch, not per rollout (one vLLM weight push per batch); rows sampled at s < 1 train through the usual
gated forward (at full scale, off-policy by the quarantine's share, as under `generation_policy: deployed`); a flagged
rollout in a coherence slot is routed into the quarantine, so the kept part never trains on a flagged rollout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from route.monitors.detectors import uniform

if TYPE_CHECKING:  # torch and transformers load lazily: `route.experiments.report` reads EMA_DEFAULTS without them
    from torch import Tensor
    from transformers import TrainerCallback

SCALE_KINDS = ("a number in [0, 1]", "uniform", "a comma-separated set of numbers in [0, 1] (e.g. 0,0.5)", "ema")
# The EMA controller's fields and defaults (a non-default value needs `rollout_quarantine_scale: ema`).
EMA_DEFAULTS = {
    "rollout_scale_target_rate": 0.1,
    "rollout_scale_ema_weight": 0.9,
    "rollout_scale_gain": 1.0,
    "rollout_scale_min": 0.0,
    "rollout_scale_max": 1.0,
}
STATE_KEY = "rollout_scale_controller"  # its key in the trainer state's `stateful_callbacks` (trainer_state.json)


@dataclass(frozen=True)
class ScaleSpec:
    """A parsed `rollout_quarantine_scale`: kind "fixed" | "uniform" | "set" | "ema", with the values of fixed/set."""

    kind: str
    values: tuple[float, ...] = ()

    def canonical(self) -> str:
        """The field's normalised spelling (a set sorted and deduplicated; numbers as `float` prints them)."""
        return ",".join(repr(v) for v in self.values) if self.kind in ("fixed", "set") else self.kind


def _error(value: Any) -> ValueError:
    return ValueError(f"rollout_quarantine_scale: invalid value {value!r}; allowed values: {list(SCALE_KINDS)}")


def parse_scale(value: Any) -> ScaleSpec | None:
    """`rollout_quarantine_scale` (None, a number, `uniform`, `ema`, a comma-separated string or a list of numbers)
    as a `ScaleSpec`; ValueError naming the field and the allowed values otherwise."""
    if value is None or isinstance(value, ScaleSpec):
        return value
    if isinstance(value, str) and value.strip().lower() in ("uniform", "ema"):
        return ScaleSpec(value.strip().lower())
    items = (
        [v.strip() for v in value.split(",")]
        if isinstance(value, str)
        else (list(value) if isinstance(value, (list, tuple)) else [value])
    )
    try:
        numbers = [float(v) for v in items if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise _error(value) from None
    if not numbers or len(numbers) != len(items) or not all(0.0 <= v <= 1.0 for v in numbers):
        raise _error(value)
    numbers = sorted(set(numbers))
    return ScaleSpec("fixed" if len(numbers) == 1 else "set", tuple(numbers))


def check_rollout(config: Any) -> None:
    """Validate and normalise the rollout fields of a config (ValueError naming the field and the allowed values)."""
    spec = parse_scale(config.rollout_quarantine_scale)
    config.rollout_quarantine_scale = None if spec is None else spec.canonical()
    if spec is not None and config.generation_policy == "deployed" and spec != ScaleSpec("fixed", (0.0,)):
        raise ValueError(
            f"generation_policy, rollout_quarantine_scale: generation_policy=deployed is "
            f"rollout_quarantine_scale=0 but rollout_quarantine_scale={spec.canonical()!r} was given; "
            "set only rollout_quarantine_scale (generation_policy full, the default, defers to it)"
        )
    for name, default in EMA_DEFAULTS.items():
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: must be a finite number, got {v!r}")
        if v != default and (spec is None or spec.kind != "ema"):
            raise ValueError(f"{name}: only used with rollout_quarantine_scale=ema (got {v!r}, default {default})")
    if not 0.0 <= config.rollout_scale_target_rate <= 1.0:
        raise ValueError(f"rollout_scale_target_rate: must be in [0, 1], got {config.rollout_scale_target_rate!r}")
    if not 0.0 <= config.rollout_scale_ema_weight < 1.0:
        raise ValueError(f"rollout_scale_ema_weight: must be in [0, 1), got {config.rollout_scale_ema_weight!r}")
    if not config.rollout_scale_gain > 0:
        raise ValueError(f"rollout_scale_gain: must be > 0, got {config.rollout_scale_gain!r}")
    if not 0.0 <= config.rollout_scale_min <= config.rollout_scale_max <= 1.0:
        raise ValueError(
            f"rollout_scale_min, rollout_scale_max: need 0 <= min <= max <= 1, got "
            f"{config.rollout_scale_min!r}, {config.rollout_scale_max!r}"
        )
    if getattr(config, "rollout_train_scale", "full") == "sampled" and spec is None:
        raise ValueError(
            "rollout_train_scale: sampled trains each row at the scale that sampled it, which "
            "rollout_quarantine_scale sets; set rollout_quarantine_scale (a number, uniform, a set or ema) or "
            "rollout_train_scale: full"
        )
    f = config.coherence_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f < 1.0:
        raise ValueError(f"coherence_fraction: must be a number in [0, 1), got {f!r}")
    if f > 0 and getattr(config, "use_vllm", False):
        raise ValueError(
            "coherence_fraction: not supported with use_vllm (a batch sampled by two policies would need "
            "two weight pushes per step); set coherence_fraction: 0 or use_vllm: false"
        )


def effective_spec(config: Any) -> ScaleSpec:
    """The sampling scale rule in force: `rollout_quarantine_scale`, else `generation_policy` (full 1, deployed 0)."""
    spec = parse_scale(config.rollout_quarantine_scale)
    if spec is not None:
        return spec
    return ScaleSpec("fixed", (0.0 if config.generation_policy == "deployed" else 1.0,))


def only_full(config: Any) -> bool:
    """Whether every rollout is sampled by the training policy (scale 1 and no coherence slots)."""
    return effective_spec(config) == ScaleSpec("fixed", (1.0,)) and not config.coherence_fraction


def draw_scale(spec: ScaleSpec, seed: int, step: int, controlled: float | None = None) -> float:
    """The sampling scale of the generation batch at global `step`: a pure function of (seed, step) (`ema`: the
    controller's current scale, `controlled`)."""
    if spec.kind == "fixed":
        return spec.values[0]
    if spec.kind == "ema":
        if controlled is None:
            raise ValueError("draw_scale: an ema rule needs the controller's scale")
        return float(controlled)
    u = uniform(seed, f"rollout_scale|{step}")
    return u if spec.kind == "uniform" else spec.values[min(int(u * len(spec.values)), len(spec.values) - 1)]


def coherence_groups(fraction: float, n_groups: int, seed: int, step: int) -> list[bool]:
    """Which of a generation batch's `n_groups` GRPO groups are coherence slots (a pure function of (seed, step)).

    k = floor(fraction * n) groups, plus one with probability equal to the remainder (stochastic rounding: the
    expected share is exactly `fraction`); the k are those with the smallest per-group draws."""
    if not fraction:
        return [False] * n_groups
    exact = fraction * n_groups
    k = math.floor(exact) + (uniform(seed, f"coherence_k|{step}") < exact - math.floor(exact))
    order = sorted(range(n_groups), key=lambda g: uniform(seed, f"coherence|{step}|{g}"))
    chosen = set(order[:k])
    return [g in chosen for g in range(n_groups)]


def coherence_modes(modes: Tensor, coherence: Tensor) -> Tensor:
    """Rows of coherence slots run in `retain` mode (kept part only, forward at scale 0), except flagged (forget)
    rows, which are routed as everywhere; out of place."""
    import torch

    from route.masks import FORGET, RETAIN

    return torch.where(coherence.to(modes.device) & (modes != FORGET), torch.full_like(modes, RETAIN), modes)


def scored_as_gate(modes: Tensor, score_scale: float, train_scale: float = 1.0) -> Tensor:
    """Rows whose log-probs under the policy at `score_scale` equal the gated forward's at `train_scale`: retain rows
    run at scale 0, every other mode at `train_scale` (its values are `scaled(train_scale)`'s)."""
    from route.masks import RETAIN

    retain = modes == RETAIN
    return (retain & (score_scale == 0.0)) | (~retain & (score_scale == train_scale))


def sampling_context(target: Any, scale: float) -> contextlib.AbstractContextManager:
    """The forward of the policy at quarantine `scale`: 1 ungated (the training policy), 0 `target.ablated()`, in
    between `target.scaled(scale)`."""
    if scale == 1.0:
        return contextlib.nullcontext()
    return target.ablated() if scale == 0.0 else target.scaled(scale)


class ScaleController:
    """`ema`: s <- clip(s + gain * (target - ema), min, max) after each training batch, where
    ema <- weight * ema + (1 - weight) * flag_rate (the first rate starts it). s starts at max."""

    def __init__(self, target_rate: float, ema_weight: float, gain: float, lo: float, hi: float):
        self.target_rate, self.ema_weight, self.gain, self.lo, self.hi = target_rate, ema_weight, gain, lo, hi
        self.scale, self.ema, self.updates = hi, None, 0

    def observe(self, flag_rate: float) -> None:
        w = self.ema_weight
        self.ema = flag_rate if self.ema is None else w * self.ema + (1 - w) * flag_rate
        self.scale = min(self.hi, max(self.lo, self.scale + self.gain * (self.target_rate - self.ema)))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "ema": self.ema, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.ema, self.updates = float(state["scale"]), state["ema"], int(state["updates"])


@dataclass
class RolloutPlan:
    """Who samples one generation batch: its scale, and per row (this process's rows) whether it is a coherence
    slot; `all_coherence` covers the whole batch over every process (for the controller)."""

    step: int
    scale: float
    coherence: Tensor
    all_coherence: Tensor

    def row_scales(self) -> list[float]:
        return [0.0 if c else self.scale for c in self.coherence.tolist()]


def controller_state(controller: ScaleController) -> TrainerCallback:
    """A callback that keeps the controller's state in `TrainerState.stateful_callbacks` (saved with every checkpoint
    in trainer_state.json) and reads it back when a resumed run begins."""
    from transformers import TrainerCallback

    class ControllerState(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            saved = (state.stateful_callbacks or {}).get(STATE_KEY)
            if saved:
                controller.load_state_dict(saved)

        def on_step_end(self, args, state, control, **kwargs):
            state.stateful_callbacks[STATE_KEY] = controller.state_dict()

    return ControllerState()


class RolloutSampler:
    """The trainer's sampling policy per generation batch (`plan`, `generating`, `scoring_scale`) and the coherence
    and controller bookkeeping (`route`, `observe`)."""

    def __init__(self, config: Any, target: Any):
        self.spec, self.seed, self.fraction = effective_spec(config), int(config.seed), float(config.coherence_fraction)
        self.target = target
        self.sampled = getattr(config, "rollout_train_scale", "full") == "sampled"  # train rows at their scale
        self.logs = config.rollout_quarantine_scale is not None or self.fraction > 0  # defaults log nothing new
        self.controller = None
        if self.spec.kind == "ema":
            self.controller = ScaleController(*(getattr(config, k) for k in EMA_DEFAULTS))

    def callbacks(self) -> list[TrainerCallback]:
        return [] if self.controller is None else [controller_state(self.controller)]

    def plan(
        self, step: int, n_rows: int, process_index: int, num_processes: int, group_size: int, training: bool
    ) -> RolloutPlan:
        import torch

        scale = draw_scale(self.spec, self.seed, step, self.controller.scale if self.controller else None)
        total = n_rows * num_processes
        n_groups = -(-total // group_size)  # a partial group at the end only when called outside TRL's batching
        groups = coherence_groups(self.fraction if training else 0.0, n_groups, self.seed, step)
        every = torch.tensor([groups[i // group_size] for i in range(total)], dtype=torch.bool)
        mine = every[process_index * n_rows : (process_index + 1) * n_rows]
        return RolloutPlan(step=step, scale=scale, coherence=mine, all_coherence=every)

    def begin(self, trainer: Any, n_rows: int) -> tuple[RolloutPlan, float]:
        """The plan of the batch `trainer` is about to generate (this process's `n_rows` rows) and its scoring scale."""
        acc, training, a = trainer.accelerator, trainer.model.training, trainer.args
        group = trainer.num_generations if training else trainer.num_generations_eval
        plan = self.plan(trainer.state.global_step, n_rows, acc.process_index, acc.num_processes, group, training)
        return plan, self.scoring_scale(plan, a.use_vllm and a.vllm_importance_sampling_correction)

    def train_scale(self, plan: RolloutPlan) -> float:
        """The quarantine scale of the batch's training forward: the sampling scale under `rollout_train_scale:
        sampled`, else 1. Coherence slots' rows train at it too (retain rows have no quarantine at any scale)."""
        return plan.scale if self.sampled else 1.0

    def scoring_scale(self, plan: RolloutPlan, vllm_is: bool) -> float:
        """The scale of TRL's scoring forward: the sampling policy's when vLLM's IS ratio is computed from it (its
        denominator is the engine's sampling log-probs) or when rows train at it, else the training policy (1)."""
        return plan.scale if vllm_is or self.sampled else 1.0

    @contextlib.contextmanager
    def generating(self, trainer: Any, plan: RolloutPlan) -> Iterator[None]:
        """Sampling of `plan`'s batch: the vLLM push at its scale, the HF forward at its scale; with coherence rows,
        TRL's `_generate_single_turn` runs once per scale on that scale's rows (an instance-level override for the
        duration of this one generation)."""
        if trainer.weight_sync is not None and trainer.weight_sync.use_scale(plan.scale):
            trainer._last_loaded_step = -1  # the engine holds another scale's weights: push again before sampling
        scales = plan.row_scales()
        if len(set(scales)) <= 1:
            with sampling_context(self.target, scales[0] if scales else plan.scale):
                yield
            return
        trainer._generate_single_turn = _split_by_scale(trainer, self.target, scales)
        try:
            yield
        finally:
            del trainer._generate_single_turn

    def route(self, modes: Tensor, candidates: Tensor | None, plan: RolloutPlan) -> tuple[Tensor, Tensor | None]:
        """Coherence rows in retain mode (`coherence_modes`) and out of a target's score routing (not candidates)."""
        if not bool(plan.coherence.any()):
            return modes, candidates
        modes = coherence_modes(modes, plan.coherence)
        if candidates is not None:
            candidates = candidates.bool() & ~plan.coherence.to(candidates.device)
        return modes, candidates

    def observe(self, all_flags: Sequence[bool], plan: RolloutPlan, metrics: dict) -> None:
        """After a training batch is flagged: the controller sees the flag rate of the rows sampled at its scale
        (not the coherence slots); the scale, the EMA and the coherence share are logged."""
        if not self.logs:
            return
        scaled = [bool(f) for f, c in zip(all_flags, plan.all_coherence.tolist(), strict=True) if not c]
        if self.controller is not None and scaled:
            self.controller.observe(sum(scaled) / len(scaled))
        metrics["rollout/quarantine_scale"].append(plan.scale)
        metrics["rollout/coherence_frac"].append(float(plan.all_coherence.float().mean()))
        if self.controller is not None and self.controller.ema is not None:
            metrics["rollout/flag_rate_ema"].append(self.controller.ema)


def _split_by_scale(trainer: Any, target: Any, scales: list[float]):
    """TRL's `_generate_single_turn` for a batch whose rows are sampled at different scales: one call per scale."""
    original = type(trainer)._generate_single_turn.__get__(trainer)

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if len(prompt_ids) != len(scales) or images is not None or multimodal_fields:
            raise RuntimeError(
                "coherence_fraction: a generation call that is not the whole text batch (tools, "
                "images or a custom rollout) cannot be split by sampling policy"
            )
        ids: list = [None] * len(scales)
        logps: list | None = [None] * len(scales)
        for scale in sorted(set(scales)):
            rows = [i for i, s in enumerate(scales) if s == scale]
            with sampling_context(target, scale):
                got_ids, got_logps = original(
                    [prompt_ids[i] for i in rows], images, multimodal_fields, num_generations, has_tool_images
                )
            for j, i in enumerate(rows):
                ids[i] = got_ids[j]
                if got_logps is None:
                    logps = None
                elif logps is not None:
                    logps[i] = got_logps[j]
        return ids, logps

    return generate


__all__ = [
    "EMA_DEFAULTS",
    "RolloutPlan",
    "RolloutSampler",
    "ScaleController",
    "ScaleSpec",
    "check_rollout",
    "coherence_groups",
    "coherence_modes",
    "draw_scale",
    "effective_spec",
    "only_full",
    "parse_scale",
    "sampling_context",
    "scored_as_gate",
]
