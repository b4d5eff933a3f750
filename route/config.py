"""`RoutedGRPOConfig`: TRL's `GRPOConfig` plus the environment, detector, intervention and target.

Every field has help text, so `--help`, YAML files and flags all work through `TrlParser`.
Invalid values fail in `__post_init__`, before any model is loaded, with a message that
names the field and the allowed values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig

INTERVENTIONS = ("none", "filter", "penalty", "route", "erase")
ROUTE_SCORES = ("none", "cosine")
DETECTORS = ("noisy", "ground_truth")
UNFLAGGED_MODES = ("default", "retain")
GENERATION_POLICIES = ("full", "deployed")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: invalid value {value!r}; allowed values: {list(allowed)}")


def _rate(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}")


def _as_dict(name: str, value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name}: must be a mapping, got {type(value).__name__}")
    return value


def _as_list(value: Any) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


@dataclass
class RoutedGRPOConfig(GRPOConfig):
    r"""
    Configuration for [`RoutedGRPOTrainer`]: every `GRPOConfig` field plus the following.

    > Environment and model

    env (`str`): registered environment name. env_kwargs (`dict`): its keyword arguments.
    train_size (`int`): number of training prompts. model_name_or_path (`str` or `None`): the policy;
    `None` builds (or reuses) the cached CPU organism.

    > Detector and intervention

    intervention (`str`): none, filter, penalty, route or erase (svf only). penalty (`float`): lambda for `penalty`.
    route_score (`str`), route_score_threshold (`float`), route_score_requires_flag (`bool`): flag-free score
    routing (svf only). erase_one_sided (`bool`).
    detector (`str`), detector_tpr, detector_fpr (`float`), detector_modes (`list[str]`), detector_seed (`int`).
    unflagged_mode (`str`), retain_fraction (`float`), generation_policy (`str`).

    > Quarantine target

    target (`str`), keep_rank, quarantine_rank (`int`), lora_alpha (`float`), target_modules (`list[str]`),
    quarantine_lr_ratio (`float`), ablate_trainable (`bool`). sgtm target: sgtm_forget_mlp_frac (`float`),
    sgtm_forget_heads (`int`), sgtm_masked_layers (`list[int]`), sgtm_strategy (`str`), sgtm_mask_shared (`bool`).
    svf target: svf_rank (`int`), svf_reserve_axes (`list[int]`), svf_hack_subspace (`str`), svf_cache_dir (`str`).

    > Evaluation

    eval_n (`int`), eval_seed (`int`), eval_max_new_tokens (`int`).
    """

    # ---------------------------------------------------------------- environment and model
    env: str = field(default="arith", metadata={"help": "Registered environment name (see envs.available_envs())."})
    env_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for the environment (a mapping, or JSON on the CLI)."})
    train_size: int = field(default=4096, metadata={"help": "Number of training prompts drawn from the environment."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy model: a local path or Hub id. None builds (or reuses) the cached CPU organism."})

    # ---------------------------------------------------------------- detector and intervention
    intervention: str = field(
        default="route",
        metadata={"help": "What to do with flagged rollouts: none, filter (zero advantage), penalty (reward minus "
                          "`penalty`), route (gradient only into the quarantine) or erase (target svf: remove the "
                          "hack-subspace component of every kept gradient; flags are only logged).",
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
    unflagged_mode: str = field(
        default="default",
        metadata={"help": "Routing mode of unflagged rollouts: default (gradient everywhere) or retain (forward "
                          "without the quarantine, gradient only into kept parameters).",
                  "choices": list(UNFLAGGED_MODES)})
    retain_fraction: float = field(
        default=1.0, metadata={"help": "With unflagged_mode=retain: share of unflagged rollouts put in retain mode."})
    route_score: str = field(
        default="none",
        metadata={"help": "Flag-free routing (target svf, intervention route): none, or cosine (a rollout is routed "
                          "when the cosine |P g| / |g| between its per-rollout delta gradient g and the hack "
                          "subspace exceeds route_score_threshold; flags then no longer route by themselves).",
                  "choices": list(ROUTE_SCORES)})
    route_score_threshold: float = field(
        default=0.3, metadata={"help": "route_score: the cosine (in [0, 1]) above which a rollout is routed."})
    route_score_requires_flag: bool = field(
        default=False,
        metadata={"help": "route_score: route only flagged rollouts whose score exceeds the threshold (the flag "
                          "picks the rollouts, the subspace confirms); unflagged rollouts follow unflagged_mode."})
    erase_one_sided: bool = field(
        default=False,
        metadata={"help": "intervention erase: remove only the components whose update would move the kept delta "
                          "toward +v (the hack direction), instead of the whole projection."})
    generation_policy: str = field(
        default="full",
        metadata={"help": "Policy that samples rollouts: full (quarantine in place) or deployed (quarantine "
                          "ablated).", "choices": list(GENERATION_POLICIES)})

    # ---------------------------------------------------------------- systematic monitor blindness (issue 13)
    # One self-contained block: validated by route.detectors.validate_monitor, built by
    # route.detectors.build_detector (monitor: plain is the detector above, unchanged).
    monitor: str = field(
        default="plain",
        metadata={"help": "Systematic blindness of the detector: plain (none), prompt (sees exploits only on prompts "
                          "whose monitor_column is true), form (a program: flags completions that fully match one "
                          "of monitor_forms, with detector_tpr/fpr as noise), prompt_form (both), classifier (a "
                          "small char n-gram classifier trained on labelled completions of monitor_train_forms).",
                  "choices": ["plain", "prompt", "form", "prompt_form", "classifier"]})
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
    # ---------------------------------------------------------------- end of the monitor block

    # ---------------------------------------------------------------- target
    target: str = field(default="dual_lora", metadata={"help": "Quarantine target (see route.targets)."})
    keep_rank: int = field(default=8, metadata={"help": "dual_lora: rank of the kept adapter."})
    quarantine_rank: int = field(default=8, metadata={"help": "dual_lora: rank of the quarantine adapter."})
    lora_alpha: float | None = field(default=None, metadata={"help": "dual_lora: LoRA alpha (default: the rank)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt (default: all attention and MLP projections)."})
    quarantine_lr_ratio: float = field(
        default=1.0, metadata={"help": "Learning rate of the quarantine group relative to learning_rate."})
    ablate_trainable: bool = field(
        default=False,
        metadata={"help": "Ablate the quarantine to a trainable re-init instead of zero before deployment."})
    sgtm_forget_mlp_frac: float = field(
        default=0.125,
        metadata={"help": "sgtm: share of each masked layer's MLP units reserved as the quarantine (the last units, "
                          "rounded, at least one when > 0)."})
    sgtm_forget_heads: int = field(
        default=0, metadata={"help": "sgtm: attention heads per masked layer reserved as the quarantine (the last "
                                     "heads; whole KV groups)."})
    sgtm_masked_layers: list[int] | None = field(
        default=None, metadata={"help": "sgtm: indices of the layers that hold quarantine units (None: every layer)."})
    sgtm_strategy: str = field(
        default="parameter_masking",
        metadata={"help": "sgtm: masking strategy for forget rollouts: parameter_masking, parameter_masking_no_proj, "
                          "gradient_routing or activation_masking (see route.masks.strategies)."})
    svf_rank: int | None = field(
        default=None,
        metadata={"help": "svf: singular pairs per module, min(svf_rank, out, in) (None: full rank). A hack subspace "
                          "must have been extracted at the same rank (route.vhack --rank)."})
    svf_reserve_axes: list[int] | None = field(
        default=None, metadata={"help": "svf: quarantine = these singular axes (indices) of every module."})
    svf_hack_subspace: str | None = field(
        default=None,
        metadata={"help": "svf: quarantine = the hack subspace in this route.vhack/1 file (python -m route.vhack)."})
    svf_cache_dir: str | None = field(
        default=None, metadata={"help": "svf: SVD cache directory (None: $ROUTE_CACHE/svd)."})
    sgtm_mask_shared: bool = field(
        default=True,
        metadata={"help": "sgtm: forget rollouts send no gradient into parameters outside the quarantine "
                          "(embeddings, norms, head, unmasked layers)."})

    # ---------------------------------------------------------------- evaluation
    eval_n: int = field(default=512, metadata={"help": "Held-out prompts per evaluated policy (base, training, "
                                                       "deployed)."})
    eval_seed: int = field(default=0, metadata={"help": "Seed of the held-out prompts and of evaluation sampling."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Completion length at evaluation (default: max_completion_length)."})

    def __post_init__(self):
        from route.targets.checkpointing import check_config

        self.validate_routing()
        super().__post_init__()
        check_config(self)  # gradient checkpointing under the routing gate (after the parent parsed its kwargs)

    def validate_routing(self) -> None:
        """Check the routing fields; raises ValueError naming the field and the allowed values."""
        import envs
        from route.targets import available_targets

        self.env_kwargs = _as_dict("env_kwargs", self.env_kwargs)
        self.detector_modes = _as_list(self.detector_modes)
        self.target_modules = _as_list(self.target_modules)
        _choice("intervention", self.intervention, INTERVENTIONS)
        _choice("route_score", self.route_score, ROUTE_SCORES)
        _choice("detector", self.detector, DETECTORS)
        _choice("unflagged_mode", self.unflagged_mode, UNFLAGGED_MODES)
        _choice("generation_policy", self.generation_policy, GENERATION_POLICIES)
        _choice("target", self.target, tuple(available_targets()))
        _choice("env", self.env, tuple(envs.available_envs()))
        for name in ("detector_tpr", "detector_fpr", "retain_fraction"):
            _rate(name, getattr(self, name))
        for name in ("train_size", "eval_n", "keep_rank", "quarantine_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.penalty < 0:
            raise ValueError(f"penalty: must be >= 0, got {self.penalty!r}")
        if self.quarantine_lr_ratio < 0:
            raise ValueError(f"quarantine_lr_ratio: must be >= 0, got {self.quarantine_lr_ratio!r}")
        self._validate_sgtm()
        self._validate_svf()
        env = envs.make_env(self.env, **self.env_kwargs)
        from route.detectors import validate_monitor

        validate_monitor(self, env)  # the monitor block (issue 13)
        if self.detector_modes is not None:
            unknown = [m for m in self.detector_modes if m not in env.modes]
            if unknown:
                raise ValueError(f"detector_modes: unknown modes {unknown}; allowed values: {list(env.modes)}")

    def _validate_sgtm(self) -> None:
        """The `sgtm` target's fields (sizes that depend on the model are checked when the target is built)."""
        from route.masks import available_strategies

        _rate("sgtm_forget_mlp_frac", self.sgtm_forget_mlp_frac)
        _choice("sgtm_strategy", self.sgtm_strategy, tuple(available_strategies()))
        if not isinstance(self.sgtm_forget_heads, int) or self.sgtm_forget_heads < 0:
            raise ValueError(f"sgtm_forget_heads: must be an int >= 0, got {self.sgtm_forget_heads!r}")
        layers = _as_list(self.sgtm_masked_layers)
        if layers is not None:
            try:
                layers = [int(i) for i in layers]
            except (TypeError, ValueError):
                raise ValueError(f"sgtm_masked_layers: must be layer indices, got {self.sgtm_masked_layers!r}"
                                 ) from None
        self.sgtm_masked_layers = layers
        if self.target == "sgtm" and self.sgtm_forget_mlp_frac == 0 and self.sgtm_forget_heads == 0:
            raise ValueError("sgtm_forget_mlp_frac, sgtm_forget_heads: the sgtm quarantine is empty; reserve MLP "
                             "units (sgtm_forget_mlp_frac > 0) or heads (sgtm_forget_heads > 0)")


    def _validate_svf(self) -> None:
        """The `svf` target's fields and the interventions only it supports (erase, score routing)."""
        import os

        svf = self.target == "svf"
        if self.intervention == "erase" and not svf:
            allowed = [i for i in INTERVENTIONS if i != "erase"]
            raise ValueError(f"intervention: invalid value 'erase'; allowed values: {allowed} with target "
                             f"{self.target!r} (erase needs target svf)")
        rank = self.svf_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"svf_rank: must be an int >= 1 or None (full rank), got {rank!r}")
        axes = _as_list(self.svf_reserve_axes)
        if axes is not None:
            try:
                axes = [int(a) for a in axes]
            except (TypeError, ValueError):
                raise ValueError(f"svf_reserve_axes: must be axis indices, got {self.svf_reserve_axes!r}") from None
            if not axes or min(axes) < 0 or len(set(axes)) != len(axes):
                raise ValueError(f"svf_reserve_axes: must be distinct indices >= 0, got {self.svf_reserve_axes!r}")
        self.svf_reserve_axes = axes
        if axes is not None and self.svf_hack_subspace is not None:
            raise ValueError("svf_reserve_axes, svf_hack_subspace: give one quarantine reservation, not both")
        if svf and self.svf_hack_subspace is not None and not os.path.isfile(self.svf_hack_subspace):
            raise ValueError(f"svf_hack_subspace: no such file: {self.svf_hack_subspace} (write it with "
                             "python -m route.vhack)")
        if svf and self.intervention in ("route", "erase") and axes is None and self.svf_hack_subspace is None:
            raise ValueError(f"svf_reserve_axes, svf_hack_subspace: target svf with intervention "
                             f"{self.intervention} needs a quarantine reservation; set one of them")
        if svf and self.ddp_broadcast_buffers is None:
            # the SVD factors are buffers (as large as the model at full rank) and a pure function of the frozen
            # weights: DDP's default would re-broadcast them from rank 0 before every forward
            self.ddp_broadcast_buffers = False
        _rate("route_score_threshold", self.route_score_threshold)
        for name in ("route_score_requires_flag", "erase_one_sided"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.route_score != "none":
            if not svf or self.intervention != "route":
                raise ValueError(f"route_score: {self.route_score!r} needs target svf and intervention route, got "
                                 f"target {self.target!r} and intervention {self.intervention!r}; allowed values "
                                 f"here: ['none']")
            if self.unflagged_mode == "retain" and not self.route_score_requires_flag:
                raise ValueError("unflagged_mode: 'retain' conflicts with flag-free route_score (every rollout is a "
                                 "score candidate and runs in default mode); set route_score_requires_flag or "
                                 "unflagged_mode: default")


def parse_config(argv: list[str] | None = None, default_config: str | None = None) -> RoutedGRPOConfig:
    """Parse `--config FILE.yaml` plus flag overrides into a `RoutedGRPOConfig` (flags win over the file).

    Same semantics as `TrlParser`, with one difference: a YAML `env:` that is a string is this
    config's environment name; a mapping is still read as environment variables to set.
    """
    import os
    import sys

    from trl import TrlParser

    from route.io import load_yaml_mapping, pop_config_arg

    path, argv = pop_config_arg(sys.argv[1:] if argv is None else argv, default_config)
    parser = TrlParser((RoutedGRPOConfig,))
    if path is not None:
        values = load_yaml_mapping(path)
        if isinstance(values.get("env"), dict):
            for key, value in values.pop("env").items():
                os.environ[key] = str(value)
        unknown = parser.set_defaults_with_config(**values)
        if unknown:
            raise ValueError(f"config file {path}: unknown fields {unknown[::2]}")
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config
