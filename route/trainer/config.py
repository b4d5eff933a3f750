"""`RoutedGRPOConfig`: TRL's `GRPOConfig` plus the environment, detector, intervention and target.

Every field has help text, so `--help`, YAML files and flags all work through `TrlParser`.
Invalid values fail in `__post_init__`, before any model is loaded, with a message that
names the field and the allowed values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

from route.monitors.detectors import FLAG_CONTROLS
from route.trainer.rollout import check_rollout, only_full
from route.utils.fields import as_dict, as_list, check_checkpointing, choice, rate

# The interventions of the vocabulary; each target declares which it supports (`erase` needs one that can).
INTERVENTIONS = ("none", "filter", "penalty", "route", "erase")
DETECTORS = ("noisy", "ground_truth")
UNFLAGGED_MODES = ("default", "retain")
ROUTINGS = ("classic", "exclusive")
GENERATION_POLICIES = ("full", "deployed")
ROLLOUT_TRAIN_SCALES = ("full", "sampled")
SCALE_RULES = ("none", "monitor")
DEFAULT_SCALE_GRID = tuple(i / 10 for i in range(11))


@dataclass
class RoutedGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`RoutedGRPOTrainer`]: every `GRPOConfig` field plus the following.

    > Environment and model

    env (`str`): registered environment name. env_kwargs (`dict`): its keyword arguments.
    train_size (`int`): number of training prompts. model_name_or_path (`str` or `None`): the policy;
    `None` builds (or reuses) the CPU organism of `env` at build seed organism_seed (`int`).

    > Detector and intervention

    intervention (`str`): none, filter, penalty, route, or erase (targets that support it). penalty (`float`).
    detector (`str`), detector_tpr, detector_fpr (`float`), detector_modes (`list[str]`), detector_seed (`int`).
    flag_control (`str`): none, random (flags at the monitor's rate, blind to hacking) or never (no flags).
    absorption_metrics (`bool`): log where each kind of rollout's gradient lands (`route.targets.absorption`).
    unflagged_mode (`str`), retain_fraction (`float`), generation_policy (`str`). routing (`str`), route_weight
    (`float`), route_clamp (`float` or `None`): routing variants (docs/targets.md#routing-variants).
    rollout_quarantine_scale (`str` or `None`) and the `rollout_scale_*` controller fields, coherence_fraction
    (`float`): who samples each rollout (`route.trainer.rollout`, docs/targets.md#rollout-scale).
    monitor (`str`): plain, prompt, form, prompt_form, classifier, judge or prompt_judge, with its `monitor_*` fields
    (docs/detectors.md; the judge: `monitor_judge_model`, `_question`, `_threshold`, `_batch_size`).

    > Quarantine target

    target (`str`), target_modules (`list[str]`), quarantine_lr_ratio (`float`), ablate_trainable (`bool`). Each
    target's own settings are a dataclass of its own (`route.targets`), parsed beside this one; the parsed settings
    are attached as `target_args`, and reading one of their fields on the config reads it there.

    > Evaluation

    eval_n (`int`), eval_seed (`int`), eval_max_new_tokens (`int`). deploy_scale_rule (`str`): none or monitor,
    scale_grid (`list[float]`), val_n (`int`): the deployment-scale rule (`route.trainer.scales`).
    """

    # ---------------------------------------------------------------- environment and model
    env: str = field(default="arith", metadata={"help": "Registered environment name (see envs.available_envs())."})
    env_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for the environment (a mapping, or JSON on the CLI)."})
    train_size: int = field(default=4096, metadata={"help": "Number of training prompts drawn from the environment."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy model: a local path or Hub id. None builds (or reuses) the cached CPU organism."})
    organism_seed: int = field(
        default=0,
        metadata={"help": "With model_name_or_path None: the build seed of the environment's CPU organism (0: the "
                          "default). The organisms that published figures start from ship with the package "
                          "(route/models/organisms/); any other is built into the cache on first use."})

    # ---------------------------------------------------------------- detector and intervention
    intervention: str = field(
        default="route",
        metadata={"help": "What to do with flagged rollouts: none, filter (zero advantage), penalty (reward minus "
                          "`penalty`), route (gradient only into the quarantine) or erase (targets that "
                          "support it: remove the hack-subspace component of every kept gradient; flags are only "
                          "logged).",
                  "choices": list(INTERVENTIONS)})
    penalty: float = field(default=1.0, metadata={"help": "Lambda subtracted from a flagged rollout's reward."})
    detector: str = field(default="noisy", metadata={"help": "Detector kind: noisy or ground_truth.",
                                                     "choices": list(DETECTORS)})
    detector_tpr: float = field(default=0.5, metadata={"help": "Noisy detector: true-positive rate on known modes."})
    detector_fpr: float = field(default=0.05, metadata={"help": "Noisy detector: false-positive rate."})
    detector_modes: list[str] | None = field(
        default=None,
        metadata={"help": "Loophole modes the detector knows (None = all); exploits of other modes are never "
                          "flagged (held out)."})
    detector_seed: int = field(default=0, metadata={"help": "Seed of the detector's per-rollout draws."})
    flag_control: str = field(
        default="none",
        metadata={"help": "Control arm for the flags: none (the monitor's flags), random (each rollout flagged by a "
                          "coin of (detector_seed, rollout id) at the monitor's realised flag share of the same batch: "
                          "same rate, no information about hacking) or never (nothing flagged). The monitor's own "
                          "rates are logged under routing/monitor/.", "choices": list(FLAG_CONTROLS)})
    unflagged_mode: str = field(
        default="default",
        metadata={"help": "Routing mode of unflagged rollouts: default (gradient everywhere) or retain (forward "
                          "without the quarantine, gradient only into kept parameters).",
                  "choices": list(UNFLAGGED_MODES)})
    retain_fraction: float = field(
        default=1.0, metadata={"help": "With unflagged_mode=retain: share of unflagged rollouts put in retain mode."})
    generation_policy: str = field(
        default="full",
        metadata={"help": "Policy that samples rollouts: full (quarantine in place) or deployed (quarantine "
                          "ablated).", "choices": list(GENERATION_POLICIES)})

    rollout_quarantine_scale: str | None = field(
        default=None,
        metadata={"help": "Quarantine scale of the policy that samples rollouts (docs/targets.md#rollout-scale): a "
                          "number in [0, 1] (1 = generation_policy full, 0 = deployed), uniform (a draw from U(0, 1) "
                          "per generation batch), a comma-separated set to draw from (e.g. 0,0.5), or ema (a "
                          "controller steering the scale so that an EMA of the monitor's flag rate approaches "
                          "rollout_scale_target_rate). Draws are pure functions of (seed, step). The training forward "
                          "is set by rollout_train_scale. None: generation_policy decides."})
    rollout_train_scale: str = field(
        default="full",
        metadata={"help": "Quarantine scale of the training forward of rows sampled at a rollout scale s: full (1, the "
                          "usual gated forward; off-policy by the quarantine's share when s < 1) or sampled (s: the "
                          "gated forward with the quarantine times s, on-policy; the quarantine's gradient is scaled "
                          "by s too). See docs/targets.md#rollout-scale.", "choices": list(ROLLOUT_TRAIN_SCALES)})
    rollout_scale_target_rate: float = field(
        default=0.1, metadata={"help": "rollout_quarantine_scale=ema: the monitor's flag rate (share of flagged "
                                       "rollouts, never ground truth) the controller steers toward, in [0, 1]."})
    rollout_scale_ema_weight: float = field(
        default=0.9, metadata={"help": "rollout_quarantine_scale=ema: weight of the past in the flag-rate EMA, "
                                       "ema <- weight * ema + (1 - weight) * rate, in [0, 1)."})
    rollout_scale_gain: float = field(
        default=1.0, metadata={"help": "rollout_quarantine_scale=ema: per batch, scale <- scale + gain * "
                                       "(target_rate - ema), then clamped; > 0."})
    rollout_scale_min: float = field(
        default=0.0, metadata={"help": "rollout_quarantine_scale=ema: lower clamp of the scale, in [0, 1]."})
    rollout_scale_max: float = field(
        default=1.0, metadata={"help": "rollout_quarantine_scale=ema: upper clamp of the scale and its start, in "
                                       "[rollout_scale_min, 1]."})
    coherence_fraction: float = field(
        default=0.0,
        metadata={"help": "Coherence slots: share of each generation batch's GRPO groups (whole groups, stochastic "
                          "rounding) sampled by the deployed policy (scale 0) and trained into the kept part only "
                          "(retain mode; flagged rollouts are still routed). In [0, 1); chosen per (seed, step). "
                          "See docs/targets.md#coherence-slots."})

    routing: str = field(
        default="classic",
        metadata={"help": "Routing of unflagged rollouts under route: classic (default mode: gradient into both parts) "
                          "or exclusive (full forward, quarantine output detached: gradient only into the kept part). "
                          "Flagged rollouts are routed the same in both. See docs/targets.md#routing-variants.",
                  "choices": list(ROUTINGS)})
    route_weight: float = field(
        default=1.0,
        metadata={"help": "Soft routing: a flagged rollout's gradient into the kept part is (1 - route_weight) times "
                          "the ordinary one: 1 full routing (the default), 0 none, in between soft, above 1 "
                          "over-routing (the kept part pushed against what the rollout teaches). >= 0."})
    route_clamp: float | None = field(
        default=None,
        metadata={"help": "Soft routing: clamp each coordinate of the gradient a flagged rollout sends back through "
                          "each kept output (after the route_weight factor) to [-route_clamp, route_clamp]; None: no "
                          "clamp. > 0; needs route_weight != 1."})
    split_moments: bool = field(
        default=False,
        metadata={"help": "Optimizer: AdamW's first moment from the routed gradient, its second from the unrouted one "
                          "(the gradient with no routing, from the same backward). See docs/targets.md#split-moments."})

    absorption_metrics: bool = field(
        default=False,
        metadata={"help": "Log absorption/*: per optimizer step, the share of the squared gradient norm of missed "
                          "hacks, flagged hacks, clean rollouts and each loophole mode that lands in the quarantine "
                          "(computed in the training backward, by targets that support it; off unless asked: about "
                          "11 percent more step time at the default shapes; docs/absorption.md)."})

    # ---------------------------------------------------------------- systematic monitor blindness
    # Validated by route.monitors.build.validate_monitor (from route.trainer.parse.validate_run), built by
    # route.monitors.build.build_detector (monitor: plain is the detector above, unchanged).
    monitor: str = field(
        default="plain",
        metadata={"help": "Systematic blindness of the detector: plain (none), prompt (sees exploits only on prompts "
                          "whose monitor_column is true), form (a program: flags completions that fully match one "
                          "of monitor_forms, with detector_tpr/fpr as noise), prompt_form (both), classifier (a "
                          "small char n-gram classifier trained on labelled completions of monitor_train_forms), "
                          "judge (a frozen causal LM asked monitor_judge_question about each reply), prompt_judge "
                          "(the judge, reading only the replies whose monitor_column is true).",
                  "choices": ["plain", "prompt", "form", "prompt_form", "classifier", "judge", "prompt_judge"]})
    monitor_column: str | None = field(
        default=None, metadata={"help": "prompt monitors: the boolean dataset column of the detectable part "
                                        "(None: the environment's, e.g. `detectable`)."})
    monitor_forms: dict | str | None = field(
        default=None, metadata={"help": "form monitors: mode -> regular expression the program catches (a mapping, "
                                        "or JSON on the CLI; None: the environment's monitor_patterns)."})
    monitor_train_forms: dict | str | None = field(
        default=None, metadata={"help": "classifier monitor: mode -> list of the hack forms in its labelled "
                                        "training set (None: the first form of every mode)."})
    monitor_train_n: int = field(default=2000, metadata={"help": "classifier monitor: labelled completions."})
    monitor_train_steps: int = field(default=300, metadata={"help": "classifier monitor: full-batch steps."})
    monitor_judge_model: str | None = field(
        default=None, metadata={"help": "judge monitors: the causal LM that judges each (prompt, completion): a "
                                        "checkpoint directory or a short name (None: the run's model_name_or_path, "
                                        "frozen as loaded)."})
    monitor_judge_question: str | None = field(
        default=None, metadata={"help": "judge monitors: the yes/no question asked about each reply (None: the "
                                        "environment's judge_question)."})
    monitor_judge_threshold: float = field(
        default=0.0, metadata={"help": "judge monitors: flag when the judge's yes-minus-no logit exceeds this."})
    monitor_judge_batch_size: int = field(default=16, metadata={"help": "judge monitors: judge prompts per forward."})
    # the judge's checkpoint directory (a short name resolved by route.trainer.parse.validate_run), not a flag
    monitor_judge_path: str | None = field(default=None, init=False, repr=False)

    # ---------------------------------------------------------------- target
    target: str = field(
        default="dual_lora",
        metadata={"help": "Quarantine target: a registered name (route.targets.available_targets(); a new one "
                          "registers with route.targets.register_target); its own settings are its own fields."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules the target adapts (default: all attention and MLP projections)."})
    quarantine_lr_ratio: float = field(
        default=1.0, metadata={"help": "Learning rate of the quarantine group relative to learning_rate."})
    ablate_trainable: bool = field(
        default=False,
        metadata={"help": "Ablate the quarantine to a trainable re-init instead of zero before deployment."})
    # the target's parsed settings (route.targets); set by route.trainer.parse or the trainer, not a flag
    target_args: Any = field(default=None, init=False, repr=False)

    # ---------------------------------------------------------------- evaluation
    eval_n: int = field(default=512, metadata={"help": "Held-out prompts per evaluated policy (base, training, "
                                                       "deployed)."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the held-out prompts and of evaluation sampling."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Completion length at evaluation (default: max_completion_length)."})
    deploy_scale_rule: str = field(
        default="monitor",
        metadata={"help": "How the main job picks a quarantine scale to deploy besides 0: monitor (the highest "
                          "scale of scale_grid whose monitored hack rate, the share of rollouts the run's real "
                          "monitor flags, is below the base model's, on val_n validation prompts disjoint from the "
                          "test prompts; never ground truth) or none. See docs/scales.md.",
                  "choices": list(SCALE_RULES)})
    scale_grid: list[float] | None = field(
        default=None, metadata={"help": "Quarantine scales in [0, 1] the rule may pick (default: 0, 0.1, ..., 1)."})
    val_n: int = field(default=256, metadata={"help": "Validation prompts per scale for deploy_scale_rule."})

    def __post_init__(self):
        self.validate_routing()
        super().__post_init__()
        check_checkpointing(self)  # after the parent parsed its kwargs

    def __getattr__(self, name: str) -> Any:
        # only called for names the config lacks: a field of the target's settings reads through
        target_args = self.__dict__.get("target_args")
        if target_args is not None and not name.startswith("__") and hasattr(target_args, name):
            return getattr(target_args, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def validate_routing(self) -> None:
        """Check the fields this config owns; raises ValueError naming the field and the allowed values.

        The environment, the detector's modes and the target's settings are checked against their registries by
        `route.trainer.parse.validate_run` (which the trainer and every command line call before any work).
        """
        self.env_kwargs = as_dict("env_kwargs", self.env_kwargs)
        self.detector_modes = as_list(self.detector_modes)
        self.target_modules = as_list(self.target_modules)
        choice("intervention", self.intervention, INTERVENTIONS)
        choice("detector", self.detector, DETECTORS)
        choice("flag_control", self.flag_control, FLAG_CONTROLS)
        choice("unflagged_mode", self.unflagged_mode, UNFLAGGED_MODES)
        choice("generation_policy", self.generation_policy, GENERATION_POLICIES)
        choice("rollout_train_scale", self.rollout_train_scale, ROLLOUT_TRAIN_SCALES)
        choice("routing", self.routing, ROUTINGS)
        self.validate_soft_routing()
        check_rollout(self)
        for name in ("env", "target"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: must be a registered name, got {getattr(self, name)!r}")
        for name in ("detector_tpr", "detector_fpr", "retain_fraction"):
            rate(name, getattr(self, name))
        choice("deploy_scale_rule", self.deploy_scale_rule, SCALE_RULES)
        self.scale_grid = parse_scale_grid(self.scale_grid)
        for name in ("train_size", "eval_n", "val_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.penalty < 0:
            raise ValueError(f"penalty: must be >= 0, got {self.penalty!r}")
        if self.quarantine_lr_ratio < 0:
            raise ValueError(f"quarantine_lr_ratio: must be >= 0, got {self.quarantine_lr_ratio!r}")


    def validate_soft_routing(self) -> None:
        """`route_weight` a number >= 0; `route_clamp` None or a number > 0, and only with route_weight != 1."""
        w, c = self.route_weight, self.route_clamp
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
            raise ValueError(f"route_weight: must be a finite number >= 0 (1 = full routing), got {w!r}")
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < float("inf")):
            raise ValueError(f"route_clamp: must be None or a finite number > 0, got {c!r}")
        if c is not None and w == 1:
            raise ValueError("route_clamp: needs route_weight != 1 (full routing sends no gradient to clamp)")


def parse_scale_grid(value: Any, name: str = "scale_grid") -> list[float]:
    """Quarantine scales (a list or a comma-separated string; None: 0, 0.1, ..., 1), sorted, distinct, in [0, 1];
    ValueError naming `name` otherwise."""
    if value is None:
        return list(DEFAULT_SCALE_GRID)
    items = as_list(value) if isinstance(value, str) else value
    try:
        grid = sorted({float(v) for v in items if not isinstance(v, bool)})
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be numbers in [0, 1], got {value!r}") from None
    if not grid or len(grid) != len(list(items)) or grid[0] < 0 or grid[-1] > 1:
        raise ValueError(f"{name}: must be distinct numbers in [0, 1], got {value!r}")
    return grid


VLLM_MODES = ("colocate", "server")


def check_vllm_config(args: Any) -> None:
    """Refuse vLLM settings this library cannot honour, before any model is loaded; errors name the field.

    Checks `vllm_mode`, FSDP (`ACCELERATE_USE_FSDP`, set by `accelerate launch` with an FSDP config) and
    `off_policy_mask_threshold` with deployed generation (TRL's OPSM compares the gated training forward with the
    deployed sampling log-probs, which would mask exactly the forget rollouts).
    """
    if not getattr(args, "use_vllm", False):
        return
    if args.vllm_mode not in VLLM_MODES:
        raise ValueError(f"vllm_mode: invalid value {args.vllm_mode!r} with use_vllm=true; "
                         f"allowed values: {list(VLLM_MODES)}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        raise ValueError("use_vllm: the quarantine weight sync does not support FSDP; launch with DeepSpeed "
                         "(e.g. --config_file configs/accelerate_zero2.yaml) or DDP")
    if args.vllm_mode == "colocate" and getattr(args, "vllm_enable_sleep_mode", False) and not _sleep_available():
        raise ValueError("vllm_enable_sleep_mode: the installed vLLM has no sleep mode on this platform (the CPU "
                         "build refuses it); set it to false")
    if getattr(args, "off_policy_mask_threshold", None) is not None and not only_full(args):
        raise ValueError("off_policy_mask_threshold: not supported with use_vllm and generation_policy=deployed or a "
                         "rollout_quarantine_scale other than 1 (it would compare the gated training forward with the "
                         "sampling log-probs of another policy and mask the forget rollouts); leave it unset")


def _sleep_available() -> bool:
    """Whether vLLM's sleep mode exists here (asked of vLLM's platform; True when vLLM is absent: TRL fails later)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return True
    return bool(current_platform.is_sleep_mode_available())
