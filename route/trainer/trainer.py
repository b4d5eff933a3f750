"""`RoutedGRPOTrainer`: TRL's GRPOTrainer with flags, routing modes and a gated loss.

Departures from plain GRPO (TRL 1.16), all through its documented override points:

- `_calculate_rewards`: after the rewards, each rollout is graded by the environment (ground
  truth, logged, never fed to the reward), the detector flags it, and it gets a routing mode
  (`route.trainer.policy.routing_modes`). `penalty` subtracts lambda from a flagged rollout's reward here, before
  advantages (`route.trainer.policy.penalize_rewards`).
- `_generate_and_score_completions`: adds the routing columns (`routing_modes`, `routing_flags`,
  `routing_exploited`, `routing_candidates`) to the batch (they survive TRL's shuffle and micro-batch split),
  zeroes flagged advantages under `filter` (`route.trainer.policy.filter_advantages`), and recomputes
  `old_per_token_logps` under the per-row gate whenever TRL scored a row under another policy.
- `_generate`: sampling runs as the policy `route.trainer.rollout` plans for the batch: `generation_policy: deployed`
  inside `target.ablated()`, `rollout_quarantine_scale` s inside `target.scaled(s)`, coherence slots at scale 0.
- vLLM (`use_vllm`, colocate or server): TRL's own `VLLMGeneration.sync_weights` pushes the weights, once per
  optimizer step; only its weight source is replaced (`route.vllm.sync.TargetWeightSync`): the target's merged
  weights at the batch's rollout scale (deployed, full or `scaled(s)`), in fp32 out of place. TRL's importance-sampling
  correction compares vLLM's sampling log-probs with the trainer's forward of the *generating* policy
  (`_get_per_token_logps_and_entropies` runs inside `target.ablated()` / `target.scaled(s)` while TRL scores such a
  batch), so the quarantine's effect on forget rollouts is not mistaken for vLLM mismatch and masked; the PPO ratio
  then uses old log-probs under the gate.
- `_compute_loss`: the loss forward runs inside `target.gate(routing_modes)` (at the batch's `routing_scale` under
  `rollout_train_scale: sampled`): one forward,
  one backward for a batch that mixes modes. With `gradient_checkpointing`, the layers recomputed in that backward
  (after the context has exited) re-enter the gate their forward ran under (`route.targets.checkpointing`:
  non-reentrant checkpointing with a `context_fn` from the target's `recompute_context()`); setups that cannot do
  that (reentrant checkpointing, FSDP activation checkpointing, torch.compile) are refused at construction.
- `training_step`: after each micro-batch's backward the target's `after_backward` hook sees that micro-batch's
  routing columns; after the last micro-batch of an optimizer step (before clipping) its `before_optimizer_step` hook
  runs and its metrics are logged (svf's score routing and `erase` live there, `route.targets.svf_routing`).
  With `absorption_metrics`, the target's per-row gradient norms of each backward (`pop_row_grads`) feed
  `route.targets.absorption.AbsorptionMeter`, whose `absorption/*` shares are logged once per optimizer step; the batch
  carries a fifth column for it, `routing_hack_mode` (ground truth, logging only).
- The optimizer is `SkipZeroAdamW` over the target's named groups, so a group that got no
  gradient does not move. With `split_moments`, `training_step` records the routed gradient's norm before Trainer
  clips (`note_preclip`), so the unrouted gradient is clipped by the same coefficient.
- `beta > 0`: the KL reference is the base model. TRL adds a "ref" copy of a `default` adapter when given a
  PeftModel with beta > 0; the trainer keeps it from doing so (`_kl_reference_is_base`), so TRL's reference forward
  runs with every adapter disabled. A target that is not PEFT gets TRL's frozen copy of the model as loaded.
- `_load_from_checkpoint` (resume): every adapter of a PEFT target reloads in place; Trainer's own PEFT path would
  reload only the first active adapter and activate it alone, dropping the quarantine from the forward.

TRL's private call order (TRL 1.16; the pin in pyproject.toml is `<1.17` because these are underscore methods).
Per generation batch, inside `_prepare_inputs` -> `_generate_and_score_completions(inputs)`:
  1. `_generate(prompts)` (sampling; vLLM weights synced before it once per optimizer step);
  2. TRL's scoring forward `_get_per_token_logps_and_entropies` (old / sampling log-probs);
  3. `_calculate_rewards(...)`: this trainer grades, flags and routes here and *stashes* the per-rollout routing
     in `self._routing` (a `_PendingRouting`), since TRL's return value carries only rewards;
  4. back in `_generate_and_score_completions`, after `super()` returns: the stash is *consumed* (exactly once) and
     its columns are added to the batch.
Then, per micro-batch: `training_step` -> `compute_loss` -> `_compute_loss(model, inputs)` (the gated forward; it
stashes the micro-batch's routing columns for `after_backward`) -> backward -> `training_step` calls the target's
hooks. A broken order fails loudly: a batch whose rewards were not computed (no stash at step 4), a stash never
consumed (step 3 twice), a micro-batch without routing columns.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer import grpo_trainer

import envs
from route.masks.optim import build_optimizer, unwrap_optimizer
from route.monitors.build import build_detector
from route.monitors.detectors import Detector, call_detector
from route.monitors.systematic import detector_parts
from route.targets import RoutingRows, Target, TargetArgs, build_target, check_target, checkpointing, configure_routing
from route.targets.absorption import AbsorptionMeter, hack_mode_codes
from route.trainer.config import RoutedGRPOConfig, check_vllm_config
from route.trainer.logprobs import install_unfused_log_probs
from route.trainer.metrics import log_monitor, log_routing
from route.trainer.parse import validate_run
from route.trainer.policy import filter_advantages, penalize_rewards, routing_modes
from route.trainer.rollout import RolloutPlan, RolloutSampler, sampling_context, scored_as_gate
from route.utils.io import atomic_dir
from route.utils.kernels import portable_sqrt_in
from route.vllm.serve import trainer_client
from route.vllm.sync import TargetWeightSync

ROUTING_COLUMNS = ("routing_modes", "routing_flags", "routing_exploited", "routing_candidates")


@dataclass
class _PendingRouting:
    """What `_calculate_rewards` stashes for `_generate_and_score_completions` (this process's rows, in order)."""

    modes: torch.Tensor
    flags: torch.Tensor
    exploited: torch.Tensor
    candidates: torch.Tensor
    hack_mode: torch.Tensor  # ground truth loophole mode index per rollout (-1: none), for the absorption metrics


class _GradNormLogger(TrainerCallback):
    """Appends the optimizer's per-group gradient norms to the trainer's metrics after each step."""

    def __init__(self, trainer: RoutedGRPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        opt = unwrap_optimizer(self.trainer.optimizer)
        for name, norm in getattr(opt, "last_grad_norms", {}).items():
            self.trainer._metrics["train"][f"grad_norm/{name}"].append(norm)


@contextlib.contextmanager
def _kl_reference_is_base(args: RoutedGRPOConfig, model):
    """The KL reference (beta > 0) is the base model. A PEFT target's is the model with every adapter disabled, what
    TRL uses when the model has no "ref" adapter; TRL would add one (a copy of a "default" adapter) when it is given a
    PeftModel with beta > 0, so beta reads 0 while TRL builds itself and is restored after. A target that is not PEFT
    (sgtm) gets TRL's frozen copy of the model as loaded."""
    from peft import PeftModel

    beta = args.beta
    if isinstance(model, PeftModel):
        args.beta = 0.0
    try:
        yield
    finally:
        args.beta = beta


class RoutedGRPOTrainer(GRPOTrainer):
    """GRPO with per-rollout gradient routing into a quarantine target.

    Args:
        model: a causal LM (or a path); the target wraps it (e.g. with the dual LoRA).
        args: a `RoutedGRPOConfig`.
        env: the environment (default: `envs.make_env(args.env, **args.env_kwargs)`).
        target: a prepared `Target` (default: built from `args.target` and its settings).
        target_args: the target's settings (default: `args.target_args`, else the target's defaults).
        detector: a `Detector` (default: built from the `detector_*` fields).
        reward_funcs: default `[env.reward_func]` (reward from the prompt's grader only).
        **kwargs: passed to `GRPOTrainer` (train_dataset, processing_class, callbacks, ...).
    """

    def __init__(self, model, args: RoutedGRPOConfig, env=None, target: Target | None = None,
                 detector: Detector | None = None, reward_funcs=None, target_args: TargetArgs | None = None,
                 **kwargs):
        if not isinstance(args, RoutedGRPOConfig):
            raise TypeError(f"args must be a RoutedGRPOConfig, got {type(args).__name__}")
        if target_args is not None:
            args.target_args = target_args
        validate_run(args)
        check_vllm_config(args)
        self.env = env or envs.make_env(args.env, **args.env_kwargs)
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            from route.models.pretrained import resolve_model

            model = AutoModelForCausalLM.from_pretrained(resolve_model(model))
        if target is None:
            from transformers import set_seed

            set_seed(args.seed)  # adapters are initialised here, before TRL seeds: same seed, same run
            target = build_target(args, model)
        check_target(target)
        configure_routing(target, args)  # soft routing and split moments: refused here if the target cannot
        self.target = target
        self._install_checkpointing(args)
        self.detector = detector or build_detector(args, self.env)
        self._routing: _PendingRouting | None = None
        self._loss_rows: RoutingRows | None = None
        self.rollout = RolloutSampler(args, self.target)  # who samples each batch (scale, coherence slots)
        self._plan: RolloutPlan | None = None
        self._score_scale: float | None = None  # set while TRL scores a batch sampled through vLLM below scale 1
        self.weight_sync = TargetWeightSync(self.target, args.generation_policy) if args.use_vllm else None
        # server mode on a CPU trainer: weights over HTTP (route.vllm.serve); beta > 0: the KL reference is the base
        with trainer_client(args), _kl_reference_is_base(args, self.target.model):
            super().__init__(model=self.target.model, reward_funcs=reward_funcs or [self.env.reward_func], args=args,
                             **kwargs)
        self.beta = args.beta
        if self.target.reads_output_head:  # after TRL patched the forward with its fused log-prob head
            install_unfused_log_probs(self.target.model, temperature=self.temperature)
        if self.weight_sync is not None:
            self.weight_sync.install(self.vllm_generation)
        self.add_callback(_GradNormLogger(self))
        for callback in self.rollout.callbacks():
            self.add_callback(callback)
        checkpointing.check_trainer(args, self.accelerator)  # what TRL and accelerate decided from the args
        self.target.check_accelerator(self.accelerator)
        self._absorption = self._absorption_meter(args)

    def _absorption_meter(self, args: RoutedGRPOConfig) -> AbsorptionMeter | None:
        """The absorption metrics' meter (`route.targets.absorption`), when on and the target records per-row norms."""
        if not args.absorption_metrics:
            return None
        if not self.target.record_row_grads(True):
            warnings.warn(f"absorption_metrics: the {self.target.name!r} target does not record per-row gradient "
                          "norms; no absorption/* metrics are logged (see docs/absorption.md)", stacklevel=3)
            return None
        return AbsorptionMeter(self.env.modes, args.detector_modes)

    def _install_checkpointing(self, args: RoutedGRPOConfig) -> None:
        """Every gradient-checkpointing enable on the model re-applies the gate in the recompute (or is refused)."""
        checkpointing.check_config(args, self.target)
        checkpointing.install(self.target.model, self.target)
        self._checkpoint_layers = checkpointing.checkpoint_layers(self.target.model)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            a = self.args
            self.optimizer = build_optimizer(
                self.target.param_groups(), lr=a.learning_rate, weight_decay=a.weight_decay,
                betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon,
                lr_scale={"quarantine": a.quarantine_lr_ratio}, split_moments=a.split_moments)
        return self.optimizer

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list):
        # HF generate samples inside the plan's context; vLLM samples from the weights `weight_sync` pushed (a weight
        # merge is not affected by forward hooks, so the context alone would not make vLLM deployed)
        plan = self._plan if self._plan is not None else self.rollout.begin(self, len(prompts))[0]  # a direct call
        with self.rollout.generating(self, plan):
            return super()._generate(prompts)

    # ------------------------------------------------------------------ flags and modes
    def routing_modes(self, flags: list[bool], rollout_ids: list[str],
                      candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Per-rollout routing codes from flags (`route.trainer.policy.routing_modes` with this run's settings;
        `candidates`: the target's `routing_candidates(flags)`, asked for here when not given)."""
        a = self.args
        if candidates is None:
            candidates = self.target.routing_candidates(flags, a.intervention)
        return routing_modes(flags, rollout_ids, intervention=a.intervention, unflagged_mode=a.unflagged_mode,
                             retain_fraction=a.retain_fraction, seed=a.detector_seed, candidates=candidates,
                             routing=a.routing)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from accelerate.utils import gather_object

        if self._routing is not None:
            raise RuntimeError("routing: the previous batch's routing was never consumed by "
                               "_generate_and_score_completions (TRL's call order changed?)")
        offset = self.accelerator.process_index * len(inputs)
        step = self.state.global_step
        rollout_ids = [f"{x.get('prompt_id', 'p')}|s{step}|r{offset + i}" for i, x in enumerate(inputs)]
        columns = {k: [x[k] for x in inputs] for k in inputs[0]}
        grades = self.env.grade(prompts, completions, **columns)
        context = {"prompts": prompts, "completions": completions, "columns": columns}
        flags = call_detector(self.detector, grades, rollout_ids, **context)
        parts = detector_parts(self.detector, grades, rollout_ids, **context)  # the monitor's conditions, if any
        candidates = self.target.routing_candidates(flags, self.args.intervention)
        modes = self.routing_modes(flags, rollout_ids, candidates)
        if self._plan is not None:  # coherence slots: retain mode
            modes, candidates = self.rollout.route(modes, candidates, self._plan)
        self._routing = _PendingRouting(
            modes=modes, flags=torch.tensor([bool(f) for f in flags], dtype=torch.bool),
            exploited=torch.tensor([bool(g.exploited) for g in grades], dtype=torch.bool),
            candidates=torch.zeros(len(flags), dtype=torch.bool) if candidates is None else candidates.bool(),
            hack_mode=hack_mode_codes(grades, self.env.modes))

        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        all_grades, all_flags = gather_object(grades), gather_object(flags)
        if self.args.intervention == "penalty":
            penalize_rewards(rewards_per_func, all_flags, self.args.penalty, float(self.reward_weights[0]))
        metrics = self._metrics["train" if self.model.training else "eval"]
        log_routing(metrics, all_grades, all_flags, gather_object(modes.tolist()),
                    gather_object(parts) if parts is not None else None, self.env.modes,
                    exclusive=self.args.routing == "exclusive")
        monitor_flags = getattr(self.detector, "monitor_flags", None)  # a flag control's real monitor
        if monitor_flags is not None:
            log_monitor(metrics, all_grades, gather_object(monitor_flags))
        if self._plan is not None and self.model.training:
            self.rollout.observe(all_flags, self._plan, self._metrics["train"])
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        # With vLLM's IS correction on, TRL's scoring forward is the numerator of its ratio against the sampling
        # log-probs, so it must run as the policy that sampled (`route.trainer.rollout.RolloutSampler.scoring_scale`)
        if self._score_scale is not None and model is self.model:
            with sampling_context(self.target, self._score_scale):
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        self._plan, score_scale = self.rollout.begin(self, len(inputs))  # who samples this batch, who scores it
        self._score_scale = None if score_scale == 1.0 else score_scale
        train_scale = self.rollout.train_scale(self._plan)
        try:
            with portable_sqrt_in(grpo_trainer, "nanstd"):  # the advantages' std: route.utils.kernels
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._score_scale, self._plan = None, None
        if self._routing is None:
            raise RuntimeError("routing: rewards were not computed for this batch (RoutedGRPOTrainer."
                               "_calculate_rewards did not run inside _generate_and_score_completions; TRL's call "
                               "order changed?)")
        routing, self._routing = self._routing, None
        device = output["advantages"].device
        modes = routing.modes.to(device)
        output.update({"routing_modes": modes, "routing_flags": routing.flags.to(device),
                       "routing_exploited": routing.exploited.to(device),
                       "routing_candidates": routing.candidates.to(device),
                       "routing_hack_mode": routing.hack_mode.to(device)})
        if self.args.intervention == "filter":
            output["advantages"] = filter_advantages(output["advantages"], routing.flags)
        # TRL scored every row as one policy: ungated (= default and forget rows) or ablated (= retain rows), or
        # scaled (= no row's gate)
        if train_scale != 1.0:  # rows train at the scale that sampled them (`rollout_train_scale: sampled`)
            output["routing_scale"] = torch.full(modes.shape, train_scale, device=device)
        if "old_per_token_logps" in output and not bool(scored_as_gate(modes, score_scale, train_scale).all()):
            output["old_per_token_logps"] = self._gated_logps(output, modes, train_scale)
        return output

    @torch.no_grad()
    def _gated_logps(self, output: dict, modes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Per-token log-probs of the batch under the same per-row gate (at quarantine `scale`) as the training forward.

        Chunked like TRL's own scoring forward (`per_device_train_batch_size` rows), each chunk with its rows' modes.
        """
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        chunk = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        logps = []
        for start in range(0, ids.size(0), chunk):
            rows = slice(start, start + chunk)
            with self.target.gate(modes[rows], scale):
                lp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids[rows], mask[rows],
                                                                   output["completion_ids"].size(1))
            logps.append(lp)
        return torch.cat(logps, dim=0)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        missing = [c for c in ROUTING_COLUMNS if c not in inputs]
        if missing:
            raise KeyError(f"{', '.join(missing)} missing from the batch: was it produced by RoutedGRPOTrainer?")
        modes = inputs["routing_modes"]
        self._loss_rows = RoutingRows(modes=modes, flags=inputs["routing_flags"], exploited=inputs["routing_exploited"],
                                      candidates=inputs["routing_candidates"],
                                      hack_mode=inputs.get("routing_hack_mode"))
        checkpointing.verify(self._checkpoint_layers, self.target)
        scale = inputs.get("routing_scale")  # one scale per generation batch
        with self.target.gate(modes, None if scale is None else float(scale[0])):
            return super()._compute_loss(model, inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._loss_rows = None
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._loss_rows is not None:
            rows = self._loss_rows
            norms = self.target.pop_row_grads() if self._absorption is not None else None
            if norms is not None:  # before the target's hook, which may act on the same backward's rows
                self._absorption.add(norms, rows.flags, rows.exploited, rows.hack_mode)
            self.target.after_backward(rows)
            self._loss_rows = None
        if self.accelerator.sync_gradients:
            many = self.accelerator.num_processes > 1
            reduce = (lambda t, op: self.accelerator.reduce(t, reduction=op)) if many else None
            if self._absorption is not None:
                for key, value in self._absorption.metrics(reduce, self.accelerator.device).items():
                    self._metrics["train"][key].append(value)
            for key, value in self.target.before_optimizer_step(reduce).items():
                self._metrics["train"][key].append(value)
            if self.args.split_moments:  # before the trainer clips: the base of the shared clip coefficient
                unwrap_optimizer(self.optimizer).note_preclip()
        return loss

    # ------------------------------------------------------------------ resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load every adapter of a PEFT target in place. Trainer's own PEFT path reloads only the first active adapter
        as trainable and then activates it alone, which would silently drop the quarantine from every forward; here
        the parameters keep their identity (the optimizer's groups), their trainability and the active set."""
        from pathlib import Path

        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        model = model if model is not None else self.model
        if not isinstance(model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in model.peft_config:
            folder = Path(resume_from_checkpoint) / ("" if name == "default" else name)
            path = folder / "adapter_model.safetensors"
            if not path.is_file():
                raise ValueError(f"resume_from_checkpoint: {path} missing (adapter {name!r} of this target)")
            result = set_peft_model_state_dict(model, load_file(path), adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"resume_from_checkpoint: {path} does not match this target's adapter {name!r} "
                                 f"(unexpected keys {result.unexpected_keys[:3]})")

    # ------------------------------------------------------------------ deployment
    def save_deployed(self, output_dir: str | None = None) -> str:
        """Save the deployed policy (quarantine ablated, kept adapter merged) as a plain transformers checkpoint."""
        output_dir = output_dir or f"{self.args.output_dir}/deployed"
        if self.accelerator.is_main_process:
            with atomic_dir(output_dir) as tmp:
                self.target.save_deployed(str(tmp), tokenizer=self.processing_class)
        self.accelerator.wait_for_everyone()
        return output_dir
